"""Hugging Face weights, both directions, for GPT-2, LLaMA / Mistral / Qwen2 and the
encoder-decoders BART / mBART / Marian (BERT loads itself, fastllm/models/bert.py).

``from_pretrained(source)`` reads an HF model directory (config.json + model.safetensors,
a sharded ``model.safetensors.index.json``, or pytorch_model.bin) or takes an in-memory
``transformers`` ``PreTrainedModel``; ``save_pretrained(model, dir)`` writes config.json +
model.safetensors that ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` (BART,
Marian: ``AutoModelForSeq2SeqLM``) loads. The names already match HF's; GPT-2's ``Conv1D``
weights are (in, out), the transpose of ``torch.nn.Linear``'s, so those four per block are
transposed both ways. BART / mBART / Marian checkpoints hold their tied embeddings under one or
several of the aliases (``model.shared``, ``model.{en,de}coder.embed_tokens``, ``lm_head``),
Marian's sinusoidal position tables are recomputed, and a missing ``final_logits_bias`` is
zeros (as HF). ``transformers`` is never imported here (only its objects' ``config`` /
``state_dict`` are read).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from fastllm.models.encoder_decoder import (
    EncoderDecoder,
    EncoderDecoderConfig,
    SinusoidalPositionalEmbedding,
    sinusoidal_table,
)
from fastllm.models.gpt import GPT, GPTConfig
from fastllm.models.llama import Llama, LlamaConfig

_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                "mlp.c_proj.weight")
# buffers some checkpoints carry that have no counterpart here (recomputed or not needed)
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


# ----- configs ---------------------------------------------------------------------------

def _gpt_config_from_hf(cfg: dict[str, Any]) -> GPTConfig:
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"from_pretrained: GPT-2 activation_function "
                         f"{cfg['activation_function']!r} is not supported (GELU-tanh only)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            raise ValueError(f"from_pretrained: GPT-2 {flag}=True is not supported")
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        raise ValueError(f"from_pretrained: GPT-2 n_inner={cfg['n_inner']} is not supported "
                         f"(4 * n_embd only)")
    return GPTConfig(block_size=cfg["n_positions"], vocab_size=cfg["vocab_size"],
                     n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                     layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                     initializer_range=cfg.get("initializer_range", 0.02))


def _gpt_config_to_hf(config: GPTConfig) -> dict[str, Any]:
    if not config.bias:
        raise ValueError("save_pretrained: HF GPT-2 has biases; a GPTConfig(bias=False) model "
                         "has no HF layout")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout, "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": config.initializer_range, "tie_word_embeddings": True,
        "bos_token_id": 50256, "eos_token_id": 50256,
    }


def _rope(cfg: dict[str, Any]) -> tuple[float, Any]:
    """(rope_theta, rope_scaling) from an HF config: transformers 5 writes
    ``rope_parameters``, older versions ``rope_theta`` + ``rope_scaling``."""
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"} or cfg.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return theta, scaling


def _llama_config_from_hf(cfg: dict[str, Any]) -> LlamaConfig:
    model_type = cfg["model_type"]
    theta, scaling = _rope(cfg)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"from_pretrained: hidden_act {cfg['hidden_act']!r} is not supported "
                         f"(silu only)")
    sliding_window = None
    if model_type == "mistral":
        sliding_window = cfg.get("sliding_window")
    elif model_type == "qwen2":
        layer_types = cfg.get("layer_types") or []
        if cfg.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise ValueError("from_pretrained: Qwen2 with use_sliding_window is not supported")
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        attention_bias=bool(cfg.get("attention_bias", False)) and model_type == "llama",
        qkv_bias=model_type == "qwen2", mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=sliding_window,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        initializer_range=cfg.get("initializer_range", 0.02), model_type=model_type,
    )


def _llama_config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    t = config.model_type
    if t != "llama" and (config.attention_bias or config.mlp_bias):
        raise ValueError(f"save_pretrained: {t} has no attention_bias / mlp_bias")
    if t != "qwen2" and config.qkv_bias:
        raise ValueError("save_pretrained: qkv_bias alone exists only as model_type 'qwen2'")
    if t == "qwen2" and not config.qkv_bias:
        raise ValueError("save_pretrained: model_type 'qwen2' needs qkv_bias=True")
    if t != "mistral" and config.sliding_window is not None:
        raise ValueError("save_pretrained: sliding_window exists only as model_type 'mistral'")
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}[t]
    rope_parameters = {"rope_type": "default", **(config.rope_scaling or {}),
                       "rope_theta": config.rope_theta}
    out = {
        "architectures": [arch], "model_type": t,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "hidden_act": "silu",
        "rope_parameters": rope_parameters,  # transformers 5
        "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,  # 4.x
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.initializer_range,
    }
    if t == "llama":
        out.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    if t == "mistral":
        out.update(sliding_window=config.sliding_window)
    if t == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    return out


# ----- encoder-decoders: BART, Marian ----------------------------------------------------

# HF config fields EncoderDecoderConfig takes under the same name
_SEQ2SEQ_FIELDS = ("vocab_size", "max_position_embeddings", "d_model", "encoder_layers",
                   "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                   "encoder_ffn_dim", "decoder_ffn_dim", "activation_function", "dropout",
                   "attention_dropout", "activation_dropout", "init_std", "scale_embedding",
                   "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
                   "forced_bos_token_id", "forced_eos_token_id", "tie_word_embeddings")


def _encoder_decoder_config_from_hf(cfg: dict[str, Any]) -> EncoderDecoderConfig:
    """BART (post-LN, learned positions, layernorm_embedding), mBART (BART's embeddings,
    pre-LN layers, final LayerNorms) or Marian (post-LN, sinusoidal positions, no embedding
    LayerNorm); a ValueError naming any flag asking for something else (``normalize_before``
    or ``add_final_layer_norm`` on BART / Marian, ``add_bias_logits``, ...)."""
    model_type = cfg["model_type"]
    marian, mbart = model_type == "marian", model_type == "mbart"
    # flags of older (fairseq-converted) configs: the value this architecture has, or None
    expected = {"normalize_before": mbart, "add_final_layer_norm": mbart,
                "add_bias_logits": False, "normalize_embedding": not marian,
                "static_position_embeddings": marian, "encoder_layerdrop": 0.0,
                "decoder_layerdrop": 0.0}
    for flag, want in expected.items():
        got = cfg.get(flag)
        if got is not None and got != want:
            raise ValueError(f"from_pretrained: {model_type} config {flag}={got!r} is not "
                             f"supported ({want!r} only)")
    activation = cfg.get("activation_function", "gelu")
    if activation not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "swish", "silu"):
        raise ValueError(f"from_pretrained: {model_type} activation_function {activation!r} "
                         f"is not supported")
    share = bool(cfg.get("share_encoder_decoder_embeddings", True)) if marian else True
    decoder_vocab = cfg.get("decoder_vocab_size") if marian else None
    if share and decoder_vocab not in (None, cfg["vocab_size"]):
        raise ValueError(f"from_pretrained: marian share_encoder_decoder_embeddings=True with "
                         f"decoder_vocab_size={decoder_vocab} != vocab_size={cfg['vocab_size']}")
    kwargs = {k: cfg[k] for k in _SEQ2SEQ_FIELDS if k in cfg}
    for k in ("eos_token_id", "forced_eos_token_id"):  # HF allows a list; ours: the first
        if isinstance(kwargs.get(k), list):
            kwargs[k] = kwargs[k][0] if kwargs[k] else None
    return EncoderDecoderConfig(
        **kwargs, model_type=model_type,
        decoder_vocab_size=None if share or decoder_vocab == cfg["vocab_size"] else decoder_vocab,
        position_embedding="sinusoidal" if marian else "learned",
        layernorm_embedding=not marian, share_encoder_decoder_embeddings=share,
        normalize_before=mbart,
    )


def _encoder_decoder_config_to_hf(config: EncoderDecoderConfig) -> dict[str, Any]:
    marian, mbart = config.model_type == "marian", config.model_type == "mbart"
    layout = ("sinusoidal", False, False) if marian else ("learned", True, mbart)
    got = (config.position_embedding, config.layernorm_embedding, config.normalize_before)
    if got != layout:
        raise ValueError(f"save_pretrained: model_type {config.model_type!r} has "
                         f"(position_embedding, layernorm_embedding, normalize_before) = "
                         f"{layout}, got {got}")
    if not marian and not config.share_encoder_decoder_embeddings:
        raise ValueError("save_pretrained: (m)BART always shares its embeddings "
                         "(share_encoder_decoder_embeddings=False exists only for marian)")
    if config.layer_norm_eps != 1e-5:
        raise ValueError(f"save_pretrained: HF's {config.model_type} LayerNorms have eps 1e-5, "
                         f"got layer_norm_eps={config.layer_norm_eps}")
    out = {
        "architectures": [{"bart": "BartForConditionalGeneration", "marian": "MarianMTModel",
                           "mbart": "MBartForConditionalGeneration"}[config.model_type]],
        "model_type": config.model_type,
        **{k: getattr(config, k) for k in _SEQ2SEQ_FIELDS},
        "is_encoder_decoder": True, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
    }
    if marian:
        out.update(decoder_vocab_size=config.target_vocab_size,
                   share_encoder_decoder_embeddings=config.share_encoder_decoder_embeddings,
                   static_position_embeddings=True, normalize_embedding=False,
                   normalize_before=False)
    return out


def _embedding_aliases(config: EncoderDecoderConfig) -> list[list[str]]:
    """Groups of state-dict names holding one tensor (the first is the one kept)."""
    groups = []
    if config.share_encoder_decoder_embeddings:
        groups.append(["model.shared.weight", "model.encoder.embed_tokens.weight",
                       "model.decoder.embed_tokens.weight"])
        if config.tie_word_embeddings:
            groups[0].append("lm_head.weight")
    elif config.tie_word_embeddings:
        groups.append(["model.decoder.embed_tokens.weight", "lm_head.weight"])
    return groups


def _encoder_decoder_from_hf(config: dict[str, Any], state: dict[str, Tensor], *, dtype,
                             device) -> EncoderDecoder:
    ours = _encoder_decoder_config_from_hf(config)
    # a bare BartModel / MarianModel checkpoint lacks the "model." prefix
    state = {(k if k.startswith("model.") or k in ("lm_head.weight", "final_logits_bias")
              else "model." + k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith((".version",))}
    if ours.position_embedding == "sinusoidal":  # recomputed, not a parameter
        state = {k: v for k, v in state.items() if not k.endswith(".embed_positions.weight")}
    if dtype is None:
        dtype = next(iter(state.values())).dtype if state else torch.float32
    with torch.device("meta"):
        model = EncoderDecoder(ours)
    expected = set(model.state_dict())
    for group in _embedding_aliases(ours):
        present = [k for k in group if k in state]
        if present:
            state[group[0]] = state[present[0]]
        for k in group[1:]:
            state.pop(k, None)
            expected.discard(k)
    if "final_logits_bias" not in state:  # HF: _keys_to_ignore_on_load_missing
        state["final_logits_bias"] = torch.zeros(1, ours.target_vocab_size)
    check_state_keys("EncoderDecoder", expected, set(state))
    # copies: the returned model never shares storage with an in-memory source model
    model.load_state_dict({k: v.to(dtype, copy=True) for k, v in state.items()}, strict=False,
                          assign=True)
    model.tie_weights()
    for module in model.modules():  # the fixed tables were made on meta: rebuild them
        if isinstance(module, SinusoidalPositionalEmbedding):
            module.weight = sinusoidal_table(*module.weight.shape).to(dtype)
    left_on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left_on_meta:  # a bug here, never a silently half-initialised model
        raise RuntimeError(f"from_pretrained: tensors left uninitialised: {left_on_meta}")
    return model.to(device=device).eval()


_FAMILIES = {"gpt2": (GPT, _gpt_config_from_hf), "llama": (Llama, _llama_config_from_hf),
             "mistral": (Llama, _llama_config_from_hf), "qwen2": (Llama, _llama_config_from_hf)}


# ----- state dicts -----------------------------------------------------------------------

def _is_conv1d(key: str) -> bool:
    return key.startswith("transformer.h.") and key.endswith(_GPT2_CONV1D)


def _read_directory(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"from_pretrained: {path} has no config.json")
    config = json.loads(config_file.read_text())
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return config, load_file(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(path / shard))
        return config, state
    if (path / "pytorch_model.bin").is_file():
        return config, torch.load(path / "pytorch_model.bin", map_location="cpu",
                                  weights_only=True)
    raise FileNotFoundError(f"from_pretrained: {path} has no model.safetensors, "
                            f"model.safetensors.index.json or pytorch_model.bin")


def from_pretrained(source: Union[str, os.PathLike, torch.nn.Module], *, dtype=None,
                    device=None) -> torch.nn.Module:
    """A fastllm ``GPT``, ``Llama``, BERT or ``EncoderDecoder`` model holding the weights of
    ``source``: an HF model directory, a llama ``.gguf`` file (fastllm/models/gguf.py;
    dequantised, default dtype float32) or an in-memory ``transformers`` ``PreTrainedModel``
    (GPT-2, LLaMA, Mistral, Qwen2; BERT: ``BertForPreTraining`` /
    ``BertForSequenceClassification`` by the checkpoint's ``architectures``, else
    ``BertModel``; BART / mBART / Marian: ``EncoderDecoder``, in eval mode, a copy of the weights).

    ``dtype`` / ``device``: of the returned model (default: the checkpoint's dtype, CPU).
    Raises ValueError for an unknown architecture and KeyError listing any tensor the model
    needs that the checkpoint lacks (never a half-initialised model).
    """
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".gguf"):
        from fastllm.models.gguf import from_gguf

        return from_gguf(source, dtype=dtype, device=device)
    if isinstance(source, torch.nn.Module):
        if not hasattr(source, "config") or not hasattr(source.config, "to_dict"):
            raise TypeError("from_pretrained: source must be an HF model directory or a "
                            f"transformers PreTrainedModel, got {type(source).__name__}")
        config = source.config.to_dict()
        state = source.state_dict()
    else:
        config, state = _read_directory(Path(source))
    model_type = config.get("model_type")
    if model_type in ("bart", "mbart", "marian"):
        return _encoder_decoder_from_hf(config, state, dtype=dtype, device=device)
    if model_type == "bert":  # BERT's classes load themselves (fastllm/models/bert.py)
        from fastllm.models import bert

        architecture = (config.get("architectures") or ["BertModel"])[0]
        cls = {"BertForPreTraining": bert.BertForPreTraining,
               "BertForSequenceClassification": bert.BertForSequenceClassification}.get(
                   architecture, bert.BertModel)
        return cls.from_pretrained(source, dtype=dtype, device=device)
    if model_type not in _FAMILIES:
        raise ValueError(f"from_pretrained: unsupported architecture model_type={model_type!r} "
                         f"({config.get('architectures')}); supported: "
                         f"{sorted([*_FAMILIES, 'bart', 'bert', 'marian', 'mbart'])}")
    cls, config_from_hf = _FAMILIES[model_type]
    ours_config = config_from_hf(config)

    # HF's bare-model checkpoints ("h.0...." for GPT2Model) lack the wrapper prefix
    prefix = "transformer." if cls is GPT else "model."
    state = {(k if k.startswith(prefix) or k == "lm_head.weight" else prefix + k): v
             for k, v in state.items()}
    state = {k: (v.t() if _is_conv1d(k) else v) for k, v in state.items()
             if not k.endswith(_IGNORED_SUFFIXES)}
    return build_model(cls, ours_config, state, dtype=dtype, device=device)


def check_state_keys(owner: str, expected: set[str], present: set[str], *,
                     optional: set = frozenset()) -> None:
    """A KeyError listing the tensors ``owner`` needs that the checkpoint lacks (``optional``
    ones aside), else one listing the tensors it has that ``owner`` does not know."""
    missing = sorted(expected - present - set(optional))
    if missing:
        raise KeyError(f"from_pretrained: the checkpoint lacks {len(missing)} tensors the "
                       f"{owner} needs: {missing}")
    unexpected = sorted(present - expected)
    if unexpected:
        raise KeyError(f"from_pretrained: the checkpoint has {len(unexpected)} tensors the "
                       f"{owner} does not know: {unexpected}")


def build_model(cls, ours_config, state: dict[str, Tensor], *, dtype=None,
                device=None) -> torch.nn.Module:
    """``cls(ours_config)`` holding ``state`` (fastllm / HF names), built on meta and loaded
    by assignment; KeyError listing missing or unknown tensors. Shared with GGUF loading."""
    if dtype is None:
        dtype = next(iter(state.values())).dtype if state else torch.float32
    with torch.device("meta"):
        model = cls(ours_config)
    expected = set(model.state_dict())
    tied = "lm_head.weight" if (cls is GPT or ours_config.tie_word_embeddings) else None
    check_state_keys(cls.__name__, expected, set(state), optional={tied})
    if tied is not None:
        state.pop(tied, None)  # re-tied below, to the embedding
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if tied == "lm_head.weight":
        model.lm_head.weight = (model.transformer.wte.weight if cls is GPT
                                else model.model.embed_tokens.weight)
    # the non-persistent buffers (rotary caches) were made on meta: rebuild them
    if cls is Llama:
        from fastllm.nn import RotaryEmbedding

        c = ours_config
        model.model.rotary_emb = RotaryEmbedding(c.head_dim, c.max_position_embeddings,
                                                 base=c.rope_theta, scaling=c.rope_scaling)
    left_on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left_on_meta:  # a bug here, never a silently half-initialised model
        raise RuntimeError(f"from_pretrained: tensors left uninitialised: {left_on_meta}")
    return model.to(device=device)


def save_pretrained(model: torch.nn.Module, save_directory: Union[str, os.PathLike]) -> None:
    """Writes ``model`` (a fastllm ``GPT``, ``Llama`` or ``EncoderDecoder``) as HF's
    config.json + model.safetensors into ``save_directory`` (created if needed). Each file is
    written to a temporary name in the directory and renamed into place, config.json last, so
    a reader never sees a partial file (write_hf_directory)."""
    if isinstance(model, EncoderDecoder):
        hf_config = _encoder_decoder_config_to_hf(model.config)
        hf_config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        aliases = {k for group in _embedding_aliases(model.config) for k in group[1:]}
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
                 if k not in aliases}  # HF re-ties them from the kept one
        write_hf_directory(save_directory, state, hf_config)
        return
    if isinstance(model, GPT):
        hf_config = _gpt_config_to_hf(model.config)
        tied = True
    elif isinstance(model, Llama):
        hf_config = _llama_config_to_hf(model.config)
        tied = model.config.tie_word_embeddings
    else:
        raise TypeError(f"save_pretrained: model must be a fastllm GPT, Llama or "
                        f"EncoderDecoder, got {type(model).__name__}")
    dtype = next(model.parameters()).dtype
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    state = {}
    for k, v in model.state_dict().items():
        if tied and k == "lm_head.weight":
            continue  # HF re-ties it from the embedding
        v = v.detach().to("cpu")
        state[k] = (v.t() if isinstance(model, GPT) and _is_conv1d(k) else v).contiguous()

    write_hf_directory(save_directory, state, hf_config)


def write_hf_directory(save_directory: Union[str, os.PathLike], state: dict[str, Tensor],
                       hf_config: dict[str, Any]) -> None:
    """HF's config.json + model.safetensors in ``save_directory`` (created if needed). Each
    file is written to a temporary name in the directory and renamed into place, config.json
    last, so a reader never sees a partial file."""
    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, write in (
        ("model.safetensors", lambda f: save_file(state, f, metadata={"format": "pt"})),
        ("config.json", lambda f: Path(f).write_text(json.dumps(hf_config, indent=2) + "\n")),
    ):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, directory / name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
