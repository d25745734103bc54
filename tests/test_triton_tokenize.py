"""Triton tokenizer stage (cct_kernels/triton/tokenize.py) against the eager reference in float64.

Tolerance rule (DESIGN.md): the kernel's error against float64 may be at most 2x the error of the same-dtype eager
reference against float64, plus a small floor. On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py);
bf16 runs there too (the kernel multiplies bf16 values in fp32 under the interpreter, exact products either way).
"""
import pytest
import torch
import torch.nn.functional as F

from cct_kernels import backends, ops, reference
from cct_kernels.triton import tokenize as triton_tokenize
from tests.cases import check_backward_takes_any_layout, check_two_stages_channels_last

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# name: (B, C_in, H, W, C_out, kernel, stride, padding, pool, relu, bias, to_tokens)
CASES = {
    # CCT k3 s1 p1 tokenizers: RGB stage (flat K) and a second stage (per-tap K, C_in >= 16), odd sizes.
    "k3_rgb_33x31": (2, 3, 33, 31, 20, 3, 1, 1, (3, 2, 1), True, False, True),
    "k3_stage2_9x10": (1, 24, 9, 10, 40, 3, 1, 1, (3, 2, 1), True, False, True),
    # CCT k7 s2 p3 tokenizers (224/384 models) at small odd sizes: RGB stage to NCHW, then a 2nd stage to tokens.
    "k7_rgb_30x30_nchw": (2, 3, 30, 30, 16, 7, 2, 3, (3, 2, 1), True, False, False),
    "k7_stage2_15x13": (1, 20, 15, 13, 24, 7, 2, 3, (3, 2, 1), True, False, True),
    # ViT-Lite/CVT patch embedding: k4 s4 p0 with bias, no ReLU, no pool.
    "patch4_bias_nopool": (2, 3, 32, 32, 36, 4, 4, 0, None, False, True, True),
}
# General kernel/stride/padding/pool, fp32 only (keeps the interpreter time down).
GENERAL = {
    "pool2_no_relu_bias_nchw": (1, 5, 17, 15, 12, 3, 2, 1, (2, 2, 0), False, True, False),
    "pool5_s3_p2_k5": (2, 4, 21, 19, 18, 5, 1, 2, (5, 3, 2), True, False, True),
    "pool_stride_gt_kernel": (1, 3, 16, 16, 16, 3, 1, 0, (2, 3, 1), True, True, True),
    "k1_wide_channels": (1, 48, 7, 9, 70, 1, 1, 0, (3, 2, 1), True, False, True),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Uninitialised buffers start as NaN (floats) or an impossible window offset (int8), so gaps show."""
    real = triton_tokenize._empty

    def poisoned(*shape, device, dtype, **kwargs):
        t = real(*shape, device=device, dtype=dtype, **kwargs)
        return t.fill_(float("nan") if dtype.is_floating_point else 127)

    monkeypatch.setattr(triton_tokenize, "_empty", poisoned)


def _inputs(case, dtype, device):
    B, C_in, H, W, C_out, k, *_ , has_bias, _tokens = case
    x = torch.randn(B, C_in, H, W, device=device).to(dtype)
    weight = (torch.randn(C_out, C_in, k, k, device=device) * (2 / (C_in * k * k)) ** 0.5).to(dtype)
    bias = torch.randn(C_out, device=device).to(dtype) if has_bias else None
    return x, weight, bias


def _kwargs(case):
    *_, stride, padding, pool, relu, _bias, to_tokens = case
    return dict(stride=stride, padding=padding, pool=pool, relu=relu, to_tokens=to_tokens)


def _run(fn, x, weight, bias, grad_out):
    """fn's output and the gradients of (output * grad_out).sum() w.r.t. x, weight (and bias)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = fn(*leaves) if bias is not None else fn(*leaves, None)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _check_against_reference(case, dtype, device):
    x, weight, bias = _inputs(case, dtype, device)
    kw = _kwargs(case)
    exact_out = reference.tokenize(x.double(), weight.double(), None if bias is None else bias.double(), **kw)
    grad_out = torch.randn(exact_out.shape, device=device).to(dtype)
    as64 = [t.double() if t is not None else None for t in (x, weight, bias, grad_out)]
    exact = _run(lambda *a: reference.tokenize(*a, **kw), *as64)
    eager = _run(lambda *a: reference.tokenize(*a, **kw), x, weight, bias, grad_out)
    got = _run(lambda *a: ops.tokenize(*a, **kw, backend="triton"), x, weight, bias, grad_out)
    for name, g, e, r in zip(("out", "grad_x", "grad_weight", "grad_bias"), got, eager, exact):
        assert g.dtype == dtype and g.shape == r.shape, (name, g.dtype, g.shape, r.shape)
        assert not g.isnan().any(), f"{name}: NaN in the kernel's result (an element left unwritten?)"
        scale = max(1.0, r.abs().max().item())
        err = (g.double() - r).abs().max().item()
        allowed = 2 * (e.double() - r).abs().max().item() + FLOOR[dtype] * scale
        assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} (eager error x2 + floor)"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_cct_stages_match_float64(case, dtype, device):
    _check_against_reference(CASES[case], dtype, device)


@pytest.mark.parametrize("case", list(GENERAL), ids=str)
def test_general_shapes_match_float64(case, device):
    _check_against_reference(GENERAL[case], torch.float32, device)


def test_pool_index_is_the_window_offset_of_the_max(device):
    """Where the output is positive, pool_index is max_pool2d's argmax as a row-major offset in its window."""
    case = CASES["k3_rgb_33x31"][:11] + (False,)  # NCHW output
    x, weight, _ = _inputs(case, torch.float32, device)
    out, index = triton_tokenize.forward(x, weight, None, 1, 1, True, 3, 2, 1, False)
    conv = F.relu(F.conv2d(x, weight, padding=1))
    pooled, flat = F.max_pool2d(conv, 3, 2, 1, return_indices=True)
    Wo = conv.shape[-1]
    rows = torch.arange(pooled.shape[-2], device=device).view(-1, 1) * 2 - 1
    cols = torch.arange(pooled.shape[-1], device=device).view(1, -1) * 2 - 1
    expected = (flat // Wo - rows) * 3 + (flat % Wo - cols)
    positive = pooled > 0
    assert index.dtype == torch.int8 and index.shape == out.shape
    assert positive.float().mean() > 0.5
    assert torch.equal(index[positive].long(), expected[positive])
    torch.testing.assert_close(out, pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["k3_rgb_33x31", "k7_stage2_15x13", "patch4_bias_nopool"], ids=str)
def test_nan_input_propagates_like_the_reference(case, device):
    """A NaN pixel makes NaN exactly where the reference has NaN (pool: max_pool2d lets NaN win; no pool: the
    conv); everything else matches. A strict running max (acc > best from -inf) never took a NaN."""
    x, weight, bias = _inputs(CASES[case], torch.float32, device)
    x[0, 0, 2, 3] = float("nan")
    kw = _kwargs(CASES[case])
    grad_out = torch.ones_like(reference.tokenize(x, weight, bias, **kw))
    expected = _run(lambda *a: reference.tokenize(*a, **kw), x, weight, bias, grad_out)
    got = _run(lambda *a: ops.tokenize(*a, **kw, backend="triton"), x, weight, bias, grad_out)
    assert expected[0].isnan().any()
    for name, g, e in zip(("out", "grad_x", "grad_weight", "grad_bias"), got, expected):
        # ReLU passes the gradient at a NaN output (torch's threshold_backward keeps only out <= 0 at zero)
        assert torch.equal(g.isnan(), e.isnan()), name
        torch.testing.assert_close(g.nan_to_num(0.0), e.nan_to_num(0.0), rtol=1e-5, atol=1e-5, msg=name)


def test_permuted_weight_is_cached_until_the_weight_changes(device):
    """The launcher permutes a weight once while it is unchanged; an in-place update (optimizer step) is seen."""
    case = CASES["k3_stage2_9x10"]
    x, weight, _ = _inputs(case, torch.float32, device)
    kw = _kwargs(case)
    first = triton_tokenize._weight_taps(weight)
    assert triton_tokenize._weight_taps(weight) is first
    with torch.no_grad():
        weight.mul_(-1.0)
    assert triton_tokenize._weight_taps(weight) is not first
    out = ops.tokenize(x, weight, **kw, backend="triton")
    torch.testing.assert_close(out, reference.tokenize(x, weight, **kw), rtol=1e-5, atol=1e-5)


def test_unsupported_cases_give_reasons(device):
    x, weight, _ = _inputs(CASES["k3_rgb_33x31"], torch.float32, device)
    with pytest.raises(backends.BackendUnavailable, match="int8"):
        ops.tokenize(x, weight, stride=1, padding=1, pool=(13, 2, 6), backend="triton")
    x64, w64 = x.double(), weight.double()
    with pytest.raises(backends.BackendUnavailable, match="float32, float16 and bfloat16"):
        ops.tokenize(x64, w64, stride=1, padding=1, backend="triton")


def test_opcheck(device):
    case = CASES["k3_stage2_9x10"]
    x, weight, _ = _inputs(case, torch.float32, device)
    x.requires_grad_()
    weight.requires_grad_()
    args = (x, weight, None, 1, 1, True, 3, 2, 1, True)
    torch.library.opcheck(torch.ops.cct_kernels.tokenize_forward.default, (*args, "triton"))
    out, index = triton_tokenize.forward(*(a.detach() if torch.is_tensor(a) else a for a in args))
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.cct_kernels.tokenize_backward.default,
        (grad_out, x.detach(), weight.detach(), None, out, index, *args[3:], True, "triton"),
    )


def test_torch_compile_fullgraph_two_stages_with_backward(device):
    x, w1, _ = _inputs((1, 3, 16, 14, 16, 3, 1, 1, (3, 2, 1), True, False, False), torch.float32, device)
    w2 = torch.randn(20, 16, 3, 3, device=device) * (2 / 144) ** 0.5

    def tokenizer(x, w1, w2, tokenize):
        y = tokenize(x, w1, None, stride=1, padding=1, to_tokens=False)
        return tokenize(y, w2, None, stride=1, padding=1, to_tokens=True)

    compiled = torch.compile(
        lambda x, w1, w2: tokenizer(x, w1, w2, lambda *a, **k: ops.tokenize(*a, **k, backend="triton")),
        fullgraph=True,
    )
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    out = compiled(*leaves)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    ref = tokenizer(*ref_leaves, reference.tokenize)
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for got, expected in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-4)


class _KernelSpy:
    """Stands in for a @triton.jit kernel: records each launch's first argument, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.first_args = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.first_args.append(args[0])
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_two_stages_pass_the_activation_channels_last_without_a_copy(monkeypatch, device):
    """Stage 1 (to_tokens=False) returns a channels-last (B, C, H, W) tensor; stage 2 hands it to the kernel as it
    is (no transpose), and its gradient comes back to stage 1 channels-last; values and gradients match float64
    (tests/cases.py)."""
    x = torch.randn(2, 3, 10, 9, device=device)
    w1 = torch.randn(16, 3, 3, 3, device=device) * (2 / 27) ** 0.5
    w2 = torch.randn(20, 16, 3, 3, device=device) * (2 / 144) ** 0.5  # C_in 16: the per-tap channels-last path
    spy = _KernelSpy(triton_tokenize._forward_kernel)
    monkeypatch.setattr(triton_tokenize, "_forward_kernel", spy)
    y, leaves = check_two_stages_channels_last(lambda *a, **k: ops.tokenize(*a, **k, backend="triton"), x, w1, w2,
                                               dict(stride=1, padding=1), dict(stride=1, padding=1),
                                               torch.randn(2, 9, 20, device=device))
    assert [a.data_ptr() for a in spy.first_args] == [leaves[0].data_ptr(), y.data_ptr()]  # stage 2 read y in place


def test_backward_takes_the_gradient_in_the_layout_it_gets(device):
    """grad_out of a channels-last NCHW output: channels-last, row-major, or a strided slice (copied, since its
    positions have no single stride) all give the same gradients; so does a row-major out and pool_index."""
    x = torch.randn(1, 16, 9, 10, device=device)
    weight = torch.randn(12, 16, 3, 3, device=device) * (2 / 144) ** 0.5
    out, index = triton_tokenize.forward(x, weight, None, 1, 1, True, 3, 2, 1, False)
    check_backward_takes_any_layout(
        out, index, lambda g, o, i: triton_tokenize.backward(g, x, weight, None, o, i, 1, 1, True, 3, 2, 1, False))


def _meta_stage(c_in, c_out, k, stride, padding, size, dtype=torch.bfloat16, batch=64):
    x = torch.empty(batch, c_in, size, size, dtype=dtype, device="meta")
    weight = torch.empty(c_out, c_in, k, k, dtype=dtype, device="meta")
    return x, weight, None, stride, padding, True, 3, 2, 1, False


@pytest.mark.parametrize("stage,declined", [
    ((64, 384, 7, 2, 3, 56), True),   # cct_14_7x2_224 stage 2: compute bound, 2.25x recompute loses to cuDNN
    ((64, 384, 7, 2, 3, 96), True),   # cct_14_7x2_384 stage 2
    ((3, 64, 7, 2, 3, 224), False),   # the 224 models' RGB stem: eager's 112x112x64 round trips cost more
    ((3, 256, 3, 1, 1, 32), False),   # cct_7_3x1_32 stem
    ((64, 128, 3, 1, 1, 16), False),  # cct_7_3x2_32 stage 2
], ids=str)
def test_auto_keeps_cudnn_where_the_floors_say_it_wins(stage, declined):
    """auto passes over triton (to the cuda backend's cuDNN conv, or eager) exactly where the fused kernel's H100
    floor is above cuDNN's; backend="triton" by name still gets triton."""
    inputs = _meta_stage(*stage)
    fused, eager = triton_tokenize.floors(*inputs[:2], *inputs[3:5], *inputs[6:9])
    assert (fused > eager) == declined
    assert (triton_tokenize.auto_declines(*inputs) is not None) == declined
    cuda = torch.device("cuda")  # select() needs only the device type: meta tensors stand in for CUDA ones
    fallback = "cuda" if backends.unsupported_reason("cuda", "tokenize", cuda, *inputs) is None else "eager"
    assert backends.select("tokenize", "auto", cuda, *inputs) == (fallback if declined else "triton")
    assert backends.select("tokenize", "triton", cuda, *inputs) == "triton"


def test_a_declined_stage_still_runs_when_triton_is_named(device):
    """float32 with many input channels: exact FMA products at 2.25x the conv lose to cuDNN (auto declines it),
    but backend="triton" computes it, and correctly."""
    case = CASES["k7_stage2_15x13"]
    x, weight, _ = _inputs(case, torch.float32, device)
    kw = _kwargs(case)
    assert triton_tokenize.auto_declines(x, weight, None, 2, 3, True, 3, 2, 1, True) is not None
    out = ops.tokenize(x, weight, **kw, backend="triton")
    torch.testing.assert_close(out, reference.tokenize(x, weight, **kw), rtol=1e-5, atol=1e-5)
