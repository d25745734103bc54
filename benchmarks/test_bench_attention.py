"""Attention benchmarks: eager reference, torch.compile of it, torch SDPA per backend that runs, and every kernel
backend of cct_kernels that can serve the shape, forward and forward+backward.

On CUDA: B=128 H=4 N=256 d=64 (CCT-7/3x1 at 32x32), B=64 H=6 N=196 and N=576 d=64 (CCT-14/7x2 at 224 and at
384), in bf16. On CPU: one small shape in fp32, without the Triton interpreter (a test aid, not a speed path).
SDPA backends are probed once on the benchmark's device and dtype; only those that run become parameters.

FLOP count (stated, flash-attention's convention): forward 4*B*H*N^2*d (QK^T and PV, 2 flops per multiply-add);
backward 10*B*H*N^2*d (QK^T recomputed, dV, dP, dQ, dK); forward+backward 14*B*H*N^2*d = 3.5x forward.
Bytes (what a fused kernel must move through HBM): forward reads qkv and writes out and lse; backward reads qkv,
out, dout and lse, writes dqkv and reads/writes delta. extra_info holds TFLOP/s, GB/s and, on a GPU of known peaks,
the two floors (floor_bytes_us, floor_flops_us: benchmarks/conftest.py); see benchmarks/NOTES.md, "## attention".

    pytest benchmarks/test_bench_attention.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.speed_paths import kernel_backends, row_function

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
HEAD_DIM = 64
SHAPES = {  # name -> (B, H, N)
    "cuda": {"B128_H4_N256": (128, 4, 256), "B64_H6_N196": (64, 6, 196), "B64_H6_N576": (64, 6, 576)},
    "cpu": {"B2_H4_N256": (2, 4, 256)},
}[DEVICE.type]
SDPA = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}


def _qkv(B, H, N, requires_grad=False):
    return torch.randn(B, N, 3 * H * HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)


def _sdpa(which):
    """Attention on packed qkv through torch SDPA restricted to one backend (views in, merged heads out)."""
    def attention(qkv, num_heads):
        B, N, _ = qkv.shape
        q, k, v = qkv.unflatten(-1, (3, num_heads, HEAD_DIM)).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(SDPA[which]):
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(B, N, num_heads * HEAD_DIM)

    return attention


def _sdpa_runs(which) -> bool:
    """Whether this SDPA backend runs forward and backward at every benchmark shape (batch 1) here."""
    try:
        for _, H, N in SHAPES.values():
            qkv = _qkv(1, H, N, requires_grad=True)
            _sdpa(which)(qkv, H).sum().backward()
        return True
    except RuntimeError:  # "No available kernel", or a backend not built for this device
        return False


BACKENDS = ["eager", "compile"] + [name for name in SDPA if _sdpa_runs(name)] + kernel_backends(
    "attention", [(_qkv(1, H, N), H, HEAD_DIM**-0.5, 0.0) for _, H, N in SHAPES.values()], DEVICE)


def _fn(backend):
    return _sdpa(backend) if backend in SDPA else row_function("attention", backend)


def flops(B, H, N, backward):
    return (14 if backward else 4) * B * H * N * N * HEAD_DIM


def bytes_moved(B, H, N, backward, size=None):
    size = size or torch.finfo(DTYPE).bits // 8
    tokens = B * N * H * HEAD_DIM  # elements of one of q, k, v, out
    forward = 4 * tokens * size + B * H * N * 4  # qkv, out; lse (fp32)
    # backward: qkv, out, dout in, dqkv out; lse read, delta written and read (fp32)
    return forward + (8 * tokens * size + 3 * B * H * N * 4 if backward else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_attention(measure, mode, shape, backend):
    B, H, N = SHAPES[shape]
    backward = mode == "forward_backward"
    qkv = _qkv(B, H, N, requires_grad=backward)
    fn = _fn(backend)
    if backward:
        grad_out = torch.randn(B, N, H * HEAD_DIM, device=DEVICE, dtype=DTYPE)

        def step():
            return torch.autograd.grad(fn(qkv, H), qkv, grad_out)
    else:
        def step():
            with torch.no_grad():
                return fn(qkv, H)

    work, moved = flops(B, H, N, backward), bytes_moved(B, H, N, backward)
    info = measure(step, flops=work, bytes_moved=moved, items=B, dtype=DTYPE)
    info["backend"], info["shape"], info["dtype"] = backend, shape, str(DTYPE)
