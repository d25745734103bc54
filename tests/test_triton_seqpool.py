"""Triton SeqPool (cct_kernels/triton/seqpool.py) against the eager reference in float64.

Tolerance rule (DESIGN.md): the kernel's error against float64 may be at most 2x the error of the same-dtype eager
reference against float64, plus a small floor. On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py);
bf16 runs there too because the kernels cast every loaded value to float32 before any arithmetic.
"""
import functools

import pytest
import torch

from cct_kernels import backends, ops, reference
from cct_kernels.triton import seqpool as triton_seqpool

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (B, N, D): N in 64, 196, 197, 257 and 1; D not a power of two; batch 1.
SHAPES = [(1, 64, 96), (2, 196, 384), (2, 197, 100), (1, 257, 64), (2, 1, 33)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every buffer the launchers leave uninitialised starts as NaN, so an element never written shows."""
    def nan_empty(*shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(triton_seqpool, "_empty", nan_empty)


def _inputs(B, N, D, dtype, device):
    x = torch.randn(B, N, D, device=device).to(dtype)
    weight = (torch.randn(1, D, device=device) * D**-0.5 * 2).to(dtype)  # scores of a few units: a peaked softmax
    bias = torch.randn(1, device=device).to(dtype)
    grad_out = torch.randn(B, D, device=device).to(dtype)
    return x, weight, bias, grad_out


def _run(fn, x, weight, bias, grad_out):
    """fn's output and the gradients of (output * grad_out).sum() w.r.t. x, weight, bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _assert_close(name, got, eager, exact, dtype, extra=0.0):
    """max |got - exact| <= 2 max |eager - exact| + floor (+ extra)."""
    got, eager = got.double(), eager.double()
    assert not got.isnan().any(), f"{name}: NaN in the kernel's result (an element left unwritten?)"
    scale = max(1.0, exact.abs().max().item())
    err = (got - exact).abs().max().item()
    allowed = 2 * (eager - exact).abs().max().item() + FLOOR[dtype] * scale + extra
    assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} (eager error x2 + floor)"


def _check_against_reference(kernel_fn, x, weight, bias, grad_out, mask=None):
    dtype = x.dtype
    pool = functools.partial(reference.seqpool, mask=mask)
    exact = _run(pool, x.double(), weight.double(), bias.double(), grad_out.double())
    eager = _run(pool, x, weight, bias, grad_out)
    got = _run(kernel_fn, x, weight, bias, grad_out)
    # grad_bias = sum_n ds_n is exactly 0 (softmax ignores a shift of the scores): what is left is the cancellation
    # of g.x_n against g.out, and the kernel (like FlashAttention's rowsum(dO * O)) takes g.out from the rounded
    # output it saved. Rounding out costs about eps * ||g * out|| (random signs); allow twice that.
    bias_noise = 2 * torch.finfo(dtype).eps * (grad_out.double() * exact[0]).norm().item()
    for name, g, e, r in zip(("out", "grad_x", "grad_weight", "grad_bias"), got, eager, exact):
        assert g.dtype == dtype and g.shape == r.shape, (name, g.dtype, g.shape)
        _assert_close(name, g, e, r, dtype, extra=bias_noise if name == "grad_bias" else 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_match_float64(shape, dtype, device):
    x, weight, bias, grad_out = _inputs(*shape, dtype, device)
    _check_against_reference(lambda *a: ops.seqpool(*a, backend="triton"), x, weight, bias, grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rows_wider_than_one_block_loop_over_d(dtype, device):
    """D larger than the register block: the chunked path (BLOCK_D = 32 here, so D = 100 takes 4 chunks)."""
    x, weight, bias, grad_out = _inputs(2, 70, 100, dtype, device)

    class Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            out, lse = triton_seqpool.forward(x, weight, bias, max_block_d=32)  # out float32, as the op saves it
            ctx.save_for_backward(x, weight, bias, out, lse)
            return out.to(x.dtype)

        @staticmethod
        def backward(ctx, grad_out):
            return triton_seqpool.backward(grad_out, *ctx.saved_tensors, max_block_d=32)

    _check_against_reference(Chunked.apply, x, weight, bias, grad_out)


def test_lse_is_the_logsumexp_of_the_scores(device):
    x, weight, bias, _ = _inputs(2, 197, 96, torch.float32, device)
    _, lse = triton_seqpool.forward(x, weight, bias)
    expected = torch.logsumexp((x.double() @ weight.double().T).squeeze(-1) + bias.double(), dim=1)
    assert lse.dtype == torch.float32 and lse.shape == (2,)
    torch.testing.assert_close(lse.double(), expected, rtol=1e-6, atol=1e-5)


def test_large_scores_do_not_overflow(device):
    """Scores of hundreds in fp16 inputs: exp would overflow without the running max."""
    x, weight, bias, grad_out = _inputs(2, 130, 64, torch.float16, device)
    weight = (weight * 40).to(torch.float16)
    _check_against_reference(lambda *a: ops.seqpool(*a, backend="triton"), x, weight, bias, grad_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_block_d", [triton_seqpool.MAX_BLOCK_D, 32], ids=["one_d_block", "d_chunks"])
def test_key_padding_matches_float64(dtype, max_block_d, device, monkeypatch):
    """Softmax over the real tokens only (lengths 0, 1, N and one between), each row split over three programs so
    that whole chunks hold no real token; padded tokens hold NaN, which must reach nothing (their gradients are
    exact zeros); a row without real tokens gives out = 0 and lse = -inf."""
    monkeypatch.setattr(triton_seqpool, "_programs_wanted", lambda device: 16)
    B, N, D = 4, 70, 100
    x, weight, bias, grad_out = _inputs(B, N, D, dtype, device)
    lengths = torch.tensor([0, 1, N, 29], device=device)
    real = torch.arange(N, device=device)[None] < lengths[:, None]
    poison = torch.zeros(B, N, 1, device=device, dtype=dtype).masked_fill(~real[..., None], float("nan"))

    class Padded(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            out, lse = triton_seqpool.forward(x, weight, bias, lengths, max_block_d=max_block_d)
            ctx.save_for_backward(x, weight, bias, out, lse)
            return out.to(x.dtype)

        @staticmethod
        def backward(ctx, grad_out):
            return triton_seqpool.backward(grad_out, *ctx.saved_tensors, lengths, max_block_d=max_block_d)

    _check_against_reference(lambda x, w, b: Padded.apply(x + poison, w, b), x, weight, bias, grad_out, mask=real)
    out, lse = triton_seqpool.forward(x + poison, weight, bias, lengths, max_block_d=max_block_d)
    grad_x, _, _ = triton_seqpool.backward(grad_out, x + poison, weight, bias, out, lse, lengths,
                                           max_block_d=max_block_d)
    assert (grad_x[~real] == 0).all() and (out[0] == 0).all()
    scores = (x.double() @ weight.double().T).squeeze(-1) + bias.double()
    expected = torch.logsumexp(scores.masked_fill(~real, float("-inf")), dim=1)
    assert lse[0] == float("-inf")
    torch.testing.assert_close(lse[1:].double(), expected[1:], rtol=1e-5, atol=1e-2 if dtype != torch.float32 else 1e-5)


def test_empty_batch(device):
    x, weight, bias, _ = _inputs(0, 5, 8, torch.float32, device)
    out, lse = triton_seqpool.forward(x, weight, bias)
    assert out.shape == (0, 8) and lse.shape == (0,)


def test_float64_is_refused_with_a_reason(device):
    x, weight, bias, _ = _inputs(1, 4, 8, torch.float64, device)
    assert "float32" in triton_seqpool.unsupported(x, weight, bias, backend="triton")
    with pytest.raises(backends.BackendUnavailable, match="float32, float16 and bfloat16"):
        ops.seqpool(x, weight, bias, backend="triton")


def test_opcheck(device):
    x, weight, bias, grad_out = _inputs(2, 33, 40, torch.float32, device)
    for t in (x, weight, bias):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.cct_kernels.seqpool_forward.default, (x, weight, bias, "triton"))
    lengths = torch.tensor([33, 0], device=device)
    torch.library.opcheck(torch.ops.cct_kernels.seqpool_forward.default, (x, weight, bias, "triton", lengths))
    out, lse = triton_seqpool.forward(x.detach(), weight.detach(), bias.detach())
    torch.library.opcheck(
        torch.ops.cct_kernels.seqpool_backward.default,
        (grad_out, x.detach(), weight.detach(), bias.detach(), out, lse, "triton"),
    )


def test_torch_compile_fullgraph_with_backward(device):
    x, weight, bias, grad_out = _inputs(2, 40, 24, torch.float32, device)

    @torch.compile(fullgraph=True)
    def pooled_tanh(x, weight, bias):
        return torch.tanh(ops.seqpool(x * 2, weight, bias, backend="triton"))

    got = _run(pooled_tanh, x, weight, bias, grad_out)
    expected = _run(lambda x, w, b: torch.tanh(reference.seqpool(x * 2, w, b)), x, weight, bias, grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
