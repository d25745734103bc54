"""One command for a GPU machine: build the extension, run the tests, run every benchmark, write one report.

    python benchmarks/gpu_report.py                          # all stages, about 9.5 minutes at most
    python benchmarks/gpu_report.py --skip-build --tests tests/test_ops.py --benchmarks benchmarks/test_bench_models.py

Stages, each with a time budget; one that fails or runs out of time is recorded and the next one still runs:
  wheels  pip install --no-deps .wheels/*.whl   when that (git-ignored) folder exists: the GPU image lacks
          vit-pytorch, which tests/official.py needs. On a networked machine, before the GPU call:
          pip download --no-deps -d .wheels vit-pytorch   and name .wheels in the device call's carry list.
  build   pip install --no-build-isolation --no-deps -e .   (PIP_NO_INDEX=1: the GPU machine has no network)
  tests   pytest tests -q --junitxml=junit.xml
  bench   pytest <file> --benchmark-only --benchmark-json=...   per benchmark file, sharing what time is left
          (benchmarks/conftest.py also streams each result to a JSON-lines file, so a file cut off by its
          budget keeps what it measured)
Writes report.md and report.json, with the logs, junit.xml and the raw benchmark JSON, into
benchmarks/results/<date>-<gpu>/. It also runs without a GPU (the device is then "cpu"), for checking.
Standard library only, so it reports even when torch or the package is broken.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Weight of each benchmark file in sharing the bench budget: whole models cost the most (compiles included).
WEIGHTS = {"test_bench_models.py": 3.0}
GRACE_S = 10  # after the budget: SIGINT (pytest still writes its JSON), then SIGKILL this much later


# ------------------------------------------------------------------------------------------------ running
def run_stage(name: str, cmd: list[str], budget_s: float, log: Path, env: dict | None = None) -> dict:
    """Run `cmd` in the repository root with output to `log`, stopped after `budget_s` seconds.

    Returns {name, command, status: ok | failed | timeout | error, returncode, seconds, log}.
    """
    started = time.monotonic()
    record = {"name": name, "command": shlex.join(cmd), "budget_s": round(budget_s, 1), "log": log.name}
    if budget_s <= 1:
        return {**record, "status": "skipped", "returncode": None, "seconds": 0.0, "note": "no time left"}
    with open(log, "w") as out:
        try:
            process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, **(env or {})})
        except OSError as e:
            return {**record, "status": "error", "returncode": None, "seconds": 0.0, "note": str(e)}
        try:
            returncode = process.wait(timeout=budget_s)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            _stop(process)
            returncode = process.returncode
    return {**record, "status": status, "returncode": returncode, "seconds": round(time.monotonic() - started, 1)}


def _stop(process: subprocess.Popen):
    """Interrupt the stage's process group, then kill it if it has not ended after GRACE_S."""
    for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _capture(cmd: list[str], timeout: float = 60) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


_ENV_PROBE = r"""
import json, platform
info = {"python": platform.python_version()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
except Exception as e:
    info["torch_error"] = repr(e)
for module in ("triton", "pytest_benchmark"):
    try:
        info[module] = __import__(module).__version__
    except Exception as e:
        info[module] = None
try:
    from cct_kernels import backends, extension
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info["extension"] = extension.load_error() or "built"
    info["backends"] = {k: v or "available" for k, v in backends.availability(device).items()}
except Exception as e:
    info["cct_kernels_error"] = repr(e)
print(json.dumps(info))
"""


def environment() -> dict:
    """Device, driver and versions: nvidia-smi, nvcc, and a probe of torch/triton/cct_kernels in a subprocess."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    probe = _capture([sys.executable, "-c", _ENV_PROBE], timeout=120)
    try:
        env.update(json.loads(probe.splitlines()[-1]))
    except (AttributeError, IndexError, ValueError):
        env["probe_error"] = probe
    smi = _capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                    "--format=csv,noheader"])
    if smi:
        env["nvidia_smi"] = smi.splitlines()[0]
        env["driver"] = smi.splitlines()[0].split(",")[1].strip()
    nvcc = _capture(["nvcc", "--version"])
    if nvcc:
        env["nvcc"] = nvcc.splitlines()[-1]
    env["git_commit"] = _capture(["git", "rev-parse", "--short", "HEAD"])
    env["git_dirty"] = bool(_capture(["git", "status", "--porcelain", "--untracked-files=no"]))
    return env


# ------------------------------------------------------------------------------------------------ reading
def junit_summary(path: Path) -> dict:
    """Counts and the failed tests (with the first line of their message) from a pytest junit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    summary = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    summary["time_s"] = sum(float(s.get("time", 0)) for s in suites)
    summary["passed"] = summary["tests"] - summary["failures"] - summary["errors"] - summary["skipped"]
    summary["failed"] = []
    for case in root.iter("testcase"):
        for problem in list(case.findall("failure")) + list(case.findall("error")):
            message = (problem.get("message") or "").strip().splitlines()
            summary["failed"].append(f"{case.get('classname')}::{case.get('name')}: {message[0] if message else ''}")
    return summary


def _pytest_last_line(log: Path) -> str | None:
    """pytest's closing line ("3 passed, 1 failed in 12.3s"), for a run that wrote no junit file."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = [line.strip("= ") for line in lines if re.search(r"\d+ (passed|failed|error)", line)]
    return found[-1] if found else None


def load_benchmarks(json_path: Path, jsonl_path: Path) -> list[dict]:
    """A file's benchmarks: pytest-benchmark's JSON when it was written, else the streamed JSON lines."""
    if json_path.exists():
        try:
            return json.loads(json_path.read_text())["benchmarks"]
        except (ValueError, KeyError):
            pass
    if jsonl_path.exists():
        return [json.loads(line) for line in jsonl_path.read_text().splitlines() if line.strip()]
    return []


def benchmark_rows(benchmarks: list[dict]) -> list[dict]:
    """One flat row per benchmark, with its speedup over the eager run of the same case when there is one."""
    rows = []
    for b in benchmarks:
        info, stats = b.get("extra_info") or {}, b["stats"]
        params = dict(b.get("params") or {})
        backend = info.get("backend") or params.get("backend")
        params.pop("backend", None)
        case = (b.get("group"), b["fullname"].split("[")[0], json.dumps(params, sort_keys=True, default=str))
        rows.append({
            "group": b.get("group") or "", "name": b["name"], "backend": backend, "case": case,
            "median_ms": stats["median"] * 1e3, "rounds": stats.get("rounds"), "tflops": info.get("tflops"),
            "gbps": info.get("gbps"), "peak_flops": info.get("fraction_of_peak_flops"),
            "peak_bw": info.get("fraction_of_peak_bandwidth"), "items_per_s": info.get("items_per_s"),
            "cuda_graph_ms": info.get("cuda_graph_ms"),
        })
    eager = {r["case"]: r["median_ms"] for r in rows if r["backend"] == "eager"}
    for r in rows:
        base = eager.get(r["case"]) if r["backend"] else None
        r["vs_eager"] = base / r["median_ms"] if base else None
    return rows


def _num(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else format(value, spec) + suffix


def benchmark_table(rows: list[dict]) -> str:
    """A Markdown table of every benchmark, grouped as pytest-benchmark groups them."""
    headers = ["group", "benchmark", "backend", "median ms", "rounds", "TFLOP/s", "GB/s", "% peak FLOP/s",
               "% peak BW", "images/s", "vs eager", "graph ms"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * 3 + "---:|" * (len(headers) - 3)]
    for r in sorted(rows, key=lambda r: (r["group"], r["name"])):
        cells = [
            r["group"], r["name"], r["backend"] or "", f"{r['median_ms']:.3f}", _num(r["rounds"], "d"),
            _num(r["tflops"], ".1f" if (r["tflops"] or 0) >= 10 else ".3f"), _num(r["gbps"], ",.0f"),
            _num(r["peak_flops"] and r["peak_flops"] * 100, ".1f", "%"),
            _num(r["peak_bw"] and r["peak_bw"] * 100, ".1f", "%"), _num(r["items_per_s"], ",.0f"),
            _num(r["vs_eager"], ".2f", "x"), _num(r["cuda_graph_ms"], ".3f"),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    env = report["environment"]
    device = env.get("gpu") or "cpu (no GPU)"
    out = [f"# cct_kernels GPU report: {device}, {env['date'][:10]}", ""]
    out += ["| | |", "|---|---|"]
    for key, label in (("gpu", "GPU"), ("nvidia_smi", "nvidia-smi"), ("driver", "driver"), ("capability", "arch"),
                       ("torch", "torch"), ("torch_cuda", "CUDA (torch)"), ("nvcc", "nvcc"), ("cudnn", "cuDNN"),
                       ("triton", "triton"), ("python", "Python"), ("pytest_benchmark", "pytest-benchmark"),
                       ("extension", "extension"), ("git_commit", "commit"), ("date", "date (UTC)")):
        if env.get(key) is not None:
            value = f"{env[key]}{' (uncommitted changes)' if key == 'git_commit' and env.get('git_dirty') else ''}"
            out.append(f"| {label} | {value} |")
    for name, reason in (env.get("backends") or {}).items():
        out.append(f"| backend {name} | {reason} |")
    out += ["", f"Command: `{report['command']}` (took {report['seconds']:.0f} s)", "", "## Stages", "",
            "| stage | command | status | seconds | budget s |", "|---|---|---|---:|---:|"]
    for s in report["stages"]:
        note = f" ({s['note']})" if s.get("note") else ""
        out.append(f"| {s['name']} | `{s['command']}` | {s['status']}{note} | {s['seconds']} | {s['budget_s']} |")
    out += ["", "## Tests", ""]
    tests = report.get("tests") or {}
    if "tests" in tests:
        out.append(f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                   f"{tests['skipped']} skipped of {tests['tests']} ({tests['time_s']:.0f} s).")
        out += [f"- {line}" for line in tests["failed"][:50]]
    else:
        out.append(tests.get("note", "no test results"))
    out += ["", "## Benchmarks", ""]
    if report["benchmarks"]:
        out.append("median ms: pytest-benchmark's median per call (device synchronised inside); graph ms: per "
                   "CUDA-graph replay; vs eager: speedup over the eager backend on the same case.")
        out += ["", benchmark_table(report["benchmarks"])]
    else:
        out.append("no benchmark results")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ main
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=570, help="seconds for everything (default 570)")
    parser.add_argument("--build-budget", type=float, default=180, help="seconds for the build (default 180)")
    parser.add_argument("--test-budget", type=float, default=150, help="seconds for the tests (default 150)")
    parser.add_argument("--skip-build", action="store_true", help="use the package as installed")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="pytest paths (default tests)")
    parser.add_argument("--benchmarks", nargs="+", help="benchmark files (default benchmarks/test_bench_*.py)")
    parser.add_argument("--out", help="report folder (default benchmarks/results/<date>-<gpu>/)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    deadline = started + args.budget
    left = lambda reserve=0.0: deadline - time.monotonic() - reserve  # noqa: E731
    python = sys.executable
    out = Path(args.out) if args.out else None
    logs_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"cct_gpu_report_{os.getpid()}"
    logs_dir.mkdir(parents=True, exist_ok=True)  # stage outputs land here until the device name is known
    stages = []
    # No network on the GPU machine: never let pip try an index; build with every core.
    build_env = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "MAX_JOBS": str(os.cpu_count() or 4)}

    wheels = sorted(str(p) for p in Path(".wheels").glob("*.whl"))
    if wheels:  # pure-Python test dependencies the GPU image lacks (vit-pytorch), carried from a networked machine
        cmd = [python, "-m", "pip", "install", "--no-deps", *wheels]
        stages.append(run_stage("wheels", cmd, left(30), logs_dir / "wheels.log", build_env))
    if not args.skip_build:
        cmd = [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
        stages.append(run_stage("build", cmd, min(args.build_budget, left(30)), logs_dir / "build.log", build_env))
        print(f"build: {stages[-1]['status']} in {stages[-1]['seconds']} s", flush=True)
    env = environment()
    if out is None:
        day = datetime.date.today().isoformat()
        out = RESULTS / f"{day}-{_slug(env.get('gpu') or 'cpu')}"
        suffix = 2
        while out.exists():
            out = RESULTS / f"{day}-{_slug(env.get('gpu') or 'cpu')}-{suffix}"
            suffix += 1
    out.mkdir(parents=True, exist_ok=True)
    for log in logs_dir.iterdir():
        log.replace(out / log.name)
    logs_dir.rmdir()

    tests = {}
    if not args.skip_tests:
        junit = out / "junit.xml"
        cmd = [python, "-m", "pytest", *args.tests, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        stages.append(run_stage("tests", cmd, min(args.test_budget, left(30)), out / "tests.log"))
        print(f"tests: {stages[-1]['status']} in {stages[-1]['seconds']} s", flush=True)
        try:
            tests = junit_summary(junit)
        except (OSError, ET.ParseError):
            tests = {"note": f"no junit file ({stages[-1]['status']}); last line: "
                             f"{_pytest_last_line(out / 'tests.log')}"}

    benchmarks = []
    if not args.skip_bench:
        files = args.benchmarks or sorted(glob.glob(str(ROOT / "benchmarks" / "test_bench_*.py")),
                                          key=lambda f: Path(f).name in WEIGHTS)  # op-level files first
        for i, path in enumerate(files):
            stem = Path(path).stem
            weights = [WEIGHTS.get(Path(f).name, 1.0) for f in files[i:]]
            budget = left(15) * weights[0] / sum(weights)
            json_path, jsonl_path = out / f"{stem}.json", out / f"{stem}.jsonl"
            cmd = [python, "-m", "pytest", str(Path(path).relative_to(ROOT) if Path(path).is_absolute() else path),
                   "--benchmark-only", f"--benchmark-json={json_path}", "-q", "-p", "no:cacheprovider"]
            stages.append(run_stage(f"bench {stem}", cmd, budget, out / f"{stem}.log",
                                    {"CCT_BENCH_JSONL": str(jsonl_path)}))
            found = load_benchmarks(json_path, jsonl_path)
            stages[-1]["benchmarks"] = len(found)
            benchmarks += found
            print(f"bench {stem}: {stages[-1]['status']} in {stages[-1]['seconds']} s, {len(found)} results",
                  flush=True)

    report = {
        "command": shlex.join([Path(sys.argv[0]).name if argv is None else "gpu_report.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "seconds": time.monotonic() - started, "environment": env, "stages": stages, "tests": tests,
        "benchmarks": benchmark_rows(benchmarks),
    }
    (out / "report.json").write_text(json.dumps({**report, "raw_benchmarks": benchmarks}, indent=2, default=str))
    (out / "report.md").write_text(markdown(report))
    print(f"wrote {out / 'report.md'} ({time.monotonic() - started:.0f} s)")
    return 0 if all(s["status"] == "ok" for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
