"""fastllm.patch on Hugging Face families and plain PyTorch modules.

Parity: a patched model against the same model unpatched, both against a float64 copy of the
unpatched model (the truth), under the 2x rule (tests/accuracy.py), for the logits (eval) and
the loss and every parameter gradient (training, where the causal-LM loss is fused).
Undo: module identity, instance attributes and bit-identical outputs. Nothing global: a second
model in the process is untouched.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastllm
from tests.accuracy import assert_within_torch_error

transformers = pytest.importorskip("transformers")

V, B, T = 99, 3, 11


def _tiny(family: str):
    """A tiny random model of ``family``, dropout off (fixed seed)."""
    torch.manual_seed(0)
    t = transformers
    llama_like = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**llama_like))
    if family == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**llama_like, sliding_window=5))
    if family == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**llama_like, tie_word_embeddings=True))
    if family == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                              bos_token_id=0, eos_token_id=0))
    if family == "bert":
        return t.BertForMaskedLM(t.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=96,
                                              hidden_dropout_prob=0.0,
                                              attention_probs_dropout_prob=0.0))
    seq2seq = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                   decoder_ffn_dim=64, dropout=0.0, attention_dropout=0.0,
                   activation_dropout=0.0, pad_token_id=1, decoder_start_token_id=2,
                   max_position_embeddings=64)
    if family == "bart":
        return t.BartForConditionalGeneration(t.BartConfig(**seq2seq))
    if family == "marian":
        return t.MarianMTModel(t.MarianConfig(**seq2seq))
    if family == "mbart":
        return t.MBartForConditionalGeneration(t.MBartConfig(**seq2seq))
    if family == "t5":
        return t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=1,
            decoder_start_token_id=2))
    raise ValueError(family)


FAMILIES = ["gpt2", "bert", "llama", "mistral", "qwen2", "bart", "marian", "mbart", "t5"]
CAUSAL = {"gpt2", "llama", "mistral", "qwen2"}

# what patch() must replace in each tiny model (2 layers)
EXPECTED_COUNTS = {
    "llama": dict(attention=1, norm=5, rotary=2, mlp=2, cross_entropy=1, fused_lm_loss=1),
    "mistral": dict(attention=1, norm=5, rotary=2, mlp=2, cross_entropy=1, fused_lm_loss=1),
    "qwen2": dict(attention=1, norm=5, rotary=2, mlp=2, cross_entropy=1, fused_lm_loss=1),
    "gpt2": dict(attention=1, norm=5, cross_entropy=1, fused_lm_loss=1),
    "bert": dict(attention=1, norm=6),  # embeddings + 2 per layer + the MLM head's transform
    "bart": dict(attention=1, norm=12),
    "marian": dict(attention=1, norm=10),
    "mbart": dict(attention=1, norm=14),  # BART's 12 + the two stacks' final LayerNorms
    "t5": dict(attention=1, norm=12),  # 2 + 3 per decoder layer + 2 per encoder layer + 2 final
}


def _batch(family: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if family in CAUSAL:
        mask[1, :4] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if family in ("bart", "marian", "mbart", "t5"):
        dec = torch.randint(3, V, (B, 7), generator=g)
        dec_mask = torch.ones(B, 7, dtype=torch.long)
        dec_mask[0, 5:] = 0
        batch.update(decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                     labels=dec.masked_fill(dec_mask == 0, -100))
    return batch


def _valid(family: str, batch):
    """(B, T, 1) 1/0: the output positions that mean something (padded rows do not)."""
    m = batch.get("decoder_attention_mask", batch["attention_mask"])
    return m[..., None].double()


def _run(model, batch, *, train: bool):
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    if train:
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return out.loss.detach(), grads
    return out.logits.detach(), None


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_matches_unpatched_fp32(family):
    theirs = _tiny(family)
    truth = copy.deepcopy(theirs).double()
    ours = copy.deepcopy(theirs)
    handle = fastllm.patch(ours)
    counts = handle.report.counts()
    assert counts == EXPECTED_COUNTS[family], str(handle.report)
    batch = _batch(family)
    valid = _valid(family, batch)

    logits = [_run(m, batch, train=False)[0] for m in (ours, theirs, truth)]
    assert_within_torch_error(f"{family} logits", *(x * valid for x in logits), torch.float32)

    (loss_o, g_o), (loss_t, g_t), (loss_r, g_r) = (
        _run(m, batch, train=True) for m in (ours, theirs, truth))
    assert_within_torch_error(f"{family} loss", loss_o, loss_t, loss_r, torch.float32)
    assert g_o.keys() == g_r.keys()
    for name in g_r:
        assert_within_torch_error(f"{family} grad {name}", g_o[name], g_t[name], g_r[name],
                                  torch.float32)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama", "bart", "t5"])
def test_patched_matches_unpatched_bf16(family):
    theirs = _tiny(family).to(torch.bfloat16)
    truth = copy.deepcopy(theirs).double()
    ours = copy.deepcopy(theirs)
    fastllm.patch(ours)
    batch = _batch(family)
    valid = _valid(family, batch)
    logits = [_run(m, batch, train=False)[0] for m in (ours, theirs, truth)]
    assert_within_torch_error(f"{family} bf16 logits", *(x * valid for x in logits),
                              torch.bfloat16)
    (loss_o, g_o), (loss_t, g_t), (loss_r, g_r) = (
        _run(m, batch, train=True) for m in (ours, theirs, truth))
    assert_within_torch_error(f"{family} bf16 loss", loss_o, loss_t, loss_r, torch.bfloat16)
    for name in g_r:
        assert_within_torch_error(f"{family} bf16 grad {name}", g_o[name], g_t[name],
                                  g_r[name], torch.bfloat16)


def _snapshot(model):
    return ({n: m for n, m in model.named_modules()},
            {n: dict(m.__dict__) for n, m in model.named_modules()},
            model.config._attn_implementation if hasattr(model, "config") else None)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bart"])
def test_undo_restores_everything(family):
    model = _tiny(family).eval()
    batch = _batch(family)
    before_out = model(**batch).logits
    modules, dicts, attn = _snapshot(model)
    handle = fastllm.patch(model)
    assert model.config._attn_implementation == "fastllm"
    handle.undo()
    modules2, dicts2, attn2 = _snapshot(model)
    assert modules2.keys() == modules.keys()
    for name, m in modules.items():
        assert modules2[name] is m, name  # the same objects back in their places
        assert dicts2[name].keys() == dicts[name].keys(), name  # no attribute left behind
    assert attn2 == attn
    if family != "bart":  # positional arguments reach the patched forwards by their names
        with fastllm.patch(model):
            positional = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        valid = _valid(family, batch)
        torch.testing.assert_close(positional * valid, before_out * valid, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(**batch).logits, before_out)  # bit for bit
    handle.undo()  # a second undo does nothing
    assert not handle.active


def test_context_manager_and_patch_twice():
    model = _tiny("llama")
    with fastllm.patch(model) as handle:
        assert handle.active and type(model.model.norm) is fastllm.nn.RMSNorm
        with pytest.warns(UserWarning, match="already patched"):
            again = fastllm.patch(model)
        assert again is handle
        assert handle.report.counts()["norm"] == 5  # not doubled
    assert not handle.active and type(model.model.norm).__name__ == "LlamaRMSNorm"
    with fastllm.patch(model, rotary=False) as second:  # after undo, patching works again
        assert "rotary" not in second.report.counts()


def test_two_models_one_patched():
    a, b = _tiny("llama").eval(), _tiny("llama").eval()
    batch = _batch("llama")
    before = b(**batch).logits
    with fastllm.patch(a):
        assert b.config._attn_implementation == "sdpa"
        assert type(b.model.norm).__name__ == "LlamaRMSNorm"
        assert torch.equal(b(**batch).logits, before)
        assert "forward" not in b.__dict__


def test_state_dict_unchanged_and_save_pretrained_loads_in_transformers(tmp_path):
    model = _tiny("llama").eval()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with fastllm.patch(model):
        patched = model.state_dict()
        assert patched.keys() == keys.keys()
        assert all(torch.equal(patched[k], v) for k, v in keys.items())
        model.save_pretrained(tmp_path)
        batch = _batch("llama")
        ours = model(**batch).logits
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    valid = _valid("llama", batch)
    assert torch.allclose(plain(**batch).logits * valid, ours * valid, atol=1e-5)


def test_training_forward_logits_switch_and_num_items_in_batch():
    model = _tiny("llama").train()
    batch = _batch("llama")
    with fastllm.patch(model):
        out = model(**batch)
        assert out.logits is None and out.loss.dtype == torch.float32
        # num_items_in_batch: summed micro-batch losses equal the full batch's mean
        n = int((batch["labels"][:, 1:] != -100).sum())
        parts = [model(**{k: v[i:i + 1] for k, v in batch.items()},
                       num_items_in_batch=n).loss for i in range(B)]
        torch.testing.assert_close(sum(parts), out.loss, rtol=1e-5, atol=1e-6)
        model.eval()  # eval: logits come back, the loss is fastllm's loss function's
        out_eval = model(**batch)
        assert out_eval.logits is not None
        torch.testing.assert_close(out_eval.loss, out.loss, rtol=1e-5, atol=1e-6)
    model.train()
    with fastllm.patch(model, keep_logits=True) as handle:
        out = model(**batch)
        assert out.logits is not None and "fused_lm_loss" not in handle.report.counts()
        assert any("keep_logits" in reason for _, _, reason in handle.report.skipped)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "bart"])
def test_generate_matches_unpatched(family):
    model = _tiny(family).eval()
    ids = torch.randint(3, V, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if family == "bart":  # encoder padding on the right
        mask[1, 5:] = 0
        mask[2, 2:] = 0
    else:  # decoder-only: left padding, as transformers' generate wants
        mask[1, :4] = 0
        mask[2, :7] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    if family == "bart":
        kw.update(num_beams=1, no_repeat_ngram_size=0, forced_bos_token_id=None,
                  forced_eos_token_id=None, min_length=0)
    expected = model.generate(ids, **kw)
    with fastllm.patch(model):
        got = model.generate(ids, **kw)
    assert torch.equal(got, expected)


def test_refuses_before_changing_anything(monkeypatch):
    cfg = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64)
    unknown = transformers.GPTNeoXForCausalLM(cfg)
    modules = dict(unknown.named_modules())
    with pytest.raises(ValueError, match="gpt_neox.*does not know"):
        fastllm.patch(unknown)
    assert dict(unknown.named_modules()) == modules
    assert unknown.config._attn_implementation != "fastllm"

    model = _tiny("llama")
    from fastllm.integrations import transformers as integration

    monkeypatch.setattr(integration, "installed_version", lambda: "4.40.0")
    with pytest.raises(RuntimeError, match="4.40.0 is outside the tested range"):
        fastllm.patch(model)
    assert type(model.model.norm).__name__ == "LlamaRMSNorm" and "forward" not in model.__dict__
    monkeypatch.setenv("FASTLLM_ALLOW_UNTESTED_TRANSFORMERS", "1")
    fastllm.patch(model).undo()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastllm.patch("llama")


def test_compile_fullgraph_patched_llama():
    model = _tiny("llama").train()
    ref = copy.deepcopy(model)
    batch = _batch("llama")
    batch.pop("attention_mask")  # a dynamic-cache-free, mask-free training step
    fastllm.patch(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(**batch).loss
    loss.backward()
    fastllm.patch(ref, cross_entropy=False, attention=False, norm=False, rotary=False, mlp=False)
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_finetune_50_steps_patched_matches_unpatched():
    base = _tiny("llama")
    batch = _batch("llama")
    curves = []
    for patched in (False, True):
        model = copy.deepcopy(base).train()
        handle = fastllm.patch(model) if patched else None
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(50):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
        if handle:
            handle.undo()
    plain, fused = curves
    assert fused[-1] < 0.5 * fused[0]  # it learns
    # fp32 rounding differences compound through 50 Adam steps; they stay far below the
    # loss's own movement (several units)
    assert (fused - plain).abs().max() < 2e-3, (plain, fused)


def test_peft_lora_patch_and_unpatch():
    peft = pytest.importorskip("peft")
    base = _tiny("llama")
    batch = _batch("llama")
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
        lora_dropout=0.0, init_lora_weights=False))
    lora.train()
    expected = lora(**batch).loss
    expected.backward()
    grads = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
    lora.zero_grad(set_to_none=True)
    modules = dict(lora.named_modules())
    with fastllm.patch(lora) as handle:
        assert handle.report.counts()["mlp"] == 2
        got = lora(**batch).loss
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for n, p in lora.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
        # the LoRA layers sit inside the swapped GatedMLP
        mlp = lora.base_model.model.model.layers[0].mlp
        assert type(mlp) is fastllm.nn.GatedMLP
        assert type(mlp.gate_proj).__module__.startswith("peft")
    assert all(dict(lora.named_modules())[n] is m for n, m in modules.items())


# ----- plain PyTorch ------------------------------------------------------------------------

class _Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(16)
        self.rms = torch.nn.RMSNorm(16, eps=1e-6)
        self.mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.shared = torch.nn.LayerNorm(16)
        self.blocks = torch.nn.ModuleList([self.shared, self.shared])
        self.head = torch.nn.Linear(16, 7)
        self.loss = torch.nn.CrossEntropyLoss(ignore_index=-1)

    def forward(self, x, target):
        h = self.rms(self.ln(x))
        h = h + self.mha(h, h, h, need_weights=False)[0]
        for block in self.blocks:
            h = block(h)
        return self.loss(self.head(h).flatten(0, 1), target.flatten())


def test_generic_torch_modules():
    torch.manual_seed(0)
    model = _Plain()
    model.ln.weight.requires_grad_(False)
    calls = []
    model.rms.register_forward_hook(lambda m, i, o: calls.append("rms"))
    x = torch.randn(2, 5, 16)
    target = torch.randint(0, 7, (2, 5))
    target[0, 0] = -1
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    with fastllm.patch(model) as handle:
        # norm: ln, rms and the shared LayerNorm in its three slots (one object, swapped once)
        assert handle.report.counts() == dict(norm=5, attention=1, cross_entropy=1)
        assert type(model.ln) is fastllm.nn.LayerNorm and type(model.rms) is fastllm.nn.RMSNorm
        assert type(model.mha) is fastllm.nn.MultiheadAttention
        assert type(model.loss) is fastllm.nn.CrossEntropyLoss and model.loss.ignore_index == -1
        assert model.blocks[0] is model.blocks[1] is model.shared  # still shared
        assert all(p is params[n] for n, p in model.named_parameters())
        assert not model.ln.weight.requires_grad
        loss = model(x, target)
        assert calls == ["rms"]  # the hook registered before the patch fired
        ref_loss = ref(x, target)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        loss.backward()
        ref_loss.backward()
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())
    assert type(model.ln) is torch.nn.LayerNorm


def test_register_attn_implementation_in_from_pretrained(tmp_path):
    from fastllm.integrations import transformers as integration

    integration.register()
    _tiny("llama").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                              attn_implementation="fastllm")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert model.config._attn_implementation == "fastllm"
    batch = _batch("llama")
    valid = _valid("llama", batch)
    torch.testing.assert_close(model.eval()(**batch).logits * valid,
                               plain(**batch).logits * valid, rtol=1e-5, atol=1e-5)


# ----- real weights ------------------------------------------------------------------------

def test_minilm_real_weights_patched_matches_unpatched():
    from tests.test_models_bert import minilm_dir, tokenize

    d = minilm_dir()
    theirs = transformers.BertModel.from_pretrained(d).eval()
    truth = copy.deepcopy(theirs).double()
    ours = copy.deepcopy(theirs)
    handle = fastllm.patch(ours)
    assert handle.report.counts() == dict(attention=1, norm=13)
    ids, mask = tokenize(d, ["fastllm swaps its kernels into models people already have.",
                             "A short one.", "The quick brown fox jumps over the lazy dog"])
    valid = mask[..., None].double()
    with torch.no_grad():
        outs = [m(input_ids=ids, attention_mask=mask) for m in (ours, theirs, truth)]
    assert_within_torch_error("minilm last_hidden_state",
                              *(o.last_hidden_state * valid for o in outs), torch.float32)
    assert_within_torch_error("minilm pooler_output", *(o.pooler_output for o in outs),
                              torch.float32)


@pytest.mark.slow
def test_smollm2_real_weights_patched_matches_unpatched():
    pytest.importorskip("accelerate")
    from tests.test_models_gguf import smollm2_file

    path = smollm2_file()
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = enc["input_ids"]
    truth = copy.deepcopy(theirs).double()
    with torch.no_grad():
        expected = theirs(ids).logits
        reference = truth(ids).logits
    del truth
    kw = dict(max_new_tokens=8, do_sample=False)
    answer = theirs.generate(ids, **kw)
    with fastllm.patch(theirs) as handle:
        assert handle.report.counts()["rotary"] == 30
        with torch.no_grad():
            got = theirs(ids).logits
        assert_within_torch_error("smollm2 logits", got, expected, reference, torch.float32)
        assert torch.equal(theirs.generate(ids, **kw), answer)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1]:])


@pytest.mark.parametrize("family", ["llama", "t5", "bert"])
def test_output_attentions_falls_back_to_eager(family):
    model = _tiny(family).eval()
    batch = _batch(family)
    batch.pop("labels")
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    expected = eager(**batch, output_attentions=True)
    with fastllm.patch(model):
        got = model(**batch, output_attentions=True)
    name = "encoder_attentions" if family == "t5" else "attentions"
    assert len(getattr(got, name)) == 2
    for a, e in zip(getattr(got, name), getattr(expected, name)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    if family == "llama":
        valid = _valid(family, batch)
        torch.testing.assert_close(got.logits * valid, expected.logits * valid, rtol=1e-5,
                                   atol=1e-5)


def test_head_dim_beyond_the_kernels_falls_back():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=2 * 320, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=320)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    batch = _batch("llama")
    batch.pop("labels")
    expected = model(**batch).logits
    with fastllm.patch(model):
        got = model(**batch).logits
    valid = _valid("llama", batch)
    torch.testing.assert_close(got * valid, expected * valid, rtol=1e-5, atol=1e-5)
