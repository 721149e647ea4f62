"""Autoregressive generation with a pre-allocated KV cache driven by
:func:`fastllm.functional.attention_with_kvcache`: for the decoder-only models (GPT, Llama;
:func:`generate`, :func:`generate_stream`) and the encoder-decoders (BART, mBART, Marian;
:func:`generate_seq2seq`, :func:`generate_seq2seq_stream`, at the end of this file: encode once,
cross-attention keys / values once, the same sampling and processing helpers).

Design — the cache holds no padding, so a slot index is a position:

- Hugging Face left-pads a batch of prompts and gives token t of sequence b the position
  ``cumsum(attention_mask[b])[t] - 1``, i.e. its index among the sequence's real tokens; the
  padded keys are masked out. Here each prompt's real tokens (``attention_mask == 1``, in
  order) are moved to the front of its row (the padded ids to the back) and the prefill runs
  this right-padded batch through ``attention_with_kvcache`` with ``cache_seqlens = 0``: real
  token t lands in cache slot t, is rotated (Llama) / embedded (GPT) at position t, and
  attends, causally, only slots ``0 .. t`` — real tokens. The padded ids behind them write
  throw-away rows into slots ``len_b ..``, which no real query sees and the decode steps
  overwrite.
- After the prefill ``cache_seqlens[b] = len_b`` (the real prompt length); each decode step
  appends one token per sequence at slot ``cache_seqlens[b]``, rotated there by the call's
  ``rotary_cos`` / ``rotary_sin`` (Llama; GPT adds ``wpe[cache_seqlens[b]]``), and attends the
  ``cache_seqlens[b] + 1`` valid slots. Positions therefore equal Hugging Face's exactly, for
  any 0/1 mask (left padding or not), with no key padding mask in the cache call.
- Cache: per layer ``k``, ``v`` of shape (B, L + max_new_tokens, Hkv, D) in the model's
  dtype, allocated once (L: the longest real prompt; the prefill runs on (B, L) ids).
- ``generate_stream`` checks the arguments eagerly and returns the decoding iterator; the
  cache lives as long as the iterator.

Decoding follows Hugging Face's ``generate``: the logits are taken in float32; the
repetition penalty (CTRL's: a seen token's logit divided by the penalty when positive,
multiplied when negative) applies to the real prompt tokens and the generated ones, in greedy
and sampling decoding; sampling then applies temperature, top-k and top-p (in that order, as
HF's warpers) and draws from the softmax with ``torch.multinomial(generator=...)``; greedy
takes the argmax. A sequence that has produced an EOS emits ``pad_token_id`` (default the
first EOS id) afterwards; generation stops when all sequences have finished or after
``max_new_tokens`` steps.

Shapes: B batch, T prompt tokens (padded), n new tokens, V vocabulary, Hkv key/value heads,
D head dim.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from fastllm.models.config import check_input_ids, check_like_input_ids


def _check_args(name: str, input_ids: Tensor, max_new_tokens: int,
                attention_mask: Optional[Tensor], temperature: float, top_k: int, top_p: float,
                repetition_penalty: float) -> None:
    check_input_ids(name, input_ids)
    check_like_input_ids(name, "attention_mask", attention_mask, input_ids)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"{name}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"{name}: input_ids must hold at least one token per sequence, got "
                         f"shape {tuple(input_ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"{name}: top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{name}: top_p must be in (0, 1], got {top_p!r}")
    if not repetition_penalty > 0:
        raise ValueError(f"{name}: repetition_penalty must be > 0, got {repetition_penalty!r}")


def _eos_ids(name: str, eos_token_id, device) -> Optional[Tensor]:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"{name}: eos_token_id must be an int >= 0 or a non-empty list of "
                         f"them, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.int64, device=device)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """HF's ``RepetitionPenaltyLogitsProcessor``: logits (B, V) float; seen (B, V) bool, the
    tokens already in the sequence. Their logits are divided by ``penalty`` when positive and
    multiplied by it when negative."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: Tensor, top_k: int) -> Tensor:
    """HF's ``TopKLogitsWarper``: all but the ``top_k`` largest logits of each row -> -inf
    (ties with the k-th kept)."""
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, top_p: float) -> Tensor:
    """HF's ``TopPLogitsWarper``: keeps the smallest set of most likely tokens whose
    probability reaches ``top_p`` (at least one)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum_probs <= (1 - top_p)
    remove_sorted[..., -1:] = False  # the most likely token stays
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def next_tokens(logits: Tensor, *, do_sample: bool, temperature: float, top_k: int,
                top_p: float, generator: Optional[torch.Generator]) -> Tensor:
    """(B, V) float32 logits (penalties applied) -> (B,) int64 tokens."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        logits = apply_top_k(logits, top_k)
    if top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _step_tokens(logits: Tensor, seen: Optional[Tensor], unfinished: Tensor,
                 eos: Optional[Tensor], *, repetition_penalty: float, pad_token_id: int,
                 **sampling) -> tuple[Tensor, Tensor]:
    """One decoding step's tokens (B,) from its logits (B, V) -- the repetition penalty over
    ``seen`` (B, V) bool (updated in place), greedy or sampled (``next_tokens``),
    ``pad_token_id`` for finished sequences -- and the sequences still unfinished after it."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    token = next_tokens(logits, **sampling)  # (B,)
    token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
    if seen is not None:
        seen.scatter_(1, token[:, None], True)
    if eos is not None:
        unfinished = unfinished & ~torch.isin(token, eos)
    return token, unfinished


def generate_stream(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Optional[Tensor] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Tensor]:
    """An iterator of each step's new tokens, (B,) int64 (a finished sequence's:
    ``pad_token_id``), until every sequence has produced an EOS or after ``max_new_tokens``
    steps. Arguments as :func:`generate`; they are checked here, before the first step. The
    steps run under ``torch.inference_mode`` (only while the iterator runs)."""
    name = f"{type(model).__name__}.generate"
    _check_args(name, input_ids, max_new_tokens, attention_mask, temperature, top_k,
                top_p, repetition_penalty)
    device = input_ids.device
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        mask = attention_mask.to(device=device).bool()
    lengths = mask.sum(dim=1)  # (B,) real prompt tokens
    lengths_list = lengths.tolist()
    if min(lengths_list) == 0:
        raise ValueError(
            f"{name}: attention_mask[{lengths_list.index(0)}] has no token (all zeros)"
        )
    t_real = max(lengths_list)
    max_positions = model._max_positions()
    if max_positions is not None and t_real + max_new_tokens > max_positions:
        raise ValueError(
            f"{name}: the prompt ({t_real} tokens) plus max_new_tokens ({max_new_tokens}) is "
            f"more than the position table holds ({max_positions})"
        )
    eos = _eos_ids(name, eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = 0 if eos is None else int(eos[0])
    return _decode(model, input_ids.long(), mask, lengths, t_real, max_new_tokens,
                   do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, eos=eos, pad_token_id=pad_token_id,
                   generator=generator)


@torch.inference_mode()
def _decode(model, ids: Tensor, mask: Tensor, lengths: Tensor, t_real: int,
            max_new_tokens: int, *, do_sample: bool, temperature: float, top_k: int,
            top_p: float, repetition_penalty: float, eos: Optional[Tensor], pad_token_id: int,
            generator: Optional[torch.Generator]) -> Iterator[Tensor]:
    """The decoding loop of :func:`generate_stream` on checked arguments: ids (B, T) int64,
    mask (B, T) bool, lengths (B,) its row sums, t_real their maximum."""
    if max_new_tokens == 0:
        return
    device = ids.device
    B = ids.shape[0]
    # The real tokens of each prompt to the front of its row (stable: their order is kept).
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :t_real]
    prompt = ids.gather(1, order)  # (B, t_real): real tokens, then padded ids (throw-away)

    n_layer, n_kv_heads, head_dim = model._kv_cache_layout()
    dtype = next(model.parameters()).dtype
    capacity = t_real + max_new_tokens
    caches = [(torch.empty(B, capacity, n_kv_heads, head_dim, device=device, dtype=dtype),
               torch.empty(B, capacity, n_kv_heads, head_dim, device=device, dtype=dtype))
              for _ in range(n_layer)]
    cache_seqlens = torch.zeros(B, dtype=torch.int32, device=device)

    vocab = model.lm_head.weight.shape[0]
    seen = None
    if repetition_penalty != 1.0:
        # The real prompt tokens (HF also penalizes the pad id of a left-padded prompt;
        # padding is not a token of the sequence here). Padding goes to the extra column.
        seen = torch.zeros(B, vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, ids.masked_fill(~mask, vocab), True)
        seen = seen[:, :vocab]
    unfinished = torch.ones(B, dtype=torch.bool, device=device)

    hidden = model._forward_cached(prompt, caches, cache_seqlens)  # (B, t_real, C)
    last = hidden.gather(1, (lengths - 1).view(B, 1, 1).expand(B, 1, hidden.shape[-1]))
    logits = model.lm_head(last[:, 0]).float()  # (B, V)
    cache_seqlens = lengths.to(torch.int32)
    for step in range(max_new_tokens):
        token, unfinished = _step_tokens(
            logits, seen, unfinished, eos, repetition_penalty=repetition_penalty,
            pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, generator=generator)  # (B,)
        yield token
        if step == max_new_tokens - 1 or (eos is not None and not bool(unfinished.any())):
            return
        hidden = model._forward_cached(token[:, None], caches, cache_seqlens)  # (B, 1, C)
        logits = model.lm_head(hidden[:, 0]).float()
        cache_seqlens = cache_seqlens + 1


def generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Optional[Tensor] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    streamer: Optional[Callable[[Tensor], None]] = None,
) -> Tensor:
    """``model.generate``: the prompt followed by the new tokens, (B, T + n), n <=
    ``max_new_tokens`` (fewer when every sequence reached an EOS), as Hugging Face's.

    Args:
        input_ids: int64/int32 (B, T) prompts; a batch of different lengths is left-padded
            (any 0/1 ``attention_mask`` works: only the masked-in tokens count).
        max_new_tokens: int >= 0.
        attention_mask: (B, T), 1 for tokens, 0 for padding; None: all tokens.
        do_sample: sample (with ``temperature``, ``top_k``, ``top_p``) instead of greedy.
        temperature: > 0; divides the logits when sampling.
        top_k: keep the k most likely tokens when sampling (0: all).
        top_p: nucleus sampling's probability mass, in (0, 1] (1: all).
        repetition_penalty: > 0, CTRL's / HF's (1: off); greedy and sampling.
        eos_token_id: an int or a list of ints; a sequence stops at its first one.
        pad_token_id: what a finished sequence emits (default the first EOS id, as HF).
        generator: the ``torch.Generator`` of the sampling draws (same seed, same tokens).
        streamer: called with each step's new tokens, a (B,) int64 tensor, as they come
            (``generate_stream`` is the iterator form).

    Call ``model.eval()`` first (dropout stays on in training mode).
    """
    steps = []
    for token in generate_stream(
        model, input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, generator=generator,
    ):
        if streamer is not None:
            streamer(token)
        steps.append(token)
    if not steps:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(steps, dim=1).to(input_ids.dtype)], dim=1)


# ----- encoder-decoder models (fastllm.models.EncoderDecoder: BART, Marian) ----------------

def generate_seq2seq_stream(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Optional[Tensor] = None,
    decoder_start_token_id: Optional[int] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Tensor]:
    """An iterator of each step's new target tokens, (B,) int64 (a finished sequence's:
    ``pad_token_id``), for an encoder-decoder ``model``. Arguments as
    :func:`generate_seq2seq`; checked here, before the first step."""
    name = f"{type(model).__name__}.generate"
    _check_args(name, input_ids, max_new_tokens, attention_mask, temperature, top_k,
                top_p, repetition_penalty)
    config = model.config
    device = input_ids.device
    mask = None if attention_mask is None else attention_mask.to(device=device).bool()
    if mask is not None:
        lengths_list = mask.sum(dim=1).tolist()
        if min(lengths_list) == 0:
            raise ValueError(
                f"{name}: attention_mask[{lengths_list.index(0)}] has no token (all zeros)")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"{name}: input_ids has {input_ids.shape[1]} tokens, more than the "
                         f"position table holds ({config.max_position_embeddings})")
    if max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"{name}: max_new_tokens ({max_new_tokens}) is more than the decoder's "
                         f"position table holds ({config.max_position_embeddings})")
    decoder_start_token_id = _decoder_start(name, config, decoder_start_token_id)
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
    eos = _eos_ids(name, eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id
    return _decode_seq2seq(model, input_ids.long(), mask, max_new_tokens,
                           decoder_start_token_id, do_sample=do_sample,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, eos=eos,
                           pad_token_id=int(pad_token_id), generator=generator)


def _decoder_start(name: str, config, decoder_start_token_id: Optional[int]) -> int:
    """The argument, else the config's decoder_start_token_id, else its bos_token_id (HF's
    order; mBART has no decoder_start_token_id)."""
    for start in (decoder_start_token_id, config.decoder_start_token_id, config.bos_token_id):
        if start is not None:
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise ValueError(f"{name}: decoder_start_token_id must be an int >= 0, got "
                                 f"{start!r}")
            return start
    raise ValueError(f"{name}: pass decoder_start_token_id (the config has neither "
                     f"decoder_start_token_id nor bos_token_id)")


@torch.inference_mode()
def _decode_seq2seq(model, ids: Tensor, mask: Optional[Tensor], max_new_tokens: int,
                    start: int, *, do_sample: bool, temperature: float, top_k: int,
                    top_p: float, repetition_penalty: float, eos: Optional[Tensor],
                    pad_token_id: int, generator: Optional[torch.Generator]) -> Iterator[Tensor]:
    """The decoding loop of :func:`generate_seq2seq_stream` on checked arguments: ids (B, S)
    int64, mask (B, S) bool or None. Every sequence's decoder has the same length (a finished
    one keeps decoding its pad tokens, as HF), so one ``cache_seqlens`` value serves all."""
    if max_new_tokens == 0:
        return
    device = ids.device
    B = ids.shape[0]
    memory = model.encode(ids, mask)  # (B, S, C), once
    cross_kv = model._cross_kv(memory)  # per layer (B, S, H, D) keys and values, once

    n_layer, n_heads, head_dim = model._decoder_cache_layout()
    dtype = memory.dtype
    caches = [(torch.empty(B, max_new_tokens, n_heads, head_dim, device=device, dtype=dtype),
               torch.empty(B, max_new_tokens, n_heads, head_dim, device=device, dtype=dtype))
              for _ in range(n_layer)]
    cache_seqlens = torch.zeros(B, dtype=torch.int32, device=device)

    token = torch.full((B,), start, dtype=torch.int64, device=device)
    seen = None
    if repetition_penalty != 1.0:  # HF penalizes the decoder's ids: the start token too
        seen = torch.zeros(B, model.config.target_vocab_size, dtype=torch.bool, device=device)
        seen[:, start] = True
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        hidden = model._forward_cached(token[:, None], caches, cache_seqlens, cross_kv,
                                       mask)  # (B, 1, C)
        logits = model._logits(hidden[:, 0]).float()  # (B, V)
        cache_seqlens = cache_seqlens + 1
        token, unfinished = _step_tokens(
            logits, seen, unfinished, eos, repetition_penalty=repetition_penalty,
            pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, generator=generator)  # (B,)
        yield token
        if eos is not None and not bool(unfinished.any()):
            return


def generate_seq2seq(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Optional[Tensor] = None,
    decoder_start_token_id: Optional[int] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    streamer: Optional[Callable[[Tensor], None]] = None,
) -> Tensor:
    """``EncoderDecoder.generate``: ``decoder_start_token_id`` followed by the new tokens,
    (B, 1 + n), n <= ``max_new_tokens`` (fewer when every sequence reached an EOS), as
    Hugging Face's ``generate`` for encoder-decoders.

    The source is encoded once; each decoder layer's cross-attention keys / values are
    projected once from the encoder output (attended with the source's ``attention_mask`` as
    key padding mask); the decoder's self-attention runs on a pre-allocated (B,
    max_new_tokens, H, D) cache through ``attention_with_kvcache``, one token per step.

    Args:
        input_ids: int64/int32 (B, S) source tokens (padding anywhere, given by the mask).
        max_new_tokens: int >= 0, at most ``max_position_embeddings``.
        attention_mask: (B, S), 1 for tokens, 0 for padding; None: all tokens.
        decoder_start_token_id: the first decoder token (default the config's, else its
            ``bos_token_id``, as HF; mBART: pass the target language id).
        eos_token_id: an int or a list of ints; a sequence stops at its first one (default the
            config's ``eos_token_id``, as HF).
        pad_token_id: what a finished sequence emits (default the config's, as HF).
        do_sample, temperature, top_k, top_p, repetition_penalty, generator, streamer: as
            :func:`generate` (the repetition penalty counts the decoder's tokens, the start
            token included, as HF).

    HF's ``forced_bos_token_id`` / ``forced_eos_token_id``, ``no_repeat_ngram_size``,
    ``min_length`` and beam search are not applied. Call ``model.eval()`` first.
    """
    start = _decoder_start(f"{type(model).__name__}.generate", model.config,
                           decoder_start_token_id)
    steps = []
    for token in generate_seq2seq_stream(
        model, input_ids, max_new_tokens, attention_mask=attention_mask,
        decoder_start_token_id=decoder_start_token_id, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, generator=generator,
    ):
        if streamer is not None:
            streamer(token)
        steps.append(token)
    first = torch.full((input_ids.shape[0], 1), start, dtype=torch.int64, device=input_ids.device)
    return torch.cat([first, *(t[:, None] for t in steps)], dim=1)
