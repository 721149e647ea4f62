"""Reference cross-entropy (with label smoothing, class weights, z-loss and logit
soft-capping) and linear + cross-entropy, in plain PyTorch.

They compute in float32 (float64 for float64 inputs) and round the loss once to the input
dtype, which is what the fused kernels do, so they double as the accuracy yardstick in tests
and as the ``"reference"`` backend. Logits are ``(rows, vocab)``: the class dimension last.

Per row with target t (rows whose target is ``ignore_index`` contribute nothing):
    z     = softcap * tanh(x / softcap) if softcap > 0 else x
    lse   = logsumexp(z)
    loss  = (1 - ls) * w[t] * (lse - z[t]) + ls * sum_c w[c] * (lse - z[c]) / V + z_loss * lse^2
with w = weight, or ones. reduction="mean" divides the sum by sum_rows w[t] over the
non-ignored rows (the row count without weights), exactly as torch's cross_entropy does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def cross_entropy_ref(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
) -> Tensor:
    """logits (N, V), target (N,) int64 -> loss () or (N,) in logits' dtype."""
    vocab = logits.shape[-1]
    z = logits.to(_acc(logits))
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    log_probs = z - lse.unsqueeze(-1)  # (N, V)
    w = torch.ones(vocab, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)

    valid = target != ignore_index  # (N,)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    w_t = w[safe_target] * valid  # (N,), 0 on ignored rows
    nll = -log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1) * w_t
    smooth = -(log_probs * w).sum(dim=-1) / vocab * valid
    per_row = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse.square() * valid

    if reduction == "none":
        loss = per_row
    elif reduction == "sum":
        loss = per_row.sum()
    elif reduction == "mean":
        loss = per_row.sum() / w_t.sum()  # 0 / 0 = nan when every row is ignored, as in torch
    else:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return loss.to(logits.dtype)


def linear_cross_entropy_ref(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor] = None,
    *options,
    **kw_options,
) -> Tensor:
    """The unfused composition: ``cross_entropy_ref(linear(input), target, *options)``, with
    input (N, H), linear_weight (V, H), linear_bias (V,) and the options of cross_entropy_ref
    after its target (weight, ignore_index, reduction, label_smoothing, z_loss, softcap)."""
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)  # (N, V)
    return cross_entropy_ref(logits, target, *options, **kw_options)
