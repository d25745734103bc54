"""Shared test helpers: which (op, kernel backend) pairs run on this machine, which backends can serve a whole
model, the tolerance rule, the channels-last checks of the tokenizer backends that write it, and the environment of
a pytest run in a subprocess."""
import os
import threading
from unittest import mock

import torch

from cct_kernels import backends, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPS = ("tokenize", "attention", "seqpool", "linear")


def sample(op):
    """The registered forward op and a small random input for it (the backend name is appended per case)."""
    g = dict(device=DEVICE, dtype=torch.float32)
    if op == "seqpool":
        return torch.ops.cct_kernels.seqpool_forward, (torch.randn(2, 7, 24, **g, requires_grad=True),
                                                       torch.randn(1, 24, **g, requires_grad=True),
                                                       torch.randn(1, **g, requires_grad=True))
    if op == "linear":
        return torch.ops.cct_kernels.linear_forward, (torch.randn(5, 16, **g, requires_grad=True),
                                                      torch.randn(12, 16, **g, requires_grad=True),
                                                      torch.randn(12, **g, requires_grad=True),
                                                      torch.randn(5, 12, **g, requires_grad=True), "gelu", True)
    if op == "attention":
        return torch.ops.cct_kernels.attention_forward, (torch.randn(2, 9, 3 * 2 * 16, **g, requires_grad=True),
                                                         2, 0.25, 0.0, torch.empty(0, dtype=torch.int64, device=DEVICE))
    return torch.ops.cct_kernels.tokenize_forward, (torch.randn(1, 3, 9, 9, **g, requires_grad=True),
                                                    torch.randn(8, 3, 3, 3, **g, requires_grad=True),
                                                    None, 1, 1, True, 3, 2, 1, True)


def runnable_pairs():
    """(op, backend) for every kernel backend that can run the op's sample here."""
    pairs = []
    for op in OPS:
        _, args = sample(op)
        inputs = args[:-1] if op in ("attention", "linear") else args  # unsupported() takes no seed / save flag
        for backend in backends.KERNEL_BACKENDS:
            if backends.unsupported_reason(backend, op, DEVICE, *inputs) is None:
                pairs.append((op, backend))
    return pairs


RUNNABLE = runnable_pairs()
KERNEL_BACKENDS_HERE = sorted({b for _, b in RUNNABLE})


def backends_serving_model(model, x, *, train: bool) -> list[str]:
    """Every backend name that can serve every op call of `model` on input `x` (a tensor, or a tuple of the
    forward's arguments) in train or eval mode: "eager",
    "auto", and each kernel backend whose own unsupported() accepts every call (the cuda attention, for one,
    refuses float32 and dropout). The calls are recorded from one eager forward pass."""
    calls = []

    def record(op, explicit, device, *inputs, **_):
        calls.append((op, device, inputs))
        return "eager"

    was_training = model.training
    try:
        model.train(train)
        with torch.no_grad(), mock.patch.object(backends, "select", record):
            model(*x) if isinstance(x, tuple) else model(x)
    finally:
        model.train(was_training)
    kernels = [b for b in backends.KERNEL_BACKENDS
               if all(backends.unsupported_reason(b, op, device, *inputs) is None for op, device, inputs in calls)]
    return ["eager", "auto"] + kernels


def assert_close_to_reference(out, ref64, eager_same_dtype, name="output", factor=2.0, floor=None):
    """The tolerance rule of DESIGN.md: the kernel's error against the float64 reference is at most `factor`
    times the error of the same-dtype eager reference, plus a small floor scaled by the reference's magnitude
    (at least 1: inputs are O(1), and a gradient that is 0 in exact arithmetic, like SeqPool's bias gradient,
    is rounding noise in every dtype)."""
    assert out.shape == ref64.shape, (name, out.shape, ref64.shape)
    if floor is None:
        floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[out.dtype]
    scale = max(ref64.abs().max().item(), 1.0)
    err = (out.double() - ref64).abs().max().item()
    eager_err = (eager_same_dtype.double() - ref64).abs().max().item()
    assert err <= factor * eager_err + floor * scale, (
        f"{name}: max error {err:.3e} vs eager {eager_same_dtype.dtype} error {eager_err:.3e} (scale {scale:.3e})"
    )


def check_two_stages_channels_last(tokenize, x, w1, w2, stage1: dict, stage2: dict, grad_out: torch.Tensor):
    """Stage 1 (tokenize(x, w1, **stage1, to_tokens=False)) returns a channels-last (B, C, H, W) tensor, stage 2
    (to_tokens=True) takes it, and stage 1's gradient comes back channels-last; values and gradients match float64.
    Returns stage 1's output and the three leaves (copies of x, w1, w2) the stages ran on."""
    stage_grads = []

    def two_stages(tokenize, x, w1, w2):
        y = tokenize(x, w1, **stage1, to_tokens=False)
        if y.requires_grad:
            y.register_hook(stage_grads.append)
        return y, tokenize(y, w2, **stage2, to_tokens=True)

    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    y, out = two_stages(tokenize, *leaves)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    out.backward(grad_out)
    assert stage_grads[0].is_contiguous(memory_format=torch.channels_last) and not stage_grads[0].is_contiguous()
    exact = [t.double().requires_grad_() for t in (x, w1, w2)]
    exact_y, exact_out = two_stages(reference.tokenize, *exact)
    exact_out.backward(grad_out.double())
    torch.testing.assert_close(y.double(), exact_y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double(), exact_out, rtol=1e-4, atol=1e-5)
    for got, expected in zip(leaves, exact):
        torch.testing.assert_close(got.grad.double(), expected.grad, rtol=1e-4, atol=1e-4)
    return y, leaves


def check_backward_takes_any_layout(out, index, grads):
    """out and pool_index of a channels-last NCHW tokenizer output, and grads(grad_out, out, pool_index) -> the
    backward's gradients: grad_out channels-last, row-major or a strided slice, and a row-major out and pool_index,
    all give the same gradients, bit for bit. Returns them."""
    assert out.is_contiguous(memory_format=torch.channels_last) and index.stride() == out.stride()
    grad = torch.randn(out.shape, device=out.device)
    wide = torch.zeros(*out.shape[:3], out.shape[3] + 3, device=out.device)
    wide[..., :out.shape[3]] = grad
    expected = grads(grad.contiguous(memory_format=torch.channels_last), out, index)
    for g, o, i in ((grad, out, index), (wide[..., :out.shape[3]], out, index),
                    (grad, out.contiguous(), index.contiguous())):
        for e, got in zip(expected, grads(g, o, i)):
            torch.testing.assert_close(got, e, rtol=0, atol=0)
    return expected


def subprocess_env(**extra: str) -> dict:
    """os.environ for a pytest run in a subprocess, without the PYTEST_XDIST_* variables of a pytest-xdist worker
    (they made pytest-benchmark disable itself there, and tests/conftest.py's outcome stream skip writing), plus
    `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return {**env, **extra}


def run_in_threads(target, count: int) -> None:
    """Runs target(0), ..., target(count - 1), each in its own thread, all at once; returns when every one is done."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
