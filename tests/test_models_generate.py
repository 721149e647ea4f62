"""model.generate for GPT and Llama (fastllm/models/generation.py): greedy output
token-identical to Hugging Face's ``generate(do_sample=False)`` on the same weights (batch 1,
a left-padded batch of different prompt lengths, EOS stopping, repetition penalty; GPT-2,
LLaMA, Mistral's sliding window, Qwen2), greedy equal to step-by-step argmax of the full
forward without a cache, the sampling processors against HF's, sampling reproducible from a
torch.Generator, streaming, fp32 and bf16, and input errors."""

from __future__ import annotations

import pytest
import torch

from fastllm.models import GPT, GPTConfig, Llama, LlamaConfig, from_pretrained
from fastllm.models.generation import apply_repetition_penalty, apply_top_k, apply_top_p

V = 97
GPT_TINY = dict(vocab_size=V, n_positions=48, n_embd=48, n_layer=2, n_head=4,
                initializer_range=0.1, bos_token_id=None, eos_token_id=None)
LLAMA_TINY = dict(vocab_size=V, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.1)
# variant -> (HF class name, HF config class name, config)
VARIANTS = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", GPT_TINY),
    "llama": ("LlamaForCausalLM", "LlamaConfig", LLAMA_TINY),
    "mistral": ("MistralForCausalLM", "MistralConfig", {**LLAMA_TINY, "sliding_window": 4}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {**LLAMA_TINY, "num_key_value_heads": 1,
                                                  "tie_word_embeddings": True}),
}
# (B, T) prompts: batch 1, and a left-padded batch of lengths 9, 4, 1, 6
LENGTHS = {"batch1": [7], "left-padded": [9, 4, 1, 6]}


def hf_model(variant: str):
    transformers = pytest.importorskip("transformers")
    cls_name, config_name, config = VARIANTS[variant]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_name)(**config)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases; random ones test them
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    # no EOS / pad from the config: each test passes its own
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def left_padded(lengths: list[int], pad: int = 0, seed: int = 1):
    """(input_ids, attention_mask) (B, max(lengths)), each prompt right-aligned."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.int64)
    mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(1, V, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


def tiny(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=V, block_size=48, n_layer=2, n_head=4, n_embd=48,
                              initializer_range=0.1))
    else:
        model = Llama(LlamaConfig(**{**LLAMA_TINY, "sliding_window": 5}))
    return model.to(dtype).eval()


def greedy_reference(model, ids, mask, n, eos=None):
    """Step-by-step argmax of the full forward, no cache; HF's positions and stopping."""
    mask = mask.clone()
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(n):
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
        token = logits[:, -1].float().argmax(-1)
        if eos is not None:
            token = torch.where(done, torch.full_like(token, eos), token)
            done |= token == eos
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if eos is not None and bool(done.all()):
            break
    return ids


# ----- parity with Hugging Face ------------------------------------------------------------

@pytest.mark.parametrize("prompts", sorted(LENGTHS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_hf(variant, prompts):
    hf = hf_model(variant)
    model = from_pretrained(hf).eval()
    ids, mask = left_padded(LENGTHS[prompts])
    n = 12
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
    assert torch.equal(model.generate(ids, n, attention_mask=mask), expected)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_greedy_eos_matches_hf(variant):
    hf = hf_model(variant)
    model = from_pretrained(hf).eval()
    ids, mask = left_padded(LENGTHS["left-padded"])
    n = 16
    free = model.generate(ids, n, attention_mask=mask)
    eos = int(free[1, ids.shape[1] + 2])  # sequence 1's third new token: it stops there
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos)
    out = model.generate(ids, n, attention_mask=mask, eos_token_id=eos)
    assert torch.equal(out, expected)
    assert (out[1, ids.shape[1] + 2:] == eos).all()
    # all sequences finished: the output stops early
    late = int(free[0, ids.shape[1]])
    out = model.generate(ids[:1], n, attention_mask=mask[:1], eos_token_id=[V - 1, late])
    assert out.shape == (1, ids.shape[1] + 1) and int(out[0, -1]) == late


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_repetition_penalty_matches_hf(variant):
    hf = hf_model(variant)
    model = from_pretrained(hf).eval()
    ids = left_padded([8])[0]
    for penalty in (1.5, 0.7):
        expected = hf.generate(ids, max_new_tokens=12, do_sample=False,
                               repetition_penalty=penalty)
        assert torch.equal(model.generate(ids, 12, repetition_penalty=penalty), expected)


def test_processors_match_hf():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, V, generator=g) * 3
    ids = torch.randint(0, V, (5, 11), generator=g)
    seen = torch.zeros(5, V, dtype=torch.bool).scatter_(1, ids, True)
    hf_pen = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.3), hf_pen)
    for k in (1, 7, V + 5):
        hf_k = transformers.TopKLogitsWarper(k)(ids, logits.clone())
        assert torch.equal(apply_top_k(logits, k), hf_k)
    for p in (0.05, 0.5, 0.9):
        hf_p = transformers.TopPLogitsWarper(p)(ids, logits.clone())
        assert torch.equal(apply_top_p(logits, p), hf_p)


# ----- self-consistency --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_greedy_equals_stepwise_argmax_without_cache(kind, dtype):
    model = tiny(kind, dtype)
    ids, mask = left_padded([5, 11, 2])
    out = model.generate(ids, 10, attention_mask=mask)
    assert out.shape == (3, 21) and out.dtype == ids.dtype
    ref = greedy_reference(model, ids, mask, 10)
    if dtype == torch.float32:
        assert torch.equal(out, ref)
    else:  # bf16 rounding differs between the paths: the first new tokens agree
        assert torch.equal(out[:, :ids.shape[1] + 1], ref[:, :ids.shape[1] + 1])
    eos = int(out[0, ids.shape[1] + 1])
    out = model.generate(ids, 10, attention_mask=mask, eos_token_id=eos)
    if dtype == torch.float32:
        assert torch.equal(out, greedy_reference(model, ids, mask, 10, eos=eos))


def test_no_mask_int32_and_zero_new_tokens():
    model = tiny("llama")
    ids = left_padded([6])[0]
    out = model.generate(ids.int(), 5)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), model.generate(ids, 5, attention_mask=torch.ones_like(ids)))
    assert torch.equal(model.generate(ids, 0), ids)


def test_llama_rotary_growth_during_generate_keeps_training_working():
    model = Llama(LlamaConfig(**{**LLAMA_TINY, "max_position_embeddings": 8}))
    model.generate(left_padded([6])[0], 20)  # the rotary caches grow past 8 rows
    assert not model.model.rotary_emb.cos_cached.is_inference()
    ids = torch.randint(0, V, (2, 30))
    model.train()(ids, labels=ids).loss.backward()


# ----- sampling ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_sampling_reproducible_from_generator(kind):
    model = tiny(kind)
    ids, mask = left_padded([4, 7])
    kw = dict(attention_mask=mask, do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    a = model.generate(ids, 20, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(ids, 20, generator=torch.Generator().manual_seed(3), **kw)
    c = model.generate(ids, 20, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :ids.shape[1]], ids)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_top_k_1_and_tiny_top_p_equal_greedy(kind):
    model = tiny(kind)
    ids, mask = left_padded([4, 7])
    greedy = model.generate(ids, 12, attention_mask=mask)
    g = torch.Generator().manual_seed(0)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, temperature=5.0)):
        out = model.generate(ids, 12, attention_mask=mask, do_sample=True, generator=g, **kw)
        assert torch.equal(out, greedy), kw


# ----- streaming ---------------------------------------------------------------------------

def test_streamer_and_generate_stream():
    model = tiny("gpt")
    ids, mask = left_padded([3, 6])
    seen = []
    out = model.generate(ids, 8, attention_mask=mask, streamer=seen.append)
    assert len(seen) == 8 and all(t.shape == (2,) for t in seen)
    assert torch.equal(torch.stack(seen, 1), out[:, ids.shape[1]:])
    steps = list(model.generate_stream(ids, 8, attention_mask=mask))
    assert torch.equal(torch.stack(steps, 1), out[:, ids.shape[1]:])
    assert not torch.is_inference_mode_enabled()


# ----- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_bad_input_errors(kind):
    model = tiny(kind)
    name = "GPT" if kind == "gpt" else "Llama"
    ids = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match=rf"{name}.generate: max_new_tokens must be an int >= 0"):
        model.generate(ids, -1)
    with pytest.raises(ValueError, match="input_ids must be \\(B, T\\), got \\(5,\\)"):
        model.generate(ids[0], 3)
    with pytest.raises(TypeError, match="input_ids must be int64 or int32, got torch.float32"):
        model.generate(ids.float(), 3)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model.generate(ids, 3, attention_mask=torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"attention_mask\[1\] has no token"):
        model.generate(ids, 3, attention_mask=torch.tensor([[1] * 5, [0] * 5]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(ids, 3, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(ids, 3, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        model.generate(ids, 3, do_sample=True, top_k=-2)
    with pytest.raises(ValueError, match="eos_token_id must be"):
        model.generate(ids, 3, eos_token_id=[])
    with pytest.raises(ValueError, match="eos_token_id must be"):
        model.generate_stream(ids, 3, eos_token_id=-1)  # checked before the first step


def test_gpt_position_table_exceeded():
    model = tiny("gpt")  # block_size 48
    ids, mask = left_padded([40, 30])
    assert model.generate(ids, 8, attention_mask=mask).shape == (2, 48)
    with pytest.raises(ValueError, match=r"prompt \(40 tokens\) plus max_new_tokens \(9\) is "
                                         r"more than the position table holds \(48\)"):
        model.generate(ids, 9, attention_mask=mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_cuda_greedy_equals_cpu(kind):
    model = tiny(kind)
    ids, mask = left_padded([5, 11, 2])
    expected = model.generate(ids, 10, attention_mask=mask)
    out = model.cuda().generate(ids.cuda(), 10, attention_mask=mask.cuda())
    assert torch.equal(out.cpu(), expected)
