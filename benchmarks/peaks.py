"""Device facts for the benchmarks: peak throughput of known GPUs, and whether to run the quick suite.

Dense tensor-core TFLOP/s (no sparsity) and HBM GB/s from NVIDIA's data sheets. More specific names come first
("H100 PCIe" before "H100", whose default is the SXM part).
"""
import os

import torch

_PEAKS = {
    "H100 PCIe": {"gbps": 2000.0, "tflops": {torch.bfloat16: 756.0, torch.float16: 756.0, torch.float32: 51.0}},
    "H100 NVL": {"gbps": 3900.0, "tflops": {torch.bfloat16: 835.0, torch.float16: 835.0, torch.float32: 60.0}},
    "H100": {"gbps": 3350.0, "tflops": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 67.0}},
    "H200": {"gbps": 4800.0, "tflops": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 67.0}},
    "A100": {"gbps": 2039.0, "tflops": {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 19.5}},
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


def quick_mode() -> bool:
    """CCT_BENCH_QUICK=1 (the default without a GPU): few rounds for slow cases, smaller 224px throughput batches.

    A 2-core CPU needs minutes per training step of CCT-14 at batch 64; the quick suite keeps the whole
    `pytest benchmarks --benchmark-only` run to minutes. CCT_BENCH_QUICK=0 runs the full suite anywhere.
    """
    default = "0" if torch.cuda.is_available() else "1"
    return os.environ.get("CCT_BENCH_QUICK", default) == "1"
