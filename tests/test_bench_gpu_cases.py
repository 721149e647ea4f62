"""``fastllm bench``'s GPU-facing cases, checked on the CPU without running them: the
LLaMA-3-8B shape set (``--shapes``), the contenders a CUDA device adds (torch's SDPA forced
onto its flash and cuDNN backends; Liger-Kernel where importable, its importability
monkeypatched), the CPU's contenders left as they were, the SDPA refusal turned into n/a,
liger's rotary layout, and the models runner's device handling."""

import pytest
import torch

from fastllm.bench import attention, common, cross_entropy, gated_mlp, load_family, models
from fastllm.bench import norm, rotary
from fastllm.bench.common import (
    COMPILE, CONTENDERS, EAGER, FASTLLM, LIGER, SHAPE_SETS, NOT_AVAILABLE, TimingBudget,
    run_cases,
)
from fastllm.cli import build_parser, main

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
OP_FAMILIES = ("norm", "cross_entropy", "attention", "mlp", "rotary")


@pytest.fixture
def liger(monkeypatch):
    """``liger(True)`` / ``liger(False)``: Liger-Kernel importable or not, for this test."""
    return lambda present: monkeypatch.setattr(common, "liger_available", lambda: present)


# ----- the LLaMA-3-8B shape set ---------------------------------------------------------


def test_llama3_8b_cases():
    both = (torch.float32, torch.bfloat16)
    modes = {"fwd", "fwd+bwd"}
    expected = {
        "norm": {(op, (4096, 4096)) for op in norm.OPS},
        "cross_entropy": {("cross_entropy", (4096, 128256)),
                          ("linear_cross_entropy", (4096, 4096, 128256))},
        "attention": {("attention-full-hkv8", (1, 32, 4096, 128)),
                      ("attention-causal-hkv8", (1, 32, 4096, 128))},
        "mlp": {("swiglu", (4096, 14336))},
        "rotary": {("rotary-qk", (1, 4096, 32, 8, 128))},
    }
    for family, ops in expected.items():
        for device in (CPU, CUDA):
            got = load_family(family).cases(False, "llama3-8b", device)
            assert {(c.op_id, c.shape) for c in got} == ops, family
            # every op at every dtype and mode: linear CE too, on the CPU as on a GPU
            assert {(c.op_id, c.shape, c.dtype, c.mode) for c in got} == {
                (op, shape, dtype, mode) for op, shape in ops for dtype in both for mode in modes
            }, (family, device)
            # --quick only shortens the timing of this set
            assert [c.id for c in load_family(family).cases(True, "llama3-8b", device)] == [
                c.id for c in got]
    gqa = attention.cases(False, "llama3-8b")
    assert {c.kv_heads for c in gqa} == {8}
    assert gqa[0].id == "attention-full-hkv8-fwd-1x32x4096x128-float32"
    assert gqa[0].params()["shape"] == "B1 H32 Hkv8 T4096 D128"


@pytest.mark.parametrize("family", OP_FAMILIES)
def test_shape_sets_compose(family):
    module = load_family(family)
    for quick in (False, True):
        for device in (CPU, CUDA):
            default = [c.id for c in module.cases(quick, "default", device)]
            llama = [c.id for c in module.cases(quick, "llama3-8b", device)]
            every = [c.id for c in module.cases(quick, "all", device)]
            assert sorted(every) == sorted(default + llama)
            assert len(set(every)) == len(every)  # ids unique, so --only can tell them apart
            assert not set(default) & set(llama)
    # the default set is the one before --shapes existed: what cases(quick) still gives
    assert [c.id for c in module.cases(True)] == [c.id for c in module.cases(True, "default", CPU)]
    with pytest.raises(ValueError, match="shapes must be one of default, llama3-8b, all; got 'x'"):
        module.cases(False, "x")


@pytest.mark.parametrize("cpu", ["avx2", "avx512", "amx"])
def test_linear_cross_entropy_dtypes_by_device(monkeypatch, cpu):
    """The default linear cases are float32 only on a CPU without bfloat16 dot products
    (bfloat16 GEMMs emulated: AVX2 only); a CPU with AVX512-BF16 (the avx512 group) or AMX
    and a GPU get bfloat16 at every shape too."""
    bf16 = cpu != "avx2"  # bfloat16 cases expected
    monkeypatch.setattr(cross_entropy, "cpu_isa_features",
                        lambda: {"avx2": True, "avx512": cpu != "avx2", "amx": cpu == "amx"})

    def linear(device):
        return {(c.shape, c.dtype) for c in cross_entropy.cases(False, "default", device)
                if c.linear}

    shapes = set(cross_entropy.LINEAR_SHAPES)
    every = {(s, d) for s in shapes for d in cross_entropy.DTYPES}
    assert linear(CPU) == (every if bf16 else {(s, torch.float32) for s in shapes})
    assert linear(CUDA) == every
    if bf16:
        return
    assert {c.id for c in cross_entropy.cases(False, "default", CPU)} < {
        c.id for c in cross_entropy.cases(False, "default", CUDA)}


def test_gqa_bytes_and_agreement():
    """k, v count Hkv heads; fastllm and torch's SDPA (enable_gqa) give the same out and
    gradients on a small grouped-query case."""
    case = attention.AttentionCase("causal", "fwd+bwd", (1, 4, 64, 32), torch.float32, kv_heads=2)
    nq, nkv = 4 * 64 * 32, 2 * 64 * 32
    assert case.bytes_moved() == (6 * nq + 6 * nkv) * 4
    fwd = attention.AttentionCase("causal", "fwd", (1, 4, 64, 32), torch.float32, kv_heads=2)
    assert fwd.bytes_moved() == (2 * nq + 2 * nkv) * 4
    mha = attention.AttentionCase("causal", "fwd", (1, 4, 64, 32), torch.float32)
    assert mha.bytes_moved() == 4 * nq * 4 and mha.flops() == fwd.flops()
    inputs = case.make_inputs(CPU)
    results = {}
    for contender in (FASTLLM, EAGER):
        call_inputs = case.contender_inputs(contender, inputs)
        assert call_inputs.args[1].shape[1 if contender == EAGER else 2] == 2
        out = case.function(contender, "reference", CPU)(*call_inputs.args)
        grads = torch.autograd.grad(out, call_inputs.differentiable, call_inputs.grad_outputs)
        if contender == FASTLLM:  # (B, T, H, D) -> (B, H, T, D)
            out, grads = out.transpose(1, 2), [g.transpose(1, 2) for g in grads]
        results[contender] = (out, grads)
    torch.testing.assert_close(results[FASTLLM][0], results[EAGER][0], rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(results[FASTLLM][1], results[EAGER][1]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ----- contenders by device -------------------------------------------------------------


@pytest.mark.parametrize("present", [False, True])
def test_cpu_contenders_unchanged(liger, present):
    """Whatever is installed, the CPU's contenders are the ones before devices mattered."""
    liger(present)
    old_peers = {
        "cross_entropy": lambda c: (cross_entropy.TORCH_LINEAR_CROSS_ENTROPY,) if c.linear else (),
        "attention": lambda c: ((attention.OLD_MASKED_PATH,)
                                if isinstance(c, attention.MaskedAttentionCase) else ()),
    }
    for family in OP_FAMILIES:
        for case in load_family(family).cases(False, "all", CPU):
            expected = (FASTLLM, *inplace_variant(case), EAGER, COMPILE,
                        *old_peers.get(family, lambda c: ())(case))
            assert case.contenders_on(CPU) == expected, case.id
            assert case.contenders == expected, case.id


def inplace_variant(case) -> tuple[str, ...]:
    """Cross-entropy forward+backward's fastllm inplace_backward row, on every device."""
    if isinstance(case, cross_entropy.CrossEntropyCase) and case.backward and not case.linear:
        return (cross_entropy.FASTLLM_INPLACE_BACKWARD,)
    return ()


@pytest.mark.parametrize("present", [False, True])
def test_cuda_contenders(liger, present):
    liger(present)
    with_liger = (LIGER,) if present else ()
    for case in attention.cases(True, "all", CUDA):
        if isinstance(case, attention.MaskedAttentionCase):
            assert case.contenders_on(CUDA) == CONTENDERS + (attention.OLD_MASKED_PATH,)
        else:
            assert case.contenders_on(CUDA) == CONTENDERS + ("sdpa[flash]", "sdpa[cudnn]")
    for case in norm.cases(True, "all", CUDA):
        liger_op = case.op in ("layer_norm", "rms_norm")  # Liger has no fused add + norm
        assert case.contenders_on(CUDA) == CONTENDERS + (with_liger if liger_op else ()), case.id
    for case in cross_entropy.cases(True, "all", CUDA):
        torch_chunked = (cross_entropy.TORCH_LINEAR_CROSS_ENTROPY,) if case.linear else ()
        assert case.contenders_on(CUDA) == (FASTLLM, *inplace_variant(case), EAGER, COMPILE,
                                            *torch_chunked, *with_liger)
    for module in (gated_mlp, rotary):
        for case in module.cases(True, "all", CUDA):
            assert case.contenders_on(CUDA) == CONTENDERS + with_liger
    if present:  # function() finds the peer by device, and only there
        case = norm.cases(True)[2]
        assert case.op == "rms_norm"
        assert case.function(LIGER, "reference", CUDA) is norm.liger_rms_norm
        with pytest.raises(ValueError, match="contender must be one of .* on cpu; got 'liger'"):
            case.function(LIGER, "reference", CPU)


def test_liger_note(liger):
    liger(False)
    assert common.liger_note() == "Liger-Kernel: not found (no liger rows)"
    liger(True)
    assert common.liger_note().startswith("Liger-Kernel: ")
    assert "not found" not in common.liger_note()


def test_liger_rotary_layout():
    """liger's inputs are views of the same tensors in its (B, H, T, D) layout (no copy), the
    caches repeated to (T, D) as its kernel reads them, the gradients transposed alike."""
    case = rotary.RotaryCase("fwd+bwd", (1, 16, 4, 2, 8), torch.float32)
    inputs = case.make_inputs(CPU)
    assert case.contender_inputs(FASTLLM, inputs) is inputs
    theirs = case.contender_inputs(LIGER, inputs)
    q, k, cos, sin = inputs.args
    lq, lk, lcos, lsin = theirs.args
    assert lq.shape == (1, 4, 16, 8) and lk.shape == (1, 2, 16, 8)
    assert lq.data_ptr() == q.data_ptr() and lq.transpose(1, 2).is_contiguous()
    assert torch.equal(lcos, torch.cat((cos, cos), dim=-1)) and lsin.shape == (16, 8)
    assert theirs.differentiable == inputs.differentiable
    assert [g.shape for g in theirs.grad_outputs] == [(1, 4, 16, 8), (1, 2, 16, 8)]
    assert theirs.grad_outputs[0].data_ptr() == inputs.grad_outputs[0].data_ptr()


# ----- SDPA forced onto one backend ----------------------------------------------------


def test_sdpa_backend_refusal_is_not_available():
    """A backend that refuses the case raises NotImplementedError (the runner's n/a): here
    cuDNN, which the CPU does not have; the CPU's flash kernel runs and agrees with eager."""
    case = attention.AttentionCase("causal", "fwd", (1, 2, 64, 32), torch.float32, kv_heads=1)
    args = case.contender_inputs("sdpa[cudnn]", case.make_inputs(CPU)).args
    with pytest.raises(NotImplementedError, match=r"^sdpa\[cudnn\] refuses this case: "):
        attention.sdpa_on_backend("sdpa[cudnn]")(*args)
    torch.testing.assert_close(attention.sdpa_on_backend("sdpa[flash]")(*args),
                               attention.torch_sdpa(*args))


def test_run_cases_records_refusal_as_na(monkeypatch):
    """run_cases shows a peer raising NotImplementedError as n/a, the others timed."""
    case = attention.AttentionCase("full", "fwd", (1, 2, 64, 32), torch.float32)
    refusing = {"sdpa[cudnn]": attention.sdpa_on_backend("sdpa[cudnn]")}
    monkeypatch.setattr(attention.AttentionCase, "peers", lambda self, device: refusing)
    results = run_cases("attention", [case], kernel_family="attention", device=CPU,
                        backend="reference", budget=TimingBudget(0, 1, 0, 1), copy_gbs=1.0)
    assert [r.contender for r in results] == [FASTLLM, EAGER, COMPILE, "sdpa[cudnn]"]
    assert results[-1].error.startswith(NOT_AVAILABLE) and results[-1].time_s is None
    assert all(r.error is None and r.time_s > 0 for r in results[:3])


# ----- the command line -----------------------------------------------------------------


def test_shapes_option_parses():
    parser = build_parser()
    assert parser.parse_args(["bench", "norm"]).shapes == "default"
    for choice in SHAPE_SETS:
        assert parser.parse_args(["bench", "norm", "--shapes", choice]).shapes == choice
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--shapes", "llama2"])


def test_shapes_refused_for_own_runners(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "models", "--shapes", "llama3-8b"])
    assert exit_info.value.code == 2
    assert "--shapes picks the op families' shapes; models has its own cases" in (
        capsys.readouterr().err)


def test_models_device(monkeypatch):
    """models accepts cuda (the worker gets --device) and refuses other devices."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "models", "--device", "meta"])
    assert exit_info.value.code == 2
    commands = []

    class Done(Exception):
        pass

    def fake_run(command, **kwargs):
        commands.append(command)
        raise Done

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    case = models.cases(quick=True)[0]
    args = build_parser().parse_args(["bench", "models", "--quick"])
    with pytest.raises(Done):
        models._run_in_subprocess(case, args, "reference", CUDA)
    assert commands[0][commands[0].index("--device") + 1] == "cuda"
