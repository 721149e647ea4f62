"""The CPU kernels' huge-page advice on their large fresh outputs (csrc/common/cpu_memory.h):
FASTLLM_CPU_HUGE_PAGES=0 / 1 / auto as ``fastllm.backend.cpu_fresh_pages()`` reports it, a
bad value refused by the kernels, naming the variable and the value, and the advice's
effect: far fewer page faults with it, none of it in the values (the sysfs check behind
``auto`` is tested on a made-up sysfs in ctest's cpu_common, tests/cpp/cpu_common_test.cpp).
Each setting in a fresh child: the decision is made once per process."""

from __future__ import annotations

import pytest

from fastllm import _native
from fastllm.bench.common import _kernel_thp_mode
from tests.helpers import native_cpu_report
from tests.hostile import run_isolated

pytestmark = pytest.mark.skipif(not _native.AVAILABLE,
                                reason="fastllm's native extension is not built")


def fresh_pages_with(value: str) -> str:
    return native_cpu_report("cpu_fresh_pages", "FASTLLM_CPU_HUGE_PAGES", value)


def test_switch_values():
    assert fresh_pages_with("1") == "huge pages advised (MADV_HUGEPAGE; FASTLLM_CPU_HUGE_PAGES=1)"
    assert fresh_pages_with("0") == "left to the system (FASTLLM_CPU_HUGE_PAGES=0)"
    automatic = fresh_pages_with("auto")
    assert automatic in ("huge pages advised (MADV_HUGEPAGE)",
                         "left to the system (free page reporting to the hypervisor: "
                         "virtio-balloon)")
    assert fresh_pages_with("") == automatic
    bad = fresh_pages_with("yes")
    assert bad.startswith("ValueError: FASTLLM_CPU_HUGE_PAGES must be") and "'yes'" in bad


def test_bad_value_fails_the_kernels_with_its_name():
    out = run_isolated("""
        import torch
        from fastllm import functional as F
        x = torch.randn(4, 8)
        try:
            F.rms_norm(x, (8,))
        except RuntimeError as e:  # the kernels' errors name the op (as FASTLLM_CPU_ISA's)
            print("RuntimeError:", e)
    """, env={"FASTLLM_CPU_HUGE_PAGES": "2"})
    assert "RuntimeError: rms_norm_fwd: FASTLLM_CPU_HUGE_PAGES must be" in out and "'2'" in out


FAULTS = """
    import hashlib, resource, torch
    from fastllm import functional as F
    torch.manual_seed(0)
    x = torch.randn(1024, 8192, requires_grad=True)  # a 32 MiB fresh gradient
    y = torch.randint(0, 8192, (1024,))
    loss = F.cross_entropy(x, y)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    grad, = torch.autograd.grad(loss, (x,))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(faults, hashlib.sha256(grad.numpy().tobytes()).hexdigest())
"""


@pytest.mark.skipif("[madvise]" not in _kernel_thp_mode(),
                    reason="needs transparent_hugepage=madvise (the advice then decides)")
def test_advice_cuts_the_faults_and_not_the_values():
    pages = (1024 * 8192 * 4) // 4096
    off_faults, off_hash = run_isolated(FAULTS, env={"FASTLLM_CPU_HUGE_PAGES": "0"}).split()
    on_faults, on_hash = run_isolated(FAULTS, env={"FASTLLM_CPU_HUGE_PAGES": "1"}).split()
    assert on_hash == off_hash
    assert int(off_faults) >= pages // 2, (off_faults, on_faults)  # 4 KiB pages: one each
    assert int(on_faults) <= pages // 8, (off_faults, on_faults)  # 2 MiB pages: 512 x fewer
