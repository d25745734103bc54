"""SeqPool benchmarks: eager vs torch.compile of the reference vs every kernel backend that can run here.

On CUDA: the model shapes (B=128, N=256, D=256: CCT-7/3x1 at 32x32; B=64, N=196, D=384: CCT-14/7x2 at 224) in
bf16. On CPU: the same N and D at batch 8 in fp32 (5 rounds), without the Triton interpreter (it is a test aid, not a
speed path). Forward and forward+backward. extra_info holds GB/s (bytes_moved below) and, on a GPU of
known peaks, floor_us, the time the bytes take at its peak bandwidth (benchmarks/conftest.py; NOTES.md "## seqpool").

    pytest benchmarks/test_bench_seqpool.py --benchmark-only
"""
import pytest
import torch

from benchmarks.speed_paths import kernel_backends, row_function

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BATCH = {"cuda": (128, 64), "cpu": (8, 8)}[DEVICE.type]
SHAPES = {f"B{b}_N{n}_D{d}": (b, n, d) for b, (n, d) in zip(BATCH, [(256, 256), (196, 384)])}


def _inputs(B, N, D):
    x = torch.randn(B, N, D, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(1, D, device=DEVICE, dtype=DTYPE) * D**-0.5
    bias = torch.zeros(1, device=DEVICE, dtype=DTYPE)
    return x, weight, bias


BACKENDS = ["eager", "compile"] + kernel_backends("seqpool", [_inputs(1, n, d) for _, n, d in SHAPES.values()],
                                                  DEVICE)


def _bytes(B, N, D, backward):
    """HBM traffic of a fused kernel: read x (and write out); backward reads x again and writes dx."""
    size = torch.finfo(DTYPE).bits // 8
    forward = (B * N * D + B * D) * size
    return forward + (2 * B * N * D + 2 * B * D) * size if backward else forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_seqpool(measure, mode, shape, backend):
    B, N, D = SHAPES[shape]
    x, weight, bias = _inputs(B, N, D)
    fn = row_function("seqpool", backend)
    backward = mode == "forward_backward"
    if backward:
        for t in (x, weight, bias):
            t.requires_grad_()
        grad_out = torch.randn(B, D, device=DEVICE, dtype=DTYPE)

        def step():
            out = fn(x, weight, bias)
            return torch.autograd.grad(out, (x, weight, bias), grad_out)
    else:
        def step():
            with torch.no_grad():
                return fn(x, weight, bias)

    moved = _bytes(B, N, D, backward)
    rounds = None if DEVICE.type == "cuda" else 5  # CPU: a smoke run of every backend, not a speed figure
    info = measure(step, flops=(13 if backward else 4) * B * N * D, bytes_moved=moved, items=B, dtype=DTYPE,
                   rounds=rounds)
    info["backend"], info["shape"], info["dtype"] = backend, shape, str(DTYPE)
