"""RotaryEmbedding: the cos / sin caches of rotary position embeddings and their application
to q and k (``fastllm.functional.apply_rotary_qk``, one kernel pass for both).

The frequencies are Hugging Face's (``inv_freq[i] = 1 / base ** (2 i / dim)``, float32),
optionally rescaled by an HF-style ``scaling`` dict (``rope_scaling`` / ``rope_parameters``
of a config; ``"type"`` is accepted as the legacy alias of ``"rope_type"``):

    {"rope_type": "linear", "factor": f}            inv_freq / f (positions interpolated)
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
     "original_max_position_embeddings"}            Llama 3.1's banded rescaling
    {"rope_type": "dynamic", "factor": f}           dynamic NTK: the base grows with the
                                                     sequence length beyond
                                                     max_position_embeddings

and the caches are ``cos[p, i] = cos(p * inv_freq[i])``, ``sin`` likewise, for positions
``0 .. len - 1``: (len, dim / 2) float32 (or ``dtype``), non-persistent buffers (so
``state_dict`` stays empty, as HF's ``inv_freq``), which is the layout the kernels read.

Growth. The caches start at ``max_position_embeddings`` rows and grow (to the next power of
two, "dynamic": to the exact length, whose base depends on it) when a call needs more rows
and the need is known without reading device memory: from the sequence length, an int
offset, or position tensors on the CPU. A CUDA position tensor is not read (that would
synchronise with the device); positions beyond the cache are then clamped by the kernels
(``fastllm.ops.rotary``), so size ``max_position_embeddings`` for the longest sequence, or
call :meth:`extend` first. Growth reassigns the buffers, which torch.compile sees as a guard
failure and recompiles: also a reason to size the cache up front.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from fastllm.ops.rotary import apply_rotary_qk

_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


def default_inv_freq(dim: int, base: float, device=None) -> Tensor:
    """``1 / base ** (arange(0, dim, 2) / dim)`` in float32, as Hugging Face computes it."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    return 1.0 / (base ** exponents)


def llama3_inv_freq(inv_freq: Tensor, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position_embeddings: int) -> Tensor:
    """Llama 3.1's rescaling of ``inv_freq``: wavelengths shorter than
    ``original / high_freq_factor`` kept, longer than ``original / low_freq_factor`` divided by
    ``factor``, and between the two a linear blend of both in ``original / wavelength``."""
    wavelength = 2 * math.pi / inv_freq
    long_wavelength = original_max_position_embeddings / low_freq_factor
    short_wavelength = original_max_position_embeddings / high_freq_factor
    scaled = torch.where(wavelength > long_wavelength, inv_freq / factor, inv_freq)
    blend = (original_max_position_embeddings / wavelength - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    blended = (1 - blend) * scaled / factor + blend * scaled
    medium = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
    return torch.where(medium, blended, scaled)


def _parse_scaling(scaling: Optional[dict]) -> tuple[str, dict]:
    if scaling is None:
        return "default", {}
    if not isinstance(scaling, dict):
        raise TypeError(f"RotaryEmbedding: scaling must be a dict or None, got "
                        f"{type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in _SCALING_KEYS:
        raise ValueError(
            f"RotaryEmbedding: scaling['rope_type'] must be one of {sorted(_SCALING_KEYS)}, "
            f"got {rope_type!r}"
        )
    missing = [key for key in _SCALING_KEYS[rope_type] if key not in scaling]
    if missing:
        raise ValueError(f"RotaryEmbedding: scaling of rope_type {rope_type!r} needs {missing}")
    return rope_type, {key: scaling[key] for key in _SCALING_KEYS[rope_type]}


class RotaryEmbedding(torch.nn.Module):
    """``RotaryEmbedding(dim, max_position_embeddings=2048, base=10000.0, scaling=None,
    interleaved=False)``.

    Args:
        dim: the rotated features per head (``rotary_dim``: the head dim, or less for partial
            rotary); even.
        max_position_embeddings: the rows the caches start with (and, for "dynamic", the
            length beyond which the base grows).
        base: ``rope_theta``.
        scaling: None, or an HF-style dict (module docstring).
        interleaved: the pair layout passed to the kernels (False: NeoX / HF LLaMA).
        device: of the buffers.
        dtype: of the cos / sin caches (default float32; the kernels also take x's dtype).

    ``forward(q, k, position_ids=None)`` with q ``(B, T, H, D)``, k ``(B, T, Hkv, D)``,
    ``D >= dim``, returns the rotated ``(q, k)``; ``position_ids`` as
    :func:`fastllm.functional.apply_rotary` (None, an int offset, ``(B,)`` offsets or
    ``(B, T)`` positions).
    """

    def __init__(
        self,
        dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000.0,
        scaling: Optional[dict] = None,
        interleaved: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0 or dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding: dim must be a positive even int, got {dim!r}")
        if not isinstance(max_position_embeddings, int) or max_position_embeddings <= 0:
            raise ValueError(
                "RotaryEmbedding: max_position_embeddings must be a positive int, got "
                f"{max_position_embeddings!r}"
            )
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = float(base)
        self.rope_type, self.scaling = _parse_scaling(scaling)
        self.interleaved = interleaved
        self.cache_dtype = torch.float32 if dtype is None else dtype
        self.register_buffer("inv_freq", self._inv_freq(None, device), persistent=False)
        self.register_buffer("cos_cached", torch.empty(0, dim // 2, device=device),
                             persistent=False)
        self.register_buffer("sin_cached", torch.empty(0, dim // 2, device=device),
                             persistent=False)
        self._build(max_position_embeddings)

    def _inv_freq(self, seq_len: Optional[int], device) -> Tensor:
        """inv_freq of the scaling, for caches of seq_len rows ("dynamic" depends on it)."""
        if self.rope_type == "dynamic" and seq_len is not None:
            factor = self.scaling["factor"]
            seq_len = max(seq_len, self.max_position_embeddings)
            base = self.base * (
                (factor * seq_len / self.max_position_embeddings) - (factor - 1)
            ) ** (self.dim / (self.dim - 2))
            return default_inv_freq(self.dim, base, device)
        inv_freq = default_inv_freq(self.dim, self.base, device)
        if self.rope_type == "linear":
            return inv_freq / self.scaling["factor"]
        if self.rope_type == "llama3":
            return llama3_inv_freq(inv_freq, **self.scaling)
        return inv_freq

    def _build(self, length: int) -> None:
        device = self.inv_freq.device
        if self.rope_type == "dynamic":
            self.inv_freq = self._inv_freq(length, device)
        t = torch.arange(length, device=device, dtype=torch.int64).to(torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(torch.float32))  # (length, dim / 2)
        self.cos_cached = freqs.cos().to(self.cache_dtype)
        self.sin_cached = freqs.sin().to(self.cache_dtype)

    def extend(self, length: int) -> None:
        """Makes the caches hold at least ``length`` positions (0 .. length - 1)."""
        if length <= self.cos_cached.shape[0]:
            return
        if self.rope_type == "dynamic":
            self._build(length)
        else:
            self._build(max(length, 1 << (length - 1).bit_length()))

    def _needed_length(self, seq_len: int, position_ids) -> Optional[int]:
        """Rows the call needs, when known without reading device memory (else None)."""
        if position_ids is None:
            return seq_len
        if isinstance(position_ids, int):
            return position_ids + seq_len
        if isinstance(position_ids, Tensor) and position_ids.device.type == "cpu" \
                and not torch.compiler.is_compiling() and position_ids.numel() > 0:
            top = int(position_ids.max())
            return top + (seq_len if position_ids.dim() == 1 else 1)
        return None

    def cos_sin(self, position_ids: Union[int, Tensor], dtype: Optional[torch.dtype] = None
                ) -> tuple[Tensor, Tensor]:
        """Hugging Face-style ``(cos, sin)``: for a ``(B, T)`` tensor of positions,
        ``(B, T, dim)`` each, the ``dim / 2`` angles repeated (``cat((freqs, freqs), -1)``;
        interleaved: each angle twice in a row), as ``LlamaRotaryEmbedding`` returns them for
        ``apply_rotary_pos_emb``; for an int ``seq_len``, the same for positions
        ``0 .. seq_len - 1`` as ``(seq_len, dim)``. In ``dtype`` (default the caches')."""
        if isinstance(position_ids, bool) or not isinstance(position_ids, (int, Tensor)):
            raise TypeError("RotaryEmbedding.cos_sin: position_ids must be an int seq_len or "
                            f"an int tensor, got {type(position_ids).__name__}")
        if isinstance(position_ids, int):
            self.extend(position_ids)
            positions = torch.arange(position_ids, device=self.cos_cached.device)
        else:
            needed = self._needed_length(1, position_ids)
            if needed is not None:
                self.extend(needed)
            positions = position_ids.clamp(0, self.cos_cached.shape[0] - 1)
        cos, sin = self.cos_cached[positions], self.sin_cached[positions]
        if self.interleaved:
            cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        else:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        dtype = self.cache_dtype if dtype is None else dtype
        return cos.to(dtype), sin.to(dtype)

    def forward(self, q: Tensor, k: Tensor, position_ids: Union[None, int, Tensor] = None
                ) -> tuple[Tensor, Tensor]:
        needed = self._needed_length(q.shape[1] if q.dim() == 4 else 0, position_ids)
        if needed is not None:
            self.extend(needed)
        return apply_rotary_qk(q, k, self.cos_cached, self.sin_cached,
                               position_ids=position_ids, interleaved=self.interleaved)

    def extra_repr(self) -> str:
        scaling = f", scaling={{'rope_type': {self.rope_type!r}, **{self.scaling}}}" \
            if self.rope_type != "default" else ""
        return (f"dim={self.dim}, max_position_embeddings={self.max_position_embeddings}, "
                f"base={self.base}{scaling}, interleaved={self.interleaved}")
