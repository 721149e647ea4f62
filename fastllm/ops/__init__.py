"""Op layer: one module per op family (its public functions, the fake and autograd rules
of its custom ops, its Triton ops), on the shared wiring of fastllm/ops/_family.py.

``FAMILIES`` maps each family's name to its :class:`~fastllm.ops._family.OpFamily`.
"""

from fastllm.ops import (  # noqa: F401
    attention,
    cross_entropy,
    gated_mlp,
    linear_cross_entropy,
    norm,
    rotary,
)

FAMILIES = {
    "norm": norm.IMPLS,
    "cross_entropy": cross_entropy.IMPLS,
    "attention": attention.IMPLS,
    "gated_mlp": gated_mlp.IMPLS,
    "rotary": rotary.IMPLS,
}
