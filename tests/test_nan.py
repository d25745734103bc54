"""NaN in, NaN out exactly where the eager reference has NaN (issue 13 item 5, issue 17), for every backend.

The reference (torch) propagates NaN through conv, ReLU and max_pool2d (a window holding a NaN pools to NaN), and
through attention's and SeqPool's softmax (a NaN score poisons its whole softmax row). A kernel that pools with a
strict `v > best` from -inf, or clamps with max(v, 0), turns NaN into a finite value or -inf: a silently wrong
answer. Each case plants NaN in one input (or in grad_out) and checks the output and every gradient: NaN at the
same positions as the reference, and the finite values close to it (their accuracy is tested elsewhere; the
tolerance here only catches NaN turned into a wrong number). "cuda" runs where a GPU and the CUDA extension exist,
and is reported as skipped (with the reason) elsewhere.
"""
import pytest
import torch

from cct_kernels import backends, ops, reference

NAN = float("nan")
BACKENDS = ["eager", "cpu", "triton", "cuda"]


def _device(backend: str) -> torch.device:
    """The device that `backend` runs on here; skips (with the reason) a backend this machine cannot run."""
    if backend in ("eager", "cpu"):
        device = torch.device("cpu")
    elif backend == "triton":  # a GPU, else the interpreter on CPU tensors (conftest sets TRITON_INTERPRET)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if not torch.cuda.is_available():
            pytest.skip("backend 'cuda' needs a GPU")
        device = torch.device("cuda")
    reason = None if backend == "eager" else backends.availability(device)[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} is not available: {reason}")
    return device


def _run(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> with respect to every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def assert_same_nan(name, got, ref, tol):
    got, ref = got.detach().cpu().float(), ref.detach().cpu().float()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    nan_got, nan_ref = got.isnan(), ref.isnan()
    if not torch.equal(nan_got, nan_ref):
        missing = (nan_ref & ~nan_got).nonzero()[:3].tolist()
        extra = (nan_got & ~nan_ref).nonzero()[:3].tolist()
        raise AssertionError(
            f"{name}: NaN at {int(nan_got.sum())} positions, the reference at {int(nan_ref.sum())}; "
            f"finite where the reference is NaN (first): {missing} (values {got[nan_ref & ~nan_got][:3].tolist()}); "
            f"NaN where the reference is finite (first): {extra}"
        )
    torch.testing.assert_close(got[~nan_ref], ref[~nan_ref], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _check(backend, fn_backend, inputs, grad_out, names, tol):
    """Compare output and gradients of `fn_backend` (on the backend's device) with the eager reference on CPU."""
    device = _device(backend)
    dtype = inputs[0].dtype
    ref = _run(lambda *a: fn_backend(*a, backend="eager"), [t.float() for t in inputs], grad_out.float())
    got = _run(lambda *a: fn_backend(*a, backend=backend), [t.to(device) for t in inputs],
               grad_out.to(device, dtype))
    assert ref[0].isnan().any() or grad_out.isnan().any(), "the planted NaN must reach the reference's output"
    for name, g, r in zip(("out", *names), got, ref):
        assert_same_nan(name, g, r, tol)


# --------------------------------------------------------------------------------------------------- tokenize
# (C_in, kernel, stride, padding, relu, pool, to_tokens): the cpu backend's direct path (C_in*k*k <= 32) and its
# general path, the patch embedding (no ReLU, no pool), ReLU without pool, pool without ReLU, NCHW output.
TOKENIZE_STAGES = {
    "stem_rgb": (3, 3, 1, 1, True, (3, 2, 1), True),
    "stage_16ch": (16, 3, 1, 1, True, (3, 2, 1), True),
    "patch_embed": (3, 4, 4, 0, False, None, True),
    "relu_no_pool": (16, 3, 1, 1, True, None, True),
    "pool_no_relu_nchw": (16, 3, 1, 1, False, (3, 2, 1), False),
}


@pytest.mark.parametrize("where", ["x", "weight", "grad_out"])
@pytest.mark.parametrize("stage", list(TOKENIZE_STAGES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_tokenize_nan_matches_reference(backend, stage, where):
    # NaN is planted away from the zero padding: whether a convolution multiplies a padding zero by a NaN weight or
    # gradient (0 * NaN = NaN) depends on its algorithm (im2col does, implicit padding does not), in torch too.
    c_in, k, stride, padding, relu, pool, to_tokens = TOKENIZE_STAGES[stage]
    x, weight, bias = torch.randn(2, c_in, 12, 12), torch.randn(5, c_in, k, k) * 0.3, torch.randn(5)
    if where == "x":
        x[0, 1, 5, 6] = NAN  # a few conv outputs of image 0, all channels
    elif where == "weight":
        weight[2, 0, k // 2, k // 2] = NAN  # every conv output of channel 2 (the centre tap never meets padding)
    kwargs = dict(stride=stride, padding=padding, relu=relu, pool=pool)
    grad_nchw = torch.randn(reference.tokenize(x, weight, bias, **kwargs, to_tokens=False).shape)
    if where == "grad_out":
        hp, wp = grad_nchw.shape[2:]
        grad_nchw[0, 3, hp // 2, wp // 2] = NAN
        grad_nchw[1, 0, hp // 2 - 1, wp // 2] = NAN
    grad_out = grad_nchw.flatten(2).transpose(1, 2).contiguous() if to_tokens else grad_nchw

    def fn(x, weight, bias, backend):
        return ops.tokenize(x, weight, bias, **kwargs, to_tokens=to_tokens, backend=backend)

    _check(backend, fn, [x, weight, bias], grad_out, ("grad_x", "grad_weight", "grad_bias"), tol=1e-3)


# -------------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("where", ["q", "k", "v", "grad_out"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_nan_matches_reference(backend, where):
    # head dim 64, N = 70 (a partial second 64-block) and float16 on "cuda": the only case that kernel takes
    B, N, H, d = 2, 70, 2, 64
    dtype = torch.float16 if backend == "cuda" else torch.float32
    qkv = torch.randn(B, N, 3, H, d).to(dtype).float()  # representable in dtype: the same inputs for both sides
    part = {"q": 0, "k": 1, "v": 2}.get(where)
    if part is not None:
        qkv[1, 5, part, 1, 7] = NAN  # q: query 5 of head 1 of batch 1; k, v: all of head 1 of batch 1
    qkv = qkv.reshape(B, N, 3 * H * d).to(dtype)
    grad_out = torch.randn(B, N, H * d)
    if where == "grad_out":
        grad_out[0, 9, 3] = NAN

    def fn(qkv, backend):
        return ops.attention(qkv, H, backend=backend)

    tol = 2e-2 if dtype == torch.float16 else 1e-3
    _check(backend, fn, [qkv], grad_out.to(dtype).float(), ("grad_qkv",), tol=tol)


# ---------------------------------------------------------------------------------------------------- seqpool
# (B, N, D): a small case, and one whose rows the cpu kernel splits into sequence chunks (B below the thread count
# and N*D >= 2**18), so that the chunk merge also sees the NaN.
@pytest.mark.parametrize("where", ["x", "weight", "grad_out"])
@pytest.mark.parametrize("shape", [(3, 10, 24), (1, 1100, 256)], ids=["small", "chunked"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_seqpool_nan_matches_reference(backend, shape, where):
    B, N, D = shape
    x, weight, bias = torch.randn(B, N, D), torch.randn(1, D) * D**-0.5, torch.randn(1)
    if where == "x":
        x[B // 2, N - 3, 7] = NAN  # the score of one token: row B // 2's whole softmax
    elif where == "weight":
        weight[0, 5] = NAN
    grad_out = torch.randn(B, D)
    if where == "grad_out":
        grad_out[B // 2, 3] = NAN
    _check(backend, ops.seqpool, [x, weight, bias], grad_out, ("grad_x", "grad_weight", "grad_bias"), tol=1e-3)
