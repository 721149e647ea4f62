"""Reference cross-entropy (with label smoothing, class weights, z-loss and logit
soft-capping) and linear + cross-entropy, in plain PyTorch.

They compute in float32 (float64 for float64 inputs) and round the loss once to the input
dtype, which is what the fused kernels do, so they double as the accuracy yardstick in tests
and as the ``"reference"`` backend. Logits are ``(rows, vocab)``: the class dimension last.

Per row with target t (rows whose target is ``ignore_index`` contribute nothing):
    z     = softcap * tanh(x / softcap) if softcap > 0 else x
    lse   = logsumexp(z)
    ce    = (1 - ls) * w[t] * (lse - z[t]) + ls * sum_c w[c] * (lse - z[c]) / V
    loss  = ce + z_loss * lse^2
with w = weight, or ones. reduction="mean" is sum(ce) / sum_rows w[t] (torch's weighted
mean; the row count without weights) plus z_loss * sum(lse^2) / (the number of non-ignored
rows): the z-loss is averaged over the tokens, never weighted by the class weights (PaLM,
Liger-Kernel). Terms are added only when enabled (ls > 0, z_loss > 0), so that a disabled
term cannot turn an infinite log-sum-exp into 0 * inf = NaN.

Outputs training loops log (``return_z_loss`` / ``return_token_accuracy``):
    z_term   = z_loss * lse^2 per non-ignored row, reduced like the loss: none -> per row,
               sum -> sum, mean -> divided by the number of non-ignored rows (the z part of
               the mean above, whatever the class weights)
    correct  = z[t] == max_c z_c and z[t] finite (the target is a top-1 class; ties count
               as correct, where ``argmax(-1) == t`` would pick the first maximum; a NaN in
               the row fails the comparison), False on ignored rows
    accuracy = per row (float, 0 on ignored rows) for none; sum(correct) / (non-ignored
               rows) for mean and sum (NaN when every row is ignored, like the mean loss).

A target that is neither ``ignore_index`` nor in ``[0, V)`` gives its row a NaN loss (what
the CUDA kernels do; on CPU tensors the public functions raise before getting here) and is
never used as an index.
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
    *,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
):
    """logits (N, V), target (N,) int64 -> loss () or (N,) in logits' dtype; with either
    flag, (loss, z_term or None, accuracy or None): z_term in logits' dtype, accuracy in
    float32 (float64 for float64 logits), both reduced as described at the top."""
    vocab = logits.shape[-1]
    z = logits.to(_acc(logits))
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    # torch's log_softmax (max subtracted first): z - logsumexp(z) would lose the digits of
    # logits that share a large offset, and turn a row with a +inf logit into -inf / NaN
    # differently from torch.
    log_probs = torch.log_softmax(z, dim=-1)  # (N, V)
    w = torch.ones(vocab, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)

    valid = target != ignore_index  # (N,)
    in_range = (target >= 0) & (target < vocab)
    safe_target = torch.where(valid & in_range, target, torch.zeros_like(target))
    w_t = torch.where(valid, w[safe_target], 0.0)  # (N,)
    ce = -log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1) * w_t
    if label_smoothing > 0:
        smooth = -(log_probs * w).sum(dim=-1) / vocab
        ce = (1 - label_smoothing) * ce + label_smoothing * smooth
    # where(), not a product with the mask: an ignored row's infinite terms must not give NaN.
    ce = torch.where(valid, torch.where(in_range, ce, torch.nan), 0.0)
    z_term = None
    if z_loss > 0:
        z_term = torch.where(valid, z_loss * torch.logsumexp(z, dim=-1).square(), 0.0)

    if reduction == "none":
        loss = ce if z_term is None else ce + z_term
    elif reduction == "sum":
        loss = ce.sum() if z_term is None else ce.sum() + z_term.sum()
    elif reduction == "mean":
        loss = ce.sum() / w_t.sum()  # 0 / 0 = nan when every row is ignored, as in torch
        if z_term is not None:
            loss = loss + z_term.sum() / valid.sum()
    else:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    loss = loss.to(logits.dtype)
    if not (return_z_loss or return_token_accuracy):
        return loss
    n_valid = valid.sum().to(z.dtype)
    z_out = accuracy = None
    if return_z_loss:
        z_rows = torch.zeros_like(ce) if z_term is None else z_term
        z_out = z_rows if reduction == "none" else z_rows.sum()
        if reduction == "mean":
            z_out = z_out / n_valid
        z_out = z_out.detach().to(logits.dtype)
    if return_token_accuracy:
        z_t = z.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
        correct = valid & in_range & (z_t == z.max(dim=-1).values) & torch.isfinite(z_t)
        accuracy = correct.to(z.dtype)
        if reduction != "none":
            accuracy = accuracy.sum() / n_valid
    return loss, z_out, accuracy


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
