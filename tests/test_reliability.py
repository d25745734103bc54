"""Reliability of every kernel backend that runs here: randomised equivalence with the reference (hypothesis),
numerical edge cases, and no memory growth over many calls."""
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cct_kernels
from cct_kernels import backends, ops, reference
from tests.cases import DEVICE, RUNNABLE, assert_close_to_reference, backends_serving_model

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# Randomised: fresh examples every run (a failure prints the falsifying example and a @reproduce_failure blob to
# replay it; failing examples are also replayed first on the next local run from .hypothesis/).
# CCT_HYPOTHESIS_EXAMPLES overrides the number of examples per op and backend.
EXAMPLES = int(os.environ.get("CCT_HYPOTHESIS_EXAMPLES", "25"))
settings.register_profile(
    "cct-kernels", max_examples=EXAMPLES, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SETTINGS = settings.get_profile("cct-kernels")


def pairs(op):
    return [b for o, b in RUNNABLE if o == op]


def check_against_reference(run_kernel, run_reference, inputs):
    """Forward and backward of the kernel vs the float64 reference, with the same-dtype eager error as the bar."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]
    leaves64 = [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                else t for t in inputs]
    leaves_eager = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                    else t for t in inputs]
    outs = [run_kernel(*leaves), run_reference(*leaves64), run_reference(*leaves_eager)]
    grad = torch.randn_like(outs[1])
    for out, args in zip(outs, (leaves, leaves64, leaves_eager)):
        out.backward(grad.to(out.dtype))
    assert_close_to_reference(outs[0], outs[1].detach(), outs[2].detach(), "forward")
    for i, (a, a64, ae) in enumerate(zip(leaves, leaves64, leaves_eager)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert_close_to_reference(a.grad, a64.grad, ae.grad, f"grad of input {i}", factor=3.0)


def exact_conv_inputs(x_shape, weight_shape, bias: bool, dtype):
    """(x, weight, bias or None) with values in {-1, 0, 1} (weight and bias / 8): every conv output is a multiple of
    1/8 below 32 (C_in * k * k <= 245 here), exact in float16 and bfloat16, so each pool window's argmax, and the
    gradient's route, is the float64 reference's. With random values a backend that rounds the conv output before
    pooling (cuDNN, then the cuda backend's pool pass) routes near-ties elsewhere than float64 does, and so does the
    same-dtype eager reference, each differently."""
    def draw(shape, scale):
        return (torch.randint(-1, 2, shape, device=DEVICE).to(dtype)) * scale

    return draw(x_shape, 1.0), draw(weight_shape, 0.125), draw(weight_shape[:1], 0.125) if bias else None


def random_tensor(shape, dtype, transposed=False):
    if transposed:  # same values, a non-contiguous layout
        return torch.randn(*shape[:-2], shape[-1], shape[-2], device=DEVICE, dtype=dtype).transpose(-1, -2)
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("backend", pairs("seqpool"))
@SETTINGS
@given(B=st.integers(1, 3), N=st.integers(1, 70), D=st.integers(1, 100), dtype=st.sampled_from(DTYPES),
       transposed=st.booleans())
def test_seqpool_random(backend, B, N, D, dtype, transposed):
    x = random_tensor((B, N, D), dtype, transposed)
    w, b = random_tensor((1, D), dtype), random_tensor((1,), dtype)
    assume(backends.unsupported_reason(backend, "seqpool", DEVICE, x, w, b) is None)
    check_against_reference(lambda *a: ops.seqpool(*a, backend=backend), reference.seqpool, [x, w, b])


@pytest.mark.parametrize("backend", pairs("seqpool"))
# seeds with rows where dx centred on a float16 rounding of the output kept p_n g.(out_exact - out) w: 6x eager's error
@pytest.mark.parametrize("seed", [30, 110, 117, 207])
def test_seqpool_half_dx_is_centred_on_the_exact_output(backend, seed):
    torch.manual_seed(seed)
    inputs = [torch.randn(3, 28, 92), torch.randn(1, 92), torch.randn(1)]
    x, w, b = [t.half().to(DEVICE).requires_grad_() for t in inputs]
    out = ops.seqpool(x, w, b, backend=backend)
    grad = torch.randn(out.shape).half().to(DEVICE)
    (dx,) = torch.autograd.grad(out, x, grad)
    x64, w64, b64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    (dx64,) = torch.autograd.grad(reference.seqpool(x64, w64, b64), x64, grad.double())
    xe = x.detach().clone().requires_grad_()
    (dxe,) = torch.autograd.grad(reference.seqpool(xe, w.detach(), b.detach()), xe, grad)
    assert_close_to_reference(dx, dx64, dxe, "dx", factor=3.0)


@pytest.mark.parametrize("backend", pairs("attention"))
@SETTINGS
@given(B=st.integers(1, 2), H=st.integers(1, 3), d=st.sampled_from([16, 32, 64, 80]), N=st.integers(1, 130),
       dtype=st.sampled_from(DTYPES))
def test_attention_random(backend, B, H, d, N, dtype):
    qkv = random_tensor((B, N, 3 * H * d), dtype)
    assume(backends.unsupported_reason(backend, "attention", DEVICE, qkv, H, d**-0.5, 0.0) is None)
    check_against_reference(lambda q: ops.attention(q, H, backend=backend), lambda q: reference.attention(q, H),
                            [qkv])


@pytest.mark.parametrize("backend", pairs("tokenize"))
@SETTINGS
@given(B=st.integers(1, 2), c_in=st.integers(1, 5), c_out=st.integers(1, 20), h=st.integers(5, 20),
       w=st.integers(5, 20), k=st.sampled_from([1, 3, 5, 7]), stride=st.integers(1, 2), data=st.data(),
       pool=st.booleans(), relu=st.booleans(), to_tokens=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_tokenize_random(backend, B, c_in, c_out, h, w, k, stride, data, pool, relu, to_tokens, bias, dtype):
    padding = data.draw(st.integers(0, k // 2))
    assume((h + 2 * padding - k) // stride + 1 >= 2 and (w + 2 * padding - k) // stride + 1 >= 2)
    if dtype == torch.float32:
        x, weight = random_tensor((B, c_in, h, w), dtype), random_tensor((c_out, c_in, k, k), dtype)
        b = random_tensor((c_out,), dtype) if bias else None
    else:  # exact conv outputs: see exact_conv_inputs
        x, weight, b = exact_conv_inputs((B, c_in, h, w), (c_out, c_in, k, k), bias, dtype)
    pool_args = (3, 2, 1) if pool else None
    params = dict(stride=stride, padding=padding, relu=relu, pool=pool_args, to_tokens=to_tokens)
    pk, ps, pp = pool_args or (0, 1, 0)
    assume(backends.unsupported_reason(backend, "tokenize", DEVICE, x, weight, b, stride, padding, relu, pk, ps, pp,
                                       to_tokens) is None)
    inputs = [x, weight] + ([b] if bias else [])

    def run(fn):
        return lambda x, weight, b=None: fn(x, weight, b, **params)

    check_against_reference(run(lambda *a, **kw: ops.tokenize(*a, **kw, backend=backend)), run(reference.tokenize),
                            inputs)


@pytest.mark.parametrize("backend", pairs("attention"))
def test_attention_large_logits_do_not_overflow(backend):
    dtype = torch.float16
    qkv = random_tensor((1, 64, 3 * 2 * 32), dtype) * 12  # logits in the thousands: exp overflows fp16 naively
    out = ops.attention(qkv, 2, backend=backend)
    ref = reference.attention(qkv.double(), 2)
    assert torch.isfinite(out).all()
    # a float32 computation rounded once to float16: within one float16 ulp of the output's scale
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2.0**-10 * ref.abs().max().item())


@pytest.mark.parametrize("backend", pairs("seqpool"))
def test_seqpool_large_scores_and_nan_propagation(backend):
    x = random_tensor((2, 50, 16), torch.float16) * 100
    w, b = random_tensor((1, 16), torch.float16), random_tensor((1,), torch.float16)
    out = ops.seqpool(x, w, b, backend=backend)
    assert torch.isfinite(out).all()
    x[0, 3, 5] = float("nan")
    out, ref = ops.seqpool(x, w, b, backend=backend), reference.seqpool(x.double(), w.double(), b.double())
    assert torch.equal(out.isnan(), ref.isnan())


@pytest.mark.parametrize("backend", pairs("attention"))
def test_attention_nan_propagates_like_the_reference(backend):
    qkv = random_tensor((1, 20, 3 * 16), torch.float32)
    qkv[0, 4, 0] = float("nan")  # a query element: only that row becomes NaN
    out, ref = ops.attention(qkv, 1, backend=backend), reference.attention(qkv.double(), 1)
    assert torch.equal(out.isnan(), ref.isnan())


@pytest.mark.parametrize("backend", pairs("attention"))
def test_attention_long_sequence_batch_one(backend):
    N = 4096 if DEVICE.type == "cuda" else 1024  # the interpreter is slow; the GPU runs the full length
    qkv = random_tensor((1, N, 3 * 16), torch.float32).requires_grad_()
    qkv64 = qkv.detach().double().requires_grad_()
    grad = torch.randn(1, N, 16, device=DEVICE)
    out, ref = ops.attention(qkv, 1, backend=backend), reference.attention(qkv64, 1)
    out.backward(grad)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, rtol=1e-4, atol=1e-4 * qkv64.grad.abs().max().item())


def _resident_bytes():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _serving_training():
    """Backends that serve cct_2_3x2_32 in train mode (dropout on) here; not triton under the slow interpreter."""
    model, x = cct_kernels.cct_2_3x2_32().to(DEVICE), torch.randn(2, 3, 32, 32, device=DEVICE)
    return [b for b in backends_serving_model(model, x, train=True)
            if b != "auto" and (b != "triton" or DEVICE.type == "cuda")]


@pytest.mark.parametrize("backend", _serving_training())
def test_no_memory_growth_over_many_calls(backend):
    model = cct_kernels.cct_2_3x2_32(backend=backend).to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    for _ in range(20):
        step()
    before = _resident_bytes()
    for _ in range(300):
        step()
    growth = _resident_bytes() - before
    assert growth < (1 << 20 if DEVICE.type == "cuda" else 16 << 20), f"grew by {growth / 2**20:.1f} MiB"


def test_deterministic_mode_declines_the_atomic_backward():
    """Every backward is deterministic except the cuda attention's (dQ by atomics): under
    torch.use_deterministic_algorithms(True) that backend declines, so auto picks a deterministic one."""
    from cct_kernels.extension import attention as extension_attention

    qkv = torch.randn(2, 8, 3 * 2 * 64, dtype=torch.float16)
    assert extension_attention.unsupported(qkv, 2, 0.125, 0.0, backend="cuda") is None
    torch.use_deterministic_algorithms(True)
    try:
        assert "deterministic" in extension_attention.unsupported(qkv, 2, 0.125, 0.0, backend="cuda")
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("op,backend", RUNNABLE)
def test_same_inputs_same_bits(op, backend):
    from tests.cases import sample

    fn, args = sample(op)
    runs = []
    for _ in range(2):
        leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                  else a for a in args]
        out = fn(*leaves, backend)[0]
        out.backward(torch.ones_like(out))
        runs.append([out.detach()] + [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _allocated(fn):
    from cct_kernels.profiling import allocated_bytes

    with torch.inference_mode():
        return allocated_bytes(fn, DEVICE)


@pytest.mark.parametrize("backend", pairs("attention"))
def test_attention_never_allocates_the_score_matrix(backend):
    B, H, N, d = 2, 2, 512, 32
    qkv = random_tensor((B, N, 3 * H * d), torch.float32)
    scores = B * H * N * N * 4
    eager = _allocated(lambda: ops.attention(qkv, H, backend="eager"))
    assert eager >= scores  # the measure does see the matrix in eager
    fused = _allocated(lambda: ops.attention(qkv, H, backend=backend))
    assert fused < scores / 2 and fused < eager / 4, (fused, scores, eager)


@pytest.mark.parametrize("backend", pairs("tokenize"))
def test_tokenize_allocates_less_than_eager(backend):
    x, w = random_tensor((2, 3, 32, 32), torch.float32), random_tensor((64, 3, 3, 3), torch.float32)
    activation = 2 * 64 * 32 * 32 * 4  # the full-resolution conv output
    eager = _allocated(lambda: ops.tokenize(x, w, stride=1, padding=1, backend="eager"))
    fused = _allocated(lambda: ops.tokenize(x, w, stride=1, padding=1, backend=backend))
    assert eager >= 2 * activation and fused < eager
    if backend == "triton":  # fully fused: the conv activation never exists
        assert fused < activation


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_attention_reference_is_finite_near_the_float16_max(dtype):
    """|q . k| far beyond 65504: half-precision scores would be inf and the softmax NaN; the reference computes
    scores and softmax in float32, as the kernels do, and matches the float64 computation."""
    qkv = (torch.rand(2, 12, 3 * 2 * 16) * 2 - 1) * 3e4
    qkv = qkv.to(dtype)
    out = reference.attention(qkv, 2, scale=0.25)
    ref = reference.attention(qkv.double(), 2, scale=0.25)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    torch.testing.assert_close(ops.attention(qkv, 2, scale=0.25, backend="eager"), out, rtol=0, atol=0)


def test_float32_attention_reference_is_the_official_computation():
    qkv = torch.randn(2, 9, 3 * 3 * 8)
    q, k, v = qkv.reshape(2, 9, 3, 3, 8).permute(2, 0, 3, 1, 4)
    official = ((q @ k.transpose(-2, -1)) * 8**-0.5).softmax(dim=-1) @ v
    assert torch.equal(reference.attention(qkv, 3), official.transpose(1, 2).reshape(2, 9, 24))


@pytest.mark.parametrize("backend", pairs("seqpool"))
def test_seqpool_half_gradients_are_centred_on_the_exact_output(backend):
    """The backward centres the score gradients on the forward output, which the op keeps in float32: centred on a
    float16 rounding of it, dw and db carried g.(out_exact - out) (several times eager's error at D ~ 50-100, which
    hypothesis found)."""
    for seed in range(12):
        torch.manual_seed(seed)
        x = random_tensor((2, 50, 96), torch.float16)
        w, b = random_tensor((1, 96), torch.float16), random_tensor((1,), torch.float16)
        check_against_reference(lambda *a: ops.seqpool(*a, backend=backend), reference.seqpool, [x, w, b])
