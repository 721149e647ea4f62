"""The SIMT emulation that executes fastllm's CUDA kernels on the CPU (csrc/common/simt_emu.h,
csrc/common/mma.h, fastllm/_emu.py; docs/simt_emulation.md).

- Faults are caught: deliberately broken kernels (tests/emu_kernels/broken_kernels.cu) give a
  wrong answer (missing barrier, wrong shuffle lane) or a RuntimeError naming the threads
  (deadlocks, out-of-bounds shared memory, wild writes, stack overflow, device assert ...).
- Each warp intrinsic and each wrapper of mma.h matches a plain exchange / matrix product /
  the PTX ISA's fragment layout written here independently.
- fastllm's own CUDA kernels give identical bits under every schedule (a schedule-dependent
  result is a race) and agree with a float64 reference; tests/test_norm.py runs the full
  accuracy suite on them (backend "cuda_emu").
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as TF

from fastllm import _build

SEEDS = (0, 1, 2, 3, 4)
FULL_MASK = 0xFFFFFFFF
POISON_INT = -1  # what the emulation returns for an undefined value: all bits set


@pytest.fixture(scope="module")
def ext(emulated_cuda):
    return emulated_cuda


@pytest.fixture
def kernels(ext):
    return torch.ops.fastllm_emu_test


@pytest.fixture(autouse=True)
def in_order_schedule(ext):
    ext.set_schedule_seed(None)
    yield
    ext.set_schedule_seed(None)
    ext.set_num_threads(1)


# ---- broken kernels: the emulation must catch them ---------------------------------------


def test_missing_barrier_changes_the_answer_under_random_schedules(ext, kernels):
    def run(with_barrier):
        # Fresh data each call: a static __shared__ array keeps the previous block's values.
        x = torch.randn(256)
        expected = x + torch.cat([torch.zeros(1), x[:-1]])
        return torch.equal(kernels.shift_add(x, with_barrier), expected)

    assert run(with_barrier=True)
    # In order, thread t - 1 finishes before thread t starts: the bug hides ...
    assert run(with_barrier=False)
    for seed in SEEDS:
        ext.set_schedule_seed(seed)
        assert run(with_barrier=True), f"seed {seed}"
        # ... a random schedule exposes it.
        assert not run(with_barrier=False), f"seed {seed}: the missing barrier went unnoticed"


def test_missing_barrier_before_reusing_shared_memory_is_caught(ext, kernels):
    def run(with_trailing_barrier):
        x = torch.randn(128)
        out = kernels.two_block_sums(x, with_trailing_barrier)
        expected = torch.stack([x.sum(), (x * x).sum()]).expand(128, 2)
        return torch.allclose(out, expected, rtol=1e-4, atol=1e-4)

    assert run(with_trailing_barrier=True)
    assert run(with_trailing_barrier=False)  # in order, every warp reads before any rewrites
    for seed in SEEDS:
        ext.set_schedule_seed(seed)
        assert run(with_trailing_barrier=True), f"seed {seed}"
        assert not run(with_trailing_barrier=False), f"seed {seed}: the write-after-read race " \
            "went unnoticed"


@pytest.mark.parametrize("seed", (None,) + SEEDS)
def test_wrong_shuffle_lane_changes_the_answer(ext, kernels, seed):
    ext.set_schedule_seed(seed)
    x = torch.randn(6, 32)
    expected = x.sum(1, keepdim=True).expand(6, 32)
    torch.testing.assert_close(kernels.warp_broadcast_sum(x, 0), expected, rtol=1e-5, atol=1e-5)
    for wrong_lane in (1, 16, 31):
        assert not torch.allclose(kernels.warp_broadcast_sum(x, wrong_lane), expected, atol=1e-3)


def test_dynamic_shared_memory_bounds(kernels):
    x = torch.arange(32, dtype=torch.float32)
    torch.testing.assert_close(kernels.dynamic_smem_access(x, 32, 0, False), x)
    # A read just past the end faults on the guard page at once ...
    with pytest.raises(RuntimeError, match=r"thread \(31, 0, 0\).*out-of-bounds read of dynamic "
                       r"shared memory at byte 252 of a 128-byte buffer"):
        kernels.dynamic_smem_access(x, 32, 32, False)
    # ... a write into the <16 bytes that round the buffer up, or just below its start, is
    # found after the block.
    with pytest.raises(RuntimeError, match=r"wrote past the end of dynamic shared memory "
                       r"\(byte 120 of a 120-byte buffer"):
        kernels.dynamic_smem_access(x, 30, 1, True)
    with pytest.raises(RuntimeError, match=r"wrote before the start of dynamic shared memory"):
        kernels.dynamic_smem_access(x, 32, -1, True)


# FaultKind in tests/emu_kernels/emu_test_kernels.h -> what the error must say.
FAULTS = {
    0: r"deadlock in block .*threads 0\.\.15: waiting at __syncthreads\(\)\n"
       r"  threads 16\.\.63: exited",
    1: r"deadlock in block .*waiting in __shfl_xor_sync \(mask 0xffffffff\).*exited",
    2: r"__shfl_xor_sync \(mask 0xffffffff\) meets lane \d+ of the same warp waiting in "
       r"__ballot_sync|__ballot_sync \(mask 0xffffffff\) meets lane \d+ of the same warp waiting "
       r"in __shfl_xor_sync",
    3: r"deadlock in block .*waiting at __syncthreads\(\).*waiting in __syncwarp",
    4: r"did not finish within 1 s \(FASTLLM_SIMT_TIMEOUT_S\)",
    5: r"called abort\(\): a failed assert\(\)",
    6: r"thread \(3, 0, 0\).*invalid memory write at address",
    7: r"stack overflow: the thread needs more than \d+ KiB of stack",
    8: r"__shfl_sync called with mask 0x00000001, which does not include the calling lane 1",
    9: r"__shfl_xor_sync: width must be a power of 2 in \[1, 32\], got 3",
}


@pytest.mark.parametrize("seed", (None, 0))
@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_faults_are_reported_not_hung(ext, kernels, monkeypatch, kind, seed):
    monkeypatch.setenv("FASTLLM_SIMT_TIMEOUT_S", "1")
    ext.set_schedule_seed(seed)
    with pytest.raises(RuntimeError, match=r"(?s)SIMT emulation of kernel `\w+`.*" + FAULTS[kind]):
        kernels.faulty(kind)
    # The emulator is usable after the fault.
    x = torch.randn(2, 32)
    torch.testing.assert_close(
        kernels.warp_broadcast_sum(x, 0), x.sum(1, keepdim=True).expand(2, 32), rtol=1e-5, atol=1e-5
    )


def test_launch_configuration_errors_come_back_as_cuda_errors(kernels):
    values = torch.zeros(2048, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        kernels.warp_shuffle(values, values, 0, 32, FULL_MASK)  # 2048 threads per block
    x = torch.zeros(32)
    with pytest.raises(RuntimeError, match="invalid argument"):
        kernels.dynamic_smem_access(x, 20000, 0, False)  # 80 KB without cudaFuncSetAttribute


# ---- warp intrinsics against a plain exchange ---------------------------------------------


def shuffle_reference(values, args, mode, width, mask, threads):
    """CUDA's documented semantics: lanes form segments of `width`; idx reads lane
    srcLane % width of the segment, up/down read lane -/+ delta unless that leaves the
    segment (own value), xor reads lane ^ laneMask unless that is in a later segment."""
    out = []
    for t in range(threads):
        lane = t % 32
        if not (mask >> lane) & 1:
            out.append(-7)  # the kernel's marker for lanes outside the mask
            continue
        start = lane - lane % width
        a = args[t]
        if mode == 0:
            src = start + a % width
        elif mode == 1:
            src = lane - a if lane - start >= a else lane
        elif mode == 2:
            src = lane + a if lane - start + a < width else lane
        else:
            src = lane ^ a
            src = lane if src >= start + width else src
        source_thread = t - lane + src
        defined = (mask >> src) & 1 and source_thread < threads
        out.append(values[source_thread] if defined else POISON_INT)
    return out


@pytest.mark.parametrize("threads", (64, 48))
@pytest.mark.parametrize("mask", (FULL_MASK, 0x0000FFFF, 0xF0F0F0F0))
@pytest.mark.parametrize("width", (32, 16, 8, 1))
@pytest.mark.parametrize("mode", (0, 1, 2, 3), ids=("shfl", "shfl_up", "shfl_down", "shfl_xor"))
def test_shuffles_match_a_plain_exchange(ext, kernels, mode, width, mask, threads):
    g = torch.Generator().manual_seed(mode * 1000 + width * 10 + threads)
    values = torch.randint(0, 1 << 30, (threads,), generator=g, dtype=torch.int32)
    if mode == 0:
        args = torch.randint(-40, 40, (threads,), generator=g, dtype=torch.int32)
    else:
        args = torch.randint(0, 32, (threads,), generator=g, dtype=torch.int32)
    expected = shuffle_reference(values.tolist(), args.tolist(), mode, width, mask, threads)
    for seed in (None, 0):
        ext.set_schedule_seed(seed)
        out = kernels.warp_shuffle(values, args, mode, width, mask)
        assert out.tolist() == expected, f"seed {seed}"


@pytest.mark.parametrize("threads", (64, 40))
@pytest.mark.parametrize("mask", (FULL_MASK, 0x0000FFFF, 0x80000001))
def test_votes_match_a_plain_exchange(kernels, threads, mask):
    g = torch.Generator().manual_seed(threads)
    predicates = torch.randint(0, 2, (threads,), generator=g, dtype=torch.int32) * 5
    out = kernels.warp_vote(predicates, mask).tolist()
    for t in range(threads):
        lane, base = t % 32, t - t % 32
        if not (mask >> lane) & 1:
            continue
        existing = (1 << min(32, threads - base)) - 1
        lanes = mask & existing
        ballot = sum(1 << i for i in range(32) if (lanes >> i) & 1 and predicates[base + i] != 0)
        count = sum(1 for i in range(32) if (lanes >> i) & 1 and predicates[base + i] != 0)
        got = [v & 0xFFFFFFFF for v in out[t]]
        assert got[:4] == [ballot, int(ballot != 0), int(ballot == lanes), count * 5], f"thread {t}"
        # __activemask: which lanes happen to be converged is up to the hardware; the own
        # lane is always in, lanes the warp does not have never are.
        assert (got[4] >> lane) & 1 and got[4] & ~existing == 0, f"__activemask of thread {t}"


# ---- common/mma.h wrappers ------------------------------------------------------------------


@pytest.mark.parametrize("via_ldmatrix", (False, True), ids=("fragments", "ldmatrix"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_mma_m16n8k16_is_a_matrix_product(ext, kernels, dtype, via_ldmatrix):
    for seed in (None, 0):
        ext.set_schedule_seed(seed)
        a = torch.randn(16, 16).to(dtype)
        b = torch.randn(16, 8).to(dtype)
        c = torch.randn(16, 8)
        expected = (a.double() @ b.double() + c.double()).float()
        d = kernels.mma_m16n8k16(a, b, c, via_ldmatrix)
        torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-5)


def ldmatrix_reference(tile, row_of_lane, num, trans):
    """PTX ISA: lanes 8m..8m+7 address rows 0..7 of matrix m; lane l receives elements
    [l/4][2(l%4)], [l/4][2(l%4)+1] of each matrix (.trans: [2(l%4)][l/4], [2(l%4)+1][l/4]),
    the first in the low 16 bits."""
    out = []
    for lane in range(32):
        regs = []
        for m in range(num):
            matrix = [tile[row_of_lane[8 * m + r]] for r in range(8)]
            q, p = lane // 4, 2 * (lane % 4)
            lo, hi = (matrix[p][q], matrix[p + 1][q]) if trans else (matrix[q][p], matrix[q][p + 1])
            reg = (lo & 0xFFFF) | (hi & 0xFFFF) << 16
            regs.append(reg - (1 << 32) if reg >= 1 << 31 else reg)
        out.append(regs)
    return out


@pytest.mark.parametrize("trans", (False, True))
@pytest.mark.parametrize("num", (1, 2, 4))
def test_ldmatrix_follows_the_documented_layout(kernels, num, trans):
    g = torch.Generator().manual_seed(num)
    tile = torch.randint(-(1 << 15), 1 << 15, (40, 8), generator=g, dtype=torch.int16)
    row_of_lane = torch.randperm(40, generator=g)[:32].to(torch.int32)  # rows in any order
    out = kernels.ldmatrix(tile, row_of_lane, num, trans)
    assert out.tolist() == ldmatrix_reference(tile.tolist(), row_of_lane.tolist(), num, trans)


def test_cp_async_lands_at_the_covering_wait(kernels):
    x = torch.randn(256)
    valid = x.clone()
    valid[200:] = 0  # chunks from float 200 on are zero-filled
    torch.testing.assert_close(kernels.cp_async(x, 200, 2), valid)  # wait_group 0
    torch.testing.assert_close(kernels.cp_async(x, 200, 3), valid)  # wait_all
    # wait_group 1: the older group (first 128 floats) has landed, the newer one not yet.
    first_only = kernels.cp_async(x, 200, 1)
    torch.testing.assert_close(first_only[:128], valid[:128])
    assert first_only[128:].isnan().all()
    # No wait at all: nothing is there yet.
    assert kernels.cp_async(x, 200, 0).isnan().all()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", ("mma_wrappers.cu", "warp_intrinsics.cu"))
def test_test_kernels_compile_with_nvcc_without_spills(tmp_path, source):
    """The same sources build for sm_80 and sm_90 with fastllm's flags (ptxas fails on any
    spill or local-memory use); mma_wrappers.cu covers the PTX of every wrapper in mma.h."""
    cmd = [
        "nvcc", "-c", str(_build.ROOT / "tests" / "emu_kernels" / source),
        "-o", str(tmp_path / "kernels.o"), f"-I{_build.CSRC}",
        *_build.NVCC_FLAGS, *_build.gencode_flags(["80", "90"]),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert spills and all(s == ("0", "0") for s in spills), result.stderr[-4000:]


# ---- fastllm's CUDA kernels under every schedule ----------------------------------------------

NORM_SHAPES = [(7, 1000), (64, 257), (3, 9000)]  # warp-per-row, block-per-row, looped


def run_norm_kernels(ops, kind, x, residual, weight, bias, dy):
    """Forward and backward of one norm op through torch.ops.fastllm_emu; every output."""
    n = x.shape[-1]
    rms = "rms" in kind
    if residual is None:
        fwd = ops.rms_norm_fwd(x, [n], weight, 1e-5) if rms else ops.layer_norm_fwd(
            x, [n], weight, bias, 1e-5)
        s, grad_residual = x, None
    else:
        fwd = ops.add_rms_norm_fwd(x, residual, [n], weight, 1e-5) if rms else (
            ops.add_layer_norm_fwd(x, residual, [n], weight, bias, 1e-5))
        s, grad_residual = fwd[1], dy.flip(0)
    if rms:
        bwd = ops.rms_norm_bwd(dy, grad_residual, s, [n], weight, fwd[-1], True)
    else:
        bwd = ops.layer_norm_bwd(dy, grad_residual, s, [n], weight, fwd[-2], fwd[-1], True, True)
    return list(fwd) + list(bwd)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"))
def test_norm_kernels_give_identical_bits_under_every_schedule(ext, kind, shape, dtype):
    ops = torch.ops.fastllm_emu
    n = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    residual = torch.randn(shape).to(dtype) if kind.startswith("add") else None
    weight, bias, dy = torch.randn(n), torch.randn(n), torch.randn(shape).to(dtype)
    in_order = run_norm_kernels(ops, kind, x, residual, weight, bias, dy)

    # Against float64 torch (tests/test_norm.py applies the strict 2x-torch rule).
    s = x.double() if residual is None else x.double() + residual.double()
    if "rms" in kind:
        y = TF.rms_norm(s, [n], weight.double(), 1e-5)
    else:
        y = TF.layer_norm(s, [n], weight.double(), bias.double(), 1e-5)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(in_order[0].double(), y, rtol=tol, atol=tol)

    for seed in SEEDS[:2]:
        ext.set_schedule_seed(seed)
        shuffled = run_norm_kernels(ops, kind, x, residual, weight, bias, dy)
        for i, (a, b) in enumerate(zip(in_order, shuffled)):
            assert torch.equal(a, b), f"output {i} depends on the schedule (seed {seed})"


def test_blocks_on_several_os_threads_give_the_same_bits(ext):
    ops = torch.ops.fastllm_emu
    x, w, b = torch.randn(64, 257), torch.randn(257), torch.randn(257)
    dy = torch.randn(64, 257)
    serial = run_norm_kernels(ops, "layer_norm", x, None, w, b, dy)
    ext.set_num_threads(2)
    assert ext.num_threads() == 2
    parallel = run_norm_kernels(ops, "layer_norm", x, None, w, b, dy)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


def test_schedule_seed_controls(ext):
    from fastllm import _emu

    assert ext.schedule_seed() is None
    with _emu.schedule_seed(7):
        assert ext.schedule_seed() == 7
    assert ext.schedule_seed() is None
