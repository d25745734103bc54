"""Every bad input to an op is a clear error from the op's own checks (naming the argument, the value and what is
allowed) on every backend, and the launch path runs each kernel on its tensors' device."""
import math

import pytest
import torch

from cct_kernels import ops
from cct_kernels.ops import _launch

from tests.cases import DEVICE, RUNNABLE

BACKENDS_HERE = ["eager", "auto"] + sorted({b for _, b in RUNNABLE})


def _qkv(last=24):
    return torch.randn(2, 5, last, device=DEVICE)


def _image(channels=3):
    return torch.randn(1, channels, 9, 9, device=DEVICE)


def _conv(c_out=4, c_in=3, k=3):
    return torch.randn(c_out, c_in, k, k, device=DEVICE)


BAD_CALLS = {
    "scale nan": (lambda b: ops.attention(_qkv(), 2, scale=math.nan, backend=b), ValueError,
                  r"scale must be finite and > 0, got nan"),
    "scale inf": (lambda b: ops.attention(_qkv(), 2, scale=math.inf, backend=b), ValueError, r"scale .* got inf"),
    "scale 0": (lambda b: ops.attention(_qkv(), 2, scale=0.0, backend=b), ValueError, r"scale .* got 0.0"),
    "scale negative": (lambda b: ops.attention(_qkv(), 2, scale=-0.5, backend=b), ValueError, r"scale .* -0.5"),
    "scale string": (lambda b: ops.attention(_qkv(), 2, scale="0.5", backend=b), TypeError,
                     r"scale must be a real number .* str '0.5'"),
    "qkv last dim 0": (lambda b: ops.attention(_qkv(0), 2, backend=b), ValueError,
                       r"qkv's last dim .* head_dim >= 1; got 0 with num_heads=2"),
    "num_heads float": (lambda b: ops.attention(_qkv(), 2.0, backend=b), TypeError, r"num_heads must be an int"),
    "num_heads 0": (lambda b: ops.attention(_qkv(), 0, backend=b), ValueError, r"num_heads must be an int >= 1, got 0"),
    "dropout nan": (lambda b: ops.attention(_qkv(), 2, dropout_p=math.nan, backend=b), ValueError,
                    r"dropout_p must be in \[0, 1\), got nan"),
    "qkv not a tensor": (lambda b: ops.attention([[1.0]], 1, backend=b), TypeError, r"qkv must be a torch.Tensor"),
    "qkv int": (lambda b: ops.attention(_qkv().long(), 2, backend=b), TypeError, r"qkv must be a floating-point"),
    "pool of 2": (lambda b: ops.tokenize(_image(), _conv(), pool=(3, 2), backend=b), ValueError,
                  r"pool must be None or a \(kernel, stride, padding\) tuple of 3 ints, got \(3, 2\)"),
    "pool int": (lambda b: ops.tokenize(_image(), _conv(), pool=3, backend=b), TypeError, r"pool must be None .* int 3"),
    "pool float kernel": (lambda b: ops.tokenize(_image(), _conv(), pool=(3.0, 2, 1), backend=b), TypeError,
                          r"pool kernel must be an int >= 1, got float 3.0"),
    "zero output channels": (lambda b: ops.tokenize(_image(), _conv(c_out=0), backend=b), ValueError,
                             r"at least one output channel.*\(0, 3, 3, 3\)"),
    "zero input channels": (lambda b: ops.tokenize(_image(0), _conv(c_in=0), backend=b), ValueError,
                            r"at least one output channel, input channel.*\(4, 0, 3, 3\)"),
    "zero kernel": (lambda b: ops.tokenize(_image(), _conv(k=0), backend=b), ValueError, r"kernel row.*\(4, 3, 0, 0\)"),
    "stride bool": (lambda b: ops.tokenize(_image(), _conv(), stride=True, backend=b), TypeError,
                    r"stride must be an int >= 1, got bool True"),
    "negative padding": (lambda b: ops.tokenize(_image(), _conv(), padding=-1, backend=b), ValueError,
                         r"padding must be an int >= 0, got -1"),
    "relu string": (lambda b: ops.tokenize(_image(), _conv(), relu="no", backend=b), TypeError,
                    r"relu must be True or False, got str 'no'"),
    "to_tokens int": (lambda b: ops.tokenize(_image(), _conv(), to_tokens=0, backend=b), TypeError,
                      r"to_tokens must be True or False, got int 0"),
    "weight channels": (lambda b: ops.tokenize(_image(), _conv(c_in=2), backend=b), ValueError,
                        r"weight expects 2 input channels"),
    "bias on another device": (lambda b: ops.tokenize(_image(), _conv(), torch.randn(4, device="meta"), backend=b),
                               ValueError, r"bias is on meta but x is on"),
    "seqpool weight dtype": (lambda b: ops.seqpool(torch.randn(2, 5, 8), torch.randn(1, 8).half(), torch.randn(1),
                                                   backend=b), TypeError, r"weight has dtype torch.float16"),
    "seqpool bias shape": (lambda b: ops.seqpool(torch.randn(2, 5, 8), torch.randn(1, 8), torch.randn(2), backend=b),
                           ValueError, r"bias must have shape \(1,\), got \(2,\)"),
    "unknown backend": (lambda b: ops.seqpool(torch.randn(2, 5, 8), torch.randn(1, 8), torch.randn(1),
                                              backend=b + "x"), ValueError, r"unknown backend"),
}


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_a_clear_error(case, backend):
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call(backend)


def test_valid_edge_inputs_still_work():
    """The checks refuse only what is wrong: lists as pools, int scales, non-contiguous inputs."""
    qkv = torch.randn(2, 24, 5).transpose(1, 2)
    torch.testing.assert_close(ops.attention(qkv, 2, scale=1), ops.attention(qkv.contiguous(), 2, scale=1.0,
                                                                               backend="eager"))
    x, w = _image(), _conv()
    torch.testing.assert_close(ops.tokenize(x, w, pool=[3, 2, 1]), ops.tokenize(x, w, backend="eager"),
                               rtol=1e-4, atol=1e-5)


def _double_backward_cases():
    for op, backend in RUNNABLE:
        yield pytest.param(op, backend, id=f"{op}-{backend}")


def _inputs(op, device=DEVICE):
    """Inputs of a small call of `op` that require grad."""
    shapes = {"attention": [(1, 5, 24)], "seqpool": [(2, 5, 8), (1, 8)], "tokenize": [(1, 4, 9, 9), (4, 4, 3, 3)],
              "linear": [(2, 5, 8), (6, 8)]}
    return [torch.randn(s, device=device, requires_grad=True) for s in shapes[op]]


def _op_call(op, backend, inputs):
    if op == "attention":
        return ops.attention(inputs[0], 2, backend=backend)
    if op == "seqpool":
        x, w = inputs
        return ops.seqpool(x, w, torch.full((1,), 0.5, device=x.device), backend=backend)
    if op == "linear":
        x, w = inputs
        return ops.linear(x, w, torch.full((6,), 0.1, device=x.device), activation="gelu", backend=backend)
    x, w = inputs
    return ops.tokenize(x, w, padding=1, backend=backend)


@pytest.mark.parametrize("op,backend", list(_double_backward_cases()))
def test_double_backward_through_a_kernel_says_use_eager(op, backend):
    inputs = _inputs(op)
    out = _op_call(op, backend, inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match=f'double backward .* {op} kernels .* backend="eager"'):
        torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)


@pytest.mark.parametrize("op", ["attention", "seqpool", "tokenize", "linear"])
def test_double_backward_works_on_eager(op):
    inputs = _inputs(op)
    out = _op_call(op, "eager", inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for s in second)


@pytest.mark.parametrize("op,backend", list(_double_backward_cases()))
def test_every_kernel_call_runs_under_the_tensors_device_guard(op, backend, monkeypatch):
    entered = []
    guard = _launch.device_guard
    monkeypatch.setattr(_launch, "device_guard", lambda device: entered.append(device) or guard(device))
    inputs = _inputs(op)
    _op_call(op, backend, inputs).sum().backward()
    assert entered == [inputs[0].device] * 2  # forward and backward kernels


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (a tensor on cuda:1)")
@pytest.mark.parametrize("op,backend", list(_double_backward_cases()))
def test_kernels_run_on_the_second_gpu(op, backend):
    inputs = _inputs(op, "cuda:0")
    moved = [t.detach().to("cuda:1").requires_grad_() for t in inputs]
    with torch.cuda.device(0):  # the current device is not the tensors' device
        expected = _op_call(op, backend, inputs)
        out = _op_call(op, backend, moved)
        out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(out.cpu(), expected.detach().cpu())
    for a, b in zip(moved, inputs):
        torch.testing.assert_close(a.grad.cpu(), b.grad.cpu())
