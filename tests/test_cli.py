"""The command line (info, bench, profile) on a tiny model, and the GPU report's formatting on fake results."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cct_kernels import cli, profiling

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "cct_2_3x2_32", "--batch", "2", "--device", "cpu"]


def _gpu_report():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_info_lists_every_backend_per_device(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    cpu_section = out.split("\ncpu:")[1]
    for name in ("eager", "compile", "triton", "cuda", "cpu", "auto"):
        assert f"\n  {name} " in cpu_section
    # No GPU here: the cuda backend must say why it cannot run on CPU tensors.
    assert "cuda     no " in cpu_section


def test_default_backends_never_time_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    names = profiling.speed_backends(cpu)
    assert names[:2] == ["eager", "compile"] and names[-1] == "auto"
    assert "triton" not in names
    assert "interpreter" in profiling.backend_reason("triton", cpu)


def test_bench_writes_json_and_png_and_reports_failures(tmp_path, capsys):
    # "cuda" cannot run here: it must show up as a failed row, not end the run.
    argv = ["bench", *TINY, "--mode", "both", "--backends", "eager,auto,cuda", "--iters", "2", "--warmup", "1",
            "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "FAILED" in out and "images/s" in out
    report = json.loads((tmp_path / "bench_cct_2_3x2_32_cpu_fp32.json").read_text())
    assert report["command"].startswith("cct-kernels bench") and report["device"]["type"] == "cpu"
    assert report["versions"]["torch"] == torch.__version__ and report["date"]
    rows = {(r["backend"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(b, m) for b in ("eager", "auto", "cuda") for m in ("inference", "train")}
    for backend in ("eager", "auto"):
        for mode in ("inference", "train"):
            row = rows[backend, mode]
            assert row["error"] is None and row["iters"] == 2 and row["median_ms"] > 0
            assert row["images_per_s"] == pytest.approx(2 / (row["median_ms"] / 1e3))
    assert rows["eager", "inference"]["speedup_vs_eager"] == 1.0
    assert rows["auto", "inference"]["max_abs_diff"] < 1e-4  # same weights, same images
    assert "not built" in rows["cuda", "train"]["error"] or "CUDA" in rows["cuda", "train"]["error"]
    assert (tmp_path / "bench_cct_2_3x2_32_cpu_fp32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_an_unknown_backend(tmp_path):
    with pytest.raises(SystemExit, match="unknown backend 'fast'"):
        cli.main(["bench", *TINY, "--backends", "eager,fast", "--out", str(tmp_path)])


def test_profile_prints_top_ops_and_writes_a_trace(tmp_path, capsys):
    argv = ["profile", *TINY, "--backends", "eager,auto", "--top", "5", "--iters", "1", "--warmup", "0",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "eager: op" in out and "auto: op" in out and "aten::" in out
    trace = json.loads((tmp_path / "trace_cct_2_3x2_32_eager_inference.json").read_text())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    summary = json.loads((tmp_path / "profile_cct_2_3x2_32_cpu.json").read_text())
    top = summary["modes"]["inference"]["top"]["eager"]
    assert 0 < len(top) <= 5 and top == sorted(top, key=lambda r: -r["self_ms"])


def test_time_step_plans_iterations_from_the_budget():
    calls = []
    timing = profiling.time_step(lambda: calls.append(1), torch.device("cpu"), warmup=2, min_time=0.0,
                                 min_iters=4, max_iters=10)
    assert len(timing.times_ms) == 4 and len(calls) == 6
    assert profiling.time_step(lambda: None, torch.device("cpu"), warmup=1, iters=3).summary()["iters"] == 3


def test_model_flops_counts_the_matmuls_of_the_small_model():
    # cct_2_3x2_32: 2 conv stages (3->64->128, 3x3) then 64 tokens, 2 layers of dim 128, mlp 128, 10 classes.
    conv = 2 * (32 * 32 * 64 * 3 * 9 + 16 * 16 * 128 * 64 * 9)
    layer = 2 * 64 * (128 * 384 + 128 * 128 + 2 * 128 * 128) + 4 * 64 * 64 * 128
    head = 4 * 64 * 128 + 2 * 128 * 10  # SeqPool (scores and weighted sum) and fc
    assert profiling.model_flops("cct_2_3x2_32", 3, "inference") == 3 * (conv + 2 * layer + head)
    assert profiling.model_flops("cct_2_3x2_32", 1, "train") == 3 * (conv + 2 * layer + head)


FAKE_BENCHMARKS = {
    "machine_info": {"node": "gpu-1"},
    "benchmarks": [
        {"name": "test_model[cct_7_3x1_32-throughput_b128-inference-eager]", "group": "cct_7_3x1_32 thr",
         "fullname": "benchmarks/test_bench_models.py::test_model[...eager]",
         "stats": {"median": 0.0125, "mean": 0.013, "min": 0.012, "rounds": 40},
         "extra_info": {"backend": "eager", "items_per_s": 10240.0, "tflops": 24.2,
                        "fraction_of_peak_flops": 0.025}},
        {"name": "test_model[cct_7_3x1_32-throughput_b128-inference-triton]", "group": "cct_7_3x1_32 thr",
         "fullname": "benchmarks/test_bench_models.py::test_model[...triton]",
         "stats": {"median": 0.005, "mean": 0.0051, "min": 0.0049, "rounds": 90},
         "extra_info": {"backend": "triton", "items_per_s": 25600.0, "tflops": 60.5, "gbps": 1200.0,
                        "fraction_of_peak_bandwidth": 0.358, "cuda_graph_ms": 4.1}},
        {"name": "test_seqpool[B128]", "group": None, "fullname": "benchmarks/test_bench_seqpool.py::x",
         "stats": {"median": 2.5e-5, "mean": 2.6e-5, "min": 2.4e-5, "rounds": 1000}, "extra_info": {}},
    ],
}


def test_gpu_report_formats_every_benchmark(tmp_path):
    report = _gpu_report()
    rows = report.benchmark_rows(FAKE_BENCHMARKS["benchmarks"])
    table = report.benchmark_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| group | benchmark | backend | median ms")
    eager = next(line for line in lines if line.endswith("|") and "-eager]" in line)
    triton = next(line for line in lines if "-triton]" in line)
    assert "| 12.500 |" in eager and "| 10,240 |" in eager and "| 24.2 |" in eager and "| 2.5% |" in eager
    assert "| 5.000 |" in triton and "| 1,200 |" in triton and "| 35.8% |" in triton and "2.50x" in triton
    assert "| 4.100 |" in triton  # CUDA-graph replay time
    assert any("| 0.025 |" in line for line in lines)  # 25 us shown in ms


def test_gpu_report_reads_junit_and_survives_a_stage_timeout(tmp_path):
    report = _gpu_report()
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1" time="3.5">'
        '<testcase classname="tests.test_a" name="test_ok" time="1"/>'
        '<testcase classname="tests.test_a" name="test_bad" time="1"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.test_a" name="test_skip" time="0"><skipped message="no gpu"/></testcase>'
        '<testcase classname="tests.test_b" name="test_ok2" time="1"/></testsuite></testsuites>')
    summary = report.junit_summary(junit)
    assert (summary["tests"], summary["failures"], summary["skipped"], summary["passed"]) == (4, 1, 1, 2)
    assert summary["failed"] == ["tests.test_a::test_bad: assert 1 == 2"]
    stage = report.run_stage("sleep", [sys.executable, "-c", "import time; time.sleep(30)"], budget_s=2.0,
                             log=tmp_path / "sleep.log")
    assert stage["status"] == "timeout" and stage["seconds"] < 20
    stage = report.run_stage("ok", [sys.executable, "-c", "print('hi')"], budget_s=30, log=tmp_path / "ok.log")
    assert stage["status"] == "ok" and stage["returncode"] == 0 and "hi" in (tmp_path / "ok.log").read_text()


def test_model_benchmark_streams_its_result_for_the_gpu_report(tmp_path):
    """One real case of benchmarks/test_bench_models.py: extra_info, the JSON-lines stream, the speedup summary."""
    jsonl = tmp_path / "bench.jsonl"
    node = "benchmarks/test_bench_models.py::test_model[cct_2_3x2_32-latency_b1-inference-eager]"
    env = {**os.environ, "CCT_BENCH_JSONL": str(jsonl), "CCT_BENCH_QUICK": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", node, "--benchmark-only", "-q", "-p", "no:cacheprovider",
                          f"--benchmark-json={tmp_path / 'bench.json'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "speedup per case" in run.stdout
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    info = record["extra_info"]
    assert info["backend"] == "eager" and info["model"] == "cct_2_3x2_32" and info["batch"] == 1
    assert info["items_per_s"] == pytest.approx(1 / record["stats"]["median"])
    assert info["tflops"] > 0 and 1 <= record["stats"]["rounds"] <= 20
    rows = _gpu_report().benchmark_rows(json.loads((tmp_path / "bench.json").read_text())["benchmarks"])
    assert rows[0]["backend"] == "eager" and rows[0]["vs_eager"] == 1.0
