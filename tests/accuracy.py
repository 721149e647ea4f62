"""The accuracy rule of fastllm's tests, in one place.

A kernel's result in dtype D is compared with a float64 reference computed from the same
(D-valued) inputs. Its maximum error must be at most twice PyTorch's own maximum error in
D (torch's op run in D against the same reference) plus a small absolute slack that only
covers the float32 rounding of values near zero.
"""

from __future__ import annotations

import torch

# Slack added to 2x torch's own error, per dtype. Not a tolerance on its own.
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def assert_within_torch_error(name: str, ours, theirs, ref, dtype: torch.dtype) -> None:
    """ours/theirs/ref: tensors (or None together)."""
    if ref is None:
        assert ours is None, f"{name}: expected no gradient, got one"
        return
    assert ours is not None, f"{name}: gradient missing"
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = max_err(ours, ref)
    torch_err = max_err(theirs, ref)
    bound = 2 * torch_err + ATOL[dtype]
    assert err <= bound, (
        f"{name} ({dtype}): max error {err:.3g} > 2 x torch's {torch_err:.3g} + {ATOL[dtype]:g}"
    )
