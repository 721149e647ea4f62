"""Module swaps that keep everything a user attached to the original module.

A swap puts a fastllm module where the original sat in its parent (``parent._modules[name]``)
and keeps, by reference, the original's parameters and buffers (same ``Parameter`` objects:
devices, dtypes, ``requires_grad``, optimizer state and PEFT wrappers stay valid), its hooks
(the same hook dictionaries: forward / pre-forward / backward / state-dict hooks registered
before the swap keep firing), its ``training`` flag and its plain attributes (``config``,
``variance_epsilon``, ...). ``state_dict`` keys and values are therefore unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch

# attributes torch.nn.Module keeps per instance that must be new dictionaries (not shared)
_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def _hook_dicts(module: torch.nn.Module) -> dict[str, Any]:
    return {k: v for k, v in module.__dict__.items()
            if "hook" in k and isinstance(v, (dict, OrderedDict))}


def as_subclass(old: torch.nn.Module, cls: type, defaults: dict[str, Any]) -> torch.nn.Module:
    """``old`` (an instance of a torch module) as an instance of ``cls``, a fastllm subclass of
    old's class: the same state (containers copied, their contents shared), hooks shared,
    plus ``defaults`` for the attributes only the subclass has."""
    new = cls.__new__(cls)
    state = dict(old.__dict__)
    for name in _CONTAINERS:
        if name in state:
            state[name] = type(state[name])(state[name])
    new.__dict__.update(state)
    for k, v in defaults.items():
        new.__dict__.setdefault(k, v)
    return new


def rebuild(old: torch.nn.Module, build: Callable[[], torch.nn.Module],
            parameters: dict[str, Any], modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """A new module from ``build()`` (constructed on the meta device, or empty) that takes
    ``parameters`` and ``modules`` from ``old`` by reference, old's hooks, training flag and
    plain attributes it lacks."""
    new = build()
    for name, p in parameters.items():
        new._parameters[name] = p
    for name, m in modules.items():
        new._modules[name] = m
    for k, v in _hook_dicts(old).items():
        new.__dict__[k] = v
    new.training = old.training
    for k, v in old.__dict__.items():
        if not k.startswith("_") and k not in new.__dict__ and k != "training":
            new.__dict__[k] = v
    return new


def named_children_everywhere(root: torch.nn.Module):
    """(parent, child name, child, qualified name) for every child slot under ``root``,
    each parent once (a module shared by two parents is listed under each)."""
    seen = set()
    for parent_name, parent in root.named_modules(remove_duplicate=False):
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        for name, child in parent._modules.items():
            if child is not None:
                yield parent, name, child, f"{parent_name}.{name}" if parent_name else name
