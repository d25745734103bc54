"""Triton linear (cct_kernels/triton/linear.py) against the float64 reference: forward (out and the saved
pre-activation) and backward, every output poisoned with NaN before the launch, tails in every dimension, grad_W's
split over M, and the sm_90 build of the D=256 kernels (wgmma, no spills).

Tolerance rule (tests/cases.py, DESIGN.md): error against float64 at most 2x the same-dtype eager reference's, plus
a small floor. On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py); shapes stay small (M, N, K <= 136).
"""
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from cct_kernels import backends, ops, reference
from cct_kernels.triton import linear as triton_linear
from cct_kernels.triton import linear_norm
from cct_kernels.triton import linear_tiles
from tests.cases import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N): the lead's odd case; several tiles with a tail in each dimension (16-bit tiles are 64-128 wide);
# every dimension a whole number of tiles (the unmasked paths); dimensions below tl.dot's 16.
SHAPES = [(111, 48, 40), (130, 80, 136), (64, 64, 64), (3, 5, 7)]
EPILOGUES = [("gelu", True, True), ("gelu", False, False), ("none", True, True), ("none", False, False)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every buffer the launchers leave uninitialised starts as NaN, so an element never written shows."""
    def nan_empty(*shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(triton_linear, "_empty", nan_empty)


def _inputs(M, K, N, dtype, device, bias, residual, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    return (rand(M, K), rand(N, K, scale=K**-0.5), rand(N) if bias else None, rand(M, N) if residual else None,
            rand(M, N))


def _reference(x, weight, bias, residual, grad_out, activation):
    """(out, h = x @ W.T + b, grad_x, grad_W, grad_b) of the eager reference in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    b = leaves[2] if bias is not None else None
    out = reference.linear(leaves[0], leaves[1], b, activation=activation, residual=residual)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    h = F.linear(x, weight, bias)
    return (out.detach(), h, *grads)


@pytest.mark.parametrize("min_chunk", [16, linear_tiles.MIN_CHUNK_ROWS], ids=["split_m", "one_chunk"])
@pytest.mark.parametrize("activation,bias,residual", EPILOGUES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_float64(dtype, shape, activation, bias, residual, min_chunk, device):
    M, K, N = shape
    x, weight, b, res, grad_out = _inputs(M, K, N, dtype, device, bias, residual)
    out, h, *_ = triton_linear.forward(x, weight, b, res, activation, True)
    grads = triton_linear.backward(grad_out, x, weight, bias, h, activation, min_chunk=min_chunk)

    exact = _reference(*(None if t is None else t.double() for t in (x, weight, b, res, grad_out)), activation)
    eager = _reference(x, weight, b, res, grad_out, activation)
    got = (out, h) + grads[:2] + ((grads[2],) if bias else ())
    names = ("out", "pre_activation", "grad_x", "grad_weight", "grad_bias")
    for name, g, r, e in zip(names, got, exact, eager):
        if name == "pre_activation" and activation != "gelu":
            assert h.shape == (0,)
            continue
        assert g.dtype == dtype and not g.isnan().any(), f"{name}: NaN (an element left unwritten?)"
        assert_close_to_reference(g, r, e, name)
    if not bias:
        assert grads[2].shape == (0,)


def test_float16_gelu_through_the_op_matches_float64(device):
    """The registered op path (autograd, saved pre-activation) in float16, with the residual's gradient."""
    x, weight, b, res, grad_out = _inputs(3 * 37, 48, 40, torch.float16, device, True, True, seed=3)
    leaves = [t.requires_grad_() for t in (x, weight, b, res)]
    out = ops.linear(x.view(3, 37, 48), weight, b, activation="gelu", residual=res.view(3, 37, 40), backend="triton")
    got = [out.reshape(-1, 40)] + list(torch.autograd.grad(out, leaves, grad_out.view(3, 37, 40)))
    as64 = [t.detach().double().requires_grad_() for t in leaves]
    ref64 = reference.linear(*as64[:3], activation="gelu", residual=as64[3])
    exact = [ref64] + list(torch.autograd.grad(ref64, as64, grad_out.double()))
    eager_out = reference.linear(*leaves[:3], activation="gelu", residual=leaves[3])
    eager = [eager_out] + list(torch.autograd.grad(eager_out, leaves, grad_out))
    for name, g, r, e in zip(("out", "grad_x", "grad_weight", "grad_bias", "grad_residual"), got, exact, eager):
        assert_close_to_reference(g, r.detach(), e.detach(), name)


def test_gelu_derivative_is_within_its_stated_error(device):
    """GELU' (the one-polynomial normal tail) over h in [-10, 10], read out exactly: W = I and grad_out = 1 make
    grad_x = GELU'(h) in float32 products with 0 and 1. The docstring states 3.0e-7 at worst."""
    h = torch.linspace(-10, 10, 64 * 16, dtype=torch.float64)
    exact = 0.5 * (1 + torch.special.erf(h / 2**0.5)) + h * torch.exp(-0.5 * h * h) / (2 * torch.pi) ** 0.5
    eye = torch.eye(16, device=device)
    ones = torch.ones(64, 16, device=device)
    grad_x, _, _ = triton_linear.backward(ones, ones, eye, False, h.float().view(64, 16).to(device), "gelu")
    assert (grad_x.double().flatten().cpu() - exact).abs().max().item() <= 3.5e-7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,bias", [(111, 48, True), (300, 136, False), (1, 7, True)])
def test_layer_norm_backward_matches_float64(dtype, M, N, bias, device, monkeypatch):
    """The LayerNorms' backward (linear_norm.py): grad_input, grad_weight and grad_bias from the forward's
    float32 statistics, against float64 autograd through F.layer_norm; M spans several programs' row chunks."""
    monkeypatch.setattr(linear_norm, "programs_wanted", lambda device: 2)  # up to 8 programs: chunks and a tail
    g = torch.Generator().manual_seed(M + N)
    x64, grad64 = (torch.randn(M, N, generator=g, dtype=torch.float64) * 2 + 0.5 for _ in range(2))
    w64, b64 = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)

    def autograd(x, grad, w, b):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        F.layer_norm(leaves[0], (N,), leaves[1], leaves[2] if bias else None, 1e-5).backward(grad)
        return [leaf.grad for leaf in leaves]

    x, grad, w, b = x64.to(dtype), grad64.to(dtype), w64.to(dtype), b64.to(dtype)
    stats = torch.stack([x.double().mean(1), (x.double().var(1, unbiased=False) + 1e-5).rsqrt()]).float()
    got = linear_norm.layer_norm_backward(grad.to(device), x.to(device), stats.to(device), w.to(device), bias)
    expected, eager = autograd(x.double(), grad.double(), w64, b64), autograd(x, grad, w, b)
    for name, out, ref, same in zip(("grad_input", "grad_weight", "grad_bias"), got, expected, eager):
        if name == "grad_bias" and not bias:
            assert out.shape == (0,)
            continue
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert_close_to_reference(out.cpu(), ref, same, name)



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,bias", [(111, 48, True), (37, 136, False), (1, 7, True)])
def test_layer_norm_rows_match_float64(dtype, M, N, bias, device):
    """The input LayerNorm's row pass (linear_norm.py): rows against float64 F.layer_norm (error at most ~2x the
    same-dtype eager one), float32 statistics against float64's mean and 1 / std, and normalise_rows remaking the
    same rows to the bit from those statistics; M spans several programs with a tail."""
    g = torch.Generator().manual_seed(M + N)
    x64 = torch.randn(M, N, generator=g, dtype=torch.float64) * 3 + 1.5
    w64, b64 = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype) if bias else None
    rows, stats = linear_norm.layer_norm_rows(x.to(device), w.to(device), None if b is None else b.to(device), 1e-5)
    assert rows.dtype == dtype and stats.dtype == torch.float32 and stats.shape == (2, M)
    expected = F.layer_norm(x.double(), (N,), w64, b64 if bias else None, 1e-5)
    eager = F.layer_norm(x, (N,), w, b, 1e-5)
    assert_close_to_reference(rows.cpu(), expected, eager, "rows")
    xd = x.double()
    exact = torch.stack([xd.mean(1), (xd.var(1, unbiased=False) + 1e-5).rsqrt()])
    torch.testing.assert_close(stats.double().cpu(), exact, rtol=2e-6, atol=2e-6)
    again = linear_norm.normalise_rows(x.to(device), stats, w.to(device), None if b is None else b.to(device))
    assert torch.equal(again, rows)


def test_layer_norm_rows_refuse_rows_wider_than_the_tile():
    x = torch.empty(2, linear_norm.MAX_COLUMNS + 1, device="meta")
    with pytest.raises(ValueError, match="hold whole rows"):
        linear_norm.layer_norm_rows(x, x[0], None, 1e-5)

def test_layer_norm_backward_of_no_rows(device):
    grad = torch.empty(0, 16, device=device)
    grad_input, grad_weight, grad_bias = linear_norm.layer_norm_backward(
        grad, grad, torch.empty(2, 0, device=device), torch.ones(16, device=device), True)
    assert grad_input.shape == (0, 16) and (grad_weight == 0).all() and (grad_bias == 0).all()


def test_split_covers_m_in_whole_blocks():
    """grad_W's chunks: multiples of the row block, covering M, about filling the device, never above 2**31."""
    for M, block_m, tiles, NK in [(16384, 64, 8, 512 * 256), (111, 16, 1, 40 * 48), (10**6, 64, 1, 2**30)]:
        split, chunk = linear_tiles.split_rows(M, block_m, tiles, NK, torch.device("meta"), 512)
        assert chunk % block_m == 0 and (split - 1) * chunk < M <= split * chunk
        assert split * NK < 2**31 and split * tiles <= linear_tiles.META_SM_COUNT + tiles


def test_empty_batch_and_refusals(device):
    x, weight, b, _, _ = _inputs(0, 8, 6, torch.float32, device, True, False)
    out, h, *_ = triton_linear.forward(x, weight, b, None, "gelu", True)
    grad_x, grad_w, grad_b = triton_linear.backward(out, x, weight, True, h, "gelu")
    assert out.shape == h.shape == (0, 6) and grad_x.shape == (0, 8)
    assert (grad_w == 0).all() and (grad_b == 0).all()
    assert "float32, float16 and bfloat16" in triton_linear.unsupported(x.double(), weight.double(), None, None,
                                                                        "none")
    with pytest.raises(backends.BackendUnavailable, match="float32, float16 and bfloat16"):
        ops.linear(x.double(), weight.double(), backend="triton")
    huge = torch.empty(2**16, 2**15, device="meta")
    assert "int32" in triton_linear.unsupported(huge, torch.empty(4, 2**15, device="meta"), None, None, "none")


SM90_SCRIPT = """
import json
from cct_kernels.triton import linear, sm90
checks = [c for c in linear.SM90_CHECKS if c["name"] in {names!r}]
print(json.dumps({{k: v for c in checks for k, v in sm90.check_figures(c).items()}}))
"""


def test_sm90_build_of_the_d256_block_uses_wgmma_without_spills():
    """bf16, D = 256, M = 16384: linear1's forward (GELU, pre-activation saved) and backward, compiled as the JIT
    specialises them at launch (a subprocess without the interpreter)."""
    names = ["fwd_bfloat16_M16384_K256_N512_bias_gelu", "bwd_bfloat16_M16384_K256_N512_bias_gelu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SM90_SCRIPT.format(names=names)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(proc.stdout.splitlines()[-1])
    assert sorted(k.split("/")[1] for k in figures) == ["_forward_kernel", "_grad_w_kernel", "_grad_x_kernel"]
    for name, f in figures.items():
        assert f["spill_bytes"] == 0 and f["registers"] <= 255 and f["shared_bytes"] <= 227 * 1024, (name, f)
        assert f["mma"] == "wgmma" and f["cp_async"] and f["ldg_128"], (name, f)


def _spy_on_launches(monkeypatch) -> list:
    """The names of the linear kernels launched from now on, in order."""
    launched = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(self.kernel.__name__)
            return self.kernel[grid]

    for name in ("_forward_kernel", "_grad_x_kernel", "_grad_w_kernel", "_grad_h_kernel"):
        monkeypatch.setattr(triton_linear, name, Spy(getattr(triton_linear, name)))
    return launched


def test_plain_gemms_go_to_the_vendor_library_on_a_gpu(device, monkeypatch):
    """With nothing to fuse (no GELU, dropout, row scale, residual or norm) the forward is F.linear and the backward
    torch.mm on CUDA tensors (_vendor_gemm, forced here), behind the input LayerNorm's row pass; a fused forward still
    launches its kernel."""
    launched = _spy_on_launches(monkeypatch)
    monkeypatch.setattr(triton_linear, "_vendor_gemm", lambda x: True)
    x, weight, bias, residual, grad_out = _inputs(37, 24, 40, torch.float32, device, True, True)
    norm_w, norm_b = torch.rand(24, device=device) + 0.5, torch.randn(24, device=device)
    out, saved, stats, input_stats = triton_linear.forward(x, weight, bias, None, "none", True, None, 0.0, None, None,
                                                          None, 1e-5, norm_w, norm_b, 1e-5)
    normed, expected_stats = linear_norm.layer_norm_rows(x, norm_w, norm_b, 1e-5)
    assert torch.equal(out, F.linear(normed, weight, bias)) and torch.equal(input_stats, expected_stats)
    assert saved.numel() == 0 and stats.numel() == 0
    grad_x, grad_w, grad_b = triton_linear.backward(grad_out, x, weight, True, None, "none", None, 0.0, None, norm_w,
                                                    norm_b, input_stats)
    assert torch.equal(grad_x, grad_out @ weight) and torch.equal(grad_w, grad_out.t() @ normed)
    assert torch.equal(grad_b, grad_out.sum(0))
    assert launched == []
    triton_linear.forward(x, weight, bias, residual, "gelu", True)
    assert launched == ["_forward_kernel"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_backward_is_a_grad_h_pass_then_the_vendor_gemms(dtype, device, monkeypatch):
    """On CUDA tensors (_vendor_gemm, forced here) a backward with a prologue (GELU', dropout's mask, the row scale)
    is one _grad_h_kernel pass, then torch.mm: grad_h against the float64 reference at the usual 2x-eager
    tolerance, and the gradients from that grad_h against float64 at most ~2x the error of the kernels' path (whose
    prologues make the same grad_h)."""
    M, K, N = 70, 24, 40
    x, weight, _, _, grad_out = _inputs(M, K, N, dtype, device, True, False)
    h = _inputs(M, K, N, dtype, device, False, False, seed=1)[4]
    row_scale = (torch.rand(M, generator=torch.Generator().manual_seed(2)) > 0.2).to(dtype).to(device) * 1.25
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    args = (grad_out, x, weight, True, h, "gelu", row_scale, 0.25, seed)
    kernels = triton_linear.backward(*args)
    launched = _spy_on_launches(monkeypatch)
    monkeypatch.setattr(triton_linear, "_vendor_gemm", lambda x: True)
    vendor = triton_linear.backward(*args)
    assert launched == ["_grad_h_kernel"]
    grad_h = triton_linear._grad_h_rows(grad_out, h, True, row_scale, 0.25, seed)
    mask = reference.linear_dropout_mask(seed, M, N, 0.25).to(device)
    exact = (torch.ops.aten.gelu_backward(grad_out.double(), h.double()) * mask / 0.75
             * row_scale.double()[:, None])
    eager = (torch.ops.aten.gelu_backward(grad_out, h) * mask / 0.75 * row_scale[:, None]).to(dtype)
    assert_close_to_reference(grad_h, exact, eager, "grad_h")
    exact_grads = (grad_h.double() @ weight.double(), grad_h.double().t() @ x.double(), grad_h.double().sum(0))
    for name, got, fused, exact in zip(("grad_x", "grad_w", "grad_b"), vendor, kernels, exact_grads):
        assert got.dtype == dtype and got.shape == fused.shape
        assert_close_to_reference(got, exact, fused, name)  # no worse than twice the kernels' path


def test_deterministic_mode_keeps_the_kernels_on_a_gpu():
    """Under torch.use_deterministic_algorithms the GEMMs stay on these kernels (deterministic, no atomics): torch's
    cuBLAS calls would raise there unless CUBLAS_WORKSPACE_CONFIG is set."""
    cuda_like = types.SimpleNamespace(is_cuda=True)
    assert triton_linear._vendor_gemm(cuda_like)
    torch.use_deterministic_algorithms(True)
    try:
        assert not triton_linear._vendor_gemm(cuda_like)
    finally:
        torch.use_deterministic_algorithms(False)
    assert not triton_linear._vendor_gemm(torch.empty(1))
