"""fastllm.models.GPT: configs, the fused loss and its gradient-accumulation normalisation,
parity with Hugging Face's GPT2LMHeadModel (logits, loss, every parameter gradient, under the
2x-PyTorch's-own-error rule of tests/accuracy.py), HF weights both ways, gradient
checkpointing, torch.compile, and input errors. Tiny random configs only."""

from __future__ import annotations

import json

import pytest
import torch

from fastllm.models import GPT, GPTConfig, from_pretrained
from tests.accuracy import ATOL, assert_within_torch_error

V, T = 97, 13  # odd sizes on purpose
TINY = dict(vocab_size=V, block_size=32, n_layer=2, n_head=3, n_embd=48)


def tiny_gpt(**overrides) -> GPT:
    return GPT(GPTConfig(**{**TINY, **overrides}))


def hf_gpt2(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=48, n_layer=2, n_head=3, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def hf_grads(model) -> dict[str, torch.Tensor]:
    """HF's gradients under fastllm's parameter names and layouts (Conv1D transposed)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if name.startswith("transformer.h.") and name.endswith(
                ("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            g = g.t()
        out[name] = g
    return out


# ----- configs ---------------------------------------------------------------------------

def test_from_name_table_and_derived_fields():
    c = GPTConfig.from_name("gpt2")
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, c.head_dim) == \
        (12, 12, 768, 1024, 50257, 64)
    assert GPTConfig.from_name("gpt2-medium").n_embd == 1024
    mini = GPTConfig.from_name("gpt-mini", vocab_size=101)
    assert (mini.n_layer, mini.vocab_size, mini.head_dim) == (6, 101, 32)
    with pytest.raises(ValueError, match="unknown name 'gpt5'"):
        GPTConfig.from_name("gpt5")
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=50, n_head=3)


def test_gpt2_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt2"))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # tied head counted once


# ----- the loss --------------------------------------------------------------------------

def test_logits_none_with_labels_unless_asked():
    model = tiny_gpt()
    ids = torch.randint(0, V, (2, T))
    out = model(ids, labels=ids)
    assert out.logits is None and out.loss.dim() == 0
    out = model(ids, labels=ids, return_logits=True)
    assert out.logits.shape == (2, T, V)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V),
                                            ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert model(ids).loss is None and model(ids).logits.shape == (2, T, V)


# ----- parity with Hugging Face ----------------------------------------------------------

def test_hf_parity_fp32_logits_loss_and_every_gradient():
    hf = hf_gpt2()
    hf64 = hf_gpt2(torch.float64)
    hf64.load_state_dict(hf.state_dict())
    ours = from_pretrained(hf)
    ids = torch.randint(0, V, (3, T))
    labels = ids.clone()
    labels[1, :4] = -100

    o = ours(ids, labels=labels, return_logits=True)
    h = hf(ids, labels=labels)
    r = hf64(ids, labels=labels)
    f32 = torch.float32
    assert_within_torch_error("logits", o.logits, h.logits, r.logits, f32)
    assert_within_torch_error("loss", o.loss, h.loss, r.loss, f32)
    o.loss.backward()
    h.loss.backward()
    r.loss.backward()
    theirs, ref = hf_grads(hf), hf_grads(hf64)
    names = [n for n, _ in ours.named_parameters()]
    assert sorted(names) == sorted(theirs)
    for name, p in ours.named_parameters():
        assert_within_torch_error(f"grad {name}", p.grad, theirs[name], ref[name], f32)


def assert_grads_within_torch_error(ours: dict, theirs: dict, ref: dict, dtype) -> None:
    """Every parameter gradient under the rule of tests/accuracy.py, each divided by its
    reference's largest magnitude first: the slack (1e-2 in bf16) is then relative to the
    gradient's size, where a fixed 1e-2 would exceed a tiny model's small gradients."""
    assert sorted(ours) == sorted(ref)
    for name, g in ours.items():
        scale = ref[name].abs().max().item() or 1.0
        assert_within_torch_error(f"grad {name}", g.double() / scale,
                                  theirs[name].double() / scale, ref[name].double() / scale,
                                  dtype)


def assert_bf16_loss_within_torch_error(ours, theirs, ref) -> None:
    """The rule, plus one bf16 rounding of the loss value: the fused op returns its float32
    result rounded to the input's dtype (torch's rule for fastllm.functional; the model then
    casts it to float32), up to half a bf16 ulp, |loss| * 2**-8, that HF's float32 loss
    computed from bf16 logits does not have."""
    err, torch_err = abs(ours.item() - ref.item()), abs(theirs.item() - ref.item())
    bound = 2 * torch_err + ATOL[torch.bfloat16] + abs(ref.item()) * 2**-8
    assert err <= bound, f"bf16 loss: error {err:.3g} > {bound:.3g} (torch's {torch_err:.3g})"


def test_hf_parity_bf16_logits_loss_and_every_gradient():
    """bf16 weights: logits, loss and every gradient against HF's float64 run, within 2x HF's
    own bf16 error (+ slack; gradients scaled as in assert_grads_within_torch_error)."""
    hf = hf_gpt2()
    hf64 = hf_gpt2(torch.float64)
    hf64.load_state_dict(hf.state_dict())
    hf16 = hf_gpt2(torch.bfloat16)
    hf16.load_state_dict(hf.state_dict())
    ours = from_pretrained(hf, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, V, (3, T))
    labels = ids.clone()
    labels[1, :4] = -100
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
    assert_grads_within_torch_error(ours_grads, hf_grads(hf16), hf_grads(hf64), bf16)


def test_padding_attention_mask_matches_hf_and_unpadded():
    hf = hf_gpt2()
    ours = from_pretrained(hf)
    ids = torch.randint(0, V, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    with torch.no_grad():
        o = ours(ids, attention_mask=mask).logits
        h = hf(ids, attention_mask=mask).logits
        alone = ours(ids[1:, :8]).logits
    valid = mask.bool()
    torch.testing.assert_close(o[valid], h[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o[1, :8], alone[0], atol=1e-5, rtol=1e-5)


# ----- weights both ways -----------------------------------------------------------------

def test_save_pretrained_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = tiny_gpt().eval()
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    back = from_pretrained(tmp_path)  # and back again, from the directory
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits)
    assert back.lm_head.weight is back.transformer.wte.weight


def test_from_pretrained_hf_directory_and_class_method(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_from_pretrained_original_gpt2_layout(tmp_path):
    """openai-community/gpt2's model.safetensors: bare ``GPT2Model`` keys ("h.0.attn...",
    no "transformer." prefix), the causal-mask buffers "h.N.attn.bias", no lm_head."""
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    ours = tiny_gpt().eval()
    ours.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v
             for k, v in load_file(tmp_path / "model.safetensors").items()}
    for i in range(TINY["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(state, tmp_path / "model.safetensors")
    loaded = from_pretrained(tmp_path)
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits)


def test_from_pretrained_missing_tensor_and_unknown_architecture(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    tiny_gpt().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"lacks 1 tensors.*transformer\.h\.1\.mlp\.c_fc\.bias"):
        from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gptj"}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='gptj'"):
        from_pretrained(tmp_path)


# (padding with position ids, gradient accumulation, bf16 / autocast, checkpointing and
# torch.compile: tests/test_models_causal_lm.py, for every decoder-only model)

# ----- bad input -------------------------------------------------------------------------

def test_bad_input_errors_name_the_argument():
    model = tiny_gpt()
    ids = torch.randint(0, V, (2, T))
    with pytest.raises(TypeError, match="input_ids must be int64 or int32, got torch.float32"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\), got \(26,\)"):
        model(ids.flatten())
    with pytest.raises(ValueError, match="input_ids has 33 tokens, more than the position "
                                         r"table holds \(block_size=32\)"):
        model(torch.randint(0, V, (1, 33)))
    with pytest.raises(ValueError, match=r"labels must have input_ids' shape \(2, 13\), got "
                                         r"\(2, 12\)"):
        model(ids, labels=ids[:, 1:])
    with pytest.raises(TypeError, match="labels must be an integer or bool tensor"):
        model(ids, labels=ids.float())
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(ids, attention_mask=torch.ones(2, T + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask must be an integer or bool tensor, "
                                        "got torch.float32"):
        model(ids, attention_mask=torch.ones(2, T))


def test_out_of_range_values_name_the_argument_value_and_limit():
    """Ids outside the tables: ValueError (also an IndexError, torch's kind for a bad index)
    naming the first offending element, its value and the config field."""
    model = tiny_gpt()
    ids = torch.randint(0, V, (2, T))
    bad = ids.clone()
    bad[1, 5] = V
    with pytest.raises(ValueError, match=r"GPT: input_ids\[1, 5\] = 97 out of range: input_ids "
                                         r"must be in \[0, 97\) \(vocab_size=97\)"):
        model(bad, labels=ids)
    bad[1, 5] = -1
    with pytest.raises(IndexError, match=r"input_ids\[1, 5\] = -1"):
        model(bad)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored: fine
    labels[0, 7] = 1000
    with pytest.raises(ValueError, match=r"labels\[0, 7\] = 1000 out of range: labels must be "
                                         r"in \[0, 97\) \(vocab_size=97\) or -100 \(ignored\)"):
        model(ids, labels=labels)
    with pytest.raises(ValueError, match=r"position_ids\[0, 12\] = 32 out of range: "
                                         r"position_ids must be in \[0, 32\) \(block_size=32\)"):
        model(ids, position_ids=torch.arange(20, 20 + T).repeat(2, 1))


def test_models_use_fastllm_layers_not_torch_ops():
    """The models are assembled from fastllm.nn / fastllm.functional, never torch.ops."""
    from pathlib import Path

    import fastllm.models

    for path in Path(fastllm.models.__file__).parent.glob("*.py"):
        assert "torch.ops" not in path.read_text(), f"{path.name} calls torch.ops"
