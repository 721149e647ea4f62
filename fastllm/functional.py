"""fastllm's public functions, with ``torch.nn.functional``-like signatures.

Each runs on the backend chosen by ``fastllm.use_backend`` / ``FASTLLM_BACKEND`` (see
fastllm/backend.py) and is differentiable and ``torch.compile``-able. Each is defined, with
its docstring, once, in its family's op module (fastllm/ops/<family>.py); this module is
the one place they are exported from.
"""

__all__ = [
    # norms (fastllm/ops/norm.py)
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    # cross-entropy (fastllm/ops/cross_entropy.py, fastllm/ops/linear_cross_entropy.py)
    "cross_entropy",
    "linear_cross_entropy",
    "CrossEntropyOutput",
    # attention (fastllm/ops/attention.py)
    "attention",
    "scaled_dot_product_attention",
    "attention_with_kvcache",
    # gated-MLP activations (fastllm/ops/gated_mlp.py)
    "swiglu",
    "geglu",
    # rotary position embeddings (fastllm/ops/rotary.py)
    "apply_rotary",
    "apply_rotary_qk",
]

from fastllm.ops.attention import attention, attention_with_kvcache, scaled_dot_product_attention
from fastllm.ops.cross_entropy import CrossEntropyOutput, cross_entropy
from fastllm.ops.gated_mlp import geglu, swiglu
from fastllm.ops.linear_cross_entropy import linear_cross_entropy
from fastllm.ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastllm.ops.rotary import apply_rotary, apply_rotary_qk
