"""Parameter-efficient fine-tuning of fastllm's models: LoRA and AdaLoRA through the ``peft``
library, and Houlsby-style bottleneck adapters written here.

- ``lora``: ``peft.LoraConfig`` on :data:`DEFAULT_TARGETS` of the model family (the names are
  Hugging Face's, which fastllm's models keep), the classification head (``classifier`` for
  BERT, ``score`` for the decoder heads) trained whole through ``modules_to_save``.
- ``adalora``: ``peft.AdaLoraConfig`` with ``total_step`` = the run's steps. AdaLoRA only
  prunes ranks when ``update_and_allocate(step)`` is called after every optimizer step
  (before the gradients are cleared): :func:`adalora_hook` gives the loop's
  ``after_optimizer_step``; without it AdaLoRA silently stays a plain LoRA of rank ``init_r``.
- ``adapter``: a bottleneck (down projection, GELU, up projection initialised to zero,
  residual) after each block's attention-output and MLP-output projection
  (:data:`ADAPTER_SITES`); only the adapters (and a classification head) train. The
  model's function is unchanged at initialisation (the up projection is zero).
- ``none``: every parameter trains.

``merge`` folds LoRA / AdaLoRA into the base weights (``merge_and_unload``), giving back the
plain fastllm model whose ``save_pretrained`` writes Hugging Face's layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

PEFT_MODES = ("none", "lora", "adalora", "adapter")

# family -> the Linear layers LoRA / AdaLoRA adapt by default (attention projections;
# GPT-2's fused qkv c_attn with the attention / MLP output projections and c_fc)
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bert": ["query", "key", "value"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
# family -> the projections a bottleneck adapter follows (block-relative module names)
ADAPTER_SITES: dict[str, str] = {
    "gpt2": r"\.h\.\d+\.(attn|mlp)\.c_proj$",
    "llama": r"\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)$",
    "bert": r"\.layer\.\d+\.(attention\.output|output)\.dense$",
    "bart": r"\.layers\.\d+\.(self_attn\.out_proj|encoder_attn\.out_proj|fc2)$",
}
HEADS = ("classifier", "score")  # the classification heads' module names


@dataclass
class PeftSettings:
    mode: str = "lora"
    r: int = 8  # LoRA rank; AdaLoRA's target average rank
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # None: DEFAULT_TARGETS of the family
    adalora_init_r: int = 12  # AdaLoRA's starting rank per matrix
    adapter_size: int = 64  # bottleneck width


def model_family(model: torch.nn.Module) -> str:
    """gpt2, llama, bert or bart for a fastllm model (or a classifier around one)."""
    from fastllm.models import GPT, EncoderDecoder, Llama
    from fastllm.models.bert import _BertPreTrainedModel

    inner = getattr(model, "base", model)
    if isinstance(inner, GPT):
        return "gpt2"
    if isinstance(inner, Llama):
        return "llama"
    if isinstance(inner, _BertPreTrainedModel):
        return "bert"
    if isinstance(inner, EncoderDecoder):
        return "bart"
    raise TypeError(f"no fine-tuning support for {type(inner).__name__}")


def _heads(model: torch.nn.Module) -> list[str]:
    return [h for h in HEADS if isinstance(getattr(model, h, None), torch.nn.Module)]


class BottleneckAdapter(torch.nn.Module):
    """``proj`` followed by a bottleneck with a residual: ``y = p + up(gelu(down(p)))`` with
    ``p = proj(x)``. ``up`` starts at zero, so the wrapped layer starts as ``proj``."""

    def __init__(self, proj: torch.nn.Linear, size: int):
        super().__init__()
        self.proj = proj
        C = proj.out_features
        self.adapter_down = torch.nn.Linear(C, size, device=proj.weight.device,
                                            dtype=proj.weight.dtype)
        self.adapter_up = torch.nn.Linear(size, C, device=proj.weight.device,
                                          dtype=proj.weight.dtype)
        torch.nn.init.normal_(self.adapter_down.weight, 0.0, 0.02)
        torch.nn.init.zeros_(self.adapter_down.bias)
        torch.nn.init.zeros_(self.adapter_up.weight)
        torch.nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: Tensor) -> Tensor:
        p = self.proj(x)  # (..., C)
        return p + self.adapter_up(F.gelu(self.adapter_down(p)))


def add_bottleneck_adapters(model: torch.nn.Module, family: str, size: int) -> list[str]:
    """Wraps every :data:`ADAPTER_SITES` projection of ``model`` in a
    :class:`BottleneckAdapter`, freezes everything but the adapters and any classification
    head; returns the wrapped modules' names."""
    pattern = re.compile(ADAPTER_SITES[family])
    sites = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and pattern.search("." + name)]
    if not sites:
        raise ValueError(f"no adapter sites ({ADAPTER_SITES[family]}) in {type(model).__name__}")
    for name in sites:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, BottleneckAdapter(getattr(parent, child), size))
    heads = tuple(f"{h}." for h in _heads(model))
    for name, p in model.named_parameters():
        p.requires_grad_(".adapter_" in name or name.startswith(heads))
    return sites


def apply_peft(model: torch.nn.Module, settings: PeftSettings, total_steps: int):
    """``model`` ready for fine-tuning with ``settings.mode`` (module docstring): a
    ``peft.PeftModel`` for lora / adalora, ``model`` itself (adapters inserted) otherwise.
    ValueError for a target module the model does not have."""
    family = model_family(model)
    if settings.mode == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if settings.mode == "adapter":
        add_bottleneck_adapters(model, family, settings.adapter_size)
        return model
    import peft

    targets = settings.target_modules or DEFAULT_TARGETS[family]
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in targets if t not in names and not any(
        n.endswith(t) for n, _ in model.named_modules())]
    if unknown:
        raise ValueError(f"--target-modules {unknown} are not Linear layers of this "
                         f"{family} model; its Linear layers are {sorted(names)}")
    common = dict(target_modules=targets, lora_alpha=settings.alpha,
                  lora_dropout=settings.dropout, modules_to_save=_heads(model) or None)
    if settings.mode == "lora":
        config = peft.LoraConfig(r=settings.r, **common)
    else:
        tinit = total_steps // 10
        tfinal = max(1, total_steps // 5)
        if total_steps - tfinal <= tinit:
            raise ValueError(f"--peft adalora needs more --steps to prune ranks (got "
                             f"{total_steps}: at least 2)")
        config = peft.AdaLoraConfig(init_r=settings.adalora_init_r, target_r=settings.r,
                                    tinit=tinit, tfinal=tfinal, deltaT=1,
                                    total_step=total_steps, **common)
    return peft.get_peft_model(model, config)


def adalora_hook(peft_model) -> Callable[[int], None]:
    """The loop's ``after_optimizer_step``: AdaLoRA's ``update_and_allocate(step)``."""
    def after_optimizer_step(step: int) -> None:
        peft_model.base_model.update_and_allocate(step)
    return after_optimizer_step


def adalora_ranks(peft_model) -> dict[str, int]:
    """The rank each AdaLoRA matrix keeps now: the non-zero entries of its ``lora_E``."""
    return {name: int((p != 0).sum()) for name, p in peft_model.named_parameters()
            if "lora_E" in name}


def adalora_state(peft_model) -> dict:
    """AdaLoRA's allocator state (importance averages) and rank pattern, for an exact resume."""
    alloc = peft_model.base_model.rankallocator
    config = peft_model.peft_config[peft_model.active_adapter]
    return {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt,
            "exp_avg_unc": alloc.exp_avg_unc, "rank_pattern": config.rank_pattern}


def load_adalora_state(peft_model, state: dict) -> None:
    alloc = peft_model.base_model.rankallocator
    alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (state["ipt"], state["exp_avg_ipt"],
                                                       state["exp_avg_unc"])
    peft_model.peft_config[peft_model.active_adapter].rank_pattern = state["rank_pattern"]


def merge(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """The plain fastllm model with LoRA / AdaLoRA folded into its weights (and the trained
    copy of a ``modules_to_save`` head in place); ``model`` itself for ``none``."""
    if mode == "none":
        return model
    if mode == "adapter":
        raise ValueError("bottleneck adapters cannot be merged into the weights")
    return model.merge_and_unload()


def count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
