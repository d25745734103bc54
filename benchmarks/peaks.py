"""Peak throughput of known devices, for the floors in benchmarks/NOTES.md and the fractions in extra_info.

Dense tensor-core TFLOP/s (no sparsity) and HBM GB/s from NVIDIA's data sheets (SXM parts).
"""
import torch

_PEAKS = {
    "H100": {"gbps": 3350.0, "tflops": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 67.0}},
    "H200": {"gbps": 4800.0, "tflops": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 67.0}},
}


def device_peaks(dtype=None) -> dict:
    """{"gbps": ..., "tflops": ...} for the current CUDA device if known (tflops for `dtype`), else {}."""
    if not torch.cuda.is_available():
        return {}
    name = torch.cuda.get_device_name()
    for key, peaks in _PEAKS.items():
        if key in name:
            return {"gbps": peaks["gbps"], "tflops": peaks["tflops"].get(dtype or torch.bfloat16)}
    return {}
