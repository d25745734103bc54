"""Shared benchmark setup: device choice, Triton interpreter on CPU, correct device timing, a ratio summary.

Use the `measure` fixture instead of calling `benchmark` directly:
    measure(fn, flops=..., bytes_moved=..., items=..., backend="triton")
It synchronises the device inside each timed call (so CUDA work is counted, not just launched), warms up first,
and records in extra_info: TFLOP/s and GB/s (and their fraction of the device's peak on a known GPU), items/s
(e.g. images/s), the device name and the torch/triton versions.

Quick mode (CCT_BENCH_QUICK=1, the default without a GPU; see peaks.quick_mode): a call without `rounds` gets
as many rounds as fit in about QUICK_SECONDS (at least one) instead of pytest-benchmark's calibration, which
would run a multi-second step at least 5 times.

With CCT_BENCH_JSONL=<path>, each finished benchmark is appended to that file as one JSON line, so a run cut
short by a time limit (benchmarks/gpu_report.py) keeps what it measured.

At the end, benchmarks that name their backend (measure(..., backend=...) or extra_info["backend"]) are
summarised per case: median time and speedup against eager and against torch.compile ("compile").
"""
import json
import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.peaks import device_peaks, quick_mode  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = quick_mode()
QUICK_SECONDS = 2.0
_RESULTS = []  # (group, case key, backend, median seconds, items/s) for the summary at the end
_MEASURED = pytest.StashKey()  # a test's benchmark fixture and case key, read back at teardown


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def cuda_graph_ms(fn, replays: int = 20) -> float:
    """Milliseconds per replay of `fn` captured in a CUDA graph: the device time without launch overhead.

    Raises when `fn` cannot be captured (host syncs, CPU-side randomness, allocation patterns); callers
    record the error instead.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def quick():
    return QUICK


def _case_key(node) -> str:
    """The benchmark's name without its backend parameter: the set of runs a speedup compares."""
    params = dict(getattr(getattr(node, "callspec", None), "params", {}))
    params.pop("backend", None)
    return node.originalname + "[" + "-".join(f"{v}" for v in params.values()) + "]"


@pytest.fixture
def measure(benchmark, request):
    def run(fn, *, flops=None, bytes_moved=None, items=None, dtype=None, rounds=None, warmup=3, backend=None):
        def timed():
            fn()
            _sync()

        started = time.perf_counter()
        last = 0.0
        for _ in range(warmup):
            t0 = time.perf_counter()
            timed()
            last = time.perf_counter() - t0
        warmup_s = time.perf_counter() - started
        if rounds is None and QUICK:
            rounds = max(1, min(20, int(QUICK_SECONDS / max(last, 1e-6)))) if warmup else 1
        if getattr(benchmark, "disabled", False):  # --benchmark-disable: run once as a test, no stats
            benchmark(timed)
            return {}
        if rounds is None:
            benchmark(timed)
        else:
            benchmark.pedantic(timed, rounds=rounds, iterations=1)
        seconds = benchmark.stats.stats.median
        info = benchmark.extra_info
        info["device"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
        info["torch"] = torch.__version__
        info["warmup_s"] = warmup_s
        info["quick"] = QUICK
        if backend is not None:
            info["backend"] = backend
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
        request.node.stash[_MEASURED] = (benchmark, _case_key(request.node))
        return info

    return run


def pytest_runtest_teardown(item):
    """After the test body (which may add to extra_info): remember the result, append it to CCT_BENCH_JSONL."""
    if _MEASURED in item.stash:
        benchmark, case = item.stash[_MEASURED]
        stats = benchmark.stats.stats
        info = dict(benchmark.extra_info)
        if info.get("backend") is not None:
            _RESULTS.append((benchmark.group or "", case, info["backend"], stats.median, info.get("items_per_s")))
        path = os.environ.get("CCT_BENCH_JSONL")
        if path:
            record = {"name": item.name, "fullname": item.nodeid, "group": benchmark.group,
                      "params": getattr(getattr(item, "callspec", None), "params", None),
                      "stats": {k: getattr(stats, k) for k in ("min", "max", "mean", "median", "stddev", "rounds")},
                      "extra_info": info}
            with open(path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")


def pytest_terminal_summary(terminalreporter):
    """Speedups of each backend against eager and torch.compile, per benchmark case."""
    if not _RESULTS:
        return
    cases = {}
    for group, case, backend, median, items_per_s in _RESULTS:
        cases.setdefault((group, case), {})[backend] = (median, items_per_s)
    write = terminalreporter.write_line
    terminalreporter.section("cct_kernels: speedup per case (median time; >1 is faster)")
    write(f"{'case':<58} {'backend':<8} {'ms':>10} {'items/s':>10} {'vs eager':>9} {'vs compile':>10}")
    for (group, case), by_backend in cases.items():
        eager = by_backend.get("eager", (None,))[0]
        compiled = by_backend.get("compile", (None,))[0]
        for backend, (median, items_per_s) in by_backend.items():
            vs_eager = f"{eager / median:.2f}x" if eager else "-"
            vs_compile = f"{compiled / median:.2f}x" if compiled else "-"
            rate = f"{items_per_s:.1f}" if items_per_s else "-"
            write(f"{(group or case)[:58]:<58} {backend:<8} {median * 1e3:>10.3f} {rate:>10} {vs_eager:>9} "
                  f"{vs_compile:>10}")
