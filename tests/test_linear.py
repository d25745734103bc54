"""ops.linear (linear + bias + GELU / residual epilogue) on every backend that serves it here: forward and backward
against float64 on every epilogue path, the fakes on every path (opcheck), and the input errors."""
import itertools

import pytest
import torch

from cct_kernels import backends, ops, reference
from cct_kernels.ops._launch import new_seed
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


@pytest.mark.parametrize("backend", SERVING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_bias", [True, False])
def test_linear_layer_norm_epilogue_against_float64(backend, dtype, norm_bias):
    """proj + residual + norm1: the LayerNorm over each output row in the epilogue, its weight and bias
    differentiated (N = 40: the Triton tile spans 64 columns, 24 of them masked out of the statistics)."""
    _check_against_float64(backend, dtype, "none", True, True, row_scale=torch.tensor([0.0, 4 / 3, 4 / 3]),
                           norm=(True, norm_bias))


@pytest.mark.parametrize("backend", SERVING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_bias", [True, False])
def test_linear_layer_norm_prologue_against_float64(backend, dtype, norm_bias):
    """qkv after pre_norm: x's rows normalised before the GEMM (K = 48: the Triton tiles mask 16 of 64 columns), with
    a GELU epilogue; every gradient, the LayerNorm's weight and bias included."""
    _check_against_float64(backend, dtype, "gelu", True, False, input_norm=(True, norm_bias))


def _check_against_float64(backend, dtype, activation, bias, residual, row_scale=None, norm=(False, False),
                           input_norm=(False, False)):
    generator = torch.Generator().manual_seed(7)
    shape, n = (3, 37, 48), 40  # M = 111 rows, K = 48, N = 40: no dimension a multiple of a tile
    inputs = _inputs(dtype, shape, n, bias, residual, generator)
    norm_inputs = [torch.randn(size, generator=generator, dtype=torch.float64).to(DEVICE).to(dtype).requires_grad_()
                   if on else None for on, size in zip((*norm, *input_norm), (n, n, 48, 48))]
    x, weight, b, res = inputs
    scale = None if row_scale is None else row_scale[:, None].expand(shape[:-1]).to(DEVICE)

    def norm_kwargs(tensors):
        return dict(norm_weight=tensors[0], norm_bias=tensors[1], input_norm_weight=tensors[2],
                    input_norm_bias=tensors[3])

    out = ops.linear(x, weight, b, activation=activation, residual=res,
                     row_scale=None if scale is None else scale.to(dtype), backend=backend, **norm_kwargs(norm_inputs))
    inputs = inputs + norm_inputs
    as64 = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    ref64 = reference.linear(as64[0], as64[1], as64[2], activation=activation, residual=as64[3],
                             row_scale=None if scale is None else scale.double(), **norm_kwargs(as64[4:]))
    eager = reference.linear(*inputs[:3], activation=activation, residual=inputs[3],
                             row_scale=None if scale is None else scale.to(dtype), **norm_kwargs(inputs[4:]))
    assert out.dtype == dtype and out.shape == (3, 37, n)
    assert_close_to_reference(out, ref64, eager, "out")

    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    live = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, live, grad.to(dtype))
    grads64 = torch.autograd.grad(ref64, [t for t in as64 if t is not None], grad)
    eager_grads = torch.autograd.grad(eager, live, grad.to(dtype))
    names = [name for name, t in zip(("x", "weight", "bias", "residual", "norm_weight", "norm_bias",
                                      "input_norm_weight", "input_norm_bias"), inputs) if t is not None]
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
    out, pre_activation, stats, input_stats = torch.ops.cct_kernels.linear_forward(x, weight, b, res, activation,
                                                                                   save, backend)
    assert pre_activation.shape == ((9, 20) if activation == "gelu" and save else (0,))
    assert stats.shape == input_stats.shape == (0,)
    if activation == "gelu" and not save:
        with pytest.raises(RuntimeError, match="save_for_backward=False"):
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


# ------------------------------------------------------------------------------------------------------- dropout
KERNEL_SERVING = [b for b in SERVING if b != "eager"]


def _hash_mask_in_python_ints(seed: int, row: int, col: int, dropout_p: float) -> bool:
    """reference.linear_dropout_mask's definition for one element, in plain Python integers (no tensor tricks)."""
    def mix32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    lo, hi = seed % 2**32, (seed % 2**64) >> 32
    key = mix32(mix32(lo ^ 0x85EBCA6B) ^ mix32((hi + 0x27D4EB2F) % 2**32) ^ mix32((row + 0x9E3779B9) % 2**32))
    return mix32(key ^ mix32(col)) >> 8 >= reference.dropout_threshold(dropout_p)


@pytest.mark.parametrize("seed", [0, 123456789012345, -1, -(2**63), 2**63 - 1])
def test_linear_dropout_mask_is_its_definition(seed):
    mask = reference.linear_dropout_mask(torch.tensor([seed]), 70, 300, 0.3)
    for row, col in [(0, 0), (0, 299), (69, 0), (17, 123), (69, 299), (5, 256)]:
        assert bool(mask[row, col]) == _hash_mask_in_python_ints(seed, row, col, 0.3), (row, col)
    assert torch.equal(mask, reference.linear_dropout_mask(torch.tensor([seed]), 70, 300, 0.3))


def test_linear_dropout_mask_statistics():
    """Kept fraction 1 - p overall and per row and column (no stripes), masks of two seeds independent."""
    p = 0.25
    a = reference.linear_dropout_mask(torch.tensor([11]), 1024, 1024, p).double()
    b = reference.linear_dropout_mask(torch.tensor([12]), 1024, 1024, p).double()
    assert abs(a.mean().item() - (1 - p)) < 3e-3  # sd of the mean: 4.2e-4
    for fractions in (a.mean(0), a.mean(1)):  # sd per row / column: 0.0135
        assert (fractions - (1 - p)).abs().max().item() < 0.08
    assert abs((a * b).mean().item() - (1 - p) ** 2) < 3e-3
    assert abs((a[:, 1:] * a[:, :-1]).mean().item() - (1 - p) ** 2) < 3e-3  # neighbours independent
    assert not reference.linear_dropout_mask(torch.tensor([11]), 4, 4, 0.0).logical_not().any()
    assert not reference.linear_dropout_mask(torch.tensor([11]), 4, 4, 1.0).any()


def _dropout_case(backend, dtype, activation, dropout_p, generator):
    """ops.linear with dropout, row scale and residual on `backend`, and the seed it drew."""
    x, weight, b, res = _inputs(dtype, (3, 37, 48), 40, True, True, generator)
    scale = torch.tensor([0.0, 4 / 3, 4 / 3])[:, None].expand(3, 37).to(DEVICE)
    state = torch.get_rng_state(), torch.cuda.get_rng_state() if DEVICE.type == "cuda" else None
    out = ops.linear(x, weight, b, activation=activation, residual=res, row_scale=scale.to(dtype),
                     dropout_p=dropout_p, backend=backend)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])
    seed = new_seed(DEVICE)  # the seed ops.linear drew
    return out, (x, weight, b, res), scale, seed


@pytest.mark.parametrize("backend", KERNEL_SERVING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_linear_dropout_against_float64_with_the_kernels_mask(backend, dtype, activation):
    """Forward and every gradient against float64 applying reference.linear_dropout_mask of the drawn seed."""
    generator = torch.Generator().manual_seed(3)
    p = 0.3
    out, inputs, scale, seed = _dropout_case(backend, dtype, activation, p, generator)
    mask = reference.linear_dropout_mask(seed, 111, 40, p).view(3, 37, 40)
    assert 0.6 < mask.float().mean().item() < 0.8
    as64 = [t.detach().double().requires_grad_() for t in inputs]
    ref64 = reference.linear(*as64[:3], activation=activation, residual=as64[3], row_scale=scale.double(),
                             dropout_p=p, dropout_mask=mask)
    eager = reference.linear(*inputs[:3], activation=activation, residual=inputs[3], row_scale=scale.to(dtype),
                             dropout_p=p, dropout_mask=mask)
    assert_close_to_reference(out, ref64, eager, "out")
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad(out, inputs, grad.to(dtype))
    grads64 = torch.autograd.grad(ref64, as64, grad)
    eager_grads = torch.autograd.grad(eager, inputs, grad.to(dtype))
    for name, g, g64, ge in zip(("x", "weight", "bias", "residual"), grads, grads64, eager_grads):
        assert_close_to_reference(g, g64, ge, f"grad {name}")


@pytest.mark.parametrize("backend", KERNEL_SERVING)
def test_linear_dropout_one_drops_everything(backend):
    generator = torch.Generator().manual_seed(4)
    out, (x, weight, b, res), _, _ = _dropout_case(backend, torch.float32, "gelu", 1.0, generator)
    torch.testing.assert_close(out, res)  # every linear output dropped: the residual alone
    grad_x, grad_w = torch.autograd.grad(out.sum(), [x, weight])
    assert not grad_x.any() and not grad_w.any()


def test_linear_eager_dropout_draws_as_the_official_module():
    """The eager backend's dropout is F.dropout on torch's generator: the official nn.Dropout's draws."""
    x, weight, b = torch.randn(4, 9, 8), torch.randn(6, 8), torch.randn(6)
    torch.manual_seed(5)
    out = ops.linear(x, weight, b, activation="gelu", dropout_p=0.4, backend="eager")
    torch.manual_seed(5)
    official = torch.nn.Dropout(0.4)(torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, b)))
    torch.testing.assert_close(out, official)


@pytest.mark.parametrize("backend", KERNEL_SERVING)
def test_linear_dropout_is_seeded_by_torch_manual_seed(backend):
    x, weight = torch.randn(16, 8, device=DEVICE), torch.randn(32, 8, device=DEVICE)
    torch.manual_seed(9)
    a = ops.linear(x, weight, dropout_p=0.5, backend=backend)
    torch.manual_seed(9)
    b = ops.linear(x, weight, dropout_p=0.5, backend=backend)
    c = ops.linear(x, weight, dropout_p=0.5, backend=backend)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_linear_cuda_aten_path_matches_the_cpu_kernel():
    """The cuda backend's ATen epilogue (run here on CPU tensors) draws the cpu kernel's mask, normalises as its
    LayerNorm epilogue does and gives its gradients at h."""
    from cct_kernels.extension import linear as ext_linear

    if backends.unsupported_reason("cpu", "linear", torch.device("cpu"), torch.randn(2, 4), torch.randn(3, 4),
                                   None, None, "none") is not None:
        pytest.skip("the cpu extension is not built")
    generator = torch.Generator().manual_seed(6)
    x, weight, b, res = (torch.randn(*s, generator=generator) for s in ((50, 24), (40, 24), (40,), (50, 40)))
    scale, seed = torch.rand(50, generator=generator), torch.tensor([77])
    norm_weight, norm_bias = torch.randn(40, generator=generator), torch.randn(40, generator=generator)
    grad = torch.randn(50, 40, generator=generator)
    for gelu, norm in ((False, False), (True, False), (False, True)):
        args = (x, weight, b, res, gelu, True, scale, 0.3, seed, norm_weight if norm else None,
                norm_bias if norm else None, 1e-5)
        outputs = torch.ops.cct_kernels_C.linear_forward(*args)
        aten_outputs = ext_linear.aten_forward(*args)
        for name, kernel, aten in zip(("out", "saved", "stats"), outputs, aten_outputs):
            torch.testing.assert_close(aten, kernel, msg=lambda m: f"{name} (gelu {gelu}, norm {norm}): {m}")
        h = outputs[1] if gelu else None
        kernel_grad_h = torch.ops.cct_kernels_C.linear_grad_pre_activation(grad, h, scale, 0.3, seed)
        aten_grad_h = ext_linear.aten_grad_pre_activation(grad, h, scale, 0.3, seed)
        torch.testing.assert_close(aten_grad_h, kernel_grad_h)


@pytest.mark.parametrize("backend", KERNEL_SERVING)
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_linear_dropout_fakes(backend, activation):
    x, weight, b, res = _inputs(torch.float32, (9, 24), 20, True, True, torch.Generator().manual_seed(2))
    scale, seed = torch.rand(9, device=DEVICE), torch.tensor([5], device=DEVICE)
    torch.library.opcheck(torch.ops.cct_kernels.linear_forward,
                          (x, weight, b, res, activation, True, backend, scale, 0.2, seed))
    out, h, *_ = torch.ops.cct_kernels.linear_forward(x, weight, b, res, activation, True, backend, scale, 0.2, seed)
    torch.library.opcheck(torch.ops.cct_kernels.linear_backward,
                          (torch.randn_like(out), x.detach(), weight.detach(), True, h.detach(), activation, backend,
                           scale, 0.2, seed))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), True])
def test_linear_dropout_rate_errors(p):
    x, w = torch.randn(2, 8), torch.randn(6, 8)
    with pytest.raises((ValueError, TypeError), match=r"dropout_p must be .*in \[0, 1\]"):
        ops.linear(x, w, dropout_p=p)


# ------------------------------------------------------------------------------------------ LayerNorm epilogue
@pytest.mark.parametrize("backend", KERNEL_SERVING)
@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("norm_bias", [True, False])
def test_linear_layer_norm_fakes(backend, save, norm_bias):
    x, weight, b, res = _inputs(torch.float32, (9, 24), 20, True, True, torch.Generator().manual_seed(8))
    norm = (torch.randn(20, device=DEVICE, requires_grad=True),
            torch.randn(20, device=DEVICE, requires_grad=True) if norm_bias else None)
    args = (x, weight, b, res, "none", save, backend, None, 0.0, None, *norm, 1e-5)
    if not save:
        args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(torch.ops.cct_kernels.linear_forward, args)
    out, summed, stats, _ = torch.ops.cct_kernels.linear_forward(*args)
    assert summed.shape == ((9, 20) if save else (0,)) and stats.shape == (2, 9) and stats.dtype == torch.float32
    if save:  # the saved sum and the row statistics are those of the reference's un-normalised output
        expected = reference.linear(x, weight, b, residual=res)
        torch.testing.assert_close(summed, expected)
        torch.testing.assert_close(stats[0], expected.mean(1))
        torch.testing.assert_close(stats[1], (expected.var(1, unbiased=False) + 1e-5).rsqrt())


@pytest.mark.parametrize("backend", KERNEL_SERVING)
def test_linear_layer_norm_without_saved_sum_refuses_the_backward(backend):
    x, weight = torch.randn(4, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE)
    norm_weight = torch.randn(6, device=DEVICE, requires_grad=True)
    out = torch.ops.cct_kernels.linear_forward(x, weight, None, None, "none", False, backend, None, 0.0, None,
                                               norm_weight, None, 1e-5)[0]
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        out.sum().backward()


def test_linear_layer_norm_errors():
    x, w, b = torch.randn(2, 5, 8), torch.randn(6, 8), torch.randn(6)
    with pytest.raises(ValueError, match="follows no activation"):
        ops.linear(x, w, b, activation="gelu", norm_weight=torch.ones(6))
    with pytest.raises(ValueError, match="norm_bias needs norm_weight"):
        ops.linear(x, w, b, norm_bias=torch.ones(6))
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(6,\), got \(5,\)"):
        ops.linear(x, w, b, norm_weight=torch.ones(5))
    with pytest.raises(ValueError, match="norm_eps must be positive"):
        ops.linear(x, w, b, norm_weight=torch.ones(6), norm_eps=0.0)
    with pytest.raises(TypeError, match="norm_bias has dtype torch.float64"):
        ops.linear(x, w, b, norm_weight=torch.ones(6), norm_bias=torch.ones(6, dtype=torch.float64))


def test_triton_layer_norms_decline_rows_wider_than_their_tiles():
    from cct_kernels.triton import linear as triton_linear

    x, weight = torch.empty(4, 8, device="meta"), torch.empty(2048, 8, device="meta")
    assert "N must be <= 1024" in triton_linear.unsupported(x, weight, None, None, "none", torch.empty(2048))
    assert triton_linear.unsupported(x, weight, None, None, "none") is None
    wide = torch.empty(4, 9000, device="meta")
    assert "K must be <= 8192" in triton_linear.unsupported(wide, torch.empty(2, 9000, device="meta"), None, None,
                                                            "none", None, torch.empty(9000))


@pytest.mark.parametrize("backend", KERNEL_SERVING)
@pytest.mark.parametrize("save", [True, False])
def test_linear_layer_norm_prologue_fakes(backend, save):
    x, weight, b, _ = _inputs(torch.float32, (9, 24), 20, True, False, torch.Generator().manual_seed(9))
    in_norm = (torch.randn(24, device=DEVICE, requires_grad=True), torch.randn(24, device=DEVICE, requires_grad=True))
    args = (x, weight, b, None, "none", save, backend, None, 0.0, None, None, None, 1e-5, *in_norm, 1e-5)
    if not save:
        args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(torch.ops.cct_kernels.linear_forward, args)
    *_, input_stats = torch.ops.cct_kernels.linear_forward(*args)
    xd = x.detach()
    torch.testing.assert_close(input_stats, torch.stack([xd.mean(1), (xd.var(1, unbiased=False) + 1e-5).rsqrt()]))
    grad = torch.randn(9, 20, device=DEVICE)
    torch.library.opcheck(torch.ops.cct_kernels.linear_backward,
                          (grad, xd, weight.detach(), True, x.new_empty(0), "none", backend, None, 0.0, None,
                           in_norm[0].detach(), in_norm[1].detach(), input_stats.detach()))


def test_linear_layer_norm_prologue_errors():
    x, w = torch.randn(2, 5, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"input_norm_weight must have shape \(8,\), got \(6,\)"):
        ops.linear(x, w, input_norm_weight=torch.ones(6))
    with pytest.raises(ValueError, match="input_norm_bias needs input_norm_weight"):
        ops.linear(x, w, input_norm_bias=torch.ones(8))
    with pytest.raises(ValueError, match="input_norm_eps must be positive"):
        ops.linear(x, w, input_norm_weight=torch.ones(8), input_norm_eps=-1.0)
