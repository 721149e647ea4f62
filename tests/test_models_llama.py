"""fastllm.models.Llama and its Mistral (sliding window) and Qwen2 (qkv bias, tied head)
variants: configs, parity with Hugging Face's LlamaForCausalLM / MistralForCausalLM /
Qwen2ForCausalLM (logits, loss, every parameter gradient under the 2x-PyTorch's-own-error
rule of tests/accuracy.py; bf16 forward), Llama 3 rope scaling, padding, HF weights both
ways, gradient accumulation, checkpointing, torch.compile and input errors."""

from __future__ import annotations


import pytest
import torch

from fastllm.models import Llama, LlamaConfig, from_pretrained
from tests.accuracy import assert_within_torch_error
from tests.test_models_gpt import (
    assert_bf16_loss_within_torch_error,
    assert_grads_within_torch_error,
)

V, T = 97, 13
TINY = dict(vocab_size=V, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# variant -> (HF class name, HF config class name, HF config extras)
VARIANTS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "llama3-scaled-tied": ("LlamaForCausalLM", "LlamaConfig", dict(
        rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0}, tie_word_embeddings=True)),
    "llama-bias-mha": ("LlamaForCausalLM", "LlamaConfig", dict(
        attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=5)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True,
                                                      num_key_value_heads=1)),
}


def hf_model(variant: str, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    cls_name, config_name, extras = VARIANTS[variant]
    config = getattr(transformers, config_name)(**{**TINY, **extras})
    config._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():  # HF zero-inits biases; random ones test them
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model.to(dtype).eval()


def hf_triplet(variant: str):
    """(HF fp32, HF fp64 with the same weights, fastllm from the fp32 one)."""
    hf = hf_model(variant)
    hf64 = hf_model(variant, torch.float64)
    hf64.load_state_dict(hf.state_dict())
    return hf, hf64, from_pretrained(hf)


def tiny_llama(**overrides) -> Llama:
    return Llama(LlamaConfig(**{**TINY, **overrides}))


# ----- configs ---------------------------------------------------------------------------

def test_from_name_table_and_derived_fields():
    c = LlamaConfig.from_name("smollm2-135m")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size, c.tie_word_embeddings) == (576, 30, 9, 3, 64, 49152, True)
    c = LlamaConfig.from_name("llama-3.2-1b")
    assert c.head_dim == 64 and c.rope_scaling["rope_type"] == "llama3"
    assert LlamaConfig.from_name("mistral-tiny").window_size == (4, 0)
    assert LlamaConfig(hidden_size=64, num_attention_heads=4).num_key_value_heads == 4
    with pytest.raises(ValueError, match="unknown name 'llama-9'"):
        LlamaConfig.from_name("llama-9")
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


def test_smollm2_parameter_count():
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_name("smollm2-135m"))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.parametrize("name", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
def test_tiny_named_configs_train_step(name):
    model = Llama(LlamaConfig.from_name(name))
    ids = torch.randint(0, model.config.vocab_size, (2, T))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----- parity with Hugging Face ----------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_parity_fp32_logits_loss_and_every_gradient(variant):
    hf, hf64, ours = hf_triplet(variant)
    ids = torch.randint(0, V, (3, T))
    labels = ids.clone()
    labels[2, :5] = -100

    o = ours(ids, labels=labels, return_logits=True)
    h = hf(ids, labels=labels)
    r = hf64(ids, labels=labels)
    f32 = torch.float32
    assert_within_torch_error("logits", o.logits, h.logits, r.logits, f32)
    assert_within_torch_error("loss", o.loss, h.loss, r.loss, f32)
    o.loss.backward()
    h.loss.backward()
    r.loss.backward()
    theirs = dict(hf.named_parameters())
    ref = dict(hf64.named_parameters())
    assert sorted(n for n, _ in ours.named_parameters()) == sorted(theirs)
    for name, p in ours.named_parameters():
        assert_within_torch_error(f"grad {name}", p.grad, theirs[name].grad, ref[name].grad, f32)


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_hf_parity_bf16_logits_loss_and_every_gradient(variant):
    """bf16 weights: logits, loss and every gradient against HF's float64 run, within 2x HF's
    own bf16 error (+ slack; gradients scaled as in assert_grads_within_torch_error)."""
    hf, hf64, _ = hf_triplet(variant)
    hf16 = hf_model(variant, torch.bfloat16)
    hf16.load_state_dict(hf.state_dict())
    ours = from_pretrained(hf, dtype=torch.bfloat16)
    ids = torch.randint(0, V, (3, T))
    labels = ids.clone()
    labels[2, :5] = -100
    o = ours(ids, labels=labels, return_logits=True)
    h = hf16(ids, labels=labels)
    r = hf64(ids, labels=labels)
    bf16 = torch.bfloat16
    assert o.logits.dtype == bf16 and o.loss.dtype == h.loss.dtype == torch.float32
    assert_within_torch_error("bf16 logits", o.logits, h.logits, r.logits, bf16)
    assert_bf16_loss_within_torch_error(o.loss, h.loss, r.loss)
    for out in (o, h, r):
        out.loss.backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert all(g.dtype == bf16 for g in ours_grads.values())
    assert_grads_within_torch_error(ours_grads, {n: p.grad for n, p in hf16.named_parameters()},
                                    {n: p.grad for n, p in hf64.named_parameters()}, bf16)


@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_padding_attention_mask_matches_hf_and_unpadded(variant):
    hf, _, ours = hf_triplet(variant)
    ids = torch.randint(0, V, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, 9:] = 0  # right padding
    with torch.no_grad():
        o = ours(ids, attention_mask=mask).logits
        h = hf(ids, attention_mask=mask).logits
        alone = ours(ids[:1, :9]).logits
    valid = mask.bool()
    torch.testing.assert_close(o[valid], h[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o[0, :9], alone[0], atol=1e-5, rtol=1e-5)


# ----- weights both ways -----------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_pretrained_loads_in_transformers_and_back(variant, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf, _, ours = hf_triplet(variant)
    ours.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == VARIANTS[variant][0]
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=1e-5)
        back = Llama.from_pretrained(tmp_path)
        torch.testing.assert_close(back(ids).logits, ours(ids).logits)
    assert back.config == ours.config


def test_from_pretrained_sharded_directory(tmp_path):
    hf, _, ours = hf_triplet("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = from_pretrained(tmp_path)
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits)


def test_from_pretrained_bad_source():
    with pytest.raises(TypeError, match="source must be an HF model directory or a "
                                        "transformers PreTrainedModel, got Linear"):
        from_pretrained(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_pretrained("/nonexistent/model")


def test_from_pretrained_missing_tensor(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    tiny_llama().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["lm_head.weight"], state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"lacks 2 tensors.*'lm_head\.weight', "
                                       r"'model\.layers\.0\.mlp\.up_proj\.weight'"):
        from_pretrained(tmp_path)


# (padding with position ids, gradient accumulation, bf16 / autocast, checkpointing and
# torch.compile: tests/test_models_causal_lm.py, for every decoder-only model)

# ----- bad input -------------------------------------------------------------------------

def test_bad_input_errors_name_the_argument():
    model = tiny_llama()
    ids = torch.randint(0, V, (2, T))
    with pytest.raises(TypeError, match="input_ids must be int64 or int32, got torch.int16"):
        model(ids.short())
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\), got \(2, 13, 1\)"):
        model(ids[..., None])
    with pytest.raises(ValueError, match=r"labels must have input_ids' shape \(2, 13\), got "
                                         r"\(13,\)"):
        model(ids, labels=ids[0])
    with pytest.raises(ValueError, match="position_ids must have input_ids' shape"):
        model(ids, position_ids=torch.arange(T))
    with pytest.raises(TypeError, match="attention_mask must be an integer or bool tensor"):
        model(ids, attention_mask=torch.ones(2, T))
    bad = ids.clone()
    bad[0, 3] = V
    with pytest.raises(ValueError, match=r"Llama: input_ids\[0, 3\] = 97 out of range: input_ids "
                                         r"must be in \[0, 97\) \(vocab_size=97\)"):
        model(bad)
    labels = ids.clone()
    labels[1, 2] = -5
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = -5 out of range: labels must be in "
                                         r"\[0, 97\) \(vocab_size=97\) or -100 \(ignored\)"):
        model(ids, labels=labels)
    with pytest.raises(ValueError, match=r"position_ids\[1, 0\] = -1 out of range: position_ids "
                                         r"must be >= 0"):
        model(ids, position_ids=torch.arange(-1, T - 1).repeat(2, 1) * torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="position_ids = -2 out of range"):
        model(ids, position_ids=-2)
    with pytest.raises(TypeError, match="position_ids must be None, an int offset or a"):
        model(ids, position_ids=1.5)


def test_sequences_longer_than_max_position_embeddings_run_as_in_hf():
    """Rotary positions have no table limit: like HF, a sequence longer than
    max_position_embeddings (64 here) runs, the rotary tables growing on demand."""
    hf, _, ours = hf_triplet("llama")
    ids = torch.randint(0, V, (1, 70))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
