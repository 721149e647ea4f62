"""fastllm.nn.MultiheadAttention against torch.nn.MultiheadAttention: outputs and every
gradient (inputs and parameters) with the same state_dict, every layout, projection kind and
mask kind; the need_weights=True fallback; dropout; state_dict; torch.compile; errors."""

from __future__ import annotations

import pytest
import torch

import fastllm
from fastllm.nn.attention import MultiheadAttention
from fastllm.ops import attention as attention_ops
from tests.accuracy import assert_within_torch_error

native = pytest.mark.skipif(attention_ops.IMPLS.native is None, reason="fastllm._C not built")

EMBED, HEADS, BATCH, TGT, SRC = 24, 3, 2, 5, 7
KDIM, VDIM = 10, 14


def _pair(dtype=torch.float32, **kwargs):
    """(torch's module, ours) holding the same parameters."""
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, dtype=dtype, **kwargs)
    ours = MultiheadAttention(EMBED, HEADS, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _seq(layout: str, length: int, features: int, dtype) -> torch.Tensor:
    shape = {
        "batch_first": (BATCH, length, features),
        "seq_first": (length, BATCH, features),
        "unbatched": (length, features),
    }[layout]
    return torch.randn(shape, dtype=dtype)


def _masks(mask: str, layout: str, src_len: int, dtype):
    """Keyword arguments (key_padding_mask / attn_mask / is_causal) for one mask kind. Key 0
    is never masked, so no query row is fully masked (torch's weights path gives NaN there)."""
    batch = 1 if layout == "unbatched" else BATCH
    kpm = torch.zeros(batch, src_len, dtype=torch.bool)
    kpm[-1, -3:] = True
    attn = torch.rand(batch * HEADS, TGT, src_len) < 0.4
    attn[..., 0] = False
    if layout == "unbatched":
        kpm = kpm[0]

    def additive(m):  # a float mask mixing -inf and finite biases
        return torch.randn(m.shape, dtype=dtype).masked_fill(m, float("-inf"))

    causal = torch.ones(TGT, src_len, dtype=torch.bool).triu(1)
    return {
        "none": {},
        "kpm_bool": {"key_padding_mask": kpm},
        "kpm_float": {"key_padding_mask": additive(kpm)},
        "attn2d_bool": {"attn_mask": attn[0]},
        "attn2d_float": {"attn_mask": additive(attn[0])},
        "attn3d_bool": {"attn_mask": attn},
        "attn3d_float": {"attn_mask": additive(attn)},
        "both_bool": {"attn_mask": attn[0], "key_padding_mask": kpm},
        "both_float": {"attn_mask": additive(attn), "key_padding_mask": additive(kpm)},
        "causal": {"attn_mask": causal, "is_causal": True},
        "causal_kpm": {"attn_mask": causal, "is_causal": True, "key_padding_mask": kpm},
    }[mask]


def _inputs(kind: str, layout: str, dtype):
    """(query, key, value, module kwargs) for one projection kind."""
    x = _seq(layout, TGT, EMBED, dtype)
    if kind == "self":
        return x, x, x, {}
    if kind == "encoder_decoder":  # key is value: torch's split packed projection
        memory = _seq(layout, SRC, EMBED, dtype)
        return x, memory, memory, {}
    if kind == "cross":  # three different tensors of the same width
        return x, _seq(layout, SRC, EMBED, dtype), _seq(layout, SRC, EMBED, dtype), {}
    if kind == "kv_dims":  # kdim / vdim != embed_dim: separate projection weights
        key, value = _seq(layout, SRC, KDIM, dtype), _seq(layout, SRC, VDIM, dtype)
        return x, key, value, {"kdim": KDIM, "vdim": VDIM}
    raise ValueError(kind)


def _run(module, query, key, value, grad_out, **kwargs):
    """Output and the gradients of (query, key, value, *parameters) for one upstream grad.
    Inputs that are the same tensor stay the same tensor (the self-attention fast paths)."""
    leaves = {}
    for t in (query, key, value):
        if id(t) not in leaves:
            leaves[id(t)] = t.detach().clone().requires_grad_()
    q, k, v = (leaves[id(t)] for t in (query, key, value))
    module.zero_grad(set_to_none=True)
    out, weights = module(q, k, v, need_weights=False, **kwargs)
    assert weights is None
    out.backward(grad_out)
    grads = {"query": q.grad, "key": k.grad, "value": v.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def _to(kwargs, dtype):
    return {
        k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in kwargs.items()
    }


def _cast(tensors, dtype):
    """Cast keeping identity: tensors that were the same object stay one object."""
    cast = {}
    for t in tensors:
        if id(t) not in cast:
            cast[id(t)] = t.to(dtype)
    return [cast[id(t)] for t in tensors]


def _compare(kind, layout, mask, module_kwargs=None, dtype=torch.float32):
    """Ours in ``dtype`` against torch in ``dtype``, both judged against torch in float64
    (tests/accuracy.py: ours may err at most twice as much as torch itself)."""
    query, key, value, kv_kwargs = _inputs(kind, layout, torch.float64)
    src_len = key.shape[1 if layout == "batch_first" else 0]
    kwargs = _masks(mask, layout, src_len, torch.float64)
    module_kwargs = {**kv_kwargs, **(module_kwargs or {}), "batch_first": layout == "batch_first"}
    reference, _ = _pair(torch.float64, **module_kwargs)
    theirs, ours = _pair(dtype, **module_kwargs)
    theirs.load_state_dict(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    grad_out = torch.randn(query.shape, dtype=torch.float64)

    ref_out, ref_grads = _run(reference, query, key, value, grad_out, **kwargs)
    q, k, v, g = _cast([query, key, value, grad_out], dtype)
    their_out, their_grads = _run(theirs, q, k, v, g, **_to(kwargs, dtype))
    with fastllm.use_backend("native"):
        our_out, our_grads = _run(ours, q, k, v, g, **_to(kwargs, dtype))
    assert our_out.shape == their_out.shape == query.shape
    assert_within_torch_error("out", our_out, their_out, ref_out, dtype)
    assert our_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_within_torch_error(
            f"grad {name}", our_grads[name], their_grads[name], ref_grads[name], dtype
        )


LAYOUTS = ["batch_first", "seq_first", "unbatched"]
KINDS = ["self", "encoder_decoder", "cross", "kv_dims"]
MASKS = ["none", "kpm_bool", "kpm_float", "attn2d_bool", "attn2d_float", "attn3d_bool",
         "attn3d_float", "both_bool", "both_float", "causal", "causal_kpm"]


# ------------------------------------------------------- outputs and gradients vs torch


@native
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_torch_float32(layout, kind, mask):
    _compare(kind, layout, mask)


@native
@pytest.mark.parametrize("mask", ["none", "both_float", "causal"])
@pytest.mark.parametrize("kind", ["self", "kv_dims"])
def test_matches_torch_float64(kind, mask):
    _compare(kind, "seq_first", mask, dtype=torch.float64)


@native
@pytest.mark.parametrize("mask", ["none", "kpm_bool", "attn3d_float", "causal", "causal_kpm"])
@pytest.mark.parametrize("kind", ["self", "kv_dims"])
@pytest.mark.parametrize("layout", ["batch_first", "unbatched"])
def test_bias_kv_and_zero_attn(layout, kind, mask):
    _compare(kind, layout, mask, {"add_bias_kv": True, "add_zero_attn": True})
    _compare(kind, layout, mask, {"add_bias_kv": True})
    _compare(kind, layout, mask, {"add_zero_attn": True})


@native
@pytest.mark.parametrize("mask", ["none", "kpm_bool", "attn2d_float"])
def test_without_bias(mask):
    _compare("self", "batch_first", mask, {"bias": False})


@native
@pytest.mark.parametrize("kpm", [False, True])
@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "unbatched"])
def test_is_causal_without_attn_mask_is_top_left_causal(layout, kpm):
    """An extension: torch raises for is_causal=True without attn_mask; we apply the top-left
    causal mask, on the fused path and on the need_weights=True fallback alike."""
    query, key, value, _ = _inputs("cross", layout, torch.float32)
    kwargs = _masks("causal_kpm" if kpm else "causal", layout, SRC, torch.float32)
    theirs, ours = _pair(batch_first=layout == "batch_first")
    expected, expected_weights = theirs(query, key, value, **kwargs)
    kwargs.pop("attn_mask")
    out, _ = ours(query, key, value, need_weights=False, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out, weights = ours(query, key, value, **kwargs)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)


@native
def test_fully_masked_query_gives_zero_attention_not_nan():
    _, ours = _pair(batch_first=True)
    x = torch.randn(BATCH, TGT, EMBED)
    kpm = torch.zeros(BATCH, TGT, dtype=torch.bool)
    kpm[1] = True  # every key of batch element 1 is padding
    out, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out[1], ours.out_proj.bias.detach().expand(TGT, EMBED))
    assert torch.isfinite(out).all()


# ----------------------------------------------------- need_weights=True: torch's own path


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_need_weights_falls_back_to_torch(layout, average):
    theirs, ours = _pair(batch_first=layout == "batch_first", dropout=0.25)
    query, key, value, _ = _inputs("cross", layout, torch.float32)
    kwargs = _masks("both_bool", layout, SRC, torch.float32)
    for train in (False, True):
        theirs.train(train)
        ours.train(train)
        torch.manual_seed(1)
        expected = theirs(query, key, value, average_attn_weights=average, **kwargs)
        torch.manual_seed(1)
        got = ours(query, key, value, average_attn_weights=average, **kwargs)  # default: True
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ------------------------------------------------------------------------------ dropout


@native
def test_dropout_is_identity_in_eval():
    theirs, ours = _pair(batch_first=True, dropout=0.5)
    theirs.eval()
    ours.eval()
    x = torch.randn(BATCH, TGT, EMBED)
    torch.testing.assert_close(
        ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0]
    )


@native
@pytest.mark.parametrize("mask", ["none", "kpm_bool"])
def test_dropout_in_training(mask):
    """Deterministic under torch.manual_seed, different across draws, and unbiased: the
    mean over many draws converges to the eval output (inverted dropout)."""
    _, ours = _pair(batch_first=True, dropout=0.3)
    x = torch.randn(BATCH, TGT, EMBED)
    kwargs = _masks(mask, "batch_first", TGT, torch.float32)
    ours.eval()
    expected = ours(x, x, x, need_weights=False, **kwargs)[0].detach()
    ours.train()
    with torch.no_grad():
        torch.manual_seed(7)
        first = ours(x, x, x, need_weights=False, **kwargs)[0]
        torch.manual_seed(7)
        again = ours(x, x, x, need_weights=False, **kwargs)[0]
        draws = torch.stack([ours(x, x, x, need_weights=False, **kwargs)[0] for _ in range(200)])
    assert first.shape == expected.shape
    assert torch.equal(first, again)
    assert not torch.allclose(first, expected)
    assert not torch.equal(draws[0], draws[1])
    stderr = draws.std(dim=0) / draws.shape[0] ** 0.5
    assert ((draws.mean(dim=0) - expected).abs() <= 5 * stderr + 1e-5).all()


@native
def test_dropout_backward_in_training():
    """Training-mode backward runs and stays finite (the kernel replays its dropout mask
    from the saved seed)."""
    _, ours = _pair(batch_first=True, dropout=0.2)
    ours.train()
    x = torch.randn(BATCH, TGT, EMBED, requires_grad=True)
    out, _ = ours(x, x, x, need_weights=False)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


# --------------------------------------------------------------- drop-in: state, repr


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"kdim": KDIM, "vdim": VDIM}, {"add_bias_kv": True},
     {"batch_first": True, "dropout": 0.1, "add_zero_attn": True}],
)
def test_drop_in_state_dict_repr_isinstance(kwargs):
    theirs, ours = _pair(**kwargs)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    fresh_torch = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs)
    fresh_torch.load_state_dict(ours.state_dict())  # ours -> torch
    fresh_ours = MultiheadAttention(EMBED, HEADS, **kwargs)
    fresh_ours.load_state_dict(fresh_torch.state_dict())  # torch -> ours
    for name, value in theirs.state_dict().items():
        assert torch.equal(fresh_ours.state_dict()[name], value)
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout",
                 "batch_first", "add_zero_attn", "_qkv_same_embed_dim"):
        assert getattr(ours, attr) == getattr(theirs, attr)


# ------------------------------------------------------------------------ torch.compile


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(EMBED)
        self.attn = MultiheadAttention(EMBED, HEADS, batch_first=True)

    def forward(self, x, key_padding_mask=None):
        h = self.norm(x)
        if key_padding_mask is None:
            h, _ = self.attn(h, h, h, need_weights=False, is_causal=True)
        else:
            h, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)
        return x + h


@native
@pytest.mark.parametrize("masked", [False, True])
def test_torch_compile_fullgraph_matches_eager(masked):
    torch._dynamo.reset()
    model = Block()
    x = torch.randn(BATCH, TGT, EMBED, requires_grad=True)
    kpm = None
    if masked:
        kpm = _masks("kpm_bool", "batch_first", TGT, torch.float32)["key_padding_mask"]
    with fastllm.use_backend("native"):
        eager = model(x, kpm)
        eager.sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
        x.grad = None
        model.zero_grad()
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        out = compiled(x, kpm)
        out.sum().backward()
    torch.testing.assert_close(out, eager)
    for got, expected in zip([x.grad] + [p.grad for p in model.parameters()], grads):
        torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------- errors


def test_constructor_errors_are_torchs():
    with pytest.raises(AssertionError, match="divisible"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="greater than 0"):
        MultiheadAttention(0, 2)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("query_4d", AssertionError, "unbatched 2D or batched 3D"),
        ("key_2d", AssertionError, "expected `key` and `value`"),
        ("query_features", AssertionError, "query must have 24 features"),
        ("key_value_length", AssertionError, "do not match value"),
        ("batch", AssertionError, "batch size"),
        ("int_mask", AssertionError, "only bool and floating types of attn_mask"),
        ("attn_mask_shape", RuntimeError, "should be"),
        ("attn_mask_4d", RuntimeError, "dimension 4 is not supported"),
        ("kpm_shape", AssertionError, "key_padding_mask must be"),
    ],
)
def test_forward_errors(case, error, match):
    _, ours = _pair(batch_first=True)
    x = torch.randn(BATCH, TGT, EMBED)
    args, kwargs = [x, x, x], {}
    if case == "query_4d":
        args = [x[None]] * 3
    elif case == "key_2d":
        args = [x, x[0], x[0]]
    elif case == "query_features":
        args = [x[..., :-1], x, x]
    elif case == "key_value_length":
        args = [x, x, x[:, :-1]]
    elif case == "batch":
        args = [x, x[:1], x[:1]]
    elif case == "int_mask":
        kwargs = {"attn_mask": torch.zeros(TGT, TGT, dtype=torch.int64)}
    elif case == "attn_mask_shape":
        kwargs = {"attn_mask": torch.zeros(TGT, TGT + 1, dtype=torch.bool)}
    elif case == "attn_mask_4d":
        kwargs = {"attn_mask": torch.zeros(1, 1, TGT, TGT, dtype=torch.bool)}
    elif case == "kpm_shape":
        kwargs = {"key_padding_mask": torch.zeros(BATCH, TGT + 1, dtype=torch.bool)}
    with pytest.raises(error, match=match):
        ours(*args, need_weights=False, **kwargs)


def test_mismatched_mask_types_warn_like_torch():
    _, ours = _pair(batch_first=True)
    x = torch.randn(BATCH, TGT, EMBED)
    kwargs = {
        "attn_mask": torch.zeros(TGT, TGT),
        "key_padding_mask": torch.zeros(BATCH, TGT, dtype=torch.bool),
    }
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        ours(x, x, x, need_weights=False, **kwargs)
