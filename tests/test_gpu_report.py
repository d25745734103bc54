"""The GPU report's plan, checked on CPU so it cannot rot: benchmarks/gpu_report.py (--dry-run, stages, budgets,
a small real run), compute-sanitizer verdicts, benchmarks/sanitize_kernels.py, and the benchmark timing helpers."""
import importlib.util
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import conftest as bench_conftest
from benchmarks import report_render, sanitize_kernels, tune_linear
from benchmarks.conftest import rates
from tests.cases import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
STAGE_ORDER = ["wheels", "build", "probe", "train step", "profile", "tests", "bench ops", "sanitize memcheck",
               "sanitize racecheck", "bench models", "bench compile"]


def _gpu_report():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env())


def test_dry_run_prints_the_gpu_plan_within_nine_minutes():
    result = _run("benchmarks/gpu_report.py", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    stages = re.findall(r"^\s*\d+\. (.+?)\s+budget\s+(\d+) s  needs: (.+)$", result.stdout, re.M)
    assert [name for name, _, _ in stages] == STAGE_ORDER
    total = int(re.search(r"^total budget: (\d+) s", result.stdout, re.M).group(1))
    assert total == sum(int(budget) for _, budget, _ in stages) <= 540
    assert all(needs.strip() for _, _, needs in stages)
    assert "results: benchmarks/results/<date>-<gpu>/" in result.stdout
    assert "--ignore=tests/test_triton_sm90.py --ignore=tests/test_cuda_sources.py" in result.stdout
    for tool in ("memcheck", "racecheck"):
        assert f"compute-sanitizer --tool {tool} " in result.stdout
    last_command = result.stdout.split(" bench compile ")[1].splitlines()[1]
    assert " -m compile_row " in last_command and "--benchmark-max-time=0.2" in last_command


def test_plan_on_the_lent_gpu_machine():
    report = _gpu_report()
    args = report._parse_args(["--dry-run"])
    plan = {s.name: s for s in report.build_plan(report.LENT_MACHINE, args, [".whl/vit_pytorch.whl"], "/tmp/site")}
    assert list(plan) == STAGE_ORDER and not any(s.skip for s in plan.values())
    wheels = plan["wheels"].cmd
    assert {"--no-index", "--no-deps", "--target", "/tmp/site", ".whl/vit_pytorch.whl"} <= set(wheels)
    assert plan["build"].env == {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "MAX_JOBS": "16",
                                 "TORCH_CUDA_ARCH_LIST": "9.0"}
    tests = plan["tests"].cmd
    assert "--ignore=tests/test_triton_sm90.py" in tests and "--ignore=tests/test_cuda_sources.py" in tests
    assert tests[tests.index("-n") + 1] == "12" and "--timeout=90" in tests
    for tool in ("memcheck", "racecheck"):
        cmd = plan[f"sanitize {tool}"].cmd
        assert cmd[:3] == ["compute-sanitizer", "--tool", tool] and cmd[-1] == "benchmarks/sanitize_kernels.py"
        assert plan[f"sanitize {tool}"].env == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    for name, marker in (("bench ops", "not compile_row"), ("bench models", "not compile_row"),
                         ("bench compile", "compile_row")):
        cmd = plan[name].cmd
        assert cmd[cmd.index("-m", cmd.index("pytest")) + 1] == marker and "--benchmark-max-time=0.2" in cmd
    assert "benchmarks/test_bench_models.py" not in plan["bench ops"].cmd
    assert "benchmarks/test_bench_models.py" in plan["bench models"].cmd
    assert sum(s.budget_s for s in plan.values()) <= report.TOTAL_BUDGET_S


def test_plan_without_carried_wheels_or_a_gpu_skips_with_reasons():
    report = _gpu_report()
    facts = {**report.LENT_MACHINE, "gpu": None, "compute_sanitizer": None}
    plan = {s.name: s for s in report.build_plan(facts, report._parse_args([]), [], "/tmp/site")}
    assert "wheels" not in plan  # only a dry run shows the wheels step when none are carried
    assert "-n" not in report.build_plan(facts, report._parse_args(["--workers", "0"]), [], "/s")[2].cmd
    assert plan["sanitize memcheck"].skip == "no GPU visible"
    facts["gpu"] = "NVIDIA H200"
    plan = {s.name: s for s in report.build_plan(facts, report._parse_args(["--skip-sanitize"]), [], "/tmp/site")}
    assert "sanitize memcheck" not in plan and list(plan)[-1] == "bench compile"


def test_a_small_real_run_writes_the_report_and_the_archive(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "archive"
    result = _run("benchmarks/gpu_report.py", "--skip-build", "--skip-bench", "--skip-sanitize", "--workers", "0",
                  "--budget", "200", "--out", str(out), "--archive", str(archive),
                  "--tests", "tests/test_convert.py::test_convert_round_trips_our_own_models")
    assert result.returncode == 0, result.stdout + result.stderr
    text = (out / "report.md").read_text()
    assert "3 passed, 0 failed, 0 errors, 0 skipped of 3" in text
    assert "| tests |" in text and "| sanitize" not in text
    static = (ROOT / "benchmarks/results/sm90_static.json").exists()
    assert (out / "sm90_static.json").exists() == static and ("`sm90_static.json` in this folder" in text) == static
    assert (archive / "report.md").read_text() == text
    with tarfile.open(archive / "out.tar.gz") as tar:
        assert {Path(name).name for name in tar.getnames()} >= {"report.md", "report.json", "junit.xml"}


MEMCHECK_CLEAN = """========= COMPUTE-SANITIZER
ok          seqpool   triton bfloat16 B2_N197_D96: max relative error 3.1e-03 (out)
sanitize_kernels: 31 passed, 0 failed of 31 cases
========= ERROR SUMMARY: 0 errors
"""
MEMCHECK_ERRORS = """========= Invalid __global__ read of size 2 bytes
=========     at _attention_fwd+0x1f0
FAILED      attention triton bfloat16 B2_H2_N197_d64: RuntimeError: CUDA error: unspecified launch failure
sanitize_kernels: 30 passed, 1 failed of 31 cases
========= ERROR SUMMARY: 3 errors
"""
RACECHECK = """sanitize_kernels: 31 passed, 0 failed of 31 cases
========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)
"""
REFUSED = """========= Error: Device not supported
"""


def test_sanitizer_verdicts():
    assert report_render.sanitizer_verdict(MEMCHECK_CLEAN) == {
        "errors": 0, "cases": "sanitize_kernels: 31 passed, 0 failed of 31 cases", "verdict": "clean"}
    bad = report_render.sanitizer_verdict(MEMCHECK_ERRORS)
    assert bad["verdict"] == "errors" and bad["errors"] == 3 and len(bad["failed_cases"]) == 1
    race = report_render.sanitizer_verdict(RACECHECK)
    assert (race["verdict"], race["hazards"], race["errors"], race["warnings"]) == ("errors", 2, 1, 1)
    refused = report_render.sanitizer_verdict(REFUSED)
    assert refused["verdict"] == "incomplete" and refused["note"] == "Error: Device not supported"
    assert report_render.sanitizer_verdict("sanitize_kernels: 3 passed")["verdict"] == "incomplete"  # cut off


def test_benchmark_rows_compare_device_times_when_both_rows_have_one():
    def bench(backend, median, device_ms=None):
        return {"name": f"t[{backend}]", "fullname": "f::t[x]", "group": "g", "params": {"backend": backend},
                "stats": {"median": median}, "extra_info": {"backend": backend, "device_ms": device_ms}}

    rows = report_render.benchmark_rows([bench("eager", 0.004, 2.0), bench("triton", 0.002, 0.5),
                                         bench("cuda", 0.001)])
    assert [r["vs_eager"] for r in rows] == [1.0, 4.0, 4.0]  # device 2.0/0.5; cuda has none: wall 4/1
    assert "| 0.500 |" in report_render.benchmark_table(rows)


def test_sanitize_kernels_lists_every_op_and_gpu_backend_without_a_gpu():
    result = _run("benchmarks/sanitize_kernels.py", "--list", "--device", "cuda")
    assert result.returncode == 0, result.stdout + result.stderr
    cases = re.findall(r"^case +(\w+) +(\w+) +(\w+) +(\S+)$", result.stdout, re.M)
    assert {(op, backend) for op, backend, _, _ in cases} == {
        (op, backend) for op in ("tokenize", "attention", "seqpool") for backend in ("triton", "cuda")}
    assert {dtype for _, _, dtype, _ in cases} == {"bfloat16", "float32"}
    assert f"sanitize_kernels: {len(cases)} cases on cuda" in result.stdout
    assert re.search(r"^not served +attention cuda +float32 .*float32", result.stdout, re.M)


def test_sanitize_kernels_runs_its_cases_on_cpu(capsys):
    assert sanitize_kernels.main(["--device", "cpu", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^ok ", out, re.M)) == len(sanitize_kernels.CASES)
    assert f"{len(sanitize_kernels.CASES)} passed, 0 failed" in out


def test_sanitize_kernels_fails_a_wrong_result(monkeypatch):
    case = next(c for c in sanitize_kernels.CASES if c.op == "seqpool")
    wrong = sanitize_kernels.ops.seqpool
    monkeypatch.setattr(sanitize_kernels.ops, "seqpool", lambda *a, **k: wrong(*a, **k) * 1.1)
    with pytest.raises(AssertionError, match="relative error"):
        sanitize_kernels.run_case(case, "cpu", sanitize_kernels.torch.float32, sanitize_kernels.torch.device("cpu"))


def test_rates_and_floors():
    peaks = {"gbps": 4000.0, "tflops": 1000.0}
    info = rates(1e-3, flops=2e12 * 1e-3, bytes_moved=8e9 * 1e-3, items=64, peaks=peaks)
    assert info["tflops"] == pytest.approx(2.0) and info["gbps"] == pytest.approx(8.0)
    assert info["floor_flops_us"] == pytest.approx(2.0) and info["floor_bytes_us"] == pytest.approx(2.0)
    assert info["floor_us"] == pytest.approx(2.0) and info["fraction_of_floor"] == pytest.approx(2e-3)
    assert info["fraction_of_peak_bandwidth"] == pytest.approx(2e-3) and info["items_per_s"] == pytest.approx(64e3)
    assert set(rates(1.0, flops=1.0)) == {"tflops"}  # unknown device: no fractions, no floors


def test_compile_rows_are_marked_and_moved_last(pytestconfig):
    bench_conftest.pytest_configure(pytestconfig)  # registers the marker, as in a benchmark session

    class Item:
        def __init__(self, backend):
            self.callspec = type("CallSpec", (), {"params": {"backend": backend, "shape": "B8"}})()
            self.markers = []

        def add_marker(self, marker):
            self.markers.append(marker.name)

    items = [Item(b) for b in ("eager", "compile", "triton", "compile", "cuda")]
    bench_conftest.pytest_collection_modifyitems(items)
    assert [i.callspec.params["backend"] for i in items] == ["eager", "triton", "cuda", "compile", "compile"]
    assert [i.markers for i in items] == [[], [], [], ["compile_row"], ["compile_row"]]


def test_compile_row_marker_selects_the_compile_rows():
    files = ["benchmarks/test_bench_seqpool.py", "benchmarks/test_bench_models.py"]
    result = _run("-m", "pytest", *files, "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "compile_row")
    assert result.returncode == 0, result.stdout + result.stderr
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert {Path(i.split("::")[0]).name for i in ids} == {Path(f).name for f in files}
    # compile, compile-frozen (CPU) and compile over our ops
    assert all(re.search(r"[\[-]compile(-frozen)?(:\w+)?\]", i) for i in ids), ids


class _HostEvent:
    """Stands in for torch.cuda.Event on CPU: record() reads the host clock."""

    def __init__(self, enable_timing=False):
        self.at = None

    def record(self):
        self.at = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3


def test_device_timing_loops_and_records_why_a_graph_failed(monkeypatch):
    monkeypatch.setattr(bench_conftest.torch.cuda, "Event", _HostEvent)
    monkeypatch.setattr(bench_conftest.torch.cuda, "synchronize", lambda: None)
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.001)

    ms = bench_conftest.loop_ms(fn, call_seconds=0.001, seconds=0.02, repeats=5)
    assert len(calls) == 5 * 20 and ms >= 1.0  # 20 calls per loop of 20 ms, per-call time
    calls.clear()
    bench_conftest.loop_ms(fn, call_seconds=0.5, seconds=0.02, repeats=5)
    assert len(calls) == 3 * 2  # a slow call: 3 loops of 2
    calls.clear()

    def uncapturable(fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(bench_conftest, "cuda_graph_ms", uncapturable)
    times = bench_conftest._device_times(fn, 0.001, graph=True)
    assert times["device_ms"] == times["loop_ms"] >= 1.0 and "graph_ms" not in times
    assert times["graph_error"] == "RuntimeError: operation not permitted when stream is capturing"
    monkeypatch.setattr(bench_conftest, "cuda_graph_ms", lambda fn: 0.25)
    assert bench_conftest._device_times(fn, 0.001, graph=True)["device_ms"] == 0.25
    assert set(bench_conftest._device_times(fn, 0.001, graph=False)) == {"loop_ms", "device_ms"}


def test_tests_stage_runs_every_test_file_gpu_kernels_first_and_streams_outcomes():
    report = _gpu_report()
    plan = {s.name: s for s in report.build_plan(report.LENT_MACHINE, report._parse_args(["--dry-run"]), [], "/s")}
    files = [arg for arg in plan["tests"].cmd if arg.startswith("tests/")]
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")} - set(report.STATIC_CHECKS)
    assert sorted(files) == sorted(expected) and len(files) == len(set(files))
    assert files[:len(report.GPU_TEST_FILES)] == report.GPU_TEST_FILES
    assert plan["tests"].env == {"CCT_TEST_RESULTS": "<out>/tests.jsonl"}


def test_test_outcomes_stream_to_jsonl_and_summarise(tmp_path):
    """tests/conftest.py appends each outcome as the test ends, so a run killed before its summary keeps them."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_demo.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no')\n"
        "def test_skipped(): pass\n")
    results = tmp_path / "tests.jsonl"
    env = subprocess_env(CCT_TEST_RESULTS=str(results))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path,
                   env=env, capture_output=True, timeout=120)
    summary = report_render.streamed_test_summary(results)
    assert (summary["tests"], summary["passed"], summary["failures"], summary["skipped"]) == (3, 1, 1, 1)
    assert summary["failed"] == ["test_demo.py::test_bad (call): AssertionError: one is not two"]
    text = report_render.markdown({"tests": summary, "stages": [], "benchmarks": [], "command": "x", "seconds": 1.0,
                                   "environment": {"date": "2026-11-30"}})
    assert "1 passed, 1 failed, 0 errors, 1 skipped of 3. cut off before pytest's summary" in text


def test_train_step_stage_runs_the_cli_comparison_and_its_table_reaches_the_report():
    report = _gpu_report()
    plan = {s.name: s for s in report.build_plan(report.LENT_MACHINE, report._parse_args(["--dry-run"]), [], "/s")}
    cmd = plan["train step"].cmd
    assert cmd[1:4] == ["-m", "cct_kernels", "bench"] and "--mode" in cmd and cmd[cmd.index("--mode") + 1] == "train"
    assert cmd[cmd.index("--backends") + 1] == report.TRAIN_STEP_BACKENDS and not plan["train step"].skip
    assert {"compile", "compile-graphs", "graphs:auto"} <= set(report.TRAIN_STEP_BACKENDS.split(","))
    cpu_plan = {s.name: s for s in report.build_plan({**report.LENT_MACHINE, "gpu": None},
                                                     report._parse_args(["--dry-run"]), [], "/s")}
    assert cpu_plan["train step"].skip == cpu_plan["profile"].skip == "no GPU visible"
    cmd = plan["profile"].cmd
    assert cmd[1:4] == ["-m", "cct_kernels", "profile"] and cmd[cmd.index("--backends") + 1] == "auto"
    followup = ROOT / "benchmarks/results/2026-11-30-nvidia-h200/followup"
    table = report_render.bench_table_lines((followup / "train.log").read_text())
    assert table[0].startswith("cct_7_3x1_32, batch 128, bf16") and any(line.startswith("compile ") for line in table)
    profile = report_render.bench_table_lines((followup / "prof.log").read_text())
    assert profile[0].startswith("cct_7_3x1_32 train, batch 128, bf16") and "_forward_kernel" in "\n".join(profile)
    assert report_render.bench_table_lines("  compile  building, first call\nTraceback ...") == []
    text = report_render.markdown({"tests": {}, "benchmarks": [], "command": "x", "seconds": 1.0,
                                   "environment": {"date": "2026-11-30"},
                                   "stages": [{"name": "train step", "command": "c", "status": "ok", "seconds": 5,
                                               "budget_s": 60, "table": table}]})
    assert "## train step" in text and table[0] in text


def test_tune_linear_sweeps_candidates_against_the_reference(tmp_path):
    """benchmarks/tune_linear.py (the tile sweep for a GPU session) runs its whole loop under the interpreter: every
    case, two candidates per kernel kind, each checked against torch before it is timed, and writes its JSON."""
    out = tmp_path / "tune.json"
    result = _run("benchmarks/tune_linear.py", "--interpret", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert [c["case"] for c in report["cases"]] == [f"{c[0]} {c[-1]}" for c in tune_linear.CASES]
    for case in report["cases"]:
        kinds = {row["kind"] for row in case["candidates"]}
        assert kinds == set(tune_linear.KINDS[case["case"].split()[-1]])
        assert all("ms" in row and row["max_rel_error"] < 1e-4 for row in case["candidates"]), case
    assert _run("benchmarks/tune_linear.py", "--dry-run").stdout.count("candidates") == 7


def test_host_time_reports_each_part_of_a_stubbed_step():
    """benchmarks/host_time.py (host time with the Triton launches stubbed) runs a block and the miniature CCT-7's
    forward and backward on the triton backend, with the block as one op and as its ops one by one, and prints a
    positive time for each part and mode."""
    result = _run("benchmarks/host_time.py", "--rounds", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    times = {name: (float(one), float(by_op))
             for name, one, by_op in re.findall(r"^(.+?)\s+([\d.]+) ms\s+([\d.]+) ms$", result.stdout, re.M)}
    assert list(times) == ["block forward", "block forward + backward", "model forward", "model forward + backward",
                           "model eval forward"]
    assert all(ms > 0 for pair in times.values() for ms in pair)
    assert all(backward > forward for backward, forward in zip(times["block forward + backward"],
                                                               times["block forward"]))
