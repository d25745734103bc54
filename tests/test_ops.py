"""The op layer: input checks with clear messages, torch.library registration (opcheck) of every kernel backend
that runs here, and torch.compile(fullgraph=True) over whole models."""
import importlib

import pytest
import torch

import cct_kernels
from cct_kernels import backends, ops

from tests.cases import DEVICE as HERE, OPS, RUNNABLE, backends_serving_model, sample


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_kernel_backend_here(op):
    assert any(o == op for o, _ in RUNNABLE), f"no kernel backend can run {op} on {HERE}"


@pytest.mark.parametrize("op,backend", RUNNABLE)
def test_opcheck(op, backend):
    fn, args = sample(op)
    torch.library.opcheck(fn, (*args, backend))


def test_input_errors_name_the_argument():
    x, w, b = torch.randn(2, 5, 8), torch.randn(1, 8), torch.randn(1)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        ops.seqpool(x[0], w, b)
    with pytest.raises(ValueError, match=r"weight must have shape \(1, 8\), got \(1, 7\)"):
        ops.seqpool(x, torch.randn(1, 7), b)
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has dtype torch.float32"):
        ops.seqpool(x, w.double(), b)
    with pytest.raises(TypeError, match="floating-point"):
        ops.seqpool(x.long(), w, b)
    with pytest.raises(ValueError, match="at least one token"):
        ops.seqpool(x[:, :0], w, b)
    with pytest.raises(ValueError, match="num_heads"):
        ops.attention(torch.randn(2, 5, 30), 4)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(torch.randn(2, 5, 24), 2, dropout_p=1.0)
    with pytest.raises(ValueError, match="too small"):
        ops.tokenize(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 7, 7), stride=2, padding=0)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        ops.tokenize(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), stride=0)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        ops.tokenize(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(5))


def test_empty_batch_works():
    model = cct_kernels.cct_2_3x2_32().to(HERE).eval()
    assert model(torch.randn(0, 3, 32, 32, device=HERE)).shape == (0, 10)
    assert ops.seqpool(torch.randn(0, 5, 8), torch.randn(1, 8), torch.randn(1)).shape == (0, 8)


def _serving_eval_and_train():
    """Backends that serve cct_2_3x2_32 in eval and in train mode (dropout on) here."""
    model, x = cct_kernels.cct_2_3x2_32().to(HERE), torch.randn(2, 3, 32, 32, device=HERE)
    return [b for b in backends_serving_model(model, x, train=False) if b in backends_serving_model(model, x, train=True)]


@pytest.mark.parametrize("backend", _serving_eval_and_train())
def test_model_compiles_fullgraph_with_backward(backend):
    torch._dynamo.reset()
    model = cct_kernels.cct_2_3x2_32(backend=backend).to(HERE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32, device=HERE)
    model.eval()
    expected = model(x)
    torch.testing.assert_close(compiled(x), expected, rtol=2e-4, atol=2e-5)
    model.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_model_compiles_with_inductor():
    torch._dynamo.reset()
    model = cct_kernels.cct_2_3x2_32(backend="eager").to(HERE).eval()
    x = torch.randn(2, 3, 32, 32, device=HERE)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("backend", [b for o, b in RUNNABLE if o == "tokenize"])
def test_tokenize_skips_the_input_gradient_only_when_unneeded(backend):
    x, w = torch.randn(1, 3, 9, 9, device=HERE), torch.randn(8, 3, 3, 3, device=HERE, requires_grad=True)
    ops.tokenize(x, w, stride=1, padding=1, backend=backend).sum().backward()
    grad_w, w.grad = w.grad, None
    x.requires_grad_()
    ops.tokenize(x, w, stride=1, padding=1, backend=backend).sum().backward()
    torch.testing.assert_close(w.grad, grad_w)
    expected = torch.autograd.grad(ops.tokenize(x, w, stride=1, padding=1, backend="eager").sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton", "cuda") if backends.availability(HERE)[b] is None])
def test_eager_calls_skip_the_dispatcher_and_match_the_registered_op(backend):
    """A plain eager training call runs the op's autograd.Function (KernelOp: no custom-op dispatch); its outputs and
    gradients equal those of the registered op, which torch.compile and traces use; double backward still raises."""
    kernels = importlib.import_module("cct_kernels.ops.linear").KERNELS
    generator = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=generator).to(HERE).requires_grad_() for s in ((5, 16), (8, 16), (8,)))
    out = ops.linear(x, w, b, activation="gelu", backend=backend)
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "linear_kernelsBackward"  # under ops.linear's view
    grads = torch.autograd.grad(out.square().sum(), (x, w, b))
    registered = kernels.forward(x, w, b, None, "gelu", True, backend, None, 0.0, None, None, None, 1e-5, None,
                                 None, 1e-5)[0]
    assert type(registered.grad_fn).__name__ != "linear_kernelsBackward"
    torch.testing.assert_close(out, registered, rtol=0, atol=0)
    for mine, theirs in zip(grads, torch.autograd.grad(registered.square().sum(), (x, w, b))):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    (grad_x,) = torch.autograd.grad(ops.linear(x, w, b, backend=backend).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()
