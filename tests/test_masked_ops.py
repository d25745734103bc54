"""Key-padding masks through ops.attention and ops.seqpool on every backend that serves them here: against float64,
with random lengths including 0, 1 and N, forward and backward, no NaN anywhere (padded rows included)."""
import re

import pytest
import torch

from cct_kernels import backends, ops, reference
from cct_kernels.backends import BackendUnavailable
from tests.cases import DEVICE


def _serves_masks(backend):
    """Whether `backend` runs masked attention (at some head dim and dtype it serves: the cuda kernel takes float16
    and bfloat16 at head dim 64 only) and masked SeqPool here (a small sample with lengths)."""
    lengths = torch.tensor([3, 1], device=DEVICE)
    x, w, b = torch.randn(2, 4, 8, device=DEVICE), torch.randn(1, 8, device=DEVICE), torch.randn(1, device=DEVICE)
    samples = [torch.randn(2, 4, 3 * 2 * d, device=DEVICE, dtype=dtype)
               for d, dtype in ((8, torch.float32), (64, torch.float16))]
    return (any(backends.unsupported_reason(backend, "attention", DEVICE, qkv, 2, 0.25, 0.0, lengths) is None
                for qkv in samples)
            and backends.unsupported_reason(backend, "seqpool", DEVICE, x, w, b, lengths) is None)


KERNELS_HERE = [b for b in backends.KERNEL_BACKENDS if backends.availability(DEVICE)[b] is None]
MASK_BACKENDS = ["eager"] + [b for b in KERNELS_HERE if _serves_masks(b)]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _lengths(batch, n, generator):
    lengths = torch.randint(0, n + 1, (batch,), generator=generator)
    lengths[:3] = torch.tensor([0, 1, n])[: batch]
    return lengths.to(DEVICE)


def _serves_attention(backend, head_dim, dtype):
    """Whether `backend` runs masked attention at this head dim and dtype (triton's tiles stop at head dim 128)."""
    qkv = torch.empty(2, 3, 3 * 2 * head_dim, device=DEVICE, dtype=dtype)
    lengths = torch.tensor([3, 1], device=DEVICE)
    return backend == "eager" or backends.unsupported_reason(
        backend, "attention", DEVICE, qkv, 2, head_dim**-0.5, 0.0, lengths) is None


# Every served (backend, head dim, dtype): the text models' head dims 75 (300 / 4) and 150 among them.
ATTENTION_CASES = [
    pytest.param(backend, head_dim, dtype, id=f"{backend}-d{head_dim}-{str(dtype).split('.')[-1]}")
    for backend in MASK_BACKENDS
    for head_dim in (32, 64, 75, 150)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    if _serves_attention(backend, head_dim, dtype)
]


@pytest.mark.parametrize("backend, head_dim, dtype", ATTENTION_CASES)
def test_masked_attention_against_float64(backend, head_dim, dtype):
    generator = torch.Generator().manual_seed(head_dim)
    B, N, H = 5, 37, 2
    lengths = _lengths(B, N, generator)
    qkv = torch.randn(B, N, 3 * H * head_dim, generator=generator).to(DEVICE, dtype).requires_grad_()
    out = ops.attention(qkv, H, mask=lengths, backend=backend)
    grad = torch.randn(out.shape, generator=generator).to(DEVICE, dtype)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    q64 = qkv.detach().double().requires_grad_()
    mask = torch.arange(N, device=DEVICE)[None] < lengths[:, None]
    ref = reference.attention(q64, H, mask=mask)
    (dref,) = torch.autograd.grad(ref, q64, grad.double())
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    scale = TOL[dtype] * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=scale * 4)
    torch.testing.assert_close(dqkv.double(), dref, rtol=0, atol=TOL[dtype] * 4 * max(1.0, dref.abs().max().item()))
    assert out[0].abs().max() == 0 and dqkv[0].abs().max() == 0  # length 0: zeros


@pytest.mark.parametrize("backend", MASK_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masked_seqpool_against_float64(backend, dtype):
    generator = torch.Generator().manual_seed(7)
    B, N, D = 6, 70, 48
    lengths = _lengths(B, N, generator)
    x = torch.randn(B, N, D, generator=generator).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(1, D, generator=generator) / D**0.5).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(1, generator=generator).to(DEVICE, dtype).requires_grad_()
    out = ops.seqpool(x, w, b, mask=lengths, backend=backend)
    grad = torch.randn(out.shape, generator=generator).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (x, w, b), grad)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    mask = torch.arange(N, device=DEVICE)[None] < lengths[:, None]
    ref = reference.seqpool(x64, w64, b64, mask=mask)
    refs = torch.autograd.grad(ref, (x64, w64, b64), grad.double())
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=TOL[dtype] * 4)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=TOL[dtype] * 8 * max(1.0, r.abs().max().item()))
    assert out[0].abs().max() == 0 and grads[0][0].abs().max() == 0


DROPOUT_SAMPLE = (torch.randn(2, 20, 3 * 2 * 16, device=DEVICE), torch.tensor([20, 20], device=DEVICE))


@pytest.mark.parametrize("backend", [b for b in MASK_BACKENDS if b != "eager" and backends.unsupported_reason(
    b, "attention", DEVICE, DROPOUT_SAMPLE[0], 2, 0.25, 0.3, DROPOUT_SAMPLE[1]) is None])
def test_dropout_with_padding_drops_what_the_unpadded_kernel_drops(backend):
    """Lengths restrict the keys; the dropout mask of the remaining probabilities is the one without lengths."""
    qkv, lengths = DROPOUT_SAMPLE
    torch.manual_seed(3)
    masked = ops.attention(qkv, 2, dropout_p=0.3, mask=lengths, backend=backend)
    torch.manual_seed(3)
    plain = ops.attention(qkv, 2, dropout_p=0.3, backend=backend)
    torch.testing.assert_close(masked, plain, rtol=0, atol=0)


# Kernel backends that decline a masked attention call here: a backend without masked kernels, or one whose tiles
# stop below the head dim (triton: 128 < 150).
DECLINED = [pytest.param(backend, head_dim, id=f"{backend}-d{head_dim}") for backend in KERNELS_HERE
            for head_dim in (32, 150) if not _serves_attention(backend, head_dim, torch.float32)]


@pytest.mark.parametrize("backend, head_dim", DECLINED)
def test_a_backend_declining_a_masked_call_says_why_and_auto_falls_back(backend, head_dim):
    qkv, lengths = torch.randn(2, 4, 3 * 2 * head_dim, device=DEVICE), torch.tensor([3, 1], device=DEVICE)
    reason = backends.unsupported_reason(backend, "attention", DEVICE, qkv, 2, head_dim**-0.5, 0.0, lengths)
    with pytest.raises(BackendUnavailable, match=re.escape(reason)):
        ops.attention(qkv, 2, mask=lengths, backend=backend)
    mask = torch.arange(4, device=DEVICE)[None] < lengths[:, None]
    torch.testing.assert_close(ops.attention(qkv, 2, mask=lengths), reference.attention(qkv, 2, mask=mask))


def test_a_mask_with_holes_runs_on_eager_only():
    qkv = torch.randn(2, 6, 24, device=DEVICE)
    holes = torch.tensor([[True, False, True, True, False, False]] * 2, device=DEVICE)
    expected = reference.attention(qkv, 2, mask=holes)
    torch.testing.assert_close(ops.attention(qkv, 2, mask=holes), expected)
    kernel = next((b for b in MASK_BACKENDS if b != "eager"), None)
    if kernel is not None:
        with pytest.raises(BackendUnavailable, match="not a prefix"):
            ops.attention(qkv, 2, mask=holes, backend=kernel)


def test_a_prefix_bool_mask_reaches_the_kernels_as_lengths(monkeypatch):
    kernel = next((b for b in MASK_BACKENDS if b != "eager"), None)
    if kernel is None:
        pytest.skip("no kernel backend serves masks here")
    seen = []
    module = backends.kernel_module(kernel, "seqpool")
    original = module.forward
    monkeypatch.setattr(module, "forward", lambda *args: seen.append(args[3]) or original(*args))
    x, w, b = torch.randn(3, 5, 8, device=DEVICE), torch.randn(1, 8, device=DEVICE), torch.randn(1, device=DEVICE)
    mask = torch.arange(5, device=DEVICE)[None] < torch.tensor([5, 2, 1], device=DEVICE)[:, None]
    ops.seqpool(x, w, b, mask=mask, backend=kernel)
    assert seen and seen[0].tolist() == [5, 2, 1]
