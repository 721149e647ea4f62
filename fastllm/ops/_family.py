"""The wiring every op family shares: its implementations per backend, and the choice.

An op family (norm, cross_entropy, attention, ...) is a set of schemas declared once in
``csrc/schemas.h`` and implemented three to four times:

  ``torch.ops.fastllm.<op>``           C++ CPU kernels and CUDA kernels (``fastllm._C``)
  ``torch.ops.fastllm.<op>_triton``    Triton kernels, defined here with ``triton_op``
  ``torch.ops.fastllm_emu.<op>``       the CUDA kernels on CPU tensors through the SIMT
                                       emulation (tests only, once ``fastllm._emu`` is loaded)
  ``fastllm/reference/<family>.py``    plain PyTorch (``backend="reference"``, or a device
                                       without kernels); the family's public functions call it

A family module (``fastllm/ops/<family>.py``) declares an :class:`OpFamily` with

  ``schemas``         the op names of csrc/schemas.h it implements;
  ``checks``          ``{schema: check}``: the op's argument checks, a function of the op's
                      own arguments that raises an error naming the argument with the
                      expected and the actual value (metadata only: shapes, dtypes, devices,
                      options; so it traces under torch.compile(fullgraph=True));
  ``value_checks``    ``{schema: check}`` (optional): checks that read tensor values
                      (cu_seqlens, lengths); run before the Triton launcher and the
                      reference when ``values_readable`` (the C++ glue has its own);
  ``fakes``           ``{schema: fake}``: the op's fake (meta) rule;
  ``autograd``        a function that registers the autograd rules of ONE op set, whose
                      backward ops it calls (each backend differentiates with its own kernels);
  ``triton_kernels``  a function that imports the family's Triton module and returns
                      ``{"fastllm::<op>_triton": launcher}`` (literal names, so that a grep
                      for an op finds its definition);
  ``cuda_dtype_fallback``  dtypes that the family's CUDA kernels do not take, and the
                      backend that runs them instead under ``"native"`` ("triton", or
                      "reference"; without triton the reference);

and this module does the rest: it binds the op sets that exist, defines the Triton ops,
registers fakes and autograd for each set, records why a backend is missing, and picks the
set for a tensor under the backend in force (``fastllm.backend``).

The validation layer. Every backend checks the same arguments, and no backend can skip it:

  native, cuda_emu  the C++ glue (csrc/<family>/<family>_glue.h) checks metadata, and values
                    where reading them costs no device synchronisation (CPU tensors);
  triton            the Triton op is defined here as ``checks[schema]`` followed by the
                    launcher, so ``torch.ops.fastllm.<op>_triton`` called directly checks too;
  fake tensors      every registered fake runs ``checks[schema]`` first, so torch.compile
                    reports bad arguments while tracing, for every backend;
  reference         the family's public functions run the same checks before they pick a
                    backend.

Value checks (class targets, cu_seqlens, cache lengths) live in the kernels' glue: on CPU
tensors every backend raises; on CUDA tensors the kernels clamp every index so that a bad
value can give a wrong row (documented per op) but never an out-of-bounds access.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from fastllm import _native
from fastllm.backend import get_backend, triton_interpret

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CPU = torch.device("cpu")


def acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype kernels accumulate in (and return statistics in): float64 for float64
    tensors, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_float_tensor(op: str, name: str, t: Any) -> None:
    """``t`` must be a tensor of one of FLOAT_DTYPES; the error names ``op`` and ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}"
        )


def check_same_device(op: str, name: str, t: Tensor, like: Tensor) -> None:
    """``t`` must be on the device of ``like`` (the op's input)."""
    if t.device != like.device:
        raise ValueError(f"{op}: {name} must be on input's device {like.device}, got {t.device}")


def checked(check: Callable[..., None], fn: Callable) -> Callable:
    """``fn`` preceded by ``check`` on the same arguments; keeps ``fn``'s signature (and
    annotations), from which triton_op infers the schema."""

    @functools.wraps(fn)
    def run_checked(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)
        return fn(*args, **kwargs)

    return run_checked


def refuse_double_backward(op: str) -> None:
    """Called first in a backward formula whose gradient comes from a kernel (or from
    forward) without a derivative of its own: under ``create_graph=True`` (grad mode is on
    inside backward only then) the gradient would silently be a constant of the graph."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: double backward (create_graph=True) is not supported; use the "
            "'reference' backend (fastllm.use_backend('reference')) for higher-order gradients"
        )


def register_autograd(op: Any, backward: Callable, *, setup_context: Callable) -> None:
    """``torch.library.register_autograd`` for a backward formula built from fastllm's
    kernels, which have no derivatives of their own: a double backward through it raises
    (``refuse_double_backward``) instead of returning a gradient detached from the graph.
    Every family registers its autograd rules through this."""
    name = op if isinstance(op, str) else op.name()
    name = name.split("::")[-1]

    @functools.wraps(backward)
    def first_order_backward(ctx: Any, *grads: Any) -> Any:
        refuse_double_backward(name)
        return backward(ctx, *grads)

    torch.library.register_autograd(op, first_order_backward, setup_context=setup_context)


def values_readable(*tensors: Optional[Tensor]) -> bool:
    """Whether a check may read these tensors' values: they live on the CPU (no device
    synchronisation) and nothing is being traced (no graph break)."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or t.device.type == "cpu" for t in tensors)


def without_autograd(*tensors: Optional[Tensor]) -> bool:
    """Whether a call on these tensors may skip the autograd layer of the op's dispatch: no
    graph is being recorded (grad mode off, or no tensor requires grad) and nothing is being
    traced. The autograd kernel of a custom op (``register_autograd``) runs Python on every
    call even then, ~5 us: more than a small call's kernel (a (1, 1024) norm's ~2 us)."""
    if torch.is_grad_enabled():
        for t in tensors:  # (a loop: a generator expression costs more than the test)
            if t is not None and t.requires_grad:
                return False
    return not torch.compiler.is_compiling()


# The guard of without_autograd's calls: the op dispatches straight to its device kernel.
below_autograd = torch._C._AutoDispatchBelowAutograd


def autograd_scope(*tensors: Optional[Tensor]) -> Any:
    """The context a public function calls its op in: ``below_autograd()`` when
    ``without_autograd(*tensors)`` (``tensors``: the op's differentiable inputs), else none."""
    return below_autograd() if without_autograd(*tensors) else contextlib.nullcontext()


class OpSet:
    """One backend's implementation of a family: an attribute per schema name holding the
    ``OpOverload`` (e.g. ``ops.layer_norm_fwd``). A family's ``autograd`` may attach more
    (e.g. an autograd.Function built on the set's ops)."""

    def __init__(self, backend: str, ops: Mapping[str, Any]):
        self.backend = backend
        self.__dict__.update(ops)

    def __repr__(self) -> str:
        names = ", ".join(k for k in self.__dict__ if k != "backend")
        return f"OpSet({self.backend!r}: {names})"


class OpFamily:
    """The implementations of one op family and the choice among them (module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        schemas: Sequence[str],
        checks: Mapping[str, Callable[..., None]],
        fakes: Mapping[str, Callable],
        value_checks: Optional[Mapping[str, Callable[..., None]]] = None,
        autograd: Callable[[OpSet], None],
        triton_kernels: Callable[[], Mapping[str, Callable]],
        mutates_args: Optional[Mapping[str, Sequence[str]]] = None,
        cuda_dtype_fallback: Optional[Mapping[torch.dtype, str]] = None,
    ):
        self.name = name
        self.schemas = tuple(schemas)
        self.checks = dict(checks)
        self._fakes = dict(fakes)
        self.value_checks = dict(value_checks or {})
        unknown = set(self.value_checks) - set(self.schemas)
        if unknown:
            raise RuntimeError(f"{name}: value_checks for unknown schemas {sorted(unknown)}")
        for what, table in (("checks", self.checks), ("fakes", self._fakes)):
            if set(table) != set(self.schemas):
                raise RuntimeError(
                    f"{name}: {what} must cover exactly the schemas {sorted(self.schemas)}, "
                    f"got {sorted(table)}"
                )
        self._register_autograd = autograd
        self._mutates_args = dict(mutates_args or {})
        self.cuda_dtype_fallback = dict(cuda_dtype_fallback or {})
        for dtype, fallback in self.cuda_dtype_fallback.items():
            if fallback not in ("triton", "reference"):
                raise ValueError(
                    f"{name}: cuda_dtype_fallback[{dtype}] must be 'triton' or 'reference', "
                    f"got {fallback!r}"
                )
        self.native: Optional[OpSet] = None      # torch.ops.fastllm.<op>
        self.triton: Optional[OpSet] = None      # torch.ops.fastllm.<op>_triton
        self.emulated: Optional[OpSet] = None    # torch.ops.fastllm_emu.<op>
        self.triton_unavailable = (
            "backend 'triton' needs the triton package, which is not installed"
        )
        if _native.AVAILABLE:
            self.native = self._bind("native", torch.ops.fastllm, "")
        self.triton = self._define_triton(triton_kernels)

    def _bind(self, backend: str, namespace: Any, suffix: str) -> OpSet:
        ops = OpSet(
            backend, {name: getattr(namespace, name + suffix).default for name in self.schemas}
        )
        for schema in self.schemas:
            fake = checked(self.checks[schema], self._fakes[schema])
            torch.library.register_fake(getattr(ops, schema))(fake)
        self._register_autograd(ops)
        return ops

    def _define_triton(
        self, triton_kernels: Callable[[], Mapping[str, Callable]]
    ) -> Optional[OpSet]:
        try:
            import triton  # noqa: F401
        except ImportError:  # e.g. a CPU-only torch: the message above stands
            return None
        try:
            kernels = triton_kernels()
        except ImportError as exc:  # a broken kernel module must not break `import fastllm`
            self.triton_unavailable = f"backend 'triton' ({self.name}) failed to import: {exc}"
            return None
        by_schema = {
            qualname.split("::")[1].removesuffix("_triton"): (qualname, launcher)
            for qualname, launcher in kernels.items()
        }
        if set(by_schema) != set(self.schemas):
            raise RuntimeError(
                f"{self.name}: the Triton ops must implement exactly the schemas "
                f"{sorted(self.schemas)}, got {sorted(by_schema)}"
            )
        for schema, (qualname, launcher) in by_schema.items():
            torch.library.triton_op(
                qualname,
                checked(functools.partial(self.check, schema), launcher),
                mutates_args=tuple(self._mutates_args.get(schema, ())),
            )
        return self._bind("triton", torch.ops.fastllm, "_triton")

    def check(self, schema: str, *args: Any, **kwargs: Any) -> None:
        """The checks of ``schema`` on its arguments: metadata always, values when
        ``values_readable`` (what the Triton ops and the reference run)."""
        self.checks[schema](*args, **kwargs)
        values = self.value_checks.get(schema)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        if values is not None and values_readable(*tensors):
            values(*args, **kwargs)

    def register_emulated(self, lib: str) -> None:
        """Called by fastllm._emu once the SIMT emulation extension defined library ``lib``."""
        self.emulated = self._bind("cuda_emu", getattr(torch.ops, lib), "")

    def unavailable(self, backend: str, device: torch.device = _CPU) -> Optional[str]:
        """Why ``backend`` cannot run this family's ops on ``device`` here, or None when it
        can (a device without hand-written kernels can always run: the reference does)."""
        if backend == "native" and device.type in ("cpu", "cuda"):
            return _native.unavailable_reason()
        if backend == "triton":
            if self.triton is None:
                return self.triton_unavailable
            if device.type == "cpu" and not triton_interpret():
                return (
                    "backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1; got a CPU "
                    "tensor without it (use a CUDA tensor or the 'native' backend)"
                )
        if backend == "cuda_emu" and self.emulated is None:
            return (
                f"backend 'cuda_emu' ({self.name}) needs the SIMT emulation extension: "
                "call fastllm._emu.load() first (tests only)"
            )
        return None

    def select(self, like: Tensor, backend: Optional[str] = None) -> Optional[OpSet]:
        """The op set for tensors like ``like`` (its device and dtype) under ``backend``
        (default: the one in force); None means the plain-PyTorch reference runs. Raises
        RuntimeError with ``unavailable``'s reason when the backend cannot run here."""
        backend = get_backend() if backend is None else backend
        if backend == "native" and like.is_cpu and _native.AVAILABLE:
            return self.native  # the common case, as the general path below decides it
        device = like.device
        if backend == "reference":
            return None
        reason = self.unavailable(backend, device)
        if reason is not None:
            raise RuntimeError(reason)
        if backend == "cuda_emu":
            if device.type != "cpu":
                raise ValueError(f"backend 'cuda_emu' runs on CPU tensors, got {device}")
            return self.emulated
        if backend == "triton":
            return self.triton
        # native
        if device.type == "meta" and self.native is not None:
            return self.native  # shapes only: the checked fakes answer for meta tensors
        if device.type not in ("cpu", "cuda"):
            return None  # no hand-written kernel for this device: the reference runs
        if device.type == "cuda" and like.dtype in self.cuda_dtype_fallback:
            # A dtype the CUDA kernels do not take runs where it can, as torch's own ops do.
            fallback = self.cuda_dtype_fallback[like.dtype]
            return self.triton if fallback == "triton" else None
        return self.native
