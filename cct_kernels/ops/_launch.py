"""How the ops call a kernel backend: on the tensors' device, with outputs in one fixed layout, through the registered
custom ops or, for plain eager calls, around them (KernelOp).

Every op implementation goes through run_kernel, so three rules hold for every kernel of every backend:
- Device: Triton and CUDA launches go to the *current* CUDA device, not the tensor's; run_kernel makes the tensor's
  device current for the call (a tensor on cuda:1 would otherwise be read from a cuda:0 launch).
- Layout: every output tensor is returned contiguous (row-major), or contiguous in the memory format the op names
  for it (the Triton tokenizer's channels-last NCHW output), which is what the fake implementations state.
  Kernels may return other layouts (the cpu tokenizer's direct path returns grad_weight as a transposed view, its
  1x1 no-pool token output is a permuted view); the copy costs nothing when the kernel already returns contiguous
  tensors, and torch.compile's stride assertions hold on every layout path.
- Double backward: the backward kernels have no derivative; asking for one raises an error that says to use
  backend="eager" (the reference is plain autograd, so it supports higher-order gradients).
"""
from __future__ import annotations

import contextlib

import torch

from cct_kernels import backends


def device_guard(device: torch.device):
    """Make `device` the current CUDA device for the enclosed launches (nothing to do for CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def run_kernel(backend: str, op: str, function: str, device: torch.device, *args, memory_formats=None):
    """kernel_module(backend, op).<function>(*args) on `device`, every output tensor contiguous (in its entry of
    memory_formats, one per output, when given)."""
    kernel = getattr(backends.kernel_module(backend, op), function)
    with device_guard(device):
        outputs = kernel(*args)
    if isinstance(outputs, torch.Tensor):
        return outputs.contiguous()
    formats = memory_formats or (torch.contiguous_format,) * len(outputs)
    return tuple(o.contiguous(memory_format=f) for o, f in zip(outputs, formats))


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class KernelOp:
    """One op's forward and backward kernels, each as a plain function (run_*) and as its registered custom op,
    with one autograd formula (setup_context, formula) for both.

    The registered ops are what torch.compile, TorchScript/ONNX traces and fake or subclass tensors see (under a
    torch.func transform no kernel backend is selected: backends.FUNCTORCH_REASON). A plain eager call skips the
    dispatcher: without a gradient to record it runs the forward function directly, and with one it runs a
    torch.autograd.Function built from the same formula. The registered op's
    dispatch and autograd wrapper cost about 90 µs per forward and as much per backward on this project's 2-core
    CPU VM, more than a GPU kernel of a CCT training step takes (H200, 2026-11-30: the step was host-bound, 29 ms
    for 10.5 ms of kernels). Same kernels and outputs either way. A backward recorded for a double backward calls
    the registered backward op, whose derivative raises the error that says to use backend="eager"."""

    def __init__(self, op: str, run_forward, forward, run_backward, backward, setup_context, formula):
        self.run_forward, self.forward, self.run_backward, self.backward = run_forward, forward, run_backward, backward
        self.setup_context, self.formula = setup_context, formula
        forward.register_autograd(formula, setup_context=setup_context)
        _forbid_double_backward(backward, op)

        # forward(ctx, ...) rather than a separate setup_context: with one, every apply() binds its arguments
        # through inspect.signature (~25 µs)
        def function_forward(ctx, *inputs):
            output = run_forward(*inputs)
            ctx.set_materialize_grads(False)  # no zero tensors made for the outputs nothing differentiates
            ctx.mark_non_differentiable(*(o for o in output[1:] if o.is_floating_point()))
            ctx.input_count = len(inputs)
            setup_context(ctx, inputs, output)
            return output

        def function_backward(ctx, grad_out, *other_grads):
            if grad_out is None:  # the output took no part in what was differentiated
                return (None,) * ctx.input_count
            return formula(ctx, grad_out, *other_grads)

        # named at creation: autograd names the graph node after the class ("linear_kernelsBackward")
        self._function = type(f"{op}_kernels", (torch.autograd.Function,), {
            "forward": staticmethod(function_forward), "backward": staticmethod(function_backward)})

    def forward_for(self, *tensors):
        """The forward to call with these tensor arguments (all of them, None allowed): every call passes all of the
        op's arguments positionally, so each of the three sees the same inputs."""
        if traced(tensors):
            return self.forward
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return self._function.apply
        return self.run_forward

    def run_recorded(self, *inputs):
        """run_forward(*inputs) and the SavedContext that `formula` takes for its backward: the op as one step of a
        caller's own autograd.Function (the encoder block's, ops.encoder_layer), which calls the formulas itself."""
        output = self.run_forward(*inputs)
        ctx = SavedContext()
        self.setup_context(ctx, inputs, output)
        return output, ctx

    def backward_for(self, *tensors):
        """The backward to call inside the autograd formula, given its tensors: the plain function in an eager
        backward, the registered op when the backward is itself recorded (create_graph) or traced."""
        return self.backward if torch.is_grad_enabled() or traced(tensors) else self.run_backward


class SavedContext:
    """What the ops' setup_context and formula use of autograd's ctx (save_for_backward, saved_tensors, plain
    attributes), for an op run by KernelOp.run_recorded. The caller's autograd.Function saves its own inputs, so
    autograd still checks them for in-place changes before the backward; the tensors kept here are its own."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def traced(tensors) -> bool:
    """Whether a call must go through the registered op: a torch.compile, TorchScript or make_fx trace (fake,
    functional or other subclass tensors), or a torch.func transform."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
            or not all(t is None or type(t) in _PLAIN_TENSORS for t in tensors))


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed drawn from torch's generator for `device` (so torch.manual_seed reproduces it)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _forbid_double_backward(backward_op, op: str) -> None:
    """Give the registered backward op `backward_op` a derivative that explains why there is none."""

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"double backward (a gradient of a gradient) through the {op} kernels is not supported; "
            f'run this op with backend="eager" (e.g. cct_kernels.use_backend("eager")) to differentiate twice'
        )

    backward_op.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
