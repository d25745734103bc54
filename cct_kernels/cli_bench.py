"""`cct-kernels bench` and `cct-kernels profile`: timing and profiling a model per backend, tables, JSON, PNG.

The parser and its validation live in cct_kernels.cli; the functions here receive already-checked arguments.
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from cct_kernels import profiling

# Default timing budget per (backend, mode): about 2 minutes for the default bench on a 2-core CPU, compile
# included; a GPU iteration is milliseconds, so a few seconds give hundreds of rounds.
MIN_TIME = {"cpu": 15.0, "cuda": 3.0}
WARMUP = {"cpu": 1, "cuda": 10}
TABLE_WIDTH = 120


# --------------------------------------------------------------------------------------------------- environment
def versions() -> dict:
    """Versions of Python, torch (and its CUDA), triton and cct_kernels."""
    import cct_kernels

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cct_kernels": cct_kernels.__version__, "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return f"{_cpu_model()}, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------------- tables
def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table, columns left-aligned for text and right-aligned for numbers."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def numeric(i):
        return all(r[i].replace(".", "").replace("x", "").replace("e-", "").replace("-", "").replace("%", "")
                   .isdigit() or r[i] == "-" for r in rows)

    right = [numeric(i) and i > 0 for i in range(len(headers))]
    line = lambda cells: "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r).rstrip() for r in rows)])


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# --------------------------------------------------------------------------------------------------- bench
class _NoProgress:
    total = 0

    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(enabled: bool, desc: str, total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a nicety: without it the run is the same, just quieter
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit="round", disable=not enabled, leave=False, file=sys.stderr,
                dynamic_ncols=True)


def model_kwargs(args) -> dict:
    """The factory arguments the command line sets (only those given)."""
    return {} if args.dropout is None else {"dropout": args.dropout}


def _prepare(model_name, names, device, dtype, batch, kwargs) -> tuple[dict, dict]:
    """Build every backend's model and run its first inference call: (prepared models, setup errors).

    Logits come first, before training steps change the weights; eager's are the oracle for max_abs_diff.
    """
    prepared, errors, reference = {}, {}, None
    for name in names:
        print(f"  {name:<8} building, first call{' (compiles)' if profiling.compiles(name) else ''}",
              file=sys.stderr)
        try:
            model = profiling.build_model(model_name, name, device, dtype, **kwargs)
            inputs, labels = profiling.make_inputs(model, batch, device, dtype)
            t0 = time.perf_counter()
            logits = profiling.make_step(model, "inference", inputs, labels)()
            profiling.synchronize(device)
            first_s = time.perf_counter() - t0
        except Exception as e:  # reported in the table: one backend's failure must not end the run
            errors[name] = profiling.error_text(e)
            continue
        if name == "eager":
            reference = logits
        diff = profiling.max_abs_diff(logits, reference) if reference is not None else None
        prepared[name] = {"model": model, "inputs": inputs, "labels": labels, "first_s": first_s, "diff": diff}
    return prepared, errors


def _warm_up(prepared: dict, mode: str, device, warmup: int) -> tuple[dict, dict, dict, dict]:
    """(steps, one call's time per step, warm-up seconds per step, errors of steps that failed to warm up)."""
    steps, estimates, warmup_s, errors = {}, {}, {}, {}
    for name, p in prepared.items():
        if not profiling.runs_mode(name, mode):
            continue
        try:
            step = profiling.make_step(p["model"], mode, p["inputs"], p["labels"])
            # The first inference call already warmed (and for "compile" compiled) the inference step.
            calls = max(0, warmup - 1) if mode == "inference" else max(1, warmup)
            started, last = time.perf_counter(), p["first_s"]
            for _ in range(calls):
                t0 = time.perf_counter()
                step()
                profiling.synchronize(device)
                last = time.perf_counter() - t0
            steps[name], estimates[name], warmup_s[name] = step, last, time.perf_counter() - started
        except Exception as e:
            errors[name] = profiling.error_text(e)
    return steps, estimates, warmup_s, errors


def run_bench(model_name, device, dtype, batch, names, modes, *, warmup, rounds, min_time, progress,
              model_kwargs=None) -> list[dict]:
    """Time every (backend, mode), the backends interleaved round by round; one result dict each. model_kwargs go
    to the model factory (profiling.build_model).

    A failing backend yields its error in its row, not an exception. Each row has min/median/... over rounds
    (profiling.Timing.summary), images_per_s and tflops from the median, and speedups against eager and compile.
    """
    flops = {mode: profiling.model_flops(model_name, batch, mode) for mode in modes}
    prepared, setup_errors = _prepare(model_name, names, device, dtype, batch, model_kwargs or {})
    results = []
    for mode in modes:
        steps, estimates, warmup_s, errors = _warm_up(prepared, mode, device, warmup)
        bar = _progress(progress, f"{mode}: {len(steps)} backends per round", rounds or 0)
        timings = profiling.time_interleaved(
            steps, device, estimates_s=estimates, rounds=rounds, min_time=min_time, on_round=bar.update)
        bar.close()
        for name in names:
            if not profiling.runs_mode(name, mode):
                continue
            p = prepared.get(name, {})
            result = {"backend": name, "mode": mode, "batch": batch, "max_abs_diff": p.get("diff"),
                      "first_call_s": p.get("first_s"), "error": setup_errors.get(name) or errors.get(name)}
            timing = timings.get(name)
            if isinstance(timing, Exception):
                result["error"] = profiling.error_text(timing)
            elif timing is not None:
                timing.warmup_s = warmup_s[name]
                result.update(timing.summary())
                result["images_per_s"] = batch / (timing.median_ms / 1e3)
                result["tflops"] = flops[mode] / (timing.median_ms / 1e3) / 1e12
            results.append(result)
            status = result["error"] or f"median {result['median_ms']:.2f} ms, min {result['min_ms']:.2f} ms"
            print(f"  {name:<8} {mode:<9} {status}", file=sys.stderr)
    _add_speedups(results)
    return results


def _add_speedups(results: list[dict]):
    for mode in {r["mode"] for r in results}:
        times = {r["backend"]: r.get("median_ms") for r in results if r["mode"] == mode and not r["error"]}
        for r in results:
            if r["mode"] != mode or r["error"]:
                continue
            for base, key in (("eager", "speedup_vs_eager"), (profiling.COMPILE, "speedup_vs_compile")):
                r[key] = times[base] / r["median_ms"] if times.get(base) else None


def bench_table(results: list[dict]) -> str:
    headers = ["backend", "mode", "min ms", "median ms", "spread", "images/s", "TFLOP/s", "vs eager", "vs compile",
               "max|diff|", "note"]
    rows = []
    for r in results:
        if r["error"]:
            rows.append([r["backend"], r["mode"], "-", "-", "-", "-", "-", "-", "-", _fmt(r["max_abs_diff"], ".1e"),
                         _shorten(f"FAILED {r['error']}", 45)])
            continue
        rows.append([
            r["backend"], r["mode"], f"{r['min_ms']:.2f}", f"{r['median_ms']:.2f}", f"{r['spread_pct']:.0f}%",
            f"{r['images_per_s']:.1f}", f"{r['tflops']:.3f}",
            _fmt(r.get("speedup_vs_eager"), ".2f") + ("x" if r.get("speedup_vs_eager") else ""),
            _fmt(r.get("speedup_vs_compile"), ".2f") + ("x" if r.get("speedup_vs_compile") else ""),
            _fmt(r["max_abs_diff"], ".1e"), f"{r['rounds']} rounds, first call {r['first_call_s']:.1f} s",
        ])
    return render_table(headers, rows)


def bench_chart(results: list[dict], title: str, path: Path):
    """Bar chart of images/s per backend, one panel per mode; a failed backend shows as an empty bar."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; also keeps tests headless
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in results))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in results if r["mode"] == mode]
        values = [r.get("images_per_s") or 0.0 for r in rows]
        bars = ax.bar([r["backend"] for r in rows], values, color=["#888888" if r["backend"] == "eager" else
                                                                     "#4477aa" for r in rows])
        labels = ["failed" if r["error"] else f"{v:.0f}\n{r.get('speedup_vs_eager') or 0:.2f}x"
                  for r, v in zip(rows, values)]
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.set_title(mode)
        ax.set_ylabel("images/s (median round; higher is better)")
        ax.margins(y=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_bench(args) -> int:
    """Time the model on each backend, print the table, write JSON + PNG into --out; 1 if any row failed."""
    device, dtype, batch, names, modes = args.device, args.dtype, args.batch, args.backends, args.modes
    warmup = WARMUP[device.type] if args.warmup is None else args.warmup
    min_time = MIN_TIME[device.type] if args.min_time is None else args.min_time
    print(f"bench {args.model}: batch {batch}, {profiling.dtype_name(dtype)}, {device} "
          f"({device_name(device)}), modes {', '.join(modes)}, backends {', '.join(names)}, interleaved in rounds",
          file=sys.stderr)
    started = datetime.datetime.now(datetime.timezone.utc)
    kwargs = model_kwargs(args)
    results = run_bench(args.model, device, dtype, batch, names, modes, warmup=warmup, rounds=args.rounds,
                        min_time=min_time, progress=not args.no_progress, model_kwargs=kwargs)
    elapsed = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    settings = "".join(f", {key} {value:g}" for key, value in kwargs.items())
    title = f"{args.model}{settings}, batch {batch}, {profiling.dtype_name(dtype)} on {device_name(device)}"
    print(f"\n{title}\n" + bench_table(results))
    settled = "\n(each right after an untimed call of its own)" if device.type == "cpu" else ""
    print(f"\nEach round times every backend once, in rotating order{settled}; min / median over rounds; spread: "
          "interquartile\nrange over the median. vs eager / vs compile: speedup of the median; max|diff|: largest "
          f"logit\ndifference from eager (same weights and images). Took {elapsed:.0f} s.")

    tags = "".join(f"_{key}{value:g}" for key, value in kwargs.items())
    json_path, png_path = (args.out / f"bench_{args.model}{tags}_{device.type}_{profiling.dtype_name(dtype)}.{suffix}"
                           for suffix in ("json", "png"))
    report = {
        "command": args.command_line, "date": started.isoformat(timespec="seconds"), "elapsed_s": elapsed,
        "device": {"type": device.type, "name": device_name(device)}, "versions": versions(),
        "config": {"model": args.model, "model_kwargs": kwargs, "batch": batch, "dtype": profiling.dtype_name(dtype),
                   "modes": modes, "backends": names, "warmup": warmup, "rounds": args.rounds, "min_time_s": min_time,
                   "timing": "interleaved rounds: each round times every backend once, in rotating order"
                             + (", each timed call right after an untimed call of the same backend"
                                if device.type == "cpu" else "")},
        "results": results,
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    try:
        bench_chart(results, title, png_path)
        print(f"wrote {json_path} and {png_path}")
    except ImportError as e:  # matplotlib is optional: the JSON still holds everything
        print(f"wrote {json_path} (no chart: {e})")
    failed = [f"{r['backend']} {r['mode']}" for r in results if r["error"]]
    if failed:
        print(f"error: {len(failed)} of {len(results)} rows failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------- profile
def profile_table(entries: list[dict]) -> str:
    """One backend's top ops: rank, op (shortened to fit TABLE_WIDTH columns), self ms, calls, MB allocated and
    freed by the op itself (not its children)."""
    headers = ["#", "op", "self ms", "calls", "alloc MB", "freed MB"]
    rows = [[str(i + 1), e["name"], f"{e['self_ms']:.2f}", str(e["count"]), _fmt(e["allocated_mb"], ".1f"),
             _fmt(e["freed_mb"], ".1f")] for i, e in enumerate(entries)]
    others = sum(max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                 for i, h in enumerate(headers) if i != 1)
    width = TABLE_WIDTH - others - 2 * (len(headers) - 1)
    for row in rows:
        row[1] = _shorten(row[1], width)
    return render_table(headers, rows)


def cmd_profile(args) -> int:
    """Profile each backend with torch.profiler: print its top ops, write Chrome traces and a JSON summary."""
    device, dtype, batch, names, modes = args.device, args.dtype, args.batch, args.backends, args.modes
    by = args.by or ("kernels" if device.type == "cuda" else "ops")
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 5)
    iters = args.iters or (1 if device.type == "cpu" else 5)
    summary, written, failed = {}, [], 0
    for mode in modes:
        tables, errors = {}, {}
        for name in names:
            print(f"  profiling {name} {mode} ...", file=sys.stderr)
            try:
                model = profiling.build_model(args.model, name, device, dtype, **model_kwargs(args))
                step = profiling.make_step(model, mode, *profiling.make_inputs(model, batch, device, dtype))
                trace = args.out / f"trace_{args.model}_{name}_{mode}.json.gz"  # gzip: a GPU step's is ~10 MB
                prof = profiling.profile_step(step, device, warmup=warmup, iters=iters, trace_path=trace)
                tables[name] = profiling.top_ops(prof, device, args.top, by=by)
                written.append(trace)
            except Exception as e:
                errors[name] = profiling.error_text(e)
        print(f"\n{args.model} {mode}, batch {batch}, {profiling.dtype_name(dtype)} on {device_name(device)}: "
              f"top {args.top} {by} by self time over {iters} step(s)")
        for name, entries in tables.items():
            print(f"\n{name}\n{profile_table(entries)}")
        for name, error in errors.items():
            print(f"\n{name}: FAILED {error}")
        failed += len(errors)
        summary[mode] = {"top": tables, "errors": errors}
    path = args.out / f"profile_{args.model}_{device.type}.json"
    path.write_text(json.dumps(
        {"command": args.command_line, "model": args.model, "batch": batch, "dtype": profiling.dtype_name(dtype),
         "device": device_name(device), "iters": iters, "by": by, "versions": versions(), "modes": summary},
        indent=2) + "\n")
    print("\nwrote " + "\n      ".join(str(p) for p in [path, *written]))
    return 1 if failed else 0
