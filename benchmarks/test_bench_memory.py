"""Memory of the fused paths against eager: bytes each op allocates per forward, at the CCT-7/3x1 shapes.

extra_info["allocated_mb"]: on CUDA the peak allocation above the start, on CPU the sum of the allocations
torch.profiler records (cct_kernels.profiling.allocated_bytes). Eager writes the full-resolution conv activation
(then ReLU and pool copies) and the N x N attention scores; the fused kernels should not (tests/test_reliability.py
asserts it). The time is recorded too, with the allocation measured outside the timed calls.

    pytest benchmarks/test_bench_memory.py --benchmark-only
"""
import pytest
import torch

from benchmarks.speed_paths import kernel_backends
from cct_kernels import ops
from cct_kernels.profiling import allocated_bytes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
B = 128 if DEVICE.type == "cuda" else 8


def _tensor(*shape, scale=1.0):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE) * scale


# CCT-7/3x1 at 32x32: stem 3->256 k3, then 256 tokens of 256 = 4 heads of 64.
STEM = (_tensor(B, 3, 32, 32), _tensor(256, 3, 3, 3, scale=0.27))
QKV = _tensor(B, 256, 3 * 256)
POOLED = (_tensor(B, 256, 256), _tensor(1, 256, scale=0.06), _tensor(1))
# op -> (call(backend), the arguments backends' unsupported() takes)
CASES = {
    "tokenize": (lambda backend: ops.tokenize(*STEM, stride=1, padding=1, backend=backend),
                 (*STEM, None, 1, 1, True, 3, 2, 1, True)),
    "attention": (lambda backend: ops.attention(QKV, 4, backend=backend), (QKV, 4, 0.125, 0.0)),
    "seqpool": (lambda backend: ops.seqpool(*POOLED, backend=backend), POOLED),
}
PARAMS = [(op, backend) for op, (_, support_args) in CASES.items()
          for backend in ["eager"] + kernel_backends(op, [support_args], DEVICE)]


@pytest.mark.parametrize("op,backend", PARAMS)
def test_memory(op, backend, measure, benchmark):
    benchmark.group = f"memory {op} B{B}"
    call = CASES[op][0]
    with torch.inference_mode():
        allocated = allocated_bytes(lambda: call(backend), DEVICE)
        info = measure(lambda: call(backend), backend=backend, rounds=5)
    info["allocated_mb"] = allocated / 2**20
