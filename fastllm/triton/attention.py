"""FlashAttention-2 in Triton: forward and backward kernels over (B, T, heads, D) tensors and
their launchers.

Math (csrc/attention/attention.h is the contract; this is its Triton backend), per batch b,
query head h, kv head hk = h // (H // Hkv), query row i, key j, arithmetic in float32:
    s_ij  = softmax_scale * <q_i, k_j>
    s_ij <- softcap * tanh(s_ij / softcap)                 when softcap > 0
    s_ij -= slope_{b,h} * |i + Tk_b - Tq_b - j|            ALiBi, when slopes are given
    s_ij += attn_bias[b, h, i, j]                          when a bias is given (-inf allowed)
    s_ij  = -inf unless lo(i) <= j <= hi(i), j < Tk_b      (bottom-right aligned window;
            and key_padding_mask[b, j]                      causal caps window_right at 0)
    lse_i = log sum_j exp(s_ij),  p_ij = exp(s_ij - lse_i),  out_i = sum_j z_ij p_ij v_j
with z_ij = keep_ij / (1 - dropout_p) under dropout (1 otherwise); keep_ij is attention.h's
integer hash of (seed, b, h, i, j), computed here in uint32 so that the mask is bit-for-bit
the one of the CUDA and CPU kernels and of fastllm/reference/attention.py.
Backward, with D_i = <dout_i, out_i>:
    dv_j = sum_{h in group, i} z_ij p_ij dout_i
    ds_ij = p_ij (z_ij <dout_i, v_j> - D_i)   (times 1 - tanh^2 of the cap when soft-capping)
    dq_i = softmax_scale * sum_j ds_ij k_j,  dk_j = softmax_scale * sum_{h in group, i} ds_ij q_i
    dbias_ij = p_ij (z_ij <dout_i, v_j> - D_i)  (ds before the cap's derivative), when asked
A row with no allowed key (masked, or every score -inf through the bias) gets out = 0,
lse = -inf and zero gradients, never NaN: the running max is replaced by 0 while it is -inf,
and backward reads lse = -inf as +inf, which makes every p of the row 0.

Kernels (FlashAttention-2's work split, the scores never touch memory):
    attention_fwd_kernel      one program per (BLOCK_M query rows, query head, batch). It
        streams the allowed key blocks once, keeping the running max m_i, the running sum
        l_i of exp(s - m_i) and the unnormalised output, all rescaled when m_i grows (online
        softmax, in base 2: exp2 with log2(e) folded into the scores).
    attention_bwd_preprocess_kernel  D_i = rowsum(dout * out), float32, laid out like lse.
    attention_bwd_dkdv_kernel one program per (BLOCK_N keys, kv head, batch): for each query
        head of the GQA group, streams the query blocks that can see these keys and
        accumulates dk and dv in registers, so the group sum needs no atomics and no
        (B, Tk, H, D) buffer, and dk, dv are written once.
    attention_bwd_dq_kernel   one program per (BLOCK_M query rows, query head, batch),
        streaming the key blocks like the forward. Splitting dq from dk/dv recomputes the
        scores twice but, again, needs no atomics: gradients are deterministic. It also
        writes dbias: it visits each (b, h, i, j) once, in rows along j (coalesced).
Only the key (or query) blocks that intersect the causal / sliding window band are visited,
and, with a padding mask, those between the row's first and last live key (the forward and
dq scan the mask row first: right / left padding costs nothing); dk / dv skip a key block
without live keys. The element mask is applied in every visited block.

Variants, selected by constexpr flags: IS_VARLEN_Q / IS_VARLEN_K (packed sequences with
cu_seqlens; independent, so packed queries can attend to a padded KV cache), HAS_SEQUSED_K,
HAS_WINDOW_LEFT / HAS_WINDOW_RIGHT (causal is a right window of 0), HAS_SOFTCAP, HAS_ALIBI,
HAS_DROPOUT, HAS_BIAS, HAS_KPM (padded inputs only: the glue refuses packed ones with masks)
and HAS_DBIAS (dq kernel); a flag that is off compiles its code out. fp32 inputs use IEEE
float32 dot products (no TF32: the tests hold the kernels to twice PyTorch's own float32
error); fp16 / bf16 feed the tensor cores with fp32 accumulation, p and ds rounded to the
input dtype before their dot products, as in FlashAttention.

Shapes: B batch, Tq / Tk query / key lengths (the maxima max_seqlen_q / max_seqlen_k for packed
inputs), H query heads, Hkv kv heads (H % Hkv == 0), D head dim (any D <= 256, padded to
BLOCK_D = the next power of two >= 16 with masked loads). q, out, dout, dq (B, Tq, H, D) or
packed (total_q, H, D); k, v, dk, dv (B, Tk, Hkv, D) or packed (total_k, Hkv, D); any strides.
lse and D_i float32 (B, H, Tq) or packed (H, total_q); cu_seqlens_* int32 (B + 1,);
seqused_k int32 (B,); alibi_slopes float32 (H,) or (B, H); dropout_seed int64 (1,);
attn_bias (B, H, Tq, Tk) in q's dtype, any strides (a broadcast dim is a stride-0 view);
key_padding_mask bool (B, Tk), True = the key takes part, read as its uint8 view; dbias
(B, H, Tq, Tk) contiguous in q's dtype, zeroed here (what dq does not write is masked: 0).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fastllm.triton._common import interpreted, round_to_dtype, tanh

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

MAX_HEAD_DIM = 256


# ---- shared pieces -------------------------------------------------------------------------


@triton.jit
def _dropout_mix(x):
    """attention.h's dropout_mix ("lowbias32" mixer) on uint32: wrapping multiplies."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _dropout_head_key(seed_ptr, batch, head, num_heads):
    """attention.h's dropout_head_key: mixes the int64 seed's halves and b * H + h."""
    seed = tl.load(seed_ptr)
    seed_lo = seed.to(tl.uint32)  # truncation: the low 32 bits
    seed_hi = (seed >> 32).to(tl.uint32)
    key0 = _dropout_mix(seed_lo ^ _dropout_mix(seed_hi))
    return _dropout_mix(key0 ^ (batch * num_heads + head).to(tl.uint32))


@triton.jit
def _dropout_keep(head_key, rows, cols, threshold):
    """keep_ij for row positions `rows` and column positions `cols` (broadcastable int32
    tensors, positions inside the sequence): the row key, the column key, one more mix."""
    row_key = _dropout_mix(head_key ^ rows.to(tl.uint32))
    col_key = _dropout_mix(cols.to(tl.uint32) ^ 0x9E3779B9)
    return _dropout_mix(row_key ^ col_key) >= threshold


@triton.jit
def _seq_bounds(cu_seqlens_ptr, batch, max_len, total, IS_VARLEN: tl.constexpr):
    """(first row in the packed tensor, length) of sequence `batch`; (0, max_len) if padded.
    The values are clamped to the `total` rows the tensor holds and to `max_len`: cu_seqlens
    on a GPU are not checked (that would need a host sync), and a bad one must give a wrong
    row, never an access outside the tensors."""
    if IS_VARLEN:
        start = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + batch), 0), total)
        end = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + batch + 1), start), total)
        length = tl.minimum(end - start, max_len)
    else:
        start = 0
        length = max_len
    return start, length


@triton.jit
def _keys_in_use(seqused_k_ptr, batch, stored_keys, HAS_SEQUSED_K: tl.constexpr):
    """The keys sequence `batch` attends to: seqused_k[batch] when given (a KV cache filled
    only so far), else all `stored_keys`."""
    if HAS_SEQUSED_K:  # clamped like _seq_bounds's values
        return tl.minimum(tl.maximum(tl.load(seqused_k_ptr + batch), 0), stored_keys)
    else:
        return stored_keys


@triton.jit
def _kv_slice(cu_seqlens_k_ptr, seqused_k_ptr, batch, head, group_size, max_seqlen_k, total_k,
              IS_VARLEN_K: tl.constexpr, HAS_SEQUSED_K: tl.constexpr):
    """(first row in k / v, keys in use, kv head) that query head `head` of sequence `batch`
    attends to."""
    k_start, seqlen_k = _seq_bounds(cu_seqlens_k_ptr, batch, max_seqlen_k, total_k, IS_VARLEN_K)
    seqlen_k = _keys_in_use(seqused_k_ptr, batch, seqlen_k, HAS_SEQUSED_K)
    return k_start, seqlen_k, head // group_size


@triton.jit
def _query_block_of_program(cu_seqlens_q_ptr, max_seqlen_q, total_q, BLOCK_M: tl.constexpr,
                            IS_VARLEN_Q: tl.constexpr):
    """(start_m, head, batch, q_start, seqlen_q) of a program of the query-block grid
    (cdiv(Tq, BLOCK_M), H, B) that the forward, the D_i preprocess and dq share."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2)
    q_start, seqlen_q = _seq_bounds(cu_seqlens_q_ptr, batch, max_seqlen_q, total_q, IS_VARLEN_Q)
    return start_m, head, batch, q_start, seqlen_q


@triton.jit
def _block_positions(start, length, BLOCK: tl.constexpr):
    """(positions start + [0, BLOCK), which of them are < length)."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < length


@triton.jit
def _head_slice_ptr(ptr, batch64, start, head, stride_b, stride_t, stride_h):
    """Pointer to row `start` of head `head` of sequence `batch64` (int64: B * stride_b can
    pass 2^31) of a (B, T, heads, D) or packed tensor."""
    return ptr + batch64 * stride_b + start.to(tl.int64) * stride_t + head * stride_h


@triton.jit
def _head_slope_and_dropout_key(alibi_ptr, stride_alibi_b, dropout_seed_ptr, batch, head,
                                num_heads, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """(ALiBi slope, dropout head key) of query head `head` of sequence `batch`; 0 for a
    feature that is off (a placeholder: compiled Triton cannot return None in a tuple)."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + batch * stride_alibi_b + head)
    head_key = 0
    if HAS_DROPOUT:
        head_key = _dropout_head_key(dropout_seed_ptr, batch, head, num_heads)
    return slope, head_key


@triton.jit
def _scores(
    qk,  # float32 q.k, any 2-D layout (rows / cols broadcast to it)
    rows,  # query positions i, int32, broadcastable to qk
    cols,  # key positions j, int32, broadcastable to qk
    seqlen_q,
    seqlen_k,
    softmax_scale,
    softcap,
    slope,
    window_left,
    window_right,
    bias,  # float32 attn_bias of the block (like qk), or a placeholder without HAS_BIAS
    live,  # bool, which keys take part (key_padding_mask, broadcastable), or a placeholder
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
):
    """(s in base 2, i.e. s * log2(e), -inf where masked; tanh of the cap). Without the cap
    the second value is a placeholder the callers ignore (compiled Triton cannot return None
    in a tuple)."""
    s = qk * softmax_scale
    cap_tanh = s
    if HAS_SOFTCAP:
        cap_tanh = tanh(s / softcap)
        s = softcap * cap_tanh
    diagonal = rows + (seqlen_k - seqlen_q)  # the key aligned with query i (bottom-right)
    if HAS_ALIBI:
        s -= slope * tl.abs(diagonal - cols).to(tl.float32)
    if HAS_BIAS:  # after the cap and ALiBi; a -inf bias excludes the key like a mask
        s += bias
    allowed = cols < seqlen_k
    if HAS_KPM:
        allowed &= live
    if HAS_WINDOW_LEFT:
        allowed &= cols >= diagonal - window_left
    if HAS_WINDOW_RIGHT:
        allowed &= cols <= diagonal + window_right
    return tl.where(allowed, s * LOG2E, float("-inf")), cap_tanh


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr,
               HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr):
    """[lo, hi): the keys that query rows [start_m, start_m + BLOCK_M) may see."""
    offset = seqlen_k - seqlen_q
    lo = 0
    hi = seqlen_k
    if HAS_WINDOW_LEFT:
        lo = tl.maximum(start_m + offset - window_left, 0)
    if HAS_WINDOW_RIGHT:
        hi = tl.minimum(start_m + BLOCK_M + offset + window_right, seqlen_k)
    return lo, hi


@triton.jit
def _query_range(start_n, seqlen_q, seqlen_k, window_left, window_right, BLOCK_N: tl.constexpr,
                 HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr):
    """[lo, hi): the query rows that may see keys [start_n, start_n + BLOCK_N)."""
    offset = seqlen_k - seqlen_q
    lo = 0
    hi = seqlen_q
    if HAS_WINDOW_RIGHT:
        lo = tl.maximum(start_n - offset - window_right, 0)
    if HAS_WINDOW_LEFT:
        hi = tl.minimum(start_n + BLOCK_N - offset + window_left, seqlen_q)
    return lo, hi


@triton.jit
def _live_keys(kpm_row_ptr, cols, stride_kpm_k, seqlen_k):
    """Which of keys `cols` (int32, any shape) take part: key_padding_mask[b, j] != 0, read
    from row b's `kpm_row_ptr`; False past seqlen_k (pass the stored Tk where the keys past
    seqused_k are masked anyway: an aligned bound lets the loads be vectors)."""
    return tl.load(kpm_row_ptr + cols * stride_kpm_k, mask=cols < seqlen_k, other=0) != 0


@triton.jit
def _live_key_range(kpm_row_ptr, stride_kpm_k, seqlen_k, lo, hi, BLOCK_N: tl.constexpr):
    """[lo, hi) narrowed to [first live key, last live key + 1) of the padding mask row: the
    key blocks before and after (right / left padding) are skipped without being visited. One
    pass over the row's Tk bytes, BLOCK_N at a time: cheap next to the attention of a query
    block. A row with no live key gets an empty range."""
    offs = tl.arange(0, BLOCK_N)
    first = tl.zeros([], dtype=tl.int32) + seqlen_k  # tensors: loop-carried
    end = tl.zeros([], dtype=tl.int32)
    for start in range(0, seqlen_k, BLOCK_N):
        cols = start + offs
        live = _live_keys(kpm_row_ptr, cols, stride_kpm_k, seqlen_k)
        first = tl.minimum(first, tl.min(tl.where(live, cols, seqlen_k), axis=0))
        end = tl.maximum(end, tl.max(tl.where(live, cols + 1, 0), axis=0))
    return tl.maximum(lo, first), tl.minimum(hi, end)


@triton.jit
def _bias_row_ptr(bias_ptr, batch64, head, start_m, stride_bias_b, stride_bias_h,
                  stride_bias_q):
    """Pointer to attn_bias[b, h, start_m, 0] (int64 arithmetic: B * H * Tq * Tk can pass
    2^31; the offsets inside a block stay int32)."""
    zero64 = batch64 * 0  # head, start_m: int32 tensors or loop variables
    return (bias_ptr + batch64 * stride_bias_b + (zero64 + head) * stride_bias_h
            + (zero64 + start_m) * stride_bias_q)


@triton.jit
def _bias_and_live_block(bias_row_ptr, kpm_row_ptr, local_rows, cols, row_mask, col_mask,
                         stride_bias_q, stride_bias_k, stride_kpm_k, seqlen_k,
                         HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr):
    """(float32 attn_bias, live keys) of one block of scores, in either orientation:
    `local_rows` are the query rows counted from the row of `bias_row_ptr`, `cols` the key
    positions (both int32, broadcast to the block); row_mask / col_mask which of them exist.
    0 for a feature that is off (placeholders _scores ignores)."""
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_row_ptr + local_rows * stride_bias_q + cols * stride_bias_k,
                       mask=row_mask & col_mask, other=0.0).to(tl.float32)
    live = 0
    if HAS_KPM:
        live = _live_keys(kpm_row_ptr, cols, stride_kpm_k, seqlen_k)
    return bias, live


# ---- forward ---------------------------------------------------------------------------------


@triton.jit
def attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, Tq, H, D), (B, Tk, Hkv, D) x2, or packed
    out_ptr,  # like q
    lse_ptr,  # float32 (B, H, Tq) or (H, total_q)
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr,  # int32, or None (see the flags)
    alibi_ptr,  # float32 (H,) / (B, H), or None
    dropout_seed_ptr,  # int64 (1,), or None
    bias_ptr,  # attn_bias (B, H, Tq, Tk) in q's dtype, any strides (0: broadcast), or None
    kpm_ptr,  # key_padding_mask as uint8 (B, Tk), nonzero = the key takes part, or None
    stride_q_b, stride_q_t, stride_q_h, stride_q_d,
    stride_k_b, stride_k_t, stride_k_h, stride_k_d,
    stride_v_b, stride_v_t, stride_v_h, stride_v_d,
    stride_out_b, stride_out_t, stride_out_h, stride_out_d,
    stride_lse_b, stride_lse_h,
    stride_alibi_b,
    stride_bias_b, stride_bias_h, stride_bias_q, stride_bias_k,
    stride_kpm_b, stride_kpm_k,
    num_heads,  # H
    group_size,  # H // Hkv
    seqlen_q, seqlen_k,  # Tq, Tk (padded) or the maxima (packed)
    total_q, total_k,  # rows of the packed q / k tensors (unused when padded)
    head_dim,  # D
    softmax_scale, softcap, window_left, window_right,
    dropout_threshold,  # floor(p * 2^32), attention.h's dropout_threshold
    dropout_scale,  # 1 / (1 - p)
    IS_VARLEN_Q: tl.constexpr, IS_VARLEN_K: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """out and lse of query rows [program_id(0) * BLOCK_M, ...) of head program_id(1) of
    sequence program_id(2)."""
    start_m, head, batch, q_start, seqlen_q = _query_block_of_program(
        cu_seqlens_q_ptr, seqlen_q, total_q, BLOCK_M, IS_VARLEN_Q)
    if start_m >= seqlen_q:  # packed: a shorter sequence than the longest
        return
    bias_cols = seqlen_k  # padded (masks are): the stored keys, Tk of the bias
    k_start, seqlen_k, kv_head = _kv_slice(cu_seqlens_k_ptr, seqused_k_ptr, batch, head, group_size,
                                           seqlen_k, total_k, IS_VARLEN_K, HAS_SEQUSED_K)
    batch64 = batch.to(tl.int64)

    offs_m, m_mask = _block_positions(start_m, seqlen_q, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d, d_mask = _block_positions(0, head_dim, BLOCK_D)

    q_base = _head_slice_ptr(q_ptr, batch64, q_start, head, stride_q_b, stride_q_t, stride_q_h)
    k_base = _head_slice_ptr(k_ptr, batch64, k_start, kv_head, stride_k_b, stride_k_t, stride_k_h)
    v_base = _head_slice_ptr(v_ptr, batch64, k_start, kv_head, stride_v_b, stride_v_t, stride_v_h)
    q = tl.load(
        q_base + offs_m[:, None] * stride_q_t + offs_d[None, :] * stride_q_d,
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    slope, head_key = _head_slope_and_dropout_key(alibi_ptr, stride_alibi_b, dropout_seed_ptr,
                                                  batch, head, num_heads, HAS_ALIBI, HAS_DROPOUT)

    # Running max (base 2), running sum of exp2(s - m_i) and unnormalised output.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M,
                        HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT)
    kpm_row = kpm_ptr
    if HAS_KPM:
        kpm_row = kpm_ptr + batch64 * stride_kpm_b
        lo, hi = _live_key_range(kpm_row, stride_kpm_k, seqlen_k, lo, hi, BLOCK_N)
    bias_row = bias_ptr
    if HAS_BIAS:
        bias_row = _bias_row_ptr(bias_ptr, batch64, head, start_m, stride_bias_b,
                                 stride_bias_h, stride_bias_q)
        # Key blocks at multiples of BLOCK_N: the bias rows' loads are then aligned vectors.
        lo = lo // BLOCK_N * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < seqlen_k
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_k_t + offs_d[None, :] * stride_k_d,
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        bias, live = _bias_and_live_block(
            bias_row, kpm_row, tl.arange(0, BLOCK_M)[:, None], cols[None, :], m_mask[:, None],
            (cols < bias_cols)[None, :], stride_bias_q, stride_bias_k, stride_kpm_k, bias_cols,
            HAS_BIAS, HAS_KPM)
        s, _ = _scores(qk, offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, softmax_scale,
                       softcap, slope, window_left, window_right, bias, live,
                       HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
                       HAS_BIAS, HAS_KPM)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no allowed key so far keeps m = -inf; subtract 0 instead, so that
        # exp2(-inf - -inf) = NaN never forms (its p are exp2(-inf) = 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(head_key, offs_m[:, None], cols[None, :], dropout_threshold)
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_v_t + offs_d[None, :] * stride_v_d,
                    mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    inv_l = tl.where(has_key, 1.0 / l_safe, 0.0)
    if HAS_DROPOUT:
        inv_l *= dropout_scale
    out = acc * inv_l[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))

    out_base = _head_slice_ptr(out_ptr, batch64, q_start, head,
                               stride_out_b, stride_out_t, stride_out_h)
    tl.store(out_base + offs_m[:, None] * stride_out_t + offs_d[None, :] * stride_out_d,
             round_to_dtype(out, out_ptr.dtype.element_ty, ROUND_BF16_IN_SOFTWARE),
             mask=m_mask[:, None] & d_mask[None, :])
    lse_base = lse_ptr + batch64 * stride_lse_b + head * stride_lse_h + q_start
    tl.store(lse_base + offs_m, lse, mask=m_mask)


# ---- backward --------------------------------------------------------------------------------


@triton.jit
def attention_bwd_preprocess_kernel(
    out_ptr, dout_ptr,  # (B, Tq, H, D) or packed
    delta_ptr,  # float32, laid out like lse
    cu_seqlens_q_ptr,
    stride_out_b, stride_out_t, stride_out_h, stride_out_d,
    stride_dout_b, stride_dout_t, stride_dout_h, stride_dout_d,
    stride_delta_b, stride_delta_h,
    seqlen_q, total_q, head_dim,
    IS_VARLEN_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """D_i = <dout_i, out_i> for query rows [program_id(0) * BLOCK_M, ...), head
    program_id(1), sequence program_id(2)."""
    start_m, head, batch, q_start, seqlen_q = _query_block_of_program(
        cu_seqlens_q_ptr, seqlen_q, total_q, BLOCK_M, IS_VARLEN_Q)
    if start_m >= seqlen_q:
        return
    batch64 = batch.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < head_dim)[None, :]
    rows = q_start.to(tl.int64) + offs_m
    out = tl.load(out_ptr + batch64 * stride_out_b + head * stride_out_h
                  + rows[:, None] * stride_out_t + offs_d[None, :] * stride_out_d,
                  mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + batch64 * stride_dout_b + head * stride_dout_h
                   + rows[:, None] * stride_dout_t + offs_d[None, :] * stride_dout_d,
                   mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(out * dout, axis=1)
    tl.store(delta_ptr + batch64 * stride_delta_b + head * stride_delta_h + rows, delta,
             mask=offs_m < seqlen_q)


@triton.jit
def _load_row_block(
    q_rows_ptr, dout_rows_ptr,  # row 0 of the (T, D) slices that `rows` index
    rows,  # (BLOCK_M,) query rows
    lse_ptr, delta_ptr, lse_offsets,  # the rows' lse and D_i are at lse_offsets (BLOCK_M,)
    offs_d, m_mask, q_mask,
    stride_q_t, stride_q_d, stride_dout_t, stride_dout_d,
):
    """q, dout (BLOCK_M, BLOCK_D), lse in base 2 and D_i (BLOCK_M,) of a block of query rows:
    what both backward kernels read of it. lse and D_i come as pointer + offsets so that dq
    keeps its int64 offset arithmetic: a row-pointer form made fp32 dq with dropout spill
    4 bytes at its 64 registers (sm_80)."""
    q = tl.load(q_rows_ptr + rows[:, None] * stride_q_t + offs_d[None, :] * stride_q_d,
                mask=q_mask, other=0.0)
    dout = tl.load(dout_rows_ptr + rows[:, None] * stride_dout_t + offs_d[None, :] * stride_dout_d,
                   mask=q_mask, other=0.0)
    # Rows without any allowed key have lse = -inf: read as +inf, their p are 0.
    lse = tl.load(lse_ptr + lse_offsets, mask=m_mask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(delta_ptr + lse_offsets, mask=m_mask, other=0.0)
    return q, dout, lse, delta


@triton.jit
def _apply_dropout(p, dp, head_key, rows, cols, dropout_threshold, dropout_scale,
                   HAS_DROPOUT: tl.constexpr):
    """(z * p, the weights the forward gave v; z * dp) for p and dp = <dout_i, v_j> of one
    block, in either orientation (rows, cols broadcast to it); unchanged without dropout."""
    if HAS_DROPOUT:
        keep = _dropout_keep(head_key, rows, cols, dropout_threshold)
        p = tl.where(keep, p * dropout_scale, 0.0)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    return p, dp


@triton.jit
def _softcap_grad(ds, cap_tanh, HAS_SOFTCAP: tl.constexpr):
    """ds times 1 - tanh^2 of the cap when soft-capping (cap_tanh from _scores, ignored
    otherwise): the gradient of the score before the cap from the one after it."""
    if HAS_SOFTCAP:
        ds *= 1.0 - cap_tanh * cap_tanh
    return ds


@triton.jit
def _score_grads(p, dp, delta, cap_tanh, HAS_SOFTCAP: tl.constexpr):
    """ds = p * (dp - D_i) (dp with dropout applied, delta broadcast to p), times
    1 - tanh^2 of the cap when soft-capping."""
    return _softcap_grad(p * (dp - delta), cap_tanh, HAS_SOFTCAP)


@triton.jit
def attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr,
    lse_ptr, delta_ptr,  # float32, (B, H, Tq) or (H, total_q), same strides
    dk_ptr, dv_ptr,  # like k, v
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, alibi_ptr, dropout_seed_ptr,
    bias_ptr, kpm_ptr,  # as the forward's
    stride_q_b, stride_q_t, stride_q_h, stride_q_d,
    stride_k_b, stride_k_t, stride_k_h, stride_k_d,
    stride_v_b, stride_v_t, stride_v_h, stride_v_d,
    stride_dout_b, stride_dout_t, stride_dout_h, stride_dout_d,
    stride_dk_b, stride_dk_t, stride_dk_h, stride_dk_d,
    stride_dv_b, stride_dv_t, stride_dv_h, stride_dv_d,
    stride_lse_b, stride_lse_h,
    stride_alibi_b,
    stride_bias_b, stride_bias_h, stride_bias_q, stride_bias_k,
    stride_kpm_b, stride_kpm_k,
    num_heads, group_size, seqlen_q, seqlen_k, total_q, total_k, head_dim,
    softmax_scale, softcap, window_left, window_right, dropout_threshold, dropout_scale,
    IS_VARLEN_Q: tl.constexpr, IS_VARLEN_K: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """dk and dv of keys [program_id(0) * BLOCK_N, ...) of kv head program_id(1) of sequence
    program_id(2), summed over the kv head's group of query heads. Works in the transposed
    orientation (keys x queries), so the accumulators need no transpose. Key rows that exist
    in storage but are not used (past seqused_k) get zeros."""
    start_n = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    k_start, seqlen_k_stored = _seq_bounds(cu_seqlens_k_ptr, batch, seqlen_k, total_k, IS_VARLEN_K)
    if start_n >= seqlen_k_stored:
        return
    seqlen_k = _keys_in_use(seqused_k_ptr, batch, seqlen_k_stored, HAS_SEQUSED_K)
    q_start, seqlen_q = _seq_bounds(cu_seqlens_q_ptr, batch, seqlen_q, total_q, IS_VARLEN_Q)
    batch64 = batch.to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    kv_mask = (offs_n < seqlen_k)[:, None] & d_mask[None, :]
    k_rows = k_start.to(tl.int64) + offs_n
    k = tl.load(k_ptr + batch64 * stride_k_b + kv_head * stride_k_h
                + k_rows[:, None] * stride_k_t + offs_d[None, :] * stride_k_d,
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptr + batch64 * stride_v_b + kv_head * stride_v_h
                + k_rows[:, None] * stride_v_t + offs_d[None, :] * stride_v_d,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo, hi = _query_range(start_n, seqlen_q, seqlen_k, window_left, window_right, BLOCK_N,
                          HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT)
    if start_n >= seqlen_k:  # stored but unused keys (seqused_k): zero gradients
        hi = lo
    first_head = kv_head * group_size
    last_head = first_head + group_size
    kpm_row = kpm_ptr
    live = 0
    if HAS_KPM:  # the keys' padding mask holds for every query: loaded once
        kpm_row = kpm_ptr + batch64 * stride_kpm_b
        live_n = _live_keys(kpm_row, offs_n, stride_kpm_k, seqlen_k)
        # every key padded: no query head, zero gradients
        last_head = tl.where(tl.max(live_n.to(tl.int32), axis=0) > 0, last_head, first_head)
        live = live_n[:, None]
    q_row0 = q_start.to(tl.int64)
    for head in range(first_head, last_head):
        q_base = q_ptr + batch64 * stride_q_b + head * stride_q_h + q_row0 * stride_q_t
        dout_base = (dout_ptr + batch64 * stride_dout_b + head * stride_dout_h
                     + q_row0 * stride_dout_t)
        lse_base = lse_ptr + batch64 * stride_lse_b + head * stride_lse_h + q_row0
        delta_base = delta_ptr + batch64 * stride_lse_b + head * stride_lse_h + q_row0
        slope, head_key = _head_slope_and_dropout_key(
            alibi_ptr, stride_alibi_b, dropout_seed_ptr, batch, head, num_heads,
            HAS_ALIBI, HAS_DROPOUT)
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            m_mask = rows < seqlen_q
            q_mask = m_mask[:, None] & d_mask[None, :]
            q, dout, lse, delta = _load_row_block(
                q_base, dout_base, rows, lse_base, delta_base, rows, offs_d, m_mask, q_mask,
                stride_q_t, stride_q_d, stride_dout_t, stride_dout_d)

            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            bias_t = 0.0
            if HAS_BIAS:
                bias_t, _ = _bias_and_live_block(
                    _bias_row_ptr(bias_ptr, batch64, head, start_m, stride_bias_b,
                                  stride_bias_h, stride_bias_q),
                    kpm_row, offs_m[None, :], offs_n[:, None], m_mask[None, :],
                    (offs_n < seqlen_k_stored)[:, None], stride_bias_q, stride_bias_k, stride_kpm_k,
                    seqlen_k, HAS_BIAS, False)
            s_t, cap_tanh_t = _scores(qk_t, rows[None, :], offs_n[:, None], seqlen_q, seqlen_k,
                                      softmax_scale, softcap, slope, window_left, window_right,
                                      bias_t, live,
                                      HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
                                      HAS_BIAS, HAS_KPM)
            p_t = tl.exp2(s_t - lse[None, :])
            dp_t = tl.dot(v, tl.trans(dout), input_precision=DOT_PRECISION)  # <dout_i, v_j>
            p_dropped_t, dp_t = _apply_dropout(p_t, dp_t, head_key, rows[None, :], offs_n[:, None],
                                               dropout_threshold, dropout_scale, HAS_DROPOUT)
            dv = tl.dot(p_dropped_t.to(dout.dtype), dout, dv, input_precision=DOT_PRECISION)
            ds_t = _score_grads(p_t, dp_t, delta[None, :], cap_tanh_t, HAS_SOFTCAP)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    store_mask = (offs_n < seqlen_k_stored)[:, None] & d_mask[None, :]
    tl.store(dk_ptr + batch64 * stride_dk_b + kv_head * stride_dk_h
             + k_rows[:, None] * stride_dk_t + offs_d[None, :] * stride_dk_d,
             round_to_dtype(dk * softmax_scale, dk_ptr.dtype.element_ty, ROUND_BF16_IN_SOFTWARE),
             mask=store_mask)
    tl.store(dv_ptr + batch64 * stride_dv_b + kv_head * stride_dv_h
             + k_rows[:, None] * stride_dv_t + offs_d[None, :] * stride_dv_d,
             round_to_dtype(dv, dv_ptr.dtype.element_ty, ROUND_BF16_IN_SOFTWARE),
             mask=store_mask)


@triton.jit
def attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr,
    lse_ptr, delta_ptr,
    dq_ptr,  # like q
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, alibi_ptr, dropout_seed_ptr,
    bias_ptr, kpm_ptr,  # as the forward's
    dbias_ptr,  # (B, H, Tq, Tk) in q's dtype, zeroed, or None: receives ds before the cap's
                # derivative for every score this kernel computes (HAS_DBIAS)
    stride_q_b, stride_q_t, stride_q_h, stride_q_d,
    stride_k_b, stride_k_t, stride_k_h, stride_k_d,
    stride_v_b, stride_v_t, stride_v_h, stride_v_d,
    stride_dout_b, stride_dout_t, stride_dout_h, stride_dout_d,
    stride_dq_b, stride_dq_t, stride_dq_h, stride_dq_d,
    stride_lse_b, stride_lse_h,
    stride_alibi_b,
    stride_bias_b, stride_bias_h, stride_bias_q, stride_bias_k,
    stride_kpm_b, stride_kpm_k,
    stride_dbias_b, stride_dbias_h, stride_dbias_q, stride_dbias_k,
    num_heads, group_size, seqlen_q, seqlen_k, total_q, total_k, head_dim,
    softmax_scale, softcap, window_left, window_right, dropout_threshold, dropout_scale,
    IS_VARLEN_Q: tl.constexpr, IS_VARLEN_K: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """dq of query rows [program_id(0) * BLOCK_M, ...) of head program_id(1) of sequence
    program_id(2)."""
    start_m, head, batch, q_start, seqlen_q = _query_block_of_program(
        cu_seqlens_q_ptr, seqlen_q, total_q, BLOCK_M, IS_VARLEN_Q)
    if start_m >= seqlen_q:
        return
    bias_cols = seqlen_k  # padded (masks are): the stored keys, Tk of the bias
    k_start, seqlen_k, kv_head = _kv_slice(cu_seqlens_k_ptr, seqused_k_ptr, batch, head, group_size,
                                           seqlen_k, total_k, IS_VARLEN_K, HAS_SEQUSED_K)
    batch64 = batch.to(tl.int64)

    offs_m, m_mask = _block_positions(start_m, seqlen_q, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d, d_mask = _block_positions(0, head_dim, BLOCK_D)
    q_mask = m_mask[:, None] & d_mask[None, :]
    q_rows = q_start.to(tl.int64) + offs_m
    q, dout, lse, delta = _load_row_block(
        q_ptr + batch64 * stride_q_b + head * stride_q_h,
        dout_ptr + batch64 * stride_dout_b + head * stride_dout_h, q_rows,
        lse_ptr, delta_ptr, batch64 * stride_lse_b + head * stride_lse_h + q_rows,
        offs_d, m_mask, q_mask, stride_q_t, stride_q_d, stride_dout_t, stride_dout_d)
    slope, head_key = _head_slope_and_dropout_key(alibi_ptr, stride_alibi_b, dropout_seed_ptr,
                                                  batch, head, num_heads, HAS_ALIBI, HAS_DROPOUT)

    k_base = _head_slice_ptr(k_ptr, batch64, k_start, kv_head, stride_k_b, stride_k_t, stride_k_h)
    v_base = _head_slice_ptr(v_ptr, batch64, k_start, kv_head, stride_v_b, stride_v_t, stride_v_h)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M,
                        HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT)
    kpm_row = kpm_ptr
    if HAS_KPM:
        kpm_row = kpm_ptr + batch64 * stride_kpm_b
        lo, hi = _live_key_range(kpm_row, stride_kpm_k, seqlen_k, lo, hi, BLOCK_N)
    bias_row = bias_ptr
    if HAS_BIAS:
        bias_row = _bias_row_ptr(bias_ptr, batch64, head, start_m, stride_bias_b,
                                 stride_bias_h, stride_bias_q)
        # Key blocks at multiples of BLOCK_N: the bias rows' loads are then aligned vectors.
        lo = lo // BLOCK_N * BLOCK_N
    dbias_row = dbias_ptr
    if HAS_DBIAS:
        dbias_row = _bias_row_ptr(dbias_ptr, batch64, head, start_m, stride_dbias_b,
                                  stride_dbias_h, stride_dbias_q)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < seqlen_k
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_k_t + offs_d[None, :] * stride_k_d,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_v_t + offs_d[None, :] * stride_v_d,
                    mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        bias, live = _bias_and_live_block(
            bias_row, kpm_row, tl.arange(0, BLOCK_M)[:, None], cols[None, :], m_mask[:, None],
            (cols < bias_cols)[None, :], stride_bias_q, stride_bias_k, stride_kpm_k, bias_cols,
            HAS_BIAS, HAS_KPM)
        s, cap_tanh = _scores(qk, offs_m[:, None], cols[None, :], seqlen_q, seqlen_k,
                              softmax_scale, softcap, slope, window_left, window_right, bias,
                              live, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
                              HAS_BIAS, HAS_KPM)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
        # z * p is dv's business; the compiler drops it here.
        _, dp = _apply_dropout(p, dp, head_key, offs_m[:, None], cols[None, :],
                               dropout_threshold, dropout_scale, HAS_DROPOUT)
        ds = p * (dp - delta[:, None])
        if HAS_DBIAS:  # the gradient of the score after the cap: each (h, i, j) once, here
            tl.store(dbias_row + tl.arange(0, BLOCK_M)[:, None] * stride_dbias_q
                     + cols[None, :] * stride_dbias_k,
                     round_to_dtype(ds, dbias_ptr.dtype.element_ty, ROUND_BF16_IN_SOFTWARE),
                     mask=m_mask[:, None] & (cols < bias_cols)[None, :])
        ds = _softcap_grad(ds, cap_tanh, HAS_SOFTCAP)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(dq_ptr + batch64 * stride_dq_b + head * stride_dq_h
             + q_rows[:, None] * stride_dq_t + offs_d[None, :] * stride_dq_d,
             round_to_dtype(dq * softmax_scale, dq_ptr.dtype.element_ty, ROUND_BF16_IN_SOFTWARE),
             mask=q_mask)


# ---- launchers: schema-shaped, no argument checks beyond the dtype (fastllm/ops validates) --


def _strides4(x: torch.Tensor, is_varlen: bool) -> tuple[int, int, int, int]:
    """(b, t, h, d) strides of a (B, T, heads, D) tensor or of a packed (total, heads, D) one
    (b stride 0: packed rows are addressed through cu_seqlens)."""
    if is_varlen:
        return (0, *x.stride())
    return tuple(x.stride())


class _Config:
    """What the launchers derive from the arguments, shared by forward and backward."""

    def __init__(self, q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                 softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                 dropout_p, dropout_seed, attn_bias, key_padding_mask):
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(
                f"attention (triton): q must be float16, bfloat16 or float32, got {q.dtype}"
            )
        self.varlen_q = cu_seqlens_q is not None
        self.varlen_k = cu_seqlens_k is not None
        self.batch = cu_seqlens_q.shape[0] - 1 if self.varlen_q else q.shape[0]
        self.num_heads, self.head_dim = q.shape[-2], q.shape[-1]
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(
                f"attention (triton): head dim must be at most {MAX_HEAD_DIM}, got {self.head_dim}"
            )
        self.group_size = self.num_heads // k.shape[-2]
        # (as the C++ glue: no packed sequence is longer than the tokens; a window wider than
        # every query-key distance is unbounded)
        self.seqlen_q = min(max_seqlen_q, q.shape[0]) if self.varlen_q else q.shape[1]
        self.seqlen_k = min(max_seqlen_k, k.shape[0]) if self.varlen_k else k.shape[1]
        widest = self.seqlen_q + self.seqlen_k
        window_left = -1 if window_left > widest else window_left
        window_right = -1 if window_right > widest else window_right
        self.total_q, self.total_k = q.shape[0], k.shape[0]
        # Causal is the right window 0 (bottom-right aligned); a negative window is unbounded.
        if causal:
            window_right = 0 if window_right < 0 else min(window_right, 0)
        self.window_left, self.window_right = window_left, window_right
        self.softmax_scale, self.softcap = softmax_scale, softcap
        # (H,) slopes are (B, H) ones with a batch stride of 0.
        self.alibi_slopes = None if alibi_slopes is None else alibi_slopes.contiguous()
        self.alibi_stride_b = 0
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            self.alibi_stride_b = self.alibi_slopes.stride(0)
        self.has_dropout = dropout_p > 0.0
        self.dropout_seed = dropout_seed if self.has_dropout else None
        self.dropout_threshold = _dropout_threshold(dropout_p)
        self.dropout_scale = 1.0 / (1.0 - dropout_p) if self.has_dropout else 1.0
        # The kernels index these with unit stride.
        self.cu_seqlens_q, self.cu_seqlens_k, self.seqused_k = (
            None if t is None else t.contiguous() for t in (cu_seqlens_q, cu_seqlens_k, seqused_k)
        )
        # attn_bias as it comes (any strides: the broadcast dims are stride-0 views); the bool
        # padding mask read as bytes (one byte per bool, 0 / 1).
        self.attn_bias = attn_bias
        self.bias_strides = tuple(attn_bias.stride()) if attn_bias is not None else (0,) * 4
        self.key_padding_mask = (None if key_padding_mask is None
                                 else key_padding_mask.view(torch.uint8))
        self.kpm_strides = ((0, 0) if key_padding_mask is None
                            else tuple(key_padding_mask.stride()))
        self.masked = attn_bias is not None or key_padding_mask is not None
        self.dot_precision = "ieee"  # fp32: no TF32; fp16 / bf16 are unaffected
        self.round_bf16 = interpreted()

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        return (0, lse.stride(0)) if self.varlen_q else (lse.stride(0), lse.stride(1))

    def pointers(self):
        return (self.cu_seqlens_q, self.cu_seqlens_k, self.seqused_k, self.alibi_slopes,
                self.dropout_seed, self.attn_bias, self.key_padding_mask)

    def mask_strides(self):
        return (*self.bias_strides, *self.kpm_strides)

    def scalars(self):
        return (self.num_heads, self.group_size, self.seqlen_q,
                self.seqlen_k, self.total_q, self.total_k, self.head_dim, self.softmax_scale, self.softcap,
                self.window_left, self.window_right, self.dropout_threshold, self.dropout_scale)

    def flags(self) -> dict:
        return dict(
            IS_VARLEN_Q=self.varlen_q,
            IS_VARLEN_K=self.varlen_k,
            HAS_SEQUSED_K=self.seqused_k is not None,
            HAS_WINDOW_LEFT=self.window_left >= 0,
            HAS_WINDOW_RIGHT=self.window_right >= 0,
            HAS_SOFTCAP=self.softcap > 0.0,
            HAS_ALIBI=self.alibi_slopes is not None,
            HAS_DROPOUT=self.has_dropout,
            HAS_BIAS=self.attn_bias is not None,
            HAS_KPM=self.key_padding_mask is not None,
            DOT_PRECISION=self.dot_precision,
            ROUND_BF16_IN_SOFTWARE=self.round_bf16,
        )


def _dropout_threshold(p: float) -> int:
    """attention.h's dropout_threshold: floor(p * 2^32), saturated to 2^32 - 1."""
    t = p * 4294967296.0
    return 4294967295 if t >= 4294967295.0 else int(t)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# Tile configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages) by kernel, dtype class and
# BLOCK_D. Chosen so that ptxas (sm_80, unit D strides) reports no spills for every dtype and
# BLOCK_D with the flag sets checked (causal only, dropout only, packed + seqused_k + both
# windows, everything on; tests/test_attention.py::test_triton_kernels_compile_without_spills
# keeps checking a subset, for sm_80 and sm_90); not tuned on a GPU (none was available). On
# sm_90 some of these tiles do spill (float32 forward at BLOCK_D 128: 328 / 216 bytes of spill
# stores / loads; float32 and bfloat16 dk/dv backward at 128, a few more): that test lists
# them and leaves them out, for a GPU run to judge. float32 runs its IEEE
# dot products on FMA units, which hold whole operand tiles in registers: it needs much
# smaller tiles than the tensor-core path.
# "*_masked": the kernels with attn_bias / key_padding_mask (and dbias), checked the same
# way, every BLOCK_D, with every flag on but the packed inputs (the glue refuses packed +
# masks; the test keeps checking one BLOCK_D per dtype class). They differ where the bias
# tile made ptxas spill: BLOCK_D 128 (fwd BLOCK_N 32; bwd one stage, fp32 BLOCK_N 16) and
# tensor-core BLOCK_D 64 backward (one stage).
_FWD_TILES = {
    "tensor_core": {64: (128, 64, 8, 3), 128: (128, 64, 8, 2), 256: (64, 32, 8, 2)},
    "fma": {64: (32, 32, 4, 1), 128: (32, 16, 4, 1), 256: (32, 16, 8, 1)},
    "tensor_core_masked": {64: (128, 64, 8, 3), 128: (128, 32, 8, 2), 256: (64, 32, 8, 2)},
    "fma_masked": {64: (32, 32, 4, 1), 128: (32, 16, 4, 1), 256: (32, 16, 8, 1)},
}
_BWD_TILES = {
    "tensor_core": {64: (32, 64, 8, 2), 128: (32, 64, 8, 2), 256: (16, 32, 8, 1)},
    "fma": {64: (16, 32, 4, 1), 128: (16, 32, 8, 1), 256: (16, 16, 8, 1)},
    "tensor_core_masked": {64: (32, 64, 8, 1), 128: (32, 64, 8, 1), 256: (16, 32, 8, 1)},
    "fma_masked": {64: (16, 32, 4, 1), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
}
# The interpreter pays per executed op and per call, not per element: few, larger tiles.
_INTERPRETER_TILES = (32, 32, 1, 1)


def _tile_class(dtype: torch.dtype, masked: bool) -> str:
    return ("fma" if dtype == torch.float32 else "tensor_core") + ("_masked" if masked else "")


def _tiles(table: dict, dtype: torch.dtype, block_d: int,
           masked: bool) -> tuple[int, int, int, int]:
    if interpreted():
        return _INTERPRETER_TILES
    return table[_tile_class(dtype, masked)][max(64, block_d)]


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    attn_bias: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastllm::attention_fwd -> (out like q, contiguous; lse float32 (B, H, Tq) / (H, total_q))."""
    cfg = _Config(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                  softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                  dropout_p, dropout_seed, attn_bias, key_padding_mask)
    if cfg.varlen_q:
        # Rows past cu_seqlens_q[-1] (padding of a packed batch) belong to no sequence and are
        # never written by the kernel: they read as zeros, lse -inf.
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((cfg.num_heads, q.shape[0]), float("-inf"), dtype=torch.float32,
                         device=q.device)
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((cfg.batch, cfg.num_heads, cfg.seqlen_q), dtype=torch.float32,
                          device=q.device)
    block_d = _block_d(cfg.head_dim)
    block_m, block_n, num_warps, num_stages = _tiles(_FWD_TILES, q.dtype, block_d, cfg.masked)
    grid = (triton.cdiv(cfg.seqlen_q, block_m), cfg.num_heads, cfg.batch)
    torch.library.wrap_triton(attention_fwd_kernel)[grid](
        q, k, v, out, lse, *cfg.pointers(),
        *_strides4(q, cfg.varlen_q), *_strides4(k, cfg.varlen_k), *_strides4(v, cfg.varlen_k),
        *_strides4(out, cfg.varlen_q), *cfg.lse_strides(lse), cfg.alibi_stride_b,
        *cfg.mask_strides(), *cfg.scalars(),
        **cfg.flags(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    attn_bias: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    bias_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastllm::attention_bwd -> (dq, dk, dv, dbias), contiguous, in the dtypes and shapes of
    q, k, v; dbias (B, H, Tq, Tk) when bias_grad, else empty."""
    cfg = _Config(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                  softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                  dropout_p, dropout_seed, attn_bias, key_padding_mask)
    # Packed rows outside every sequence are never written: zeros for them (a memset, cheap
    # next to attention). Padded tensors are covered in full by the kernels.
    alloc = torch.zeros if cfg.varlen_q else torch.empty
    dq = alloc(q.shape, dtype=q.dtype, device=q.device)
    alloc = torch.zeros if cfg.varlen_k else torch.empty
    dk = alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = alloc(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    # dbias: zeroed, the dq kernel writes the scores it computes (the others are 0: masked).
    if bias_grad:
        dbias = torch.zeros((cfg.batch, cfg.num_heads, cfg.seqlen_q, k.shape[1]), dtype=q.dtype,
                            device=q.device)
        dbias_strides = dbias.stride()
    else:
        dbias = q.new_empty((0,))
        dbias_strides = (0,) * 4
    lse = lse.contiguous()
    lse_strides = cfg.lse_strides(lse)
    block_d = _block_d(cfg.head_dim)
    block_m, block_n, num_warps, num_stages = _tiles(_BWD_TILES, q.dtype, block_d, cfg.masked)

    # D_i reads two (rows, BLOCK_D) tiles: 4096 elements each, 32 registers per thread.
    pre_block_m = max(1, 4096 // block_d)
    torch.library.wrap_triton(attention_bwd_preprocess_kernel)[
        (triton.cdiv(cfg.seqlen_q, pre_block_m), cfg.num_heads, cfg.batch)
    ](
        out, dout, delta, cu_seqlens_q,
        *_strides4(out, cfg.varlen_q), *_strides4(dout, cfg.varlen_q), *lse_strides,
        cfg.seqlen_q, cfg.total_q, cfg.head_dim,
        IS_VARLEN_Q=cfg.varlen_q, BLOCK_M=pre_block_m, BLOCK_D=block_d,
    )
    common_strides = (*_strides4(q, cfg.varlen_q), *_strides4(k, cfg.varlen_k),
                      *_strides4(v, cfg.varlen_k), *_strides4(dout, cfg.varlen_q))
    torch.library.wrap_triton(attention_bwd_dkdv_kernel)[
        (triton.cdiv(cfg.seqlen_k, block_n), k.shape[-2], cfg.batch)
    ](
        q, k, v, dout, lse, delta, dk, dv, *cfg.pointers(),
        *common_strides, *_strides4(dk, cfg.varlen_k), *_strides4(dv, cfg.varlen_k),
        *lse_strides, cfg.alibi_stride_b, *cfg.mask_strides(), *cfg.scalars(),
        **cfg.flags(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages,
    )
    torch.library.wrap_triton(attention_bwd_dq_kernel)[
        (triton.cdiv(cfg.seqlen_q, block_m), cfg.num_heads, cfg.batch)
    ](
        q, k, v, dout, lse, delta, dq, *cfg.pointers(), dbias if bias_grad else None,
        *common_strides, *_strides4(dq, cfg.varlen_q),
        *lse_strides, cfg.alibi_stride_b, *cfg.mask_strides(), *dbias_strides, *cfg.scalars(),
        **cfg.flags(), HAS_DBIAS=bias_grad,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dv, dbias
