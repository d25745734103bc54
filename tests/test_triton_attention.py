"""Triton flash attention (cct_kernels/triton/attention.py) against the eager reference in float64.

Tolerance rule (DESIGN.md): the kernel's max error against float64 is at most 2x the error of the same-dtype eager
reference against float64, plus a small floor scaled by the reference's magnitude. On CPU the kernels run under
TRITON_INTERPRET=1 (conftest.py); bf16 runs there too, computed in float32 after loading (the kernels' UPCAST
path), since the interpreter's bf16 arithmetic is wrong. Outputs the tests preallocate start as NaN, so an element
a kernel never writes shows.
"""
import importlib
import math

import pytest
import torch

from cct_kernels import backends, ops, reference
from cct_kernels.triton import attention as tri
from cct_kernels.triton._common import dot_precision, tf32_matmul
from cct_kernels.triton.attention_dropout import unpack

attention_op = importlib.import_module("cct_kernels.ops.attention")  # ops.attention is the function
CUDA = torch.cuda.is_available()
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
NO_SEED = torch.empty(0, dtype=torch.int64)

# (B, H, N, d, dtype): N in 64, 65, 196, 197, 256 (and 1, 17), head dims 64 (CCT), 32, 80 (padded to 128), 128
# (and 8, 16), each dtype with several N and d; small, since the interpreter runs each program in Python.
CASES = [
    (2, 4, 64, 64, torch.float32),
    (1, 2, 65, 64, torch.float16),
    (2, 2, 196, 32, torch.float32),
    (1, 2, 197, 64, torch.bfloat16),
    (1, 1, 256, 64, torch.float16),
    (1, 2, 197, 80, torch.float32),
    (2, 1, 65, 80, torch.float16),
    (1, 1, 196, 128, torch.bfloat16),
    (1, 1, 256, 128, torch.float32),
    (1, 2, 64, 32, torch.bfloat16),
    (3, 3, 1, 8, torch.float32),  # one token; head dim below the 16-wide minimum tile
    (1, 2, 17, 16, torch.float16),
]


def _case_id(case):
    B, H, N, d, dtype = case
    return f"B{B}-H{H}-N{N}-d{d}-{str(dtype).split('.')[-1]}"


def _inputs(B, H, N, d, dtype, device):
    qkv = torch.randn(B, N, 3 * H * d, device=device, dtype=torch.float64)
    grad_out = torch.randn(B, N, H * d, device=device, dtype=torch.float64)
    return qkv.to(dtype), grad_out.to(dtype)


def _reference(qkv, grad_out, num_heads, dtype=None, **kwargs):
    """reference.attention's output and grad_qkv, computed in `dtype` (default: qkv's)."""
    x = qkv.to(dtype or qkv.dtype).detach().requires_grad_()
    out = reference.attention(x, num_heads, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), x.grad


def _assert_close(name, got, eager, exact):
    """max |got - exact| <= 2 max |eager - exact| + floor * max(1, max |exact|)."""
    assert got.shape == exact.shape and got.dtype == eager.dtype, (name, got.shape, got.dtype)
    assert not got.isnan().any(), f"{name}: NaN in the kernel's result (an element left unwritten?)"
    scale = max(1.0, exact.abs().max().item())
    err = (got.double() - exact).abs().max().item()
    eager_err = (eager.double() - exact).abs().max().item()
    allowed = 2 * eager_err + FLOOR[got.dtype] * scale
    assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} (eager error {eager_err:.3g})"


def _nan(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _kernel_forward_backward(qkv, grad_out, H, scale, dropout_p=0.0, seed=NO_SEED, lengths=None):
    """forward() and backward() into NaN-poisoned outputs."""
    B, N, three_hd = qkv.shape
    seed = seed.to(qkv.device)
    out, lse = tri.forward(
        qkv, H, scale, dropout_p, seed, lengths,
        out=_nan(B, N, three_hd // 3, dtype=qkv.dtype, device=qkv.device),
        lse=_nan(B, H, N, dtype=torch.float32, device=qkv.device),
    )
    grad_qkv = tri.backward(grad_out, qkv, out, lse, H, scale, dropout_p, seed, lengths,
                            grad_qkv=_nan(*qkv.shape, dtype=qkv.dtype, device=qkv.device))
    return out, lse, grad_qkv


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_backward_match_float64(case, device):
    B, H, N, d, dtype = case
    qkv, grad_out = _inputs(B, H, N, d, dtype, device)
    out, lse, grad_qkv = _kernel_forward_backward(qkv, grad_out, H, d**-0.5)
    exact_out, exact_grad = _reference(qkv, grad_out, H, torch.float64)
    eager_out, eager_grad = _reference(qkv, grad_out, H)
    _assert_close("out", out, eager_out, exact_out)
    _assert_close("grad_qkv", grad_qkv, eager_grad, exact_grad)
    # lse is the log-sum-exp of the scaled scores, per (b, h, query)
    q, k, _ = qkv.double().reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    expected_lse = torch.logsumexp(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, N)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-4 if dtype == torch.float32 else 1e-2)


def test_through_the_op_with_autograd_and_explicit_scale(device):
    """ops.attention(backend="triton") end to end (custom op + autograd), scale other than d**-0.5."""
    qkv, grad_out = _inputs(2, 2, 65, 32, torch.float32, device)
    x = qkv.clone().requires_grad_()
    out = ops.attention(x, 2, scale=0.3, backend="triton")
    out.backward(grad_out)
    exact_out, exact_grad = _reference(qkv, grad_out, 2, torch.float64, scale=0.3)
    eager_out, eager_grad = _reference(qkv, grad_out, 2, scale=0.3)
    _assert_close("out", out.detach(), eager_out, exact_out)
    _assert_close("grad_qkv", x.grad, eager_grad, exact_grad)


def test_strided_qkv_rows_are_read_in_place(device):
    """qkv rows with padding between them (row stride != 3*H*d, not 16-byte aligned): read through strides."""
    B, H, N, d = 2, 2, 65, 32
    wide = torch.randn(B, N, 3 * H * d + 3, device=device)
    qkv = wide[..., : 3 * H * d]
    assert not qkv.is_contiguous() and not tri._aligned(qkv, head_dim=d)
    grad_out = torch.randn(B, N, H * d, device=device)
    out, _, grad_qkv = _kernel_forward_backward(qkv, grad_out, H, d**-0.5)
    exact_out, exact_grad = _reference(qkv.double(), grad_out, H)
    eager_out, eager_grad = _reference(qkv, grad_out, H)
    _assert_close("out", out, eager_out, exact_out)
    _assert_close("grad_qkv", grad_qkv, eager_grad, exact_grad)


def test_large_scores_do_not_overflow(device):
    """Scores in the hundreds (fp16 inputs): exp overflows without the running max."""
    qkv, grad_out = _inputs(1, 1, 130, 64, torch.float16, device)
    qkv = (qkv.float() * 5).half()
    out, _, grad_qkv = _kernel_forward_backward(qkv, grad_out, 1, 64**-0.5)
    exact_out, exact_grad = _reference(qkv, grad_out, 1, torch.float64)
    eager_out, eager_grad = _reference(qkv, grad_out, 1)
    _assert_close("out", out, eager_out, exact_out)
    _assert_close("grad_qkv", grad_qkv, eager_grad, exact_grad)


# ------------------------------------------------------------------------------------------------- dropout


def _seed(value, device):
    return torch.tensor([value], dtype=torch.int64, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_matches_reference_given_the_kernels_mask(dtype, device):
    """Forward and backward against reference.attention with dropout_mask(): same mask in all three kernels."""
    B, H, N, d, p = 1, 2, 130, 32, 0.3
    qkv, grad_out = _inputs(B, H, N, d, dtype, device)
    seed = _seed(1234, device)
    out, _, grad_qkv = _kernel_forward_backward(qkv, grad_out, H, d**-0.5, p, seed)
    mask = tri.dropout_mask(seed, B, H, N, p, device)
    exact_out, exact_grad = _reference(qkv, grad_out, H, torch.float64, dropout_p=p, dropout_mask=mask)
    eager_out, eager_grad = _reference(qkv, grad_out, H, dropout_p=p, dropout_mask=mask)
    _assert_close("out", out, eager_out, exact_out)
    _assert_close("grad_qkv", grad_qkv, eager_grad, exact_grad)
    # the mask matters: without dropout the result is far off
    no_drop, _ = _reference(qkv, grad_out, H, torch.float64)
    assert (out.double() - no_drop).abs().max() > 0.1


def test_dropout_mask_statistics_and_seeding(device):
    B, H, N, p = 1, 2, 160, 0.3
    mask = tri.dropout_mask(_seed(7, device), B, H, N, p, device)
    assert mask.shape == (B, H, N, N) and mask.dtype == torch.bool
    n = mask.numel()
    keep = mask.double().mean().item()
    rate = tri.dropout_threshold(p) / 256  # p rounded to a multiple of 1/256 (one random byte per key)
    assert abs(rate - p) <= 1 / 512
    assert abs(keep - (1 - rate)) < 5 * math.sqrt(p * (1 - p) / n), keep  # 5 sigma
    # no structure across heads, rows or columns: each slice keeps about 1 - p, and slices differ
    assert not torch.equal(mask[0, 0], mask[0, 1])
    assert not torch.equal(mask[0, 0, 0], mask[0, 0, 1]) and not torch.equal(mask[0, 0, :, 0], mask[0, 0, :, 1])
    per_row = mask.double().mean(-1)
    assert (per_row - (1 - rate)).abs().max() < 6 * math.sqrt(p * (1 - p) / N)
    # a seed is the whole state: the same seed reproduces, another differs, in about p(1-p)*2 of the places
    assert torch.equal(mask, tri.dropout_mask(_seed(7, device), B, H, N, p, device))
    other = tri.dropout_mask(_seed(8, device), B, H, N, p, device)
    assert abs((mask != other).double().mean().item() - 2 * p * (1 - p)) < 0.01
    # seeds differing only in the high 32 bits are different streams too
    high = tri.dropout_mask(_seed(7 + 2**40, device), B, H, N, p, device)
    assert abs((mask != high).double().mean().item() - 2 * p * (1 - p)) < 0.01


def test_key_major_bits_hold_the_transposed_mask(device):
    """The dK/dV kernel reads key-major bits: for every (query, key) they hold the flag the query-major bits
    (dropout_mask, the forward's and dQ's) hold; N = 150 spans two 128-column word groups and a padded one."""
    B, H, N, p = 1, 2, 150, 0.3
    _, bits_t = tri._dropout_bits(_seed(5, device), B, H, N, p, device, key_major=True)
    mask = tri.dropout_mask(_seed(5, device), B, H, N, p, device)
    assert torch.equal(unpack(bits_t, N).view(B, H, N, N), mask.transpose(-1, -2))


def test_dropout_same_seed_same_result(device):
    B, H, N, d, p = 1, 2, 65, 32, 0.2
    qkv, grad_out = _inputs(B, H, N, d, torch.float32, device)
    first = _kernel_forward_backward(qkv, grad_out, H, d**-0.5, p, _seed(99, device))
    again = _kernel_forward_backward(qkv, grad_out, H, d**-0.5, p, _seed(99, device))
    other = _kernel_forward_backward(qkv, grad_out, H, d**-0.5, p, _seed(100, device))
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # deterministic, no atomics
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[2], other[2])


def test_dropout_through_the_op_forward_backward_consistent(device):
    """ops.attention draws the seed from torch's generator; with that seed the reference (given the kernels'
    mask) reproduces both the output and the gradient, so forward and backward dropped the same elements."""
    B, H, N, d, p = 2, 2, 65, 32, 0.25
    qkv, grad_out = _inputs(B, H, N, d, torch.float32, device)
    torch.manual_seed(5)
    seed = attention_op.new_seed(device)
    torch.manual_seed(5)
    x = qkv.clone().requires_grad_()
    out = ops.attention(x, H, dropout_p=p, backend="triton")
    out.backward(grad_out)
    mask = tri.dropout_mask(seed, B, H, N, p, device)
    exact_out, exact_grad = _reference(qkv, grad_out, H, torch.float64, dropout_p=p, dropout_mask=mask)
    eager_out, eager_grad = _reference(qkv, grad_out, H, dropout_p=p, dropout_mask=mask)
    _assert_close("out", out.detach(), eager_out, exact_out)
    _assert_close("grad_qkv", x.grad, eager_grad, exact_grad)


# ------------------------------------------------------------------------------------------------- key padding

# (B, H, N, d, dtype, dropout_p, lengths): lengths 0 (no real token), 1 and N; N = 130 with lengths 64 and 129
# (whole key blocks of padding skipped, a partial block masked); text_transformer's head dim 75; dropout with padding.
PADDED_CASES = [
    (3, 2, 64, 32, torch.float32, 0.0, (0, 1, 64)),
    (3, 1, 130, 64, torch.float16, 0.0, (64, 129, 0)),
    (2, 2, 70, 75, torch.bfloat16, 0.0, (1, 41)),
    (3, 2, 65, 32, torch.float32, 0.3, (0, 1, 65)),
    (2, 1, 100, 16, torch.float16, 0.2, (37, 100)),
    (2, 1, 40, 75, torch.float16, 0.2, (0, 33)),  # unaligned head rows: the tiles of _UNALIGNED_CONFIGS
    (1, 2, 33, 75, torch.float32, 0.2, (20,)),
]


def _padded_case_id(case):
    return _case_id(case[:5]) + f"-p{case[5]}-L{'_'.join(map(str, case[6]))}"


@pytest.mark.parametrize("case", PADDED_CASES, ids=_padded_case_id)
def test_key_padding_matches_float64(case, device):
    """Every query row attends to the real keys only; the keys and values of padded tokens hold NaN, which must
    reach nothing; a sequence without real tokens gives out = 0, lse = -inf and zero gradients."""
    B, H, N, d, dtype, p, lengths = case
    qkv, grad_out = _inputs(B, H, N, d, dtype, device)
    lengths = torch.tensor(lengths, device=device)
    real = torch.arange(N, device=device)[None] < lengths[:, None]  # (B, N)
    padded_kv = ~real[:, :, None, None] & (torch.arange(3, device=device) > 0)[None, None, :, None]
    poisoned = qkv.view(B, N, 3, H * d).masked_fill(padded_kv, float("nan")).view(qkv.shape)
    clean = qkv.view(B, N, 3, H * d).masked_fill(padded_kv, 0.0).view(qkv.shape)
    seed = _seed(11, device) if p > 0 else NO_SEED
    out, lse, grad_qkv = _kernel_forward_backward(poisoned, grad_out, H, d**-0.5, p, seed, lengths)
    drop = tri.dropout_mask(seed, B, H, N, p, device) if p > 0 else None
    kwargs = dict(mask=real, dropout_p=p, dropout_mask=drop)
    exact_out, exact_grad = _reference(clean, grad_out, H, torch.float64, **kwargs)
    eager_out, eager_grad = _reference(clean, grad_out, H, **kwargs)
    _assert_close("out", out, eager_out, exact_out)
    _assert_close("grad_qkv", grad_qkv, eager_grad, exact_grad)
    assert (grad_qkv.view(B, N, 3, H * d)[padded_kv.expand(B, N, 3, H * d)] == 0).all()  # exact zeros
    empty = lengths == 0
    assert (out[empty] == 0).all() and (grad_qkv[empty] == 0).all()
    q, k, _ = clean.double().reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2) * d**-0.5).masked_fill(~real[:, None, None, :], float("-inf"))
    expected_lse = torch.logsumexp(scores, dim=-1)  # -inf for the rows of an empty sequence
    assert (lse[empty] == float("-inf")).all()
    torch.testing.assert_close(lse[~empty].double(), expected_lse[~empty], rtol=1e-5,
                               atol=1e-4 if dtype == torch.float32 else 1e-2)


def test_key_padding_through_the_op(device):
    """ops.attention(mask=lengths, backend="triton") end to end, bool prefix mask and dropout included."""
    B, H, N, d, p = 3, 2, 50, 16, 0.25
    qkv, grad_out = _inputs(B, H, N, d, torch.float32, device)
    lengths = torch.tensor([50, 0, 9], device=device)
    real = torch.arange(N, device=device)[None] < lengths[:, None]
    torch.manual_seed(4)
    seed = attention_op.new_seed(device)
    torch.manual_seed(4)
    x = qkv.clone().requires_grad_()
    out = ops.attention(x, H, dropout_p=p, mask=real, backend="triton")
    out.backward(grad_out)
    kwargs = dict(mask=real, dropout_p=p, dropout_mask=tri.dropout_mask(seed, B, H, N, p, device))
    exact_out, exact_grad = _reference(qkv, grad_out, H, torch.float64, **kwargs)
    eager_out, eager_grad = _reference(qkv, grad_out, H, **kwargs)
    _assert_close("out", out.detach(), eager_out, exact_out)
    _assert_close("grad_qkv", x.grad, eager_grad, exact_grad)


# ------------------------------------------------------------------------------------- support and registration


def test_unsupported_cases_say_why(device):
    qkv = torch.randn(1, 4, 3 * 2 * 64, device=device)
    assert tri.unsupported(qkv, 2, 0.125, 0.0, backend="triton") is None
    assert "float32, float16 and bfloat16" in tri.unsupported(qkv.double(), 2, 0.125, 0.0, backend="triton")
    wide = torch.randn(1, 4, 3 * 1 * 256, device=device)
    assert "head dim <= 128" in tri.unsupported(wide, 1, 0.0625, 0.0, backend="triton")
    with pytest.raises(backends.BackendUnavailable, match="head dim <= 128"):
        ops.attention(wide, 1, backend="triton")
    assert ops.attention(wide, 1, backend="auto").shape == (1, 4, 256)  # auto falls back
    int32_lengths = torch.tensor([4], dtype=torch.int32, device=device)
    assert "(B,) int64" in tri.unsupported(qkv, 2, 0.125, 0.0, int32_lengths, backend="triton")


def test_opcheck(device):
    qkv = torch.randn(2, 17, 3 * 2 * 16, device=device, requires_grad=True)
    op = torch.ops.cct_kernels.attention_forward.default
    torch.library.opcheck(op, (qkv, 2, 0.25, 0.0, NO_SEED.to(device), "triton"))
    torch.library.opcheck(op, (qkv, 2, 0.25, 0.1, _seed(3, device), "triton"))
    lengths = torch.tensor([17, 0], device=device)
    torch.library.opcheck(op, (qkv, 2, 0.25, 0.1, _seed(3, device), "triton", lengths))


def test_torch_compile_fullgraph_with_backward(device):
    qkv, grad_out = _inputs(2, 2, 40, 16, torch.float32, device)

    def block(x):
        return torch.tanh(ops.attention(x * 2, 2, backend="triton"))

    compiled = torch.compile(block, fullgraph=True)
    x = qkv.clone().requires_grad_()
    got = compiled(x)
    got.backward(grad_out)
    x_ref = qkv.clone().requires_grad_()
    expected = torch.tanh(reference.attention(x_ref * 2, 2))
    expected.backward(grad_out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_float32_precision_follows_torch_tf32_flag():
    """Every Triton matmul (attention, linear) picks its precision per call through _common.dot_precision."""
    with tf32_matmul(False):
        assert dot_precision(torch.float32) == "ieee"
    with tf32_matmul(True):
        assert dot_precision(torch.float32) == "tf32"
    assert dot_precision(torch.bfloat16) == "tf32"  # 16-bit inputs: tensor cores whatever the flag


def test_query_block_fits_short_sequences():
    """N = 64 (cct_2): one 64-query block, not a 128-query block that is half padding."""
    assert tri._config("fwd", torch.bfloat16, 64, False, 64)[0] == 64
    assert tri._config("fwd", torch.bfloat16, 64, False, 256)[0] == 128
    assert tri._config("dq", torch.bfloat16, 64, True, 40)[0] == tri.MIN_BLOCK_M


def test_no_dropout_allocates_no_bits_per_call(device):
    first, _ = tri._dropout_bits(NO_SEED.to(device), 2, 2, 64, 0.0, device)
    again, _ = tri._dropout_bits(NO_SEED.to(device), 2, 2, 64, 0.0, device)
    assert first is again


# --------------------------------------------------------------------------------- real shapes, CUDA only

cuda_only = pytest.mark.skipif(not CUDA, reason="real shapes need a CUDA GPU (too slow for the CPU interpreter)")
CUDA_CASES = [
    (128, 4, 256, 64, torch.bfloat16),
    (64, 6, 196, 64, torch.float16),
    (64, 6, 576, 64, torch.bfloat16),
    (32, 2, 197, 64, torch.float32),
    (8, 3, 1024, 64, torch.bfloat16),
    (1024, 2, 65, 64, torch.float16),
    (4, 4, 257, 128, torch.bfloat16),
    (128, 2, 64, 64, torch.bfloat16),
]


@cuda_only
@pytest.mark.parametrize("case", CUDA_CASES, ids=_case_id)
def test_real_shapes_on_cuda(case, device):
    B, H, N, d, dtype = case
    qkv, grad_out = _inputs(B, H, N, d, dtype, device)
    out, _, grad_qkv = _kernel_forward_backward(qkv, grad_out, H, d**-0.5)
    exact_out, exact_grad = _reference(qkv, grad_out, H, torch.float64)
    eager_out, eager_grad = _reference(qkv, grad_out, H)
    _assert_close("out", out, eager_out, exact_out)
    _assert_close("grad_qkv", grad_qkv, eager_grad, exact_grad)


@cuda_only
@pytest.mark.parametrize("d", [64, 128])
def test_dropout_real_shape_on_cuda(d, device):
    B, H, N, p = 16, 4, 256, 0.1
    qkv, grad_out = _inputs(B, H, N, d, torch.bfloat16, device)
    seed = _seed(2024, device)
    out, _, grad_qkv = _kernel_forward_backward(qkv, grad_out, H, d**-0.5, p, seed)
    mask = tri.dropout_mask(seed, B, H, N, p, device)
    rate = tri.dropout_threshold(p) / 256
    assert abs(mask.double().mean().item() - (1 - rate)) < 5 * math.sqrt(p * (1 - p) / mask.numel())
    exact_out, exact_grad = _reference(qkv, grad_out, H, torch.float64, dropout_p=p, dropout_mask=mask)
    eager_out, eager_grad = _reference(qkv, grad_out, H, dropout_p=p, dropout_mask=mask)
    _assert_close("out", out, eager_out, exact_out)
    _assert_close("grad_qkv", grad_qkv, eager_grad, exact_grad)
