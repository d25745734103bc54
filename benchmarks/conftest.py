"""Shared benchmark setup: device choice, Triton interpreter on CPU, and correct device timing.

Use the `measure` fixture instead of calling `benchmark` directly:
    measure(fn, flops=..., bytes_moved=..., items=...)
It synchronises the device inside each timed call (so CUDA work is counted, not just launched), warms up first,
and records in extra_info: TFLOP/s and GB/s (and their fraction of the device's peak on a known GPU), items/s
(e.g. images/s), the device name and the torch/triton versions.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.peaks import device_peaks  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def measure(benchmark):
    def run(fn, *, flops=None, bytes_moved=None, items=None, dtype=None, rounds=None, warmup=3):
        def timed():
            fn()
            _sync()

        for _ in range(warmup):
            timed()
        if rounds is None:
            benchmark(timed)
        else:
            benchmark.pedantic(timed, rounds=rounds, iterations=1)
        seconds = benchmark.stats.stats.median
        info = benchmark.extra_info
        info["device"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
        info["torch"] = torch.__version__
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
        peaks = device_peaks(dtype)
        if flops is not None:
            info["tflops"] = flops / seconds / 1e12
            if peaks.get("tflops"):
                info["fraction_of_peak_flops"] = info["tflops"] / peaks["tflops"]
        if bytes_moved is not None:
            info["gbps"] = bytes_moved / seconds / 1e9
            if peaks.get("gbps"):
                info["fraction_of_peak_bandwidth"] = info["gbps"] / peaks["gbps"]
        if items is not None:
            info["items_per_s"] = items / seconds
        return info

    return run
