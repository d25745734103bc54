"""Backend names, the user's choice of backend, and which backend serves a call.

A backend is "eager" (the reference in cct_kernels.reference, always available) or a kernel backend whose
per-op module lives in a package: "triton" -> cct_kernels.triton.<op>, "cpu"/"cuda" -> cct_kernels.extension.<op>.
A kernel module defines
    unsupported(*inputs, backend) -> str | None   why it cannot serve these inputs (None: it can)
    forward(*inputs)  and  backward(*grads_and_saved)   with the signatures of the op's registered custom ops.
and may define
    auto_declines(*inputs, backend) -> str | None   why "auto" should not pick it for inputs it can serve (another
                                                    backend is expected to be faster); a backend named explicitly
                                                    still serves them.

The backend for a call is the first of: the explicit argument (per call, or per model via its `backend=`),
the innermost `use_backend(...)` context of the calling thread and asyncio task, the environment variable
CCT_KERNELS_BACKEND, "auto".
"auto" takes the first kernel backend that can serve the call and does not decline it (triton then cuda for CUDA
tensors, cpu for CPU tensors) and falls back to eager; an explicitly named backend that cannot serve raises
BackendUnavailable.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import threading

import torch

KERNEL_BACKENDS = ("triton", "cuda", "cpu")
BACKENDS = ("auto", "eager") + KERNEL_BACKENDS
ENV_VAR = "CCT_KERNELS_BACKEND"

_KERNEL_PACKAGES = {"triton": "cct_kernels.triton", "cuda": "cct_kernels.extension", "cpu": "cct_kernels.extension"}
_AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}

# The use_backend choice lives in a ContextVar, which is per thread and per asyncio task. torch.compile cannot read
# a ContextVar (ContextVar.get is a graph break in torch 2.13), so use_backend also mirrors the choice into a
# threading.local, which dynamo reads while tracing and guards on (a change of choice recompiles, no graph break).
# Compiled code therefore follows the choice of the thread; the mirror is kept equal to the ContextVar by every
# use_backend entry and exit, which covers threads and tasks that do not interleave open use_backend blocks.
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("cct_kernels_backend", default=None)
_thread_choice = threading.local()


# torch 2.13's custom ops (torch.library.custom_op with register_autograd) have no torch.func rules: grad and jvp
# fail in their generated autograd.Function, vmap has no batching rule. The eager reference is plain ATen.
FUNCTORCH_REASON = ("a torch.func transform (grad, vmap, jvp, ...) is active, and the kernels' registered ops have no "
                    "torch.func rules (the eager backend, plain ATen, has them)")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve a call; the message says why."""


def check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed calls of this thread / asyncio task with backend `name` unless a call or model names one.

    The choice is local to the calling thread and asyncio task (a task or thread started inside the block inherits
    it where Python copies the context: asyncio tasks do, plain threads do not).
    """
    token = _context_choice.set(check_name(name))
    _thread_choice.name = name
    try:
        yield
    finally:
        _context_choice.reset(token)
        _thread_choice.name = _context_choice.get()


def requested_backend(explicit: str | None = None) -> str:
    """The backend the user asked for, before checking that it can serve the call."""
    if explicit is not None:
        return check_name(explicit)
    if torch.compiler.is_compiling():
        chosen = getattr(_thread_choice, "name", None)
    else:
        chosen = _context_choice.get()
    if chosen is not None:
        return chosen
    return check_name(os.environ.get(ENV_VAR, "auto"))


# Filled once, outside any torch.compile trace (by cct_kernels' import or the first select), so that tracing
# select() runs only dict lookups and the kernel modules' shape checks.
_kernel_modules: dict[tuple[str, str], object] = {}
_backend_errors: dict[str, str | None] = {}
_OPS = ("tokenize", "attention", "seqpool", "linear", "text_tokenize", "encoder_layer")


def load_kernel_backends() -> None:
    """Import every kernel module and record, per backend, why it cannot run at all (None when it can)."""
    if _backend_errors:
        return
    for backend in KERNEL_BACKENDS:
        if backend == "triton" and importlib.util.find_spec("triton") is None:
            _backend_errors[backend] = "triton is not installed"
        elif backend != "triton":
            from cct_kernels import extension

            _backend_errors[backend] = extension.unavailable_reason(backend)
        else:
            _backend_errors[backend] = None
        for op in _OPS:
            _kernel_modules[backend, op] = None if _backend_errors[backend] else _import_kernel(backend, op)
    # Read once: TRITON_INTERPRET only matters if set before triton is imported.
    _backend_errors["triton-on-cpu"] = (
        None if os.environ.get("TRITON_INTERPRET") == "1" else
        "triton runs on CUDA tensors (or CPU tensors when TRITON_INTERPRET=1 is set before triton is imported)"
    )


def _import_kernel(backend: str, op: str):
    name = f"{_KERNEL_PACKAGES[backend]}.{op}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def _device_reason(backend: str, device: torch.device) -> str | None:
    load_kernel_backends()
    if _backend_errors[backend] is not None:
        return _backend_errors[backend]
    if backend == "triton":
        if device.type == "cuda":
            return None
        return _backend_errors["triton-on-cpu"] if device.type == "cpu" else f"triton cannot run on {device.type}"
    if device.type != backend:
        return f"the {backend} backend runs on {backend.upper()} tensors, got a {device.type} tensor"
    return None


def kernel_module(backend: str, op: str):
    """The module implementing `op` for kernel backend `backend`, or None when there is none."""
    load_kernel_backends()
    return _kernel_modules[backend, op]


def unsupported_reason(backend: str, op: str, device: torch.device, *inputs) -> str | None:
    """Why kernel backend `backend` cannot run `op` on these inputs, or None when it can."""
    reason = _device_reason(backend, device)
    if reason is not None:
        return reason
    module = kernel_module(backend, op)
    if module is None:
        return f"the {backend} backend has no {op} kernel"
    return module.unsupported(*inputs, backend=backend)


def auto_declines(backend: str, op: str, *inputs) -> str | None:
    """Why "auto" should pass over kernel backend `backend` for inputs it can serve, or None (the module's optional
    auto_declines hook)."""
    declines = getattr(kernel_module(backend, op), "auto_declines", None)
    return None if declines is None else declines(*inputs, backend=backend)


def select(op: str, explicit: str | None, device: torch.device, *inputs, eager_only: str | None = None) -> str:
    """The concrete backend ("eager" or a kernel backend) that runs `op` for these inputs.

    eager_only: why no kernel backend can serve this call whatever the inputs (auto then runs eager). Under a
    torch.func transform that is always so (FUNCTORCH_REASON).
    """
    name = requested_backend(explicit)
    if name == "eager":
        return name
    if eager_only is None and torch._C._are_functorch_transforms_active():
        eager_only = FUNCTORCH_REASON

    def reason(backend: str) -> str | None:
        if eager_only is not None:
            return eager_only
        return unsupported_reason(backend, op, device, *inputs)

    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ()):
            if reason(candidate) is None and auto_declines(candidate, op, *inputs) is None:
                return candidate
        return "eager"
    why = reason(name)
    if why is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run {op}: {why}")
    return name


def availability(device: torch.device) -> dict[str, str | None]:
    """For each kernel backend, None if it can run on `device`, else the reason it cannot."""
    return {b: _device_reason(b, device) for b in KERNEL_BACKENDS}
