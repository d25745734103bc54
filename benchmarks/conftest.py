"""Shared benchmark setup: device choice, Triton interpreter on CPU, correct device timing, a ratio summary.

Use the `measure` fixture instead of calling `benchmark` directly:
    measure(fn, flops=..., bytes_moved=..., items=..., backend="triton")
It warms up first, then pytest-benchmark times each call with the device synchronised inside it: the per-call
wall time (launch overhead, Python and dispatch included), which is the benchmark's median. On CUDA it also
measures the device side, without a host sync per call, and records it in extra_info (milliseconds per call):
  loop_ms   CUDA events around LOOP_SECONDS of back-to-back calls, median of LOOP_REPEATS such loops: the time per
            call of a loop that keeps the GPU fed (launch overhead shows only where it exceeds the kernel time);
  graph_ms  per replay of the calls captured in a CUDA graph (measure(..., graph=True), the default for ops): the
            kernels' time without launch overhead; graph_error says why a call could not be captured;
  device_ms graph_ms when there is one, else loop_ms: the time the rates below are computed from.
Rates in extra_info (from device_ms on CUDA, from the wall time on CPU): TFLOP/s and GB/s, their fractions of the
device's peak (benchmarks/peaks.py), and the floors of benchmarks/NOTES.md: floor_bytes_us (bytes / peak HBM
bandwidth), floor_flops_us (FLOPs / peak tensor throughput), floor_us (the larger) and fraction_of_floor
(floor_us / device time: 1.0 is the speed of light), on a GPU whose peaks are known; items/s (e.g. images/s).
Also the device name and the torch/triton versions.

Quick mode (CCT_BENCH_QUICK=1, the default without a GPU; see peaks.quick_mode): a call without `rounds` gets
as many rounds as fit in about QUICK_SECONDS (at least one) instead of pytest-benchmark's calibration, which
would run a multi-second step at least 5 times.

Ordering: torch.compile rows (backend "compile", "compile-graphs", "compile-frozen", "compile:*" or "compile-graphs:*")
carry the marker `compile_row` and run after every other row, so a run cut short by a time limit keeps the kernel
rows; `-m "not compile_row"` / `-m compile_row` split them (benchmarks/gpu_report.py runs them as separate stages
with their own budgets).

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
from cct_kernels.profiling import error_text  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = quick_mode()
QUICK_SECONDS = 2.0
_RESULTS = []  # (group, case key, backend, median seconds, items/s) for the summary at the end
_MEASURED = pytest.StashKey()  # a test's benchmark fixture and case key, read back at teardown


LOOP_SECONDS = 0.02  # device time per back-to-back loop on CUDA (enough calls to hide event resolution)
LOOP_REPEATS = 5


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def loop_ms(fn, call_seconds: float, seconds: float = LOOP_SECONDS, repeats: int = LOOP_REPEATS) -> float:
    """Milliseconds per call of `fn` called back to back with no host sync, timed with CUDA events: the median
    over `repeats` loops of about `seconds` each (`call_seconds`, a synchronised call's wall time, sizes them).
    A call slower than `seconds` (a whole training step) gets 3 loops of 2 calls: event timing needs no more."""
    calls = max(2, min(1000, int(seconds / max(call_seconds, 1e-6))))
    repeats = repeats if call_seconds < seconds else 3
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


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


def _device_times(fn, call_seconds: float, graph: bool) -> dict:
    """loop_ms, graph_ms (or graph_error) and device_ms of `fn` on CUDA (see the module docstring)."""
    times = {"loop_ms": loop_ms(fn, call_seconds)}
    if graph:
        try:
            times["graph_ms"] = cuda_graph_ms(fn)
        except Exception as e:  # not every call is capturable; the loop timing still stands
            times["graph_error"] = error_text(e)[:200]
            torch.cuda.synchronize()
    times["device_ms"] = times.get("graph_ms", times["loop_ms"])
    return times


def rates(seconds: float, *, flops=None, bytes_moved=None, items=None, peaks=None) -> dict:
    """TFLOP/s, GB/s and items/s of a call taking `seconds`, with the fractions of `peaks` ({"gbps", "tflops"},
    benchmarks.peaks.device_peaks) and the NOTES.md floors (microseconds) when the peaks are known."""
    peaks, out, floors = peaks or {}, {}, []
    if flops is not None:
        out["tflops"] = flops / seconds / 1e12
        if peaks.get("tflops"):
            out["fraction_of_peak_flops"] = out["tflops"] / peaks["tflops"]
            out["floor_flops_us"] = flops / (peaks["tflops"] * 1e12) * 1e6
            floors.append(out["floor_flops_us"])
    if bytes_moved is not None:
        out["gbps"] = bytes_moved / seconds / 1e9
        if peaks.get("gbps"):
            out["fraction_of_peak_bandwidth"] = out["gbps"] / peaks["gbps"]
            out["floor_bytes_us"] = bytes_moved / (peaks["gbps"] * 1e9) * 1e6
            floors.append(out["floor_bytes_us"])
    if floors:
        out["floor_us"] = max(floors)
        out["fraction_of_floor"] = out["floor_us"] / (seconds * 1e6)
    if items is not None:
        out["items_per_s"] = items / seconds
    return out


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
    def run(fn, *, flops=None, bytes_moved=None, items=None, dtype=None, rounds=None, warmup=3, backend=None,
            graph=True):
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
        info["wall_ms"] = seconds * 1e3
        if DEVICE.type == "cuda":
            info.update(_device_times(fn, seconds, graph))
            seconds = info["device_ms"] / 1e3
        if backend is not None:
            info["backend"] = backend
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
        info.update(rates(seconds, flops=flops, bytes_moved=bytes_moved, items=items, peaks=device_peaks(dtype)))
        request.node.stash[_MEASURED] = (benchmark, _case_key(request.node))
        return info

    return run


def pytest_configure(config):
    config.addinivalue_line("markers", "compile_row: a torch.compile benchmark row (run after every other row)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    """Mark the torch.compile rows and move them after every other row (stable otherwise)."""
    def is_compile(item):
        backend = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        return isinstance(backend, str) and backend.startswith("compile")

    for item in items:
        if is_compile(item):
            item.add_marker(pytest.mark.compile_row)
    items.sort(key=is_compile)


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
