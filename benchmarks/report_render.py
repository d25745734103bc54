"""Reading the outputs of benchmarks/gpu_report.py's stages and writing its report.md. Standard library only.

Inputs: pytest's junit XML, pytest-benchmark JSON (or benchmarks/conftest.py's JSON-lines stream), compute-sanitizer
logs. Timing columns (benchmarks/conftest.py): median ms is the synchronised per-call wall time; device ms is the
time per call without a host sync per call (CUDA-graph replay when the call was capturable, else CUDA events over
back-to-back calls); floor µs and % floor compare the device time with the NOTES.md floor at the device's peaks.
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path


# ------------------------------------------------------------------------------------------------ tests
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


def streamed_test_summary(path: Path) -> dict:
    """Counts and the failed tests from the JSON lines tests/conftest.py streams (CCT_TEST_RESULTS), for a run cut
    off before pytest wrote its junit file."""
    records = [json.loads(line) for line in path.read_text(errors="replace").splitlines() if line.strip()]
    count = {outcome: sum(r["outcome"] == outcome for r in records) for outcome in ("passed", "failed", "skipped")}
    failed = [f"{r['nodeid']} ({r['when']}): {r['message']}" for r in records if r["outcome"] == "failed"]
    return {"tests": len(records), "passed": count["passed"], "failures": count["failed"], "errors": 0,
            "skipped": count["skipped"], "time_s": None, "failed": failed,
            "note": "cut off before pytest's summary: the outcomes of the tests that finished, as they ended"}


def pytest_last_line(log: Path) -> str | None:
    """pytest's closing line ("3 passed, 1 failed in 12.3s"), for a run that wrote no junit file."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = [line.strip("= ") for line in lines if re.search(r"\d+ (passed|failed|error)", line)]
    return found[-1] if found else None


def bench_table_lines(log_text: str) -> list[str]:
    """The result tables `python -m cct_kernels bench` or `profile` print (from the last title line "<model>, batch
    ..." or "<model> <mode>, batch ...") and the lines after it, for the report; empty when the log has none (the
    run failed or was cut off first)."""
    lines = log_text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^\S+( \w+)?, batch \d+, ", line)]
    return lines[starts[-1]:] if starts else []


# ------------------------------------------------------------------------------------------------ sanitizer
def sanitizer_verdict(log_text: str) -> dict:
    """compute-sanitizer's verdict from its log: errors (memcheck's "ERROR SUMMARY: N errors"), hazards
    (racecheck's "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)"), the cases line of
    benchmarks/sanitize_kernels.py, and `verdict`: clean | errors | incomplete (no summary: cut off or refused)."""
    out = {}
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", log_text)
    if errors:
        out["errors"] = int(errors[-1])
    races = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", log_text)
    if races:
        out["hazards"], race_errors, out["warnings"] = (int(v) for v in races[-1])
        out["errors"] = max(out.get("errors", 0), race_errors)
    cases = re.findall(r"^sanitize_kernels: .*$", log_text, re.M)
    if cases:
        out["cases"] = cases[-1]
    failed_cases = re.findall(r"^FAILED +(.*)$", log_text, re.M)
    if failed_cases:
        out["failed_cases"] = failed_cases[:20]
    refused = re.search(r"^=+ (?:Error.*|.*not supported.*)$", log_text, re.M)  # the sanitizer's own lines
    if refused:
        out["note"] = refused.group(0).lstrip("= ")[:200]
    if "errors" not in out or "cases" not in out:
        out["verdict"] = "incomplete"
    else:
        out["verdict"] = "clean" if out["errors"] == 0 and not failed_cases else "errors"
    return out


# ------------------------------------------------------------------------------------------------ benchmarks
def load_benchmarks(json_path: Path, jsonl_path: Path) -> list[dict]:
    """A stage's benchmarks: pytest-benchmark's JSON when it was written, else the streamed JSON lines."""
    if json_path.exists():
        try:
            return json.loads(json_path.read_text())["benchmarks"]
        except (ValueError, KeyError):
            pass
    if jsonl_path.exists():
        return [json.loads(line) for line in jsonl_path.read_text().splitlines() if line.strip()]
    return []


def benchmark_rows(benchmarks: list[dict]) -> list[dict]:
    """One flat row per benchmark, with its speedup over the eager run of the same case when there is one
    (on device times when both rows have one, else on the synchronised wall times)."""
    rows = []
    for b in benchmarks:
        info, stats = b.get("extra_info") or {}, b["stats"]
        params = dict(b.get("params") or {})
        backend = info.get("backend") or params.get("backend")
        params.pop("backend", None)
        case = (b.get("group"), b["fullname"].split("[")[0], json.dumps(params, sort_keys=True, default=str))
        rows.append({
            "group": b.get("group") or "", "name": b["name"], "backend": backend, "case": case,
            "median_ms": stats["median"] * 1e3, "rounds": stats.get("rounds"), "device_ms": info.get("device_ms"),
            "graph_ms": info.get("graph_ms", info.get("cuda_graph_ms")), "floor_us": info.get("floor_us"),
            "fraction_of_floor": info.get("fraction_of_floor"), "tflops": info.get("tflops"),
            "gbps": info.get("gbps"), "peak_flops": info.get("fraction_of_peak_flops"),
            "peak_bw": info.get("fraction_of_peak_bandwidth"), "items_per_s": info.get("items_per_s"),
        })
    eager = {r["case"]: r for r in rows if r["backend"] == "eager"}
    for r in rows:
        base = eager.get(r["case"]) if r["backend"] else None
        key = "device_ms" if base and base["device_ms"] and r["device_ms"] else "median_ms"
        r["vs_eager"] = base[key] / r[key] if base else None
    return rows


def _num(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else format(value, spec) + suffix


def _percent(fraction) -> str:
    return _num(fraction and fraction * 100, ".1f", "%")


def benchmark_table(rows: list[dict]) -> str:
    """A Markdown table of every benchmark, grouped as pytest-benchmark groups them."""
    headers = ["group", "benchmark", "backend", "median ms", "device ms", "graph ms", "floor µs", "% floor",
               "TFLOP/s", "GB/s", "% peak FLOP/s", "% peak BW", "images/s", "vs eager", "rounds"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * 3 + "---:|" * (len(headers) - 3)]
    for r in sorted(rows, key=lambda r: (r["group"], r["name"])):
        cells = [
            r["group"], r["name"], r["backend"] or "", f"{r['median_ms']:.3f}", _num(r["device_ms"], ".3f"),
            _num(r["graph_ms"], ".3f"), _num(r["floor_us"], ".1f"), _percent(r["fraction_of_floor"]),
            _num(r["tflops"], ".1f" if (r["tflops"] or 0) >= 10 else ".3f"), _num(r["gbps"], ",.0f"),
            _percent(r["peak_flops"]), _percent(r["peak_bw"]), _num(r["items_per_s"], ",.0f"),
            _num(r["vs_eager"], ".2f", "x"), _num(r["rounds"], "d"),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report.md
_ENV_ROWS = (("gpu", "GPU"), ("nvidia_smi", "nvidia-smi"), ("driver", "driver"), ("capability", "arch"),
             ("torch", "torch"), ("torch_cuda", "CUDA (torch)"), ("nvcc", "nvcc"), ("cudnn", "cuDNN"),
             ("triton", "triton"), ("python", "Python"), ("pytest_benchmark", "pytest-benchmark"),
             ("compute_sanitizer", "compute-sanitizer"), ("cpu_count", "CPU cores"), ("extension", "extension"),
             ("vit_pytorch", "vit-pytorch"), ("xdist", "pytest-xdist"), ("git_commit", "commit"),
             ("date", "date (UTC)"),
             ("probe_error", "probe error"), ("torch_error", "torch error"), ("cct_kernels_error", "cct_kernels error"))


def markdown(report: dict) -> str:
    env = report["environment"]
    device = env.get("gpu") or "cpu (no GPU)"
    out = [f"# cct_kernels GPU report: {device}, {env['date'][:10]}", "", "| | |", "|---|---|"]
    for key, label in _ENV_ROWS:
        if env.get(key) is not None:
            value = f"{env[key]}{' (uncommitted changes)' if key == 'git_commit' and env.get('git_dirty') else ''}"
            out.append(f"| {label} | {value} |")
    for name, reason in (env.get("backends") or {}).items():
        out.append(f"| backend {name} | {reason} |")
    if report.get("static_figures"):
        out += ["", f"Static sm_90 figures of the kernels (registers, spills, shared memory per config), as committed: "
                    f"`{report['static_figures']}` in this folder."]
    out += ["", f"Command: `{report['command']}` (took {report['seconds']:.0f} s)", "", "## Stages", "",
            "| stage | command | status | seconds | budget s |", "|---|---|---|---:|---:|"]
    for s in report["stages"]:
        note = f" ({s['note']})" if s.get("note") else ""
        out.append(f"| {s['name']} | `{s['command']}` | {s['status']}{note} | {s['seconds']} | {s['budget_s']} |")
    out += ["", "## Tests", ""]
    tests = report.get("tests") or {}
    if "tests" in tests:
        took = "" if tests.get("time_s") is None else f" ({tests['time_s']:.0f} s)"
        out.append(f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                   f"{tests['skipped']} skipped of {tests['tests']}{took}." + (f" {tests['note']}." if
                                                                              tests.get("note") else ""))
        out += [f"- {line}" for line in tests["failed"][:80]]
    else:
        out.append(tests.get("note", "no test results"))
    for stage in report["stages"]:
        if stage.get("table"):
            out += ["", f"## {stage['name']}", "", "```", *stage["table"], "```"]
    out += ["", "## compute-sanitizer", ""]
    for stage in report["stages"]:
        verdict = stage.get("sanitizer")
        if verdict:
            detail = ", ".join(f"{k} {v}" for k, v in verdict.items() if k not in ("verdict", "failed_cases"))
            out.append(f"- {stage['name']}: **{verdict['verdict']}** ({detail})")
            out += [f"  - failed: {line}" for line in verdict.get("failed_cases", [])]
    if not any(s.get("sanitizer") for s in report["stages"]):
        out.append("not run")
    out += ["", "## Benchmarks", ""]
    if report["benchmarks"]:
        out.append("median ms: synchronised wall time per call (pytest-benchmark's median); device ms: per call "
                   "without a host sync (graph ms, the CUDA-graph replay, when capturable, else CUDA events over "
                   "back-to-back calls); floor µs: the larger of bytes / peak HBM bandwidth and FLOPs / peak tensor "
                   "throughput of this GPU, % floor = floor / device time; rates use the device time; vs eager: "
                   "speedup over the eager backend on the same case.")
        out += ["", benchmark_table(report["benchmarks"])]
    else:
        out.append("no benchmark results")
    return "\n".join(out) + "\n"
