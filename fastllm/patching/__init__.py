"""``fastllm.patch(model)``: fastllm's kernels in a model you already have, per instance,
reversible, nothing global.

    handle = fastllm.patch(model)          # or: with fastllm.patch(model): ...
    print(handle.report)                   # what was replaced, what was left alone and why
    handle.undo()                          # every original module, method and attribute back

What it does, by switch (each ``True`` by default):

- ``attention``: Hugging Face models switch to the ``"fastllm"`` attention implementation
  (registered in transformers' ``AttentionInterface`` / ``AttentionMaskInterface``; see
  :mod:`fastllm.integrations.transformers`) with ``set_attn_implementation``;
  ``torch.nn.MultiheadAttention`` becomes ``fastllm.nn.MultiheadAttention``.
- ``norm``: ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` become fastllm's drop-ins;
  Hugging Face's LLaMA / Mistral / Qwen2 ``*RMSNorm`` become ``fastllm.nn.RMSNorm``.
- ``rotary``: LLaMA / Mistral / Qwen2 attention modules rotate q and k in one fused pass (a
  per-instance ``forward``; the cache update and attention call stay transformers').
- ``mlp``: LLaMA / Mistral / Qwen2 MLPs become ``fastllm.nn.GatedMLP`` (same projection
  modules, LoRA wrappers included; the activation and product fused).
- ``cross_entropy``: ``torch.nn.CrossEntropyLoss`` becomes fastllm's; Hugging Face causal-LM
  models get fastllm's cross-entropy as their per-instance ``loss_function`` (honouring
  ``num_items_in_batch``) and, in training with ``labels``, the loss fused into the LM head:
  **logits are None** in that forward (they are never formed; that is the memory saving).
  ``patch(model, keep_logits=True)`` keeps them (transformers' forward, fastllm's loss on
  its logits); evaluation (``model.eval()``) and calls without labels always return logits.

Swapped modules keep their parameters (the same objects), buffers, hooks and training flag,
so ``state_dict`` keys and values, optimizers and ``save_pretrained`` are unaffected.
Refused, before anything changes: a ``transformers`` version outside the tested range, a
Hugging Face model family fastllm has no table for. Patching a patched model again warns and
returns the existing handle.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastllm import nn as fnn
from fastllm.patching import hf
from fastllm.patching.swap import as_subclass, named_children_everywhere, rebuild

logger = logging.getLogger(__name__)

_MARKER = "_fastllm_patch"

# torch module (exact type) -> (switch, fastllm drop-in, attributes only the drop-in has)
_DROP_INS: dict[type, tuple[str, type, dict]] = {
    torch.nn.LayerNorm: ("norm", fnn.LayerNorm, {}),
    torch.nn.RMSNorm: ("norm", fnn.RMSNorm, {}),
    torch.nn.MultiheadAttention: ("attention", fnn.MultiheadAttention, {}),
    torch.nn.CrossEntropyLoss: ("cross_entropy", fnn.CrossEntropyLoss, dict(
        z_loss=0.0, softcap=0.0, inplace_backward=False, return_z_loss=False,
        return_token_accuracy=False)),
}


@dataclass
class PatchReport:
    """``replaced``: (kind, qualified module name) per change; ``skipped``: (kind, qualified
    name, reason) per module left alone. ``str(report)`` is a table with counts."""

    replaced: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(kind for kind, _ in self.replaced))

    def __str__(self) -> str:
        lines = ["fastllm.patch report", "replaced:"]
        by_kind: dict[str, list[str]] = {}
        for kind, name in self.replaced:
            by_kind.setdefault(kind, []).append(name)
        for kind, names in by_kind.items():
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            lines.append(f"  {kind:<14} x{len(names):<4} {shown}")
        if not self.replaced:
            lines.append("  (nothing)")
        lines.append("left alone:")
        for kind, name, reason in self.skipped:
            lines.append(f"  {kind:<14} {name or '<model>'}: {reason}")
        if not self.skipped:
            lines.append("  (nothing)")
        return "\n".join(lines)


class Patch:
    """The handle ``fastllm.patch`` returns: ``report``, ``undo()``, ``active``; a context
    manager that undoes on exit."""

    def __init__(self, model: torch.nn.Module, report: PatchReport,
                 undo_steps: list[Callable[[], None]]):
        self.model = model
        self.report = report
        self._undo_steps = undo_steps
        self.active = True

    def undo(self) -> None:
        """Restores every original module, method and attribute (in reverse order). A second
        call does nothing."""
        if not self.active:
            return
        for step in reversed(self._undo_steps):
            step()
        self._undo_steps = []
        self.active = False
        if self.model.__dict__.get(_MARKER) is self:
            del self.model.__dict__[_MARKER]

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.report.counts().items())
        return f"Patch({type(self.model).__name__}, {'active' if self.active else 'undone'}: {counts})"


class _Plan:
    """The changes, collected before any is made (so a refusal changes nothing)."""

    def __init__(self):
        self.steps: list[tuple[Callable[[], Callable[[], None]], str, str]] = []
        self.report = PatchReport()

    def add(self, do: Callable[[], Callable[[], None]], kind: str, name: str) -> None:
        self.steps.append((do, kind, name))

    def skip(self, kind: str, name: str, reason: str) -> None:
        self.report.skipped.append((kind, name, reason))


def _swap_child(parent: torch.nn.Module, child_name: str, new: torch.nn.Module):
    def do():
        old = parent._modules[child_name]
        parent._modules[child_name] = new

        def undo():
            parent._modules[child_name] = old
        return undo
    return do


def _set_instance_attr(obj, name: str, value):
    def do():
        had = name in obj.__dict__
        before = obj.__dict__.get(name)
        obj.__dict__[name] = value

        def undo():
            if had:
                obj.__dict__[name] = before
            else:
                obj.__dict__.pop(name, None)
        return undo
    return do


def _hf_models(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost Hugging Face PreTrainedModels under ``root`` (a PeftModel's base model,
    a ForCausalLM rather than the Model inside it)."""
    found, inside = [], set()
    for module in root.modules():
        if id(module) in inside or not hf.is_pretrained_model(module):
            continue
        found.append(module)
        inside.update(id(m) for m in module.modules())
    return found


def patch(model: torch.nn.Module, *, attention: bool = True, norm: bool = True,
          rotary: bool = True, mlp: bool = True, cross_entropy: bool = True,
          keep_logits: bool = False) -> Patch:
    """Patches ``model`` in place (see the module docstring) and returns the :class:`Patch`
    handle."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastllm.patch: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    existing = model.__dict__.get(_MARKER)
    if existing is not None and existing.active:
        warnings.warn("fastllm.patch: this model is already patched; returning its handle "
                      "(call handle.undo() first to patch with other switches)", stacklevel=2)
        return existing
    switches = dict(attention=attention, norm=norm, rotary=rotary, mlp=mlp,
                    cross_entropy=cross_entropy)
    plan = _Plan()
    hf_models = _hf_models(model)
    if hf_models:
        from fastllm.integrations import transformers as integration

        integration.check_version()
        for m in hf_models:
            if hf.model_type(m) not in hf.FAMILIES:
                raise ValueError(
                    f"fastllm.patch: {type(m).__name__} (model_type={hf.model_type(m)!r}) is a "
                    f"layout fastllm does not know; known: {sorted(hf.FAMILIES)}. Nothing was "
                    f"changed."
                )
        for m in hf_models:
            _plan_hf(plan, model, m, switches, keep_logits)
    _plan_modules(plan, model, switches)

    undo_steps: list[Callable[[], None]] = []
    try:
        for do, kind, name in plan.steps:
            undo_steps.append(do())
            plan.report.replaced.append((kind, name))
    except Exception:
        for step in reversed(undo_steps):
            step()
        raise
    handle = Patch(model, plan.report, undo_steps)
    model.__dict__[_MARKER] = handle
    logger.debug("%s", plan.report)
    return handle


# ----- Hugging Face models ---------------------------------------------------------------------

def _qualified(root: torch.nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in root.named_modules(remove_duplicate=True)}


def _plan_hf(plan: _Plan, root: torch.nn.Module, model: torch.nn.Module, switches: dict,
             keep_logits: bool) -> None:
    family = hf.FAMILIES[hf.model_type(model)]
    names = _qualified(root)
    model_name = names.get(id(model), "")

    if switches["attention"]:
        if not model._can_set_attn_implementation():
            plan.skip("attention", model_name, f"{type(model).__name__} does not dispatch "
                      "through transformers' AttentionInterface")
        else:
            plan.add(_switch_attention(model), "attention", model_name or type(model).__name__)

    for parent, child_name, child, qualified in named_children_everywhere(model):
        cls_name = type(child).__name__
        full = f"{model_name}.{qualified}" if model_name else qualified
        if switches["norm"] and cls_name in family.rms_norm:
            plan.add(_swap_child(parent, child_name, _rms_norm_from_hf(child)), "norm", full)
        elif switches["mlp"] and cls_name in family.gated_mlp:
            act = getattr(getattr(child, "config", None), "hidden_act", None)
            if act not in hf.GATED_ACTIVATIONS:
                plan.skip("mlp", full, f"hidden_act={act!r} has no fused activation")
            else:
                plan.add(_swap_child(parent, child_name, _gated_mlp_from_hf(
                    child, hf.GATED_ACTIVATIONS[act])), "mlp", full)
        if switches["rotary"] and cls_name in family.rotary_attention:
            plan.add(_rotary_forward(child, family.sliding_window_kwarg), "rotary", full)

    if switches["cross_entropy"]:
        if type(model).__name__ in family.causal_lm:
            plan.add(_set_instance_attr(model, "_loss_function", hf.causal_lm_loss_function),
                     "cross_entropy", f"{model_name or type(model).__name__}.loss_function")
            head = getattr(model, "lm_head", None)
            if keep_logits:
                plan.skip("cross_entropy", model_name, "keep_logits=True: the LM head forms "
                          "the logits; fastllm's loss runs on them")
            elif type(head) is not torch.nn.Linear or head.bias is not None:
                plan.skip("cross_entropy", model_name, f"lm_head is a {type(head).__name__}"
                          f"{' with a bias' if getattr(head, 'bias', None) is not None else ''}"
                          "; the loss runs on its logits (not fused)")
            else:
                plan.add(_set_instance_attr(model, "forward", _instance_forward(
                    hf.fused_causal_lm_forward, model)), "fused_lm_loss",
                    f"{model_name or type(model).__name__}.forward")
        else:
            plan.skip("cross_entropy", model_name,
                      family.notes or f"{type(model).__name__} has no causal-LM loss")


def _switch_attention(model):
    def do():
        from fastllm.integrations import transformers as integration

        integration.register()
        before = model.config._attn_implementation
        model.set_attn_implementation(integration.NAME)

        def undo():
            model.set_attn_implementation(before)
        return undo
    return do


def _instance_forward(func, module):
    """``func`` as ``module``'s bound forward, presenting the class forward's signature
    (transformers' ``generate`` reads it to decide which inputs, such as ``position_ids``
    from a left-padded mask, to pass) and accepting its positional arguments."""
    original = type(module).forward
    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values()
                        if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if args:  # name them as the class forward does
            named = dict(signature.bind_partial(self, *args, **kwargs).arguments)
            del named[next(iter(named))]  # self
            if var_keyword is not None:
                named.update(named.pop(var_keyword, {}))
            kwargs = named
        return func(self, **kwargs)

    forward.__fastllm_forward__ = func
    return types.MethodType(forward, module)


def _rms_norm_from_hf(old: torch.nn.Module) -> torch.nn.Module:
    def build():
        new = fnn.RMSNorm.__new__(fnn.RMSNorm)
        torch.nn.Module.__init__(new)
        new.normalized_shape = tuple(old.weight.shape)
        new.eps = float(old.variance_epsilon)
        new.elementwise_affine = True
        return new
    return rebuild(old, build, {"weight": old.weight}, {})


def _gated_mlp_from_hf(old: torch.nn.Module, activation: str) -> torch.nn.Module:
    def build():
        new = fnn.GatedMLP.__new__(fnn.GatedMLP)
        torch.nn.Module.__init__(new)
        new.hidden_size = old.down_proj.out_features if hasattr(old.down_proj, "out_features") \
            else old.hidden_size
        new.intermediate_size = old.intermediate_size
        new.activation = activation
        return new
    return rebuild(old, build, {}, {"gate_proj": old.gate_proj, "up_proj": old.up_proj,
                                    "down_proj": old.down_proj})


def _rotary_forward(module, sliding_window_kwarg: bool):
    set_forward = _set_instance_attr(module, "forward",
                                     _instance_forward(hf.rotary_attention_forward, module))
    set_flag = _set_instance_attr(module, "_fastllm_sliding_window_kwarg", sliding_window_kwarg)

    def do():
        undo_flag, undo_forward = set_flag(), set_forward()

        def undo():
            undo_forward()
            undo_flag()
        return undo
    return do


# ----- plain torch modules ---------------------------------------------------------------------

def _plan_modules(plan: _Plan, root: torch.nn.Module, switches: dict) -> None:
    """torch's LayerNorm / RMSNorm / MultiheadAttention / CrossEntropyLoss (exact types: a
    user's subclass may change the math) anywhere under root, Hugging Face models included."""
    swapped: dict[int, torch.nn.Module] = {}
    for parent, child_name, child, qualified in named_children_everywhere(root):
        entry = _DROP_INS.get(type(child))
        if entry is None:
            continue
        switch, cls, defaults = entry
        if not switches[switch]:
            continue
        if id(child) not in swapped:  # a module shared by two parents stays shared
            swapped[id(child)] = as_subclass(child, cls, defaults)
        plan.add(_swap_child(parent, child_name, swapped[id(child)]), switch, qualified)
