"""Command line: `cct-kernels` or `python -m cct_kernels` with subcommands info, bench, profile and train.

    python -m cct_kernels info                      # versions, devices, which backend runs where and why not
    python -m cct_kernels bench                     # the default model on every backend: table, JSON, PNG
    python -m cct_kernels bench --mode both --backends eager,compile,auto --batch 32
    python -m cct_kernels profile --top 15          # torch.profiler per backend: top ops, Chrome traces
    python -m cct_kernels train --epochs 10         # cct_2_3x2_32 on Fashion-MNIST, checkpoints, test accuracy

bench compares each backend with eager and with torch.compile of the eager model on the same weights and
images, checks its logits against eager's, and writes <out>/bench_<model>_<device>_<dtype>.{json,png}.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from cct_kernels import backends, profiling
from cct_kernels.models import MODELS
from cct_kernels.train import TrainConfig, train

DEFAULT_OUT = "cct_bench_results"
# Default timing budget per (backend, mode): about 2 minutes for the default bench on a 2-core CPU, compile
# included; a GPU iteration is milliseconds, so a few seconds give hundreds of iterations.
MIN_TIME = {"cpu": 15.0, "cuda": 3.0}
WARMUP = {"cpu": 1, "cuda": 10}


# --------------------------------------------------------------------------------------------------- info
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


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return found


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


def _auto_description(device: torch.device) -> str:
    order = backends._AUTO_ORDER.get(device.type, ())
    usable = [b for b in order if profiling.backend_reason(b, device) is None]
    chain = " -> ".join(usable + ["eager"])
    return f"per op, the first that serves the call: {chain}"


def extension_description() -> str:
    """What cct_kernels.extension says about the build: its info() dict (or describe() text) when it has one."""
    from cct_kernels import extension

    describe = getattr(extension, "describe", None)
    if callable(describe):
        return str(describe())
    info = getattr(extension, "info", None)
    if callable(info):
        details = info()
        if isinstance(details, dict):
            return "\n".join(f"{key}: {value}" for key, value in details.items())
        return str(details)
    error = extension.load_error()
    return "built" if error is None else error


def cmd_info(args) -> int:
    """Print versions, devices and, per device, whether each backend can run there (and why not)."""
    print("cct_kernels environment")
    for key, value in versions().items():
        print(f"  {key:<12} {value}")
    print("\nC++/CUDA extension")
    for line in extension_description().splitlines():
        print(f"  {line}")
    for device in devices():
        print(f"\n{device}: {device_name(device)}")
        for name in ("eager", profiling.COMPILE, *backends.KERNEL_BACKENDS, "auto"):
            reason = profiling.backend_reason(name, device)
            if name == "auto":
                status = "yes  " + _auto_description(device)
            elif name == "triton" and device.type == "cpu" and backends.availability(device)["triton"] is None:
                status = "tests only (TRITON_INTERPRET=1: the interpreter, not a speed path)"
            else:
                status = "yes" if reason is None else f"no   {reason}"
            print(f"  {name:<8} {status}")
    return 0


# --------------------------------------------------------------------------------------------------- bench
def _resolve_common(args):
    device = torch.device(args.device) if args.device else profiling.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    dtype = profiling.DTYPES[args.dtype or profiling.default_dtype(device)]
    batch = args.batch or profiling.default_batch(device)
    names = args.backends.split(",") if args.backends else profiling.speed_backends(device)
    for name in names:
        if name not in ("eager", profiling.COMPILE, *backends.BACKENDS):
            raise SystemExit(f"error: unknown backend {name!r}; choose from eager, compile, "
                             f"{', '.join(backends.KERNEL_BACKENDS)}, auto")
    if "eager" in names:  # eager runs first: its logits are what every other backend is checked against
        names = ["eager"] + [n for n in names if n != "eager"]
    modes = list(profiling.MODES) if args.mode == "both" else [args.mode]
    return device, dtype, batch, names, modes


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table, columns left-aligned for text and right-aligned for numbers."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def numeric(i):
        return all(r[i].replace(".", "").replace("x", "").replace("e-", "").replace("-", "").isdigit() or
                   r[i] == "-" for r in rows)

    right = [numeric(i) and i > 0 for i in range(len(headers))]
    line = lambda cells: "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r).rstrip() for r in rows)])


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
    return tqdm(total=total, desc=desc, unit="it", disable=not enabled, leave=False, file=sys.stderr,
                dynamic_ncols=True)


def run_bench(model_name, device, dtype, batch, names, modes, *, warmup, iters, min_time, progress) -> list[dict]:
    """Time every (backend, mode); one result dict each. A failing backend yields its error, not an exception."""
    results = []
    reference = None  # eager's logits, the oracle for each backend's max_abs_diff
    flops = {mode: profiling.model_flops(model_name, batch, mode) for mode in modes}
    for name in names:
        model, first_s = None, None
        try:
            print(f"  {name:<8} building, first call{' (compiles)' if name == profiling.COMPILE else ''}",
                  file=sys.stderr)
            model = profiling.build_model(model_name, name, device, dtype)
            images, labels = profiling.make_inputs(model, batch, device, dtype)
            # Logits first, before training steps change the weights; this call also warms up (and for
            # "compile" compiles) the inference step, so inference timing needs one warm-up call less.
            t0 = time.perf_counter()
            logits = profiling.make_step(model, "inference", images, labels)()
            profiling.synchronize(device)
            first_s = time.perf_counter() - t0
            if name == "eager":
                reference = logits
            diff = profiling.max_abs_diff(logits, reference) if reference is not None else None
            setup_error = None
        except Exception as e:  # reported in the table: one backend's failure must not end the run
            diff, setup_error = None, profiling.error_text(e)
        for mode in modes:
            result = {"backend": name, "mode": mode, "batch": batch, "max_abs_diff": diff, "error": setup_error,
                      "first_call_s": first_s}
            if setup_error is None:
                mode_warmup = max(0, warmup - 1) if mode == "inference" else warmup
                bar = _progress(progress, f"{name} {mode}", mode_warmup)
                try:
                    step = profiling.make_step(model, mode, images, labels)
                    timing = profiling.time_step(
                        step, device, warmup=mode_warmup, iters=iters, min_time=min_time, estimate_s=first_s,
                        on_iter=bar.update, on_plan=lambda n: setattr(bar, "total", mode_warmup + n))
                    result.update(timing.summary())
                    result["images_per_s"] = batch / (timing.median_ms / 1e3)
                    result["tflops"] = flops[mode] / (timing.median_ms / 1e3) / 1e12
                except Exception as e:
                    result["error"] = profiling.error_text(e)
                finally:
                    bar.close()
            results.append(result)
            status = result["error"] or f"{result['median_ms']:.2f} ms/iter"
            print(f"  {name:<8} {mode:<9} {status}", file=sys.stderr)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
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
    headers = ["backend", "mode", "ms/iter", "images/s", "TFLOP/s", "vs eager", "vs compile", "max|diff|", "note"]
    rows = []
    for r in results:
        if r["error"]:
            rows.append([r["backend"], r["mode"], "-", "-", "-", "-", "-", _fmt(r["max_abs_diff"], ".1e"),
                         f"FAILED {r['error'][:100]}"])
            continue
        rows.append([
            r["backend"], r["mode"], f"{r['median_ms']:.2f}", f"{r['images_per_s']:.1f}", f"{r['tflops']:.3f}",
            _fmt(r.get("speedup_vs_eager"), ".2f") + ("x" if r.get("speedup_vs_eager") else ""),
            _fmt(r.get("speedup_vs_compile"), ".2f") + ("x" if r.get("speedup_vs_compile") else ""),
            _fmt(r["max_abs_diff"], ".1e"),
            f"{r['iters']} iters; first call {r['first_call_s']:.1f} s, warm-up {r['warmup_s']:.1f} s",
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
        ax.set_ylabel("images/s (higher is better)")
        ax.margins(y=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_bench(args) -> int:
    """Time the model on each backend, print the table and write JSON + PNG into --out."""
    device, dtype, batch, names, modes = _resolve_common(args)
    warmup = WARMUP[device.type] if args.warmup is None else args.warmup
    min_time = MIN_TIME[device.type] if args.min_time is None else args.min_time
    print(f"bench {args.model}: batch {batch}, {profiling.dtype_name(dtype)}, {device} "
          f"({device_name(device)}), modes {', '.join(modes)}, backends {', '.join(names)}", file=sys.stderr)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = run_bench(args.model, device, dtype, batch, names, modes, warmup=warmup, iters=args.iters,
                        min_time=min_time, progress=not args.no_progress)
    elapsed = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    title = (f"{args.model}, batch {batch}, {profiling.dtype_name(dtype)} on {device_name(device)}")
    print(f"\n{title}\n" + bench_table(results))
    print(f"\nvs eager / vs compile: speedup of the median time; max|diff|: largest logit difference from eager "
          f"(same weights and images). Took {elapsed:.0f} s.")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_{args.model}_{device.type}_{profiling.dtype_name(dtype)}"
    report = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if args.command_line is None
        else args.command_line,
        "date": started.isoformat(timespec="seconds"), "elapsed_s": elapsed,
        "device": {"type": device.type, "name": device_name(device)}, "versions": versions(),
        "config": {"model": args.model, "batch": batch, "dtype": profiling.dtype_name(dtype), "modes": modes,
                   "backends": names, "warmup": warmup, "iters": args.iters, "min_time_s": min_time},
        "results": results,
    }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        bench_chart(results, title, stem.with_suffix(".png"))
        print(f"wrote {stem}.json and {stem}.png")
    except ImportError as e:  # matplotlib is optional: the JSON still holds everything
        print(f"wrote {stem}.json (no chart: {e})")
    return 0


# --------------------------------------------------------------------------------------------------- profile
def profile_table(tables: dict[str, list[dict]], top: int) -> str:
    """Top ops per backend side by side: rank, then for each backend its op name, self ms, calls and MB."""
    width = 32
    headers, rows = ["#"], []
    for name in tables:
        headers += [f"{name}: op", "self ms", "calls", "MB"]
    for i in range(top):
        row = [str(i + 1)]
        for entries in tables.values():
            if i < len(entries):
                e = entries[i]
                op = e["name"] if len(e["name"]) <= width else e["name"][: width - 3] + "..."
                row += [op, f"{e['self_ms']:.2f}", str(e["count"]), _fmt(e["self_mb"], ".1f")]
            else:
                row += ["", "", "", ""]
        if any(cell for cell in row[1:]):
            rows.append(row)
    return render_table(headers, rows)


def cmd_profile(args) -> int:
    """Profile each backend with torch.profiler: print the top ops side by side, write Chrome traces."""
    device, dtype, batch, names, modes = _resolve_common(args)
    by = args.by or ("kernels" if device.type == "cuda" else "ops")
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 5)
    iters = args.iters or (1 if device.type == "cpu" else 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for mode in modes:
        tables, errors = {}, {}
        for name in names:
            print(f"  profiling {name} {mode} ...", file=sys.stderr)
            try:
                model = profiling.build_model(args.model, name, device, dtype)
                step = profiling.make_step(model, mode, *profiling.make_inputs(model, batch, device, dtype))
                trace = out / f"trace_{args.model}_{name}_{mode}.json"
                prof = profiling.profile_step(step, device, warmup=warmup, iters=iters, trace_path=trace)
                tables[name] = profiling.top_ops(prof, device, args.top, by=by)
                print(f"    trace: {trace}", file=sys.stderr)
            except Exception as e:
                errors[name] = profiling.error_text(e)
        print(f"\n{args.model} {mode}, batch {batch}, {profiling.dtype_name(dtype)} on {device_name(device)}: "
              f"top {args.top} {by} by self time over {iters} step(s)")
        if tables:
            print(profile_table(tables, args.top))
        for name, error in errors.items():
            print(f"  {name}: FAILED {error}")
        summary[mode] = {"top": tables, "errors": errors}
    (out / f"profile_{args.model}_{device.type}.json").write_text(json.dumps(
        {"model": args.model, "batch": batch, "dtype": profiling.dtype_name(dtype), "device": device_name(device),
         "iters": iters, "by": by, "versions": versions(), "modes": summary}, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------------------------------- main
def _common_arguments(parser: argparse.ArgumentParser, default_mode: str | None):
    parser.add_argument("--model", default=profiling.DEFAULT_MODEL, choices=sorted(MODELS), metavar="NAME",
                        help=f"model factory name (default {profiling.DEFAULT_MODEL})")
    parser.add_argument("--batch", type=int, help="batch size (default 64 on CPU, 128 on CUDA)")
    parser.add_argument("--dtype", choices=sorted(profiling.DTYPES), help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--mode", choices=["inference", "train", "both"], default=default_mode,
                        help="inference forward, training step (forward, backward, AdamW), or both")
    parser.add_argument("--backends", help="comma-separated: eager, compile (torch.compile of eager), triton, "
                                           "cuda, cpu, auto (default: eager, compile, each kernel backend that "
                                           "can run on the device, auto)")
    parser.add_argument("--device", help="cpu or cuda (default cuda when available)")
    parser.add_argument("--warmup", type=int, help="untimed steps before timing (first includes compile)")
    parser.add_argument("--iters", type=int, help="timed steps (bench default: as many as --min-time allows)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT}/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cct-kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, backend availability").set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="time a model on each backend (table, JSON, PNG)")
    _common_arguments(bench, default_mode=None)
    bench.add_argument("--min-time", type=float, help="seconds of timed steps per backend and mode "
                                                      f"(default {MIN_TIME['cpu']:g} on CPU, {MIN_TIME['cuda']:g} "
                                                      "on CUDA); at least 3 steps")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.set_defaults(func=cmd_bench)

    prof = sub.add_parser("profile", help="torch.profiler per backend: top ops, Chrome traces")
    _common_arguments(prof, default_mode="inference")
    prof.add_argument("--top", type=int, default=12, help="ops per backend to show (default 12)")
    prof.add_argument("--by", choices=["ops", "kernels"], help="rank operators or CUDA kernels "
                                                               "(default kernels on CUDA, ops on CPU)")
    prof.set_defaults(func=cmd_profile)

    train = sub.add_parser("train", help="train on Fashion-MNIST (offline), with checkpoints and resume")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("progress", "resume"):
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(field.type).split(" |")[0], str)
        train.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=getattr(defaults, field.name),
                           help=f"default {getattr(defaults, field.name)}")
    train.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)
    return parser


def cmd_train(args) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}, progress=not args.no_progress)
    history = train(config)
    print(f"{config.model} on {config.dataset}: test accuracy {history['test_accuracy']:.4f} "
          f"after {len(history['epochs'])} epochs; history in {config.out}/history.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `cct-kernels` and `python -m cct_kernels`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = None if argv is None else shlex.join(["cct-kernels", *argv])
    if args.command == "bench" and args.mode is None:
        # Training a batch of 64 on a CPU takes several times an inference pass: keep the default run short.
        device = torch.device(args.device) if args.device else profiling.default_device()
        args.mode = "both" if device.type == "cuda" else "inference"
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
