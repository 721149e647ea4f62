"""Bounds checking of Triton kernels under the interpreter (``FASTLLM_CHECK_BOUNDS=1``).

Under ``TRITON_INTERPRET=1`` a kernel's ``tl.load`` / ``tl.store`` / atomics dereference raw
host addresses in Triton's C++ interpreter: an out-of-range pointer silently reads garbage
or overwrites the heap (e.g. attention given ``cu_seqlens = [0, 3, 4000]`` with 8 packed
tokens ended in glibc's "double free or corruption"). With the check on, every access is
compared, before memory is touched, with the memory the launch may legitimately reach: the
storages of its tensor arguments, each ``[storage.data_ptr(), + storage.nbytes())``. An
access outside all of them raises `OutOfBoundsError`, naming the kernel, the program, the
kernel's source line, the byte offset from the nearest argument's pointer and how far
outside that argument's storage it lies. Masked-off lanes are not checked (they touch
nothing), exactly like on a GPU.

    FASTLLM_CHECK_BOUNDS=1 pytest tests         # read when fastllm.triton is imported
    from fastllm.triton import _bounds
    with _bounds.checking_bounds():            # or enable() / disable()
        ...

How: two hooks in ``triton/runtime/interpreter.py`` (triton 3.x), both restored by
`disable`:
  - ``GridExecutor._init_args_hst`` returns the host copies of a launch's arguments (the
    tensors the interpreted kernel addresses; on CPU they are the caller's own tensors):
    their storages become the launch's allowed regions, named after the kernel's parameters.
    ``GridExecutor.__call__`` brackets the launch (a per-thread stack of launches).
  - ``interpreter._interpreter``, the C++ module through which every memory access of an
    interpreted kernel goes (``load``, ``store``, ``atomic_rmw``, ``atomic_cas``; block
    pointers, tensor descriptors and gathers end in the same two), is replaced by a proxy
    that checks the active lanes' addresses first.
If a hook point is missing or its signature changed (another triton version), `enable`
raises instead of silently checking nothing.

Not covered: compiled kernels on a GPU (use NVIDIA's compute-sanitizer, see
docs/debugging.md); memory a kernel reaches through a raw integer address rather than a
tensor argument (it counts as out of bounds); an access inside some argument's storage but
outside the part of it that the tensor view covers (the storage is the unit, as for
compute-sanitizer's allocation-based check).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

ENV_VAR = "FASTLLM_CHECK_BOUNDS"


class OutOfBoundsError(RuntimeError):
    """An interpreted Triton kernel tried to access memory outside every tensor argument of
    its launch (raised before the access; nothing was read or written)."""


# ---- a launch's allowed memory ---------------------------------------------------------


@dataclass
class _Region:
    """One storage reachable by a launch: bytes [start, end), and the arguments using it."""

    start: int
    end: int
    names: list[str]
    pointer: int  # the first such argument's data_ptr(), what the kernel received

    def distance(self, address: int, size: int) -> int:
        """Bytes by which the access [address, address + size) lies outside; 0 inside."""
        if address < self.start:
            return self.start - address
        return max(0, address + size - self.end)


@dataclass
class _Launch:
    kernel: str
    regions: list[_Region] = field(default_factory=list)
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    ends: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))

    def set_arguments(self, named_args: list[tuple[str, object]]) -> None:
        by_storage: dict[int, _Region] = {}
        for name, arg in named_args:
            for arg_name, tensor in _tensors(name, arg):
                storage = tensor.untyped_storage()
                start = storage.data_ptr()
                region = by_storage.get(start)
                if region is None:
                    by_storage[start] = _Region(start, start + storage.nbytes(), [arg_name],
                                                tensor.data_ptr())
                else:
                    region.names.append(arg_name)
        self.regions = sorted(by_storage.values(), key=lambda r: r.start)
        self.starts = np.array([r.start for r in self.regions], dtype=np.uint64)
        self.ends = np.array([r.end for r in self.regions], dtype=np.uint64)

    def check(self, access: str, ptrs, mask, itemsize: int) -> None:
        """Raises OutOfBoundsError if an active lane's [ptr, ptr + itemsize) leaves every
        region."""
        ptrs = np.asarray(ptrs, dtype=np.uint64)
        if mask is not None:
            mask = np.broadcast_to(np.asarray(mask, dtype=bool), ptrs.shape)
            if not mask.all():
                ptrs = ptrs[mask]
        ptrs = ptrs.reshape(-1)
        if ptrs.size == 0:
            return
        lo, hi = int(ptrs.min()), int(ptrs.max()) + itemsize
        # Almost every access stays inside one tensor: two reductions and a short loop.
        for region in self.regions:
            if region.start <= lo and hi <= region.end:
                return
        # Lane by lane: the region starting at or before each address must hold it.
        index = np.searchsorted(self.starts, ptrs, side="right").astype(np.int64) - 1
        inside = index >= 0
        safe_index = np.maximum(index, 0)
        if len(self.regions):
            inside &= ptrs + np.uint64(itemsize) <= self.ends[safe_index]
        else:
            inside[:] = False
        bad = ~inside
        if bad.any():
            raise OutOfBoundsError(
                self.describe(access, int(ptrs[bad][0]), itemsize, int(bad.sum()), ptrs.size)
            )

    def describe(self, access: str, address: int, itemsize: int, bad: int, active: int) -> str:
        where = _kernel_source_line()
        head = (
            f"FASTLLM_CHECK_BOUNDS: Triton kernel `{self.kernel}`, program {_program_id()}"
            + (f", at {where}" if where else "")
            + f": out-of-bounds {access} of {itemsize}-byte elements by {bad} of {active} "
            "active lanes (nothing was read or written). "
        )
        if not self.regions:
            return head + f"The launch has no tensor argument; first address {address:#x}."
        nearest = min(self.regions, key=lambda r: r.distance(address, itemsize))
        offset = address - nearest.pointer
        element = f" (element {offset // itemsize})" if offset % itemsize == 0 else ""
        also = ""
        if len(nearest.names) > 1:
            also = f" (same storage as {', '.join(nearest.names[1:])})"
        nearest_note = "the nearest argument" if len(self.regions) > 1 else "the only argument"
        return head + (
            f"First offending access: bytes [{offset}, {offset + itemsize}){element} from "
            f"argument `{nearest.names[0]}`{also}, {nearest_note}, whose storage spans bytes "
            f"[{nearest.start - nearest.pointer}, {nearest.end - nearest.pointer}) from it "
            f"({nearest.distance(address, itemsize)} bytes outside)."
        )


def _tensors(name: str, arg) -> Iterator[tuple[str, object]]:
    """(name, tensor) for each tensor in a kernel argument (tensors, Triton's TensorWrapper,
    tensor descriptors, tuples of them)."""
    if isinstance(arg, (tuple, list)):
        for i, item in enumerate(arg):
            yield from _tensors(f"{name}[{i}]", item)
    elif hasattr(arg, "untyped_storage") and hasattr(arg, "data_ptr"):
        yield name, arg
    elif hasattr(arg, "base") and hasattr(arg, "data_ptr"):  # triton's TensorWrapper
        yield from _tensors(name, arg.base)
    elif type(arg).__name__ == "TensorDescriptor" and hasattr(arg, "base"):
        yield from _tensors(f"{name}.base", arg.base)


_FILES_TO_SKIP = (os.path.abspath(__file__),)


def _kernel_source_line() -> str:
    """file:line of the innermost frame outside triton and this module: the kernel's (the
    interpreter runs a rewrite of the kernel compiled under its own file name and lines)."""
    import triton

    triton_dir = os.path.dirname(os.path.abspath(triton.__file__))
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(triton_dir) and filename not in _FILES_TO_SKIP:
            relative = os.path.relpath(filename)
            return f"{filename if relative.startswith('..') else relative}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


def _program_id() -> str:
    from triton.runtime import interpreter

    idx = getattr(interpreter.interpreter_builder, "grid_idx", None)
    return str(tuple(int(i) for i in idx)) if idx is not None else "(unknown)"


# ---- per-thread stack of launches ------------------------------------------------------

_local = threading.local()


def _launches() -> list[_Launch]:
    stack = getattr(_local, "launches", None)
    if stack is None:
        stack = _local.launches = []
    return stack


def _current_launch(access: str) -> _Launch:
    stack = _launches()
    if not stack:
        raise RuntimeError(
            f"FASTLLM_CHECK_BOUNDS: an interpreted Triton {access} ran outside a kernel launch "
            "(triton's GridExecutor): the bounds checker's hooks no longer match triton "
            "(fastllm/triton/_bounds.py)"
        )
    return stack[-1]


# ---- the checked C++ interpreter -------------------------------------------------------


class _CheckedInterpreter:
    """Stands in for triton's C++ interpreter module (``triton._C.libtriton.interpreter``):
    memory accesses are checked against the current launch, everything else forwards."""

    def __init__(self, raw) -> None:
        self._raw = raw

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def load(self, ptrs, mask, other, dtype):
        _current_launch("load").check("load", ptrs, mask, np.dtype(dtype).itemsize)
        return self._raw.load(ptrs, mask, other, dtype)

    def store(self, ptrs, value, mask):
        _current_launch("store").check("store", ptrs, mask, np.asarray(value).itemsize)
        return self._raw.store(ptrs, value, mask)

    def atomic_rmw(self, op, ptrs, value, mask, sem):
        _current_launch("atomic").check(f"atomic ({op})", ptrs, mask, np.asarray(value).itemsize)
        return self._raw.atomic_rmw(op, ptrs, value, mask, sem)

    def atomic_cas(self, ptrs, cmp, value, sem):
        _current_launch("atomic").check("atomic_cas", ptrs, None, np.asarray(value).itemsize)
        return self._raw.atomic_cas(ptrs, cmp, value, sem)


# The C++ functions we wrap, with the argument kinds (from pybind11's signature line) the
# proxy above relies on; another layout means another triton: refuse rather than misread.
_EXPECTED_SIGNATURES = {
    "load": ("uint64", "bool", "numpy.ndarray", "numpy.dtype"),
    "store": ("uint64", "numpy.ndarray", "bool"),
    "atomic_rmw": ("RMW_OP", "uint64", "numpy.ndarray", "bool", "MEM_SEMANTIC"),
    "atomic_cas": ("uint64", "numpy.ndarray", "numpy.ndarray", "MEM_SEMANTIC"),
}


def _signature_problem(raw, name: str, expected: tuple[str, ...]) -> Optional[str]:
    fn = getattr(raw, name, None)
    if fn is None:
        return f"triton's C++ interpreter has no `{name}`"
    first_line = (getattr(fn, "__doc__", None) or "").strip().splitlines()[:1]
    match = re.match(rf"{name}\((.*)\)\s*->", first_line[0]) if first_line else None
    if match is None:
        return f"cannot read the signature of triton's C++ interpreter `{name}`"
    params = [p for p in re.split(r",\s*(?=arg\d+:)", match.group(1)) if p]
    if len(params) != len(expected) or not all(e in p for e, p in zip(expected, params)):
        return (f"triton's C++ interpreter `{name}` has the signature ({match.group(1)}), "
                f"expected arguments like {expected}")
    return None


# ---- installing and removing the hooks -------------------------------------------------

_install_lock = threading.Lock()
_originals: dict[str, object] = {}


def _hook_points():
    """(interpreter module, GridExecutor), or raises naming what is missing."""
    try:
        from triton.runtime import interpreter
    except Exception as e:  # noqa: BLE001 - any import failure means no hook point
        raise RuntimeError(
            f"{ENV_VAR}: cannot import triton.runtime.interpreter ({e!r}); the bounds checker "
            "hooks Triton's interpreter"
        ) from e
    problems = []
    executor = getattr(interpreter, "GridExecutor", None)
    if executor is None:
        problems.append("triton.runtime.interpreter has no GridExecutor")
    else:
        for method in ("__call__", "_init_args_hst"):
            if not callable(getattr(executor, method, None)):
                problems.append(f"GridExecutor has no {method}")
        init_code = getattr(executor.__init__, "__code__", None)
        if init_code is None or "arg_names" not in init_code.co_varnames:
            problems.append("GridExecutor.__init__ takes no arg_names")
    raw = getattr(interpreter, "_interpreter", None)
    if raw is None:
        problems.append("triton.runtime.interpreter has no _interpreter (its C++ module)")
    elif not isinstance(raw, _CheckedInterpreter):
        for name, expected in _EXPECTED_SIGNATURES.items():
            problem = _signature_problem(raw, name, expected)
            if problem:
                problems.append(problem)
    if problems:
        import triton

        raise RuntimeError(
            f"{ENV_VAR}: cannot hook the interpreter of triton {triton.__version__}: "
            + "; ".join(problems)
            + ". fastllm/triton/_bounds.py must be updated for this triton version."
        )
    return interpreter, executor


def _wrap_call(original):
    def __call__(self, *args, **kwargs):
        stack = _launches()
        stack.append(_Launch(getattr(self.fn, "__name__", "?")))
        try:
            return original(self, *args, **kwargs)
        except Exception as e:
            # GridExecutor re-raises kernel errors as InterpreterError(repr(e)), and so does each
            # @triton.jit helper the access happened in; give back our own error, with its
            # traceback down to the kernel's line.
            cause = e.__cause__
            while cause is not None and not isinstance(cause, OutOfBoundsError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise
        finally:
            stack.pop()

    __call__.__wrapped__ = original
    return __call__


def _wrap_init_args(original):
    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = original(self, args_dev, kwargs)
        named = list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items())
        _launches()[-1].set_arguments(named)
        return args_hst, kwargs_hst

    _init_args_hst.__wrapped__ = original
    return _init_args_hst


def enable() -> None:
    """Checks every memory access of interpreted Triton kernels from now on (idempotent).
    Raises RuntimeError if this triton's interpreter lacks the hook points."""
    with _install_lock:
        if _originals:
            return
        interpreter, executor = _hook_points()
        _originals["__call__"] = executor.__dict__["__call__"]
        _originals["_init_args_hst"] = executor.__dict__["_init_args_hst"]
        _originals["_interpreter"] = interpreter._interpreter
        executor.__call__ = _wrap_call(_originals["__call__"])
        executor._init_args_hst = _wrap_init_args(_originals["_init_args_hst"])
        interpreter._interpreter = _CheckedInterpreter(_originals["_interpreter"])
    import triton

    if not triton.knobs.runtime.interpret:
        warnings.warn(
            f"{ENV_VAR}=1 checks Triton kernels only under the interpreter (TRITON_INTERPRET=1); "
            "compiled GPU kernels run unchecked (use compute-sanitizer, docs/debugging.md)",
            RuntimeWarning,
            stacklevel=2,
        )


def disable() -> None:
    """Removes the hooks (idempotent)."""
    with _install_lock:
        if not _originals:
            return
        from triton.runtime import interpreter

        interpreter.GridExecutor.__call__ = _originals.pop("__call__")
        interpreter.GridExecutor._init_args_hst = _originals.pop("_init_args_hst")
        interpreter._interpreter = _originals.pop("_interpreter")


def enabled() -> bool:
    return bool(_originals)


@contextlib.contextmanager
def checking_bounds() -> Iterator[None]:
    """Runs the block with the bounds checks on, restoring the previous state afterwards."""
    was_enabled = enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()


def enable_from_environment() -> None:
    """Enables the checks if FASTLLM_CHECK_BOUNDS is 1 (0 or unset: off; anything else is an
    error, so that a typo does not silently turn the checks off)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value in ("", "0"):
        return
    if value != "1":
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {value!r}")
    enable()
