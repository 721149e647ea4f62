"""fastllm.models.EncoderDecoder (BART, mBART, Marian): parity with Hugging Face's
BartForConditionalGeneration / MBartForConditionalGeneration / MarianMTModel (logits, loss
and every parameter gradient in fp32, logits in bf16, under the 2x-PyTorch's-own-error rule
of tests/accuracy.py) with padded sources and right-padded targets, the fused loss
(final_logits_bias included) and its gradient-accumulation normalisation, checkpointing,
autocast, torch.compile, greedy generation token-identical to HF's, sampling, HF weights
both ways, and input errors. Tiny random configs only (shared embeddings for BART, mBART and
Marian, separate ones with a smaller target vocabulary for a second Marian)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fastllm.models import EncoderDecoder, EncoderDecoderConfig, Seq2SeqLMOutput, from_pretrained
from fastllm.models.encoder_decoder import shift_tokens_right
from tests.accuracy import assert_within_torch_error

V = 99
COMMON = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
              decoder_ffn_dim=37, max_position_embeddings=64, dropout=0.0,
              attention_dropout=0.0, activation_dropout=0.0, init_std=0.3,
              forced_eos_token_id=None)
# variant -> (HF class, HF config class, config); eos None: the generation tests pass theirs
VARIANTS = {
    "bart": ("BartForConditionalGeneration", "BartConfig",
             dict(COMMON, pad_token_id=1, bos_token_id=0, eos_token_id=None,
                  decoder_start_token_id=2)),
    "mbart": ("MBartForConditionalGeneration", "MBartConfig",  # pre-LN, language-id shift
              dict(COMMON, pad_token_id=1, bos_token_id=0, eos_token_id=None,
                   decoder_start_token_id=None, scale_embedding=True)),
    "marian": ("MarianMTModel", "MarianConfig",
               dict(COMMON, pad_token_id=98, eos_token_id=None, decoder_start_token_id=98,
                    scale_embedding=True, activation_function="swish")),
    "marian-separate": ("MarianMTModel", "MarianConfig",
                        dict(COMMON, pad_token_id=70, eos_token_id=None,
                             decoder_start_token_id=70, scale_embedding=True,
                             activation_function="swish", decoder_vocab_size=71,
                             share_encoder_decoder_embeddings=False)),
}


def hf_model(variant: str, seed: int = 0):
    """A tiny HF model with random biases, LayerNorm affines and final_logits_bias (HF's init
    zeroes them, which would test nothing)."""
    transformers = pytest.importorskip("transformers")
    cls_name, config_name, config = VARIANTS[variant]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_name)(**config)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif "layer_norm" in name or "layernorm" in name:
                p.normal_(1.0, 0.1)
        model.final_logits_bias.normal_(0.0, 0.5)
    for k in ("forced_eos_token_id", "forced_bos_token_id", "eos_token_id"):
        setattr(model.generation_config, k, None)
    return model


def target_vocab(variant: str) -> int:
    return VARIANTS[variant][2].get("decoder_vocab_size", V)


def batch(variant: str, B: int = 3, S: int = 11, T: int = 9, seed: int = 1):
    """Padded sources (rows 1, 2 shorter) and right-padded targets (row 0 shorter):
    input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels."""
    cfg = VARIANTS[variant][2]
    pad, start = cfg["pad_token_id"], cfg["decoder_start_token_id"]  # None: mBART's shift
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 70, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    src = src.masked_fill(mask == 0, pad)
    labels = torch.randint(3, 70, (B, T), generator=g)
    labels[0, 6:] = -100
    dec = shift_tokens_right(labels, pad, start)
    dec_mask = torch.ones(B, T, dtype=torch.int64)
    dec_mask[0, 7:] = 0  # start + 6 labels are real
    return dict(input_ids=src, attention_mask=mask, decoder_input_ids=dec,
                decoder_attention_mask=dec_mask, labels=labels)


def tiny(variant: str = "bart", **overrides) -> EncoderDecoder:
    name = "marian-tiny" if variant == "marian" else "bart-tiny"
    torch.manual_seed(0)
    return EncoderDecoder(EncoderDecoderConfig.from_name(name, **{"dropout": 0.0, **overrides}))


def hf_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ----- configs ---------------------------------------------------------------------------

def test_from_name_table_and_parameter_counts():
    c = EncoderDecoderConfig.from_name("bart-base")
    assert (c.d_model, c.encoder_layers, c.decoder_attention_heads, c.vocab_size,
            c.position_offset, c.target_vocab_size) == (768, 6, 12, 50265, 2, 50265)
    m = EncoderDecoderConfig.from_name("marian-opus")
    assert (m.position_embedding, m.scale_embedding, m.layernorm_embedding, m.position_offset,
            m.activation_function) == ("sinusoidal", True, False, 0, "swish")
    # HF's BartForConditionalGeneration / MarianMTModel counts (tied table counted once)
    for name, count in (("bart-base", 139_420_416), ("bart-large", 406_291_456),
                        ("marian-opus", 73_886_208)):
        with torch.device("meta"):
            model = EncoderDecoder(EncoderDecoderConfig.from_name(name))
        assert sum(p.numel() for p in model.parameters()) == count, name
    with pytest.raises(ValueError, match="unknown name 'bart-huge'"):
        EncoderDecoderConfig.from_name("bart-huge")
    with pytest.raises(ValueError, match="multiple of decoder_attention_heads"):
        EncoderDecoderConfig(d_model=30, encoder_attention_heads=3, decoder_attention_heads=4)
    with pytest.raises(ValueError, match="activation_function must be one of"):
        EncoderDecoderConfig(activation_function="mish")


def test_shared_embeddings_are_one_tensor():
    model = tiny("bart")
    shared = model.model.shared.weight
    assert model.model.encoder.embed_tokens.weight is shared
    assert model.model.decoder.embed_tokens.weight is shared and model.lm_head.weight is shared
    sep = tiny("marian", share_encoder_decoder_embeddings=False, decoder_vocab_size=50,
               pad_token_id=7, decoder_start_token_id=7)
    assert sep.model.shared is None
    assert sep.lm_head.weight is sep.model.decoder.embed_tokens.weight
    assert sep.model.encoder.embed_tokens.weight.shape == (V, 32)
    assert sep.lm_head.weight.shape == (50, 32) and sep.final_logits_bias.shape == (1, 50)


# ----- parity with Hugging Face ----------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_parity_fp32_logits_loss_and_every_gradient(variant):
    """Padded sources, right-padded targets with decoder_attention_mask, labels with -100:
    logits (every position: padded rows see their sequence's real keys in both), loss and
    every parameter's gradient within 2x HF-fp32's error against HF in float64."""
    hf = hf_model(variant)
    hf64 = copy.deepcopy(hf).to(torch.float64)
    ours = from_pretrained(hf)
    assert isinstance(ours, EncoderDecoder) and not ours.training
    inputs = batch(variant)
    o = ours(**inputs, return_logits=True)
    h = hf(**inputs)
    r = hf64(**inputs)
    f32 = torch.float32
    assert isinstance(o, Seq2SeqLMOutput)
    assert_within_torch_error("encoder_last_hidden_state", o.encoder_last_hidden_state,
                              h.encoder_last_hidden_state, r.encoder_last_hidden_state, f32)
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


@pytest.mark.parametrize("variant", ["bart", "mbart", "marian"])
def test_hf_parity_bf16_forward(variant):
    hf = hf_model(variant)
    hf64 = copy.deepcopy(hf).to(torch.float64)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ours = from_pretrained(hf, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    inputs = {k: v for k, v in batch(variant).items() if k != "labels"}
    with torch.no_grad():
        o, h, r = ours(**inputs).logits, hf16(**inputs).logits, hf64(**inputs).logits
    assert o.dtype == torch.bfloat16
    assert_within_torch_error("bf16 logits", o, h, r, torch.bfloat16)


@pytest.mark.parametrize("variant", ["bart", "mbart", "marian"])
def test_labels_alone_shift_like_hf_and_padding_is_invisible(variant):
    """labels without decoder_input_ids: HF's shift_tokens_right (mBART's: the last real
    label starts the decoder); a padded source gives what the unpadded one gives."""
    hf = hf_model(variant)
    ours = from_pretrained(hf)
    inputs = batch(variant)
    with torch.no_grad():
        o = ours(inputs["input_ids"], inputs["attention_mask"], labels=inputs["labels"])
        h = hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
               labels=inputs["labels"])
        torch.testing.assert_close(o.loss, h.loss, atol=1e-5, rtol=1e-5)
        assert o.logits is None
        # source row 2 has 3 real tokens: alone, unpadded, it gives the same logits
        dec = inputs["decoder_input_ids"]
        padded = ours(inputs["input_ids"], inputs["attention_mask"], decoder_input_ids=dec).logits
        alone = ours(inputs["input_ids"][2:, :3], decoder_input_ids=dec[2:]).logits
    torch.testing.assert_close(padded[2], alone[0], atol=1e-5, rtol=1e-5)
    if variant == "mbart":
        labels = inputs["labels"]
        assert torch.equal(dec[:, 0], torch.stack([labels[0, 5], labels[1, -1], labels[2, -1]]))


def test_loss_uses_final_logits_bias_and_is_not_shifted():
    model = tiny("marian")
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 1.0)
    inputs = batch("marian")
    out = model(**inputs, return_logits=True)
    want = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V),
                                             inputs["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    plain = torch.nn.functional.linear(model.model.decoder(
        inputs["decoder_input_ids"], inputs["decoder_attention_mask"].bool(),
        out.encoder_last_hidden_state, inputs["attention_mask"].bool()), model.lm_head.weight)
    torch.testing.assert_close(out.logits, plain + model.final_logits_bias)
    # encoder_outputs skips the encoder
    again = model(attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                  decoder_input_ids=inputs["decoder_input_ids"],
                  decoder_attention_mask=inputs["decoder_attention_mask"],
                  encoder_outputs=(out.encoder_last_hidden_state,))
    torch.testing.assert_close(again.loss, out.loss)


# ----- training --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["bart", "marian"])
def test_num_items_in_batch_accumulation_equals_full_batch(variant):
    model = tiny(variant)
    inputs = batch(variant, B=4)
    inputs["labels"][2, 2:] = -100
    inputs["labels"][3, :5] = -100
    full = model(**inputs).loss
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    n_items = (inputs["labels"] != -100).sum()
    total = 0.0
    for sl in (slice(0, 1), slice(1, 4)):
        loss = model(**{k: v[sl] for k, v in inputs.items()}, num_items_in_batch=n_items).loss
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)


@pytest.mark.parametrize("variant", ["bart", "mbart"])
def test_gradient_checkpointing_gives_same_gradients(variant):
    model = tiny(variant, **({"model_type": "mbart", "normalize_before": True}
                             if variant == "mbart" else {}))
    inputs = batch(variant)
    model(**inputs).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(**inputs).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)
    model.gradient_checkpointing_disable()
    assert not model.model.decoder.gradient_checkpointing


def test_bf16_weights_and_autocast_train_step():
    inputs = batch("marian")
    model = tiny("marian")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    model = tiny("bart").to(torch.bfloat16)
    inputs = batch("bart")
    loss = model(**inputs).loss
    loss.backward()
    assert loss.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in model.parameters())


def test_torch_compile_fullgraph_forward_backward():
    model = tiny("bart")
    inputs = batch("bart")
    eager = model(**inputs).loss
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(**inputs).loss
    loss.backward()
    torch.testing.assert_close(loss, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)


# ----- generation ------------------------------------------------------------------------

HF_GREEDY = dict(do_sample=False, num_beams=1, no_repeat_ngram_size=0, min_length=0,
                 forced_bos_token_id=None, forced_eos_token_id=None)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_hf_with_padded_sources_and_eos(variant):
    """Token-identical to HF's greedy search on padded sources: plain, and with a repetition
    penalty (random tied-embedding models otherwise tend to repeat one token) and EOS."""
    hf = hf_model(variant)
    model = from_pretrained(hf)
    inputs = batch(variant)
    src, mask = inputs["input_ids"], inputs["attention_mask"]
    pad = VARIANTS[variant][2]["pad_token_id"]
    n = 12
    plain = model.generate(src, n, attention_mask=mask)  # config eos None: never stops
    assert plain.shape == (3, n + 1)
    assert torch.equal(plain, hf.generate(src, attention_mask=mask, max_new_tokens=n,
                                          **HF_GREEDY))
    kw = dict(attention_mask=mask, repetition_penalty=3.0)
    free = model.generate(src, n, **kw)
    assert torch.equal(free, hf.generate(src, max_new_tokens=n, **kw, **HF_GREEDY))
    assert len(set(free[:, 1:].flatten().tolist())) > 12  # not a degenerate repetition
    eos = int(free[1, 3])  # sequence 1's third new token: it stops there
    expected = hf.generate(src, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad, **kw,
                           **HF_GREEDY)
    out = model.generate(src, n, eos_token_id=eos, **kw)
    assert torch.equal(out, expected)
    assert (out[1, 4:] == pad).all()
    # every sequence finished: the output stops early
    out = model.generate(src[1:2], n, attention_mask=mask[1:2], eos_token_id=[eos, V - 1],
                         repetition_penalty=3.0)
    assert out.shape == (1, 4) and int(out[0, -1]) == eos


def test_greedy_equals_stepwise_argmax_without_cache():
    """The cached decoder (self-attention cache, cross-attention K/V once) against the full
    forward re-run on the growing target, with the same repetition penalty."""
    from fastllm.models.generation import apply_repetition_penalty

    model = from_pretrained(hf_model("bart"))
    inputs = batch("bart")
    src, mask = inputs["input_ids"], inputs["attention_mask"]
    out = model.generate(src, 8, attention_mask=mask, repetition_penalty=3.0)
    dec = out[:, :1]
    with torch.no_grad():
        for _ in range(8):
            logits = model(src, mask, decoder_input_ids=dec).logits[:, -1].float()
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, dec, True)
            logits = apply_repetition_penalty(logits, seen, 3.0)
            dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, dec)


def test_sampling_reproducible_streaming_and_top_k_1():
    model = tiny("marian").eval()
    inputs = batch("marian")
    src, mask = inputs["input_ids"], inputs["attention_mask"]
    kw = dict(attention_mask=mask, do_sample=True, temperature=1.5, top_k=40, top_p=0.95,
              eos_token_id=0)
    a = model.generate(src, 15, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(src, 15, generator=torch.Generator().manual_seed(3), **kw)
    c = model.generate(src, 15, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == model.config.decoder_start_token_id).all()
    greedy = model.generate(src, 10, attention_mask=mask)
    top1 = model.generate(src, 10, attention_mask=mask, do_sample=True, top_k=1,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy)
    seen = []
    out = model.generate(src, 6, attention_mask=mask, streamer=seen.append)
    steps = list(model.generate_stream(src, 6, attention_mask=mask))
    assert torch.equal(torch.stack(seen, 1), out[:, 1:])
    assert torch.equal(torch.stack(steps, 1), out[:, 1:])
    assert model.generate(src, 0).shape == (3, 1)


def test_generate_bf16_and_mbart_start_token():
    model = tiny("bart").eval().to(torch.bfloat16)
    out = model.generate(batch("bart")["input_ids"], 5, decoder_start_token_id=0)
    assert out.shape == (3, 6) and (out[:, 0] == 0).all()
    model = tiny("bart", model_type="mbart", normalize_before=True, decoder_start_token_id=None,
                 bos_token_id=None)
    with pytest.raises(ValueError, match="pass decoder_start_token_id"):
        model.generate(batch("bart")["input_ids"], 5)
    assert (model.generate(batch("bart")["input_ids"], 2, decoder_start_token_id=7)[:, 0]
            == 7).all()


# ----- weights both ways -----------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_pretrained_loads_in_transformers(variant, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = from_pretrained(hf_model(variant))
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == VARIANTS[variant][0]
    inputs = {k: v for k, v in batch(variant).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs).logits, ours(**inputs).logits,
                                   atol=1e-5, rtol=1e-5)
        back = EncoderDecoder.from_pretrained(tmp_path)  # and back, from the directory
        torch.testing.assert_close(back(**inputs).logits, ours(**inputs).logits)
    torch.testing.assert_close(back.final_logits_bias, ours.final_logits_bias)
    assert back.lm_head.weight is back.model.decoder.embed_tokens.weight


def test_from_pretrained_missing_tensor_unsupported_flags_and_wrong_class(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    tiny("bart").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["final_logits_bias"]  # optional, as in HF: zeros
    assert not from_pretrained(tmp_path).final_logits_bias.any()
    del state["model.decoder.layers.1.fc1.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"lacks 1 tensors.*model\.decoder\.layers\.1\.fc1\.bias"):
        from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for flag, value in (("normalize_before", True), ("add_bias_logits", True),
                        ("add_final_layer_norm", True), ("static_position_embeddings", True)):
        (tmp_path / "config.json").write_text(json.dumps({**config, flag: value}))
        with pytest.raises(ValueError, match=f"bart config {flag}=True is not supported"):
            from_pretrained(tmp_path)
    from fastllm.models import GPT

    with pytest.raises(TypeError, match="holds a EncoderDecoder"):
        GPT.from_pretrained(hf_model("bart"))


# ----- bad input -------------------------------------------------------------------------

def test_bad_input_errors_name_the_argument():
    model = tiny("bart")
    ids = torch.randint(3, V, (2, 7))
    dec = torch.randint(3, V, (2, 5))
    with pytest.raises(TypeError, match="input_ids must be int64 or int32, got torch.float32"):
        model(ids.float(), decoder_input_ids=dec)
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\), got \(14,\)"):
        model(ids.flatten(), decoder_input_ids=dec)
    with pytest.raises(ValueError, match=r"input_ids has 65 tokens, more than the position "
                                         r"table holds \(max_position_embeddings=64\)"):
        model(torch.randint(3, V, (2, 65)), decoder_input_ids=dec)
    with pytest.raises(ValueError, match=r"decoder_input_ids has 65 tokens"):
        model(ids, decoder_input_ids=torch.randint(3, V, (2, 65)))
    with pytest.raises(TypeError, match="decoder_input_ids must be int64 or int32"):
        model(ids, decoder_input_ids=dec.float())
    with pytest.raises(ValueError, match=r"labels must have decoder_input_ids' shape \(2, 5\), "
                                         r"got \(2, 4\)"):
        model(ids, decoder_input_ids=dec, labels=dec[:, 1:])
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        model(ids, labels=dec.float())
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(ids, torch.ones(2, 8, dtype=torch.long), decoder_input_ids=dec)
    with pytest.raises(ValueError, match="decoder_attention_mask must have decoder_input_ids' "
                                         "shape"):
        model(ids, decoder_input_ids=dec, decoder_attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="pass decoder_input_ids or labels"):
        model(ids)
    with pytest.raises(ValueError, match=r"input_ids\[0, 3\] = 99 out of range: input_ids must "
                                         r"be in \[0, 99\) \(vocab_size=99\)"):
        model(ids.index_put((torch.tensor(0), torch.tensor(3)), torch.tensor(V)),
              decoder_input_ids=dec)
    with pytest.raises(ValueError, match=r"decoder_input_ids\[1, 0\] = -1 out of range"):
        model(ids, decoder_input_ids=dec.index_put((torch.tensor(1), torch.tensor(0)),
                                                   torch.tensor(-1)))
    bad_labels = dec.clone()
    bad_labels[1, 2] = V
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 99 out of range: labels must be in "
                                         r"\[0, 99\) .* or -100 \(ignored\)"):
        model(ids, decoder_input_ids=dec, labels=bad_labels)
    with pytest.raises(ValueError, match="decoder_input_ids has batch 1, the source has 2"):
        model(ids, decoder_input_ids=dec[:1])
    with pytest.raises(ValueError, match=r"max_new_tokens \(65\) is more than"):
        model.generate(ids, 65)
    with pytest.raises(ValueError, match=r"EncoderDecoder.generate: attention_mask\[1\] has no"):
        model.generate(ids, 3, attention_mask=torch.tensor([[1] * 7, [0] * 7]))
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate_stream(ids, 3, do_sample=True, top_p=0.0)
