"""One command for a GPU machine: build the extension, run the tests, benchmarks and compute-sanitizer, write a report.

    python3 benchmarks/gpu_report.py             # every stage, 515 s of budgets (under 9 minutes, build included)
    python3 benchmarks/gpu_report.py --dry-run   # print the plan (for the lent GPU machine when none is here)
    python3 benchmarks/gpu_report.py --skip-build --tests tests/test_ops.py --benchmarks benchmarks/test_bench_models.py

Runs on the preinstalled stack (python3 with a CUDA torch, triton, nvcc, pytest-benchmark; pytest-xdist,
pytest-timeout and compute-sanitizer when present): no bootstrap, no network (PIP_NO_INDEX=1). Stages, in order,
each with a time budget (at least its planned one while time is left, plus what earlier stages left unused; one
that fails or runs out of time is recorded and the next one still runs):
  wheels            pip install --no-index --no-deps --target <tmp>/cct_site_<pid> .whl/*.whl .wheels/*.whl, then
                    PYTHONPATH=<that folder> for every later stage; only when such wheels were carried (vit-pytorch,
                    which tests/official.py uses, is not on the GPU image: see README "GPU run"). A folder per run:
                    a report run inside the tests must not replace files that other test processes import.
  build             pip install --no-build-isolation --no-deps -e .  with MAX_JOBS = all cores and
                    TORCH_CUDA_ARCH_LIST = the visible GPU's compute capability (nvidia-smi).
  probe             device, driver and versions (nvidia-smi, nvcc, torch/triton/cct_kernels in a subprocess).
  train step        issue 15's decisive comparison: `python -m cct_kernels bench` of the cct_7_3x1_32 training step
                    (bf16, batch 128) with compile, compile-graphs, auto, compile-graphs:auto and graphs:auto
                    interleaved; its table goes into the report (GPU only).
  profile           `python -m cct_kernels profile` of the same step on auto: the top kernels by GPU time (table in
                    the report) and a gzipped Chrome trace, from which each kernel's time per call and grid can be
                    read (GPU only; NOTES.md's "Second look at the H200 trace" came from one).
  tests             pytest tests, in parallel (pytest-xdist -n, sized from the cores) when xdist is importable, with a
                    per-test timeout when pytest-timeout is; the CPU-only static checks (tests/test_triton_sm90.py,
                    tests/test_cuda_sources.py: sm_90 compiles and nvcc, which CI runs on CPU) are left out.
  bench ops         op benchmarks (every benchmarks/test_bench_*.py but the models), kernel and eager rows.
  sanitize memcheck / racecheck   compute-sanitizer over benchmarks/sanitize_kernels.py (one small forward and
                    backward of every Triton and CUDA kernel); its ERROR SUMMARY goes into the report.
  bench models      whole-model benchmarks, kernel and eager rows.
  bench compile     every torch.compile row (marker compile_row, benchmarks/conftest.py), last and bounded.
Benchmarks run with a short --benchmark-max-time; benchmarks/conftest.py streams each result to JSON lines, so a
stage cut off by its budget keeps what it measured. Writes report.md and report.json (again after every stage, so a
run stopped from outside keeps what it had), with the logs, junit.xml, the raw benchmark JSON and a copy of
benchmarks/results/sm90_static.json (the static sm_90 figures), into benchmarks/results/<date>-<gpu>/; with
--archive DIR (default: $OUT when that is a folder, as on the device tool) also DIR/<that folder's name>.tar.gz and
DIR/report.md. It also runs without a GPU (the device is then "cpu"; the sanitizer stages are skipped), for
checking. Standard library only, so it reports even when torch or the package is broken.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_render import (benchmark_rows, benchmark_table, junit_summary, load_benchmarks,  # noqa: E402,F401
                           bench_table_lines, markdown, pytest_last_line,
                           sanitizer_verdict, streamed_test_summary)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WHEEL_DIRS = (".whl", ".wheels")  # git-ignored folders of carried wheels
STATIC_CHECKS = ("tests/test_triton_sm90.py", "tests/test_cuda_sources.py")  # CPU-only, run by CI
STATIC_FIGURES = RESULTS / "sm90_static.json"  # committed static sm_90 figures: registers, spills, shared memory
TOTAL_BUDGET_S = 540  # the device allows 10 minutes per command; the rest is the machine's start and transfers
# Planned seconds per stage (sum 515). From the H200 run of 2026-11-30: the build took 27 s; the whole test suite
# needs more than 400 s with 12 workers (62% done at 260 s), so the tests get the most, GPU kernels' files first.
LINEAR_BENCH = "test_bench_linear.py"
# Test files that run the Triton and CUDA kernels on the GPU, the most kernel cases first (see default_test_files).
GPU_TEST_FILES = ["tests/test_triton_linear.py", "tests/test_triton_attention.py", "tests/test_triton_tokenize.py",
                  "tests/test_triton_seqpool.py", "tests/test_extension.py", "tests/test_linear.py",
                  "tests/test_masked_ops.py", "tests/test_text_tokenize.py", "tests/test_cuda_graphs.py",
                  "tests/test_ops.py", "tests/test_encoder_layer.py", "tests/test_compile.py", "tests/test_nan.py",
                  "tests/test_dropin.py", "tests/test_reliability.py", "tests/test_backends.py", "tests/test_train.py"]
BUDGETS = {"wheels": 10, "build": 45, "probe": 15, "train step": 60, "profile": 20, "tests": 160, "bench ops": 55,
           "sanitize memcheck": 35, "sanitize racecheck": 30, "bench models": 55, "bench compile": 30}
# The train step stage's comparison (without compile-graphs it took 53 s on the H200, two compiles included).
# compile-graphs:auto (torch.compile with mode="reduce-overhead" over our ops) in place of compile:auto, which the
# first run measured host-bound (20.0 ms): three compiles at most, within the stage's budget and leftovers.
TRAIN_STEP_BACKENDS = "compile,compile-graphs,auto,compile-graphs:auto,graphs:auto"
# The lent GPU machine (device tool, nvidia-h200), assumed by --dry-run where no GPU is visible.
LENT_MACHINE = {"gpu": "NVIDIA H200", "cuda_arch": "9.0", "cpu_count": 16, "xdist": True, "pytest_timeout": True,
                "compute_sanitizer": "compute-sanitizer", "assumed": True}
GRACE_S, KILL_S = 5, 3  # at the budget's end: SIGINT (pytest still writes its files), then SIGKILL GRACE_S later
TEST_TIMEOUT_S = 90  # per test, with pytest-timeout: a hung kernel costs one test, not the stage
BENCH_FLAGS = ["--benchmark-only", "--benchmark-max-time=0.2", "--benchmark-min-rounds=3", "-q", "-p",
               "no:cacheprovider"]


class Stage(NamedTuple):
    """One step of the plan: `cmd` run in the repository root for at most `budget_s` seconds."""
    name: str
    cmd: list[str]
    budget_s: float
    needs: str
    env: dict | None = None  # added to the environment
    skip: str | None = None  # why it will not run here (recorded as skipped)


# ------------------------------------------------------------------------------------------------ the plan
def machine_facts() -> dict:
    """What this machine offers: cores, GPU and its arch (nvidia-smi), xdist, pytest-timeout, compute-sanitizer."""
    facts = {"cpu_count": os.cpu_count() or 1, "xdist": importlib.util.find_spec("xdist") is not None,
             "pytest_timeout": importlib.util.find_spec("pytest_timeout") is not None,
             "compute_sanitizer": shutil.which("compute-sanitizer"), "gpu": None, "cuda_arch": None}
    smi = _capture(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"])
    if smi and "," in smi:
        name, cap = smi.splitlines()[0].rsplit(",", 1)
        facts.update(gpu=name.strip(), cuda_arch=cap.strip())
    return facts


def carried_wheels() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for d in WHEEL_DIRS for p in (ROOT / d).glob("*.whl"))


def default_test_files() -> list[str]:
    """Every test file, those that run the GPU kernels first: the whole suite takes longer than the tests stage's
    budget on the lent machine (Triton compiles every kernel variant), and pytest-xdist hands out tests in this
    order, so a cut-off run has checked the kernels. CI runs all of them on CPU anyway."""
    rest = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    return [*GPU_TEST_FILES, *(f for f in rest if f not in GPU_TEST_FILES and f not in STATIC_CHECKS)]


def xdist_workers(cpu_count: int) -> int:
    """Test processes for pytest-xdist: all cores but two (Triton's compiles and ptxas use the rest), at most 12."""
    return max(1, min(12, cpu_count - 2))


def build_plan(facts: dict, args, wheels: list[str], site: str) -> list[Stage]:
    python = sys.executable
    stages = []
    if wheels or args.dry_run:
        cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--upgrade", "--target", site, *(wheels or [f"{d}/*.whl" for d in WHEEL_DIRS])]
        stages.append(Stage("wheels", cmd, BUDGETS["wheels"], "wheels carried in .whl/ or .wheels/ (README 'GPU "
                            "run'); runs only when there are some", skip=None if wheels else "no wheels carried"))
    if not args.skip_build:
        env = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "MAX_JOBS": str(facts["cpu_count"])}
        if facts["cuda_arch"]:
            env["TORCH_CUDA_ARCH_LIST"] = facts["cuda_arch"]
        stages.append(Stage("build", [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                            BUDGETS["build"], "the image's CUDA torch, nvcc, setuptools, ninja", env))
    stages.append(Stage("probe", [python, "-c", "<environment probe>"], BUDGETS["probe"], "nothing (reports what is"
                        " missing)"))
    if not args.skip_bench:
        cmd = [python, "-m", "cct_kernels", "bench", "--model", "cct_7_3x1_32", "--mode", "train", "--backends",
               TRAIN_STEP_BACKENDS, "--rounds", "6", "--warmup", "2", "--out", "<out>/train_step", "--no-progress"]
        stages.append(Stage("train step", cmd, BUDGETS["train step"], "a GPU", skip=None if facts["gpu"] else
                            "no GPU visible"))
        cmd = [python, "-m", "cct_kernels", "profile", "--model", "cct_7_3x1_32", "--mode", "train", "--backends",
               "auto", "--by", "kernels", "--top", "30", "--out", "<out>/profile"]
        stages.append(Stage("profile", cmd, BUDGETS["profile"], "a GPU", skip=None if facts["gpu"] else
                            "no GPU visible"))
    if not args.skip_tests:
        cmd = [python, "-m", "pytest", *(args.tests or default_test_files()), "-q", "-p", "no:cacheprovider",
               "--junitxml=<out>/junit.xml", *(f"--ignore={path}" for path in STATIC_CHECKS)]
        workers = xdist_workers(facts["cpu_count"]) if args.workers is None else args.workers
        if facts["xdist"] and workers > 0:
            cmd += ["-n", str(workers)]
        if facts["pytest_timeout"]:
            cmd += [f"--timeout={TEST_TIMEOUT_S}"]
        stages.append(Stage("tests", cmd, BUDGETS["tests"], "pytest; pytest-xdist and pytest-timeout when present; "
                            "vit-pytorch (carried wheel) or its tests skip", {"CCT_TEST_RESULTS": "<out>/tests.jsonl"}))
    bench_files = args.benchmarks or sorted(str(p.relative_to(ROOT)) for p in
                                            (ROOT / "benchmarks").glob("test_bench_*.py"))
    model_files = [f for f in bench_files if Path(f).name == "test_bench_models.py"]
    # linear last: its many Triton variants (prologue, epilogues, dropout, backward) take the longest to compile, and
    # a stage cut at its budget then still holds every other op's rows
    op_files = sorted((f for f in bench_files if f not in model_files), key=lambda f: Path(f).name == LINEAR_BENCH)
    # (name, files or sanitizer tool, benchmark marker expression)
    steps = [("bench ops", op_files, "not compile_row")]
    if not args.skip_sanitize:
        steps += [(f"sanitize {tool}", tool, None) for tool in ("memcheck", "racecheck")]
    # compile rows of the models first: the model-level comparison with torch.compile is the one that decides
    steps += [("bench models", model_files, "not compile_row"),
              ("bench compile", model_files + op_files, "compile_row")]
    for name, what, marker in steps:
        if name.startswith("sanitize"):
            cmd = [facts["compute_sanitizer"] or "compute-sanitizer", "--tool", what, "--target-processes", "all",
                   "--print-limit", "20", "--error-exitcode", "1", python, "benchmarks/sanitize_kernels.py"]
            skip = ("no GPU visible" if not facts["gpu"] else
                    None if facts["compute_sanitizer"] else "compute-sanitizer is not on PATH")
            stages.append(Stage(name, cmd, BUDGETS[name], "compute-sanitizer (CUDA toolkit) and a GPU",
                                {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, skip))
        elif not args.skip_bench and what:
            stem = name.replace(" ", "_")
            cmd = [python, "-m", "pytest", *what, "-m", marker, *BENCH_FLAGS, f"--benchmark-json=<out>/{stem}.json"]
            stages.append(Stage(name, cmd, BUDGETS[name], "pytest-benchmark", {"CCT_BENCH_JSONL": f"<out>/{stem}"
                                                                                                 ".jsonl"}))
    return stages


def print_plan(stages: list[Stage], facts: dict, archive: Path | None) -> int:
    machine = (f"{facts['gpu'] or 'no GPU'} (arch {facts['cuda_arch']}), {facts['cpu_count']} cores, "
               f"xdist {'yes' if facts['xdist'] else 'no'}, compute-sanitizer {facts['compute_sanitizer'] or 'no'}")
    assumed = " [assumed: the lent GPU machine; no GPU is visible here]" if facts.get("assumed") else ""
    print(f"gpu_report plan for {machine}{assumed}")
    for i, s in enumerate(stages, 1):
        env = " ".join(f"{k}={v}" for k, v in (s.env or {}).items())
        skip = f"  [skipped here: {s.skip}]" if s.skip else ""
        print(f"{i:2d}. {s.name:<18} budget {s.budget_s:4.0f} s  needs: {s.needs}{skip}\n"
              f"      {env + ' ' if env else ''}{shlex.join(s.cmd)}")
    total = sum(s.budget_s for s in stages)
    print(f"total budget: {total:.0f} s ({total / 60:.1f} min; limit {TOTAL_BUDGET_S} s)")
    print(f"results: {RESULTS.relative_to(ROOT)}/<date>-<gpu>/"
          + (f"; archive: {archive}/<date>-<gpu>.tar.gz and {archive}/report.md" if archive else ""))
    return 0 if total <= TOTAL_BUDGET_S else 1


# ------------------------------------------------------------------------------------------------ running
def run_stage(name: str, cmd: list[str], budget_s: float, log: Path, env: dict | None = None) -> dict:
    """Run `cmd` in the repository root with output to `log`, stopped within `budget_s` seconds (SIGINT, then
    SIGKILL). Returns {name, command, status: ok | failed | timeout | error | skipped, returncode, seconds, log}."""
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
            returncode = process.wait(timeout=max(1.0, budget_s - GRACE_S - KILL_S))
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            _stop(process)
            returncode = process.returncode
    return {**record, "status": status, "returncode": returncode, "seconds": round(time.monotonic() - started, 1)}


def _stop(process: subprocess.Popen):
    """Interrupt the stage's process group, then kill it if it has not ended after GRACE_S."""
    for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, KILL_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _capture(cmd: list[str], timeout: float = 60, env: dict | None = None) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **(env or {})}).stdout.strip()
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
import importlib.metadata
for key, distribution in (("triton", "triton"), ("pytest_benchmark", "pytest-benchmark"), ("xdist", "pytest-xdist"),
                          ("vit_pytorch", "vit-pytorch")):
    try:
        info[key] = importlib.metadata.version(distribution)
    except Exception:
        info[key] = None
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


def environment(timeout: float, env: dict, facts: dict) -> dict:
    """Device, driver and versions: nvidia-smi, nvcc, and a probe of torch/triton/cct_kernels in a subprocess."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": facts["cpu_count"], "compute_sanitizer": facts["compute_sanitizer"]}
    probe = _capture([sys.executable, "-c", _ENV_PROBE], timeout=timeout, env=env)
    try:
        info.update(json.loads(probe.splitlines()[-1]))
    except (AttributeError, IndexError, ValueError):
        info["probe_error"] = probe or f"no answer within {timeout:.0f} s"
    smi = _capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                    "--format=csv,noheader"])
    if smi:
        info["nvidia_smi"] = smi.splitlines()[0]
        info["driver"] = smi.splitlines()[0].split(",")[1].strip()
    nvcc = _capture(["nvcc", "--version"])
    if nvcc:
        info["nvcc"] = nvcc.splitlines()[-1]
    info["git_commit"] = _capture(["git", "rev-parse", "--short", "HEAD"])
    info["git_dirty"] = bool(_capture(["git", "status", "--porcelain", "--untracked-files=no"]))
    return info


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _results_folder(gpu: str | None) -> Path:
    base = f"{datetime.date.today().isoformat()}-{_slug(gpu or 'cpu')}"
    out, suffix = RESULTS / base, 2
    while out.exists():
        out, suffix = RESULTS / f"{base}-{suffix}", suffix + 1
    return out


def _archive(out: Path, archive: Path) -> None:
    """out/ as archive/<name>.tar.gz, and report.md beside it (the device tool brings back only a few files)."""
    archive.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive / f"{out.name}.tar.gz", "w:gz") as tar:
        tar.add(out, arcname=out.relative_to(ROOT) if out.is_relative_to(ROOT) else out.name)
    shutil.copy(out / "report.md", archive / "report.md")


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help=f"seconds for everything "
                        f"(default {TOTAL_BUDGET_S})")
    parser.add_argument("--skip-build", action="store_true", help="use the package as installed")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-sanitize", action="store_true")
    parser.add_argument("--tests", nargs="+", default=None, help="pytest paths (default: every tests/test_*.py, "
                        "the GPU kernels' files first)")
    parser.add_argument("--workers", type=int, help="pytest-xdist processes for the tests (default: all cores but "
                        "two, at most 12; 0: no xdist)")
    parser.add_argument("--benchmarks", nargs="+", help="benchmark files (default benchmarks/test_bench_*.py)")
    parser.add_argument("--out", help="report folder (default benchmarks/results/<date>-<gpu>/)")
    parser.add_argument("--archive", default=os.environ.get("OUT") if os.path.isdir(os.environ.get("OUT", "")) else
                        None, help="also write <folder>.tar.gz and report.md here (default $OUT when a folder)")
    return parser.parse_args(argv)


def _read_outputs(stage: Stage, record: dict, out: Path) -> tuple[dict | None, list[dict]]:
    """After a stage: its test summary (tests stage) and benchmarks; adds the sanitizer verdict to `record`."""
    stem, tests, found = stage.name.replace(" ", "_"), None, []
    if stage.name == "tests":
        try:
            tests = junit_summary(out / "junit.xml")
        except (OSError, ValueError, SyntaxError):  # ET.ParseError is a SyntaxError
            try:
                tests = streamed_test_summary(out / "tests.jsonl")
            except (OSError, ValueError, KeyError):
                tests = {"note": f"no junit file ({record['status']}); last line: "
                                 f"{pytest_last_line(out / 'tests.log')}"}
    if stage.name in ("train step", "profile") and record["log"]:
        record["table"] = bench_table_lines((out / record["log"]).read_text(errors="replace"))
    if stage.name.startswith("sanitize") and record["log"]:
        record["sanitizer"] = sanitizer_verdict((out / record["log"]).read_text(errors="replace"))
    if stage.name.startswith("bench"):
        found = load_benchmarks(out / f"{stem}.json", out / f"{stem}.jsonl")
        record["benchmarks"] = len(found)
    return tests, found


def _write_report(out: Path, report: dict, benchmarks: list[dict], archive: str | None) -> None:
    """report.json and report.md (and the archive): after every stage, so a run stopped from outside keeps them."""
    report = {**report, "benchmarks": benchmark_rows(benchmarks),
              "static_figures": STATIC_FIGURES.name if (out / STATIC_FIGURES.name).exists() else None}
    (out / "report.json").write_text(json.dumps({**report, "raw_benchmarks": benchmarks}, indent=2, default=str))
    (out / "report.md").write_text(markdown(report))
    if archive:
        _archive(out, Path(archive))


def main(argv=None) -> int:
    args = _parse_args(argv)
    started = time.monotonic()
    facts = machine_facts()
    if args.dry_run and not facts["gpu"]:
        facts = {**facts, **LENT_MACHINE}
    site = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"cct_site_{os.getpid()}")
    stages = build_plan(facts, args, carried_wheels(), site)
    if args.dry_run:
        return print_plan(stages, facts, Path(args.archive) if args.archive else None)

    deadline = started + args.budget
    logs_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"cct_gpu_report_{os.getpid()}"
    logs_dir.mkdir(parents=True, exist_ok=True)  # stage outputs land here until the device name is known
    out, env, benchmarks = logs_dir, {}, []
    report = {"command": shlex.join(["gpu_report.py", *(sys.argv[1:] if argv is None else argv)]), "seconds": 0.0,
              "environment": None, "stages": [], "tests": {}}
    for i, stage in enumerate(stages):
        # Its planned budget at least (while time is left), plus what earlier stages left unused.
        left = deadline - time.monotonic()
        budget = min(left, max(stage.budget_s, left - sum(s.budget_s for s in stages[i + 1:] if not s.skip)))
        if stage.name == "probe":
            report["environment"] = environment(max(1.0, budget), env, facts)
            out = Path(args.out) if args.out else _results_folder(report["environment"].get("gpu"))
            out.mkdir(parents=True, exist_ok=True)
            for log in logs_dir.iterdir():
                log.replace(out / log.name)
            logs_dir.rmdir()
            if STATIC_FIGURES.exists():  # the committed static figures beside the measurements they predict
                shutil.copy(STATIC_FIGURES, out / STATIC_FIGURES.name)
            continue
        cmd = [part.replace("<out>", str(out)) for part in stage.cmd]
        stage_env = {**env, **{k: v.replace("<out>", str(out)) for k, v in (stage.env or {}).items()}}
        if stage.skip:
            record = {"name": stage.name, "command": shlex.join(cmd), "budget_s": 0, "log": None,
                      "status": "skipped", "returncode": None, "seconds": 0.0, "note": stage.skip}
        else:
            record = run_stage(stage.name, cmd, budget, out / f"{stage.name.replace(' ', '_')}.log", stage_env)
        report["stages"].append(record)
        if stage.name == "wheels" and record["status"] == "ok":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
        tests, found = _read_outputs(stage, record, out)
        report["tests"] = tests or report["tests"]
        benchmarks += found
        extra = f", {record['benchmarks']} results" if "benchmarks" in record else ""
        print(f"{stage.name}: {record['status']} in {record['seconds']} s{extra}", flush=True)
        if report["environment"] is not None:
            report["seconds"] = time.monotonic() - started
            _write_report(out, report, benchmarks, args.archive)
    report["seconds"] = time.monotonic() - started
    _write_report(out, report, benchmarks, args.archive)
    print(f"wrote {out / 'report.md'} ({time.monotonic() - started:.0f} s)")
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
