"""ops.linear (linear + bias + GELU / residual epilogue) on every backend that serves it here: forward and backward
against float64 on every epilogue path, the fakes on every path (opcheck), and the input errors."""
import itertools

import pytest
import torch

from cct_kernels import backends, ops, reference
from tests.cases import DEVICE, assert_close_to_reference

SERVING = ["eager"] + [
    b for b in backends.KERNEL_BACKENDS
    if backends.unsupported_reason(b, "linear", DEVICE, torch.randn(2, 4, device=DEVICE),
                                   torch.randn(3, 4, device=DEVICE), None, None, "none") is None
]
EPILOGUES = list(itertools.product(("none", "gelu"), (True, False), (True, False)))  # activation, bias, residual


def _inputs(dtype, shape, n, bias, residual, generator):
    def rand(*s):
        return torch.randn(*s, generator=generator, dtype=torch.float64).to(DEVICE)

    k = shape[-1]
    tensors = [rand(*shape), rand(n, k) / k**0.5, rand(n) if bias else None, rand(*shape[:-1], n) if residual else None]
    return [None if t is None else t.to(dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", SERVING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation,bias,residual", EPILOGUES)
def test_linear_against_float64(backend, dtype, activation, bias, residual):
    _check_against_float64(backend, dtype, activation, bias, residual)


@pytest.mark.parametrize("backend", SERVING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_linear_row_scale_against_float64(backend, dtype, activation):
    """Stochastic depth as the row scale: whole samples dropped (0) or scaled by 1 / keep_prob (here 1 / 0.75)."""
    _check_against_float64(backend, dtype, activation, True, True, row_scale=torch.tensor([0.0, 4 / 3, 4 / 3]))


def _check_against_float64(backend, dtype, activation, bias, residual, row_scale=None):
    generator = torch.Generator().manual_seed(7)
    shape, n = (3, 37, 48), 40  # M = 111 rows, K = 48, N = 40: no dimension a multiple of a tile
    inputs = _inputs(dtype, shape, n, bias, residual, generator)
    x, weight, b, res = inputs
    scale = None if row_scale is None else row_scale[:, None].expand(shape[:-1]).to(DEVICE)
    out = ops.linear(x, weight, b, activation=activation, residual=res,
                     row_scale=None if scale is None else scale.to(dtype), backend=backend)
    as64 = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    ref64 = reference.linear(as64[0], as64[1], as64[2], activation=activation, residual=as64[3],
                             row_scale=None if scale is None else scale.double())
    eager = reference.linear(*inputs[:3], activation=activation, residual=inputs[3],
                             row_scale=None if scale is None else scale.to(dtype))
    assert out.dtype == dtype and out.shape == (3, 37, n)
    assert_close_to_reference(out, ref64, eager, "out")

    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    live = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, live, grad.to(dtype))
    grads64 = torch.autograd.grad(ref64, [t for t in as64 if t is not None], grad)
    eager_grads = torch.autograd.grad(eager, live, grad.to(dtype))
    names = [name for name, t in zip(("x", "weight", "bias", "residual"), inputs) if t is not None]
    for name, g, g64, ge in zip(names, grads, grads64, eager_grads):
        assert_close_to_reference(g, g64, ge, f"grad {name}")


@pytest.mark.parametrize("backend", [b for b in SERVING if b != "eager"])
@pytest.mark.parametrize("activation,bias,residual", EPILOGUES)
@pytest.mark.parametrize("save", [True, False])
def test_linear_fakes_match_every_path(backend, activation, bias, residual, save):
    x, weight, b, res = _inputs(torch.float32, (9, 24), 20, bias, residual, torch.Generator().manual_seed(1))
    differentiable = save or activation == "none"  # a GELU without its saved input has no backward (tested below)
    opcheck_inputs = [t if t is None or differentiable else t.detach() for t in (x, weight, b, res)]
    torch.library.opcheck(torch.ops.cct_kernels.linear_forward, (*opcheck_inputs, activation, save, backend))
    out, pre_activation = torch.ops.cct_kernels.linear_forward(x, weight, b, res, activation, save, backend)
    assert pre_activation.shape == ((9, 20) if activation == "gelu" and save else (0,))
    if activation == "gelu" and not save:
        with pytest.raises(RuntimeError, match="save_pre_activation=False"):
            out.sum().backward()
        return
    backward_args = (torch.randn_like(out), x.detach(), weight.detach(), bias, pre_activation.detach(), activation,
                     backend)
    torch.library.opcheck(torch.ops.cct_kernels.linear_backward, backward_args)


@pytest.mark.parametrize("backend", SERVING)
def test_linear_gelu_gradient_without_saved_input_grad(backend):
    """Only the residual needs a gradient: the GELU's input must still be kept for the backward."""
    x, weight, b = torch.randn(4, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE), torch.randn(6, device=DEVICE)
    residual = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    out = ops.linear(x, weight, b, activation="gelu", residual=residual, backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), residual)
    torch.testing.assert_close(grad, torch.ones_like(residual))


@pytest.mark.parametrize("backend", SERVING)
def test_linear_empty_batch(backend):
    x, weight = torch.randn(0, 5, 8, device=DEVICE, requires_grad=True), torch.randn(6, 8, device=DEVICE)
    out = ops.linear(x, weight, torch.zeros(6, device=DEVICE), activation="gelu", backend=backend)
    assert out.shape == (0, 5, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_linear_errors_name_the_argument():
    x, w, b = torch.randn(2, 5, 8), torch.randn(6, 8), torch.randn(6)
    with pytest.raises(ValueError, match=r"x's last dim \(7\) must equal weight's in_features K = 8"):
        ops.linear(x[..., :7], w, b)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        ops.linear(x, w[0], b)
    with pytest.raises(ValueError, match=r"weight must be \(N, K\) with N, K >= 1"):
        ops.linear(x[..., :0], w[:, :0], b)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\), got \(5,\)"):
        ops.linear(x, w, b[:5])
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 5, 6\), got \(2, 5, 8\)"):
        ops.linear(x, w, b, residual=x)
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has dtype torch.float32"):
        ops.linear(x, w.double(), b)
    with pytest.raises(TypeError, match="floating-point"):
        ops.linear(x.long(), w, b)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.linear(x, w, b, activation="relu")
    with pytest.raises(ValueError, match=r"row_scale must have shape \(2, 5\), got \(2,\)"):
        ops.linear(x, w, b, row_scale=torch.ones(2))
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.linear(torch.tensor(1.0), w, b)
