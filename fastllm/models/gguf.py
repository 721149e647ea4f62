"""GGUF weights (llama.cpp's format) into a fastllm ``Llama``.

``load_gguf(path)`` reads the file with the ``gguf`` package (``gguf.GGUFReader``; install
it with fastllm's ``dev`` extra, it is not a core dependency), maps the ``llama.*`` metadata
to a :class:`LlamaConfig`, dequantises every tensor (F32/F16/BF16 and the block formats
Q4_0, Q4_1, Q8_0, K-quants ... through ``gguf.quants.dequantize``) and renames llama.cpp's
tensors to Hugging Face's ``LlamaForCausalLM`` names:

    token_embd                  model.embed_tokens
    blk.N.attn_norm             model.layers.N.input_layernorm
    blk.N.attn_q / k / v        model.layers.N.self_attn.q_proj / k_proj / v_proj
    blk.N.attn_output           model.layers.N.self_attn.o_proj
    blk.N.ffn_norm              model.layers.N.post_attention_layernorm
    blk.N.ffn_gate / up / down  model.layers.N.mlp.gate_proj / up_proj / down_proj
    output_norm                 model.norm
    output                      lm_head (absent: the head is tied to the embedding)

llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of q and k so that each head's
rotary pairs are adjacent (GPT-J style, ``(x[2i], x[2i+1])``) instead of HF's halves
(``(x[i], x[i + D/2])``). :func:`reverse_permute` undoes it, as ``transformers``'
``LlamaTensorProcessor._reverse_permute_weights`` does, so the weights run with HF's (and
fastllm's) rotate-half rotary.

Supported: ``general.architecture == "llama"`` (LLaMA, Mistral and SmolLM files use it), rope
scaling ``none`` / ``linear``. Anything else raises ValueError; a file missing a tensor
raises KeyError listing every missing one by its GGUF name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from fastllm.models.llama import Llama, LlamaConfig

_LAYER_NAMES = {  # llama.cpp's per-block tensor -> HF's name under model.layers.N.
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("from_pretrained: reading a .gguf file needs the `gguf` package "
                          "(pip install gguf, or fastllm's dev extra)") from e
    return gguf


def _metadata(reader) -> dict[str, Any]:
    """The file's key/value metadata as Python values (the token list left out: only its
    length is needed here)."""
    out = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                   "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            out[key + ".length"] = len(field.data)
            continue
        out[key] = field.contents()
    return out


def _rope_scaling(meta: dict[str, Any], arch: str) -> Any:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(f"from_pretrained: GGUF {arch}.rope.scaling.type={kind!r} is not "
                     f"supported (none or linear)")


def config_from_gguf(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]
                     ) -> LlamaConfig:
    """A :class:`LlamaConfig` from a GGUF file's metadata and its tensors' (HF-order) shapes."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"from_pretrained: unsupported GGUF architecture "
                         f"general.architecture={arch!r}; supported: ['llama']")

    def need(key: str):
        if f"{arch}.{key}" not in meta:
            raise KeyError(f"from_pretrained: the GGUF file lacks the metadata key "
                           f"{arch}.{key!r}")
        return meta[f"{arch}.{key}"]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"from_pretrained: GGUF {arch}.rope.dimension_count={rope_dim} "
                         f"differs from head_dim={head_dim} (partial rotary is not supported)")
    if "token_embd.weight" in tensor_shapes:  # authoritative: what the embedding holds
        vocab = tensor_shapes["token_embd.weight"][0]
    else:
        vocab = meta.get(f"{arch}.vocab_size", meta.get("tokenizer.ggml.tokens.length"))
        if vocab is None:
            raise KeyError("from_pretrained: the GGUF file has no token_embd.weight, "
                           f"{arch}.vocab_size or token list to size the vocabulary from")
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch),
        attention_bias="blk.0.attn_q.bias" in tensor_shapes,
        tie_word_embeddings="output.weight" not in tensor_shapes,
    )


def reverse_permute(w: Tensor, n_head: int) -> Tensor:
    """Undoes llama.cpp's q/k row permutation: rows ``(head, pair, 2)`` back to HF's
    ``(head, 2, pair)`` (rotate-half layout). ``w``: (n_head * D, ...) weight or bias."""
    D = w.shape[0] // n_head
    return w.reshape(n_head, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    """HF ``LlamaForCausalLM``'s name for a llama.cpp tensor name (ValueError if unknown)."""
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_NAMES and suffix in ("weight", "bias"):
        return f"{_TOP_NAMES[base]}.{suffix}"
    if gguf_name == "rope_freqs.weight":
        raise ValueError("from_pretrained: the GGUF file has rope_freqs.weight (per-frequency "
                         "rope factors, e.g. Llama 3.1's); it is not supported")
    raise ValueError(f"from_pretrained: the GGUF file has a tensor {gguf_name!r} a llama "
                     f"model does not know")


def _expected_gguf_names(config: LlamaConfig) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    if not config.tie_word_embeddings:
        names.append("output.weight")
    for i in range(config.num_hidden_layers):
        names += [f"blk.{i}.{n}.weight" for n in _LAYER_NAMES]
        if config.attention_bias:
            names += [f"blk.{i}.attn_{n}.bias" for n in ("q", "k", "v", "output")]
    return names


def load_gguf(path: Union[str, os.PathLike]) -> tuple[LlamaConfig, dict[str, Tensor]]:
    """(config, HF-named float32 state dict) of a llama GGUF file; see the module docstring."""
    gguf = _import_gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"from_pretrained: no GGUF file at {path}")
    reader = gguf.GGUFReader(path)
    meta = _metadata(reader)
    # GGUF stores dims innermost first; HF's (out, in) order is the reverse
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = config_from_gguf(meta, shapes)

    missing = [n for n in _expected_gguf_names(config) if n not in shapes]
    if missing:
        raise KeyError(f"from_pretrained: the GGUF file lacks {len(missing)} tensors the "
                       f"Llama needs: {missing}")
    state: dict[str, Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        # a copy: F32 tensors dequantise to a read-only view of the memory-mapped file
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                      dtype=np.float32))
        w = w.reshape(shapes[t.name])
        if ".attn_q." in t.name:
            w = reverse_permute(w, config.num_attention_heads)
        elif ".attn_k." in t.name:
            w = reverse_permute(w, config.num_key_value_heads)
        state[name] = w
    return config, state


def from_gguf(path: Union[str, os.PathLike], *, dtype=None, device=None) -> Llama:
    """A fastllm ``Llama`` holding the dequantised weights of the GGUF file at ``path``.
    ``dtype`` default float32 (the dequantised values); ``device`` default CPU."""
    from fastllm.models.hf import build_model

    config, state = load_gguf(path)
    return build_model(Llama, config, state, dtype=dtype or torch.float32, device=device)
