"""The command line (info, bench, profile, train flags) on a tiny model, and the GPU report's formatting on fake
results."""
import dataclasses
import gzip
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cct_kernels
from cct_kernels import cli, cli_bench, profiling
from cct_kernels.train import TrainConfig
from tests.cases import subprocess_env

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
    models = out.split("\nModels")[1]
    assert all(name in models for name in cct_kernels.TEXT_MODELS) and "cct_7_3x1_32" in models


def test_bench_runs_a_text_model(tmp_path):
    """Text models take token ids and lengths (profiling.make_inputs); bench compares them like image models."""
    assert cli.main(["bench", "--model", "text_cvt_2", "--batch", "2", "--rounds", "1", "--backends", "eager,auto",
                     "--mode", "both", "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("bench_text_cvt_2_*.json")).read_text())
    assert {row["backend"] for row in result["results"]} >= {"eager", "auto"}


def test_default_backends_never_time_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    names = profiling.speed_backends(cpu)
    assert names[:2] == ["eager", "compile"] and names[names.index("auto") + 1] == "compile:auto"
    assert {"frozen:auto", "compile-frozen"} <= set(names)
    assert not {"frozen:auto", "compile-frozen"} & set(profiling.speed_backends(torch.device("cuda")))
    assert ("onnxruntime" in names) == (profiling.backend_reason("onnxruntime", cpu) is None)
    assert "triton" not in names
    assert "interpreter" in profiling.backend_reason("compile:triton", cpu)
    assert profiling.backend_reason("graphs:auto", cpu) == "CUDA graphs need a CUDA device"
    assert profiling.backend_reason("compile-graphs", cpu) == "CUDA graphs need a CUDA device"
    assert "compile-graphs" not in profiling.speed_backends(cpu)
    assert profiling.backend_reason("compile-graphs:auto", cpu) == "CUDA graphs need a CUDA device"
    assert "unknown backend" in profiling.backend_reason("compile-graphs:nope", torch.device("cuda"))
    assert all(profiling.compiles(n) for n in ("compile", "compile-graphs", "compile:cpu", "compile-graphs:auto"))
    assert not any(profiling.compiles(n) for n in ("graphs:auto", "auto", "onnxruntime"))
    assert "interpreter" in profiling.backend_reason("triton", cpu)


def test_bench_onnxruntime_row_runs_the_exported_eager_model(tmp_path, capsys):
    """The ONNX Runtime row (installed by scripts/bootstrap.sh): the eager model exported once, same logits; no
    training row (inference only)."""
    argv = ["bench", *TINY, "--mode", "both", "--backends", "eager,onnxruntime", "--rounds", "2", "--warmup", "1",
            "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = {(r["backend"], r["mode"]): r for r in json.loads(next(tmp_path.glob("*.json")).read_text())["results"]}
    assert ("onnxruntime", "train") not in rows
    assert rows["onnxruntime", "inference"]["error"] is None and rows["onnxruntime", "inference"]["max_abs_diff"] < 1e-4


def test_bench_frozen_rows_run_inference_only(tmp_path):
    """frozen:cpu (cct_kernels.freeze) and compile-frozen (inductor's freezing): inference rows with eager's logits,
    no training row; the frozen row's model has its weights frozen."""
    from cct_kernels.extension import frozen

    before = frozen.stats()["weights"]
    model = profiling.build_model("cct_2_3x2_32", "frozen:cpu", torch.device("cpu"), torch.float32)
    assert frozen.stats()["weights"] > before
    del model
    argv = ["bench", *TINY, "--mode", "both", "--backends", "eager,frozen:cpu,compile-frozen", "--rounds", "2",
            "--warmup", "1", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = {(r["backend"], r["mode"]): r for r in json.loads(next(tmp_path.glob("*.json")).read_text())["results"]}
    assert set(rows) == {("eager", "inference"), ("eager", "train"), ("frozen:cpu", "inference"),
                         ("compile-frozen", "inference")}
    for name in ("frozen:cpu", "compile-frozen"):
        assert rows[name, "inference"]["error"] is None and rows[name, "inference"]["max_abs_diff"] < 1e-4
    assert profiling.compiles("compile-frozen") and not profiling.compiles("frozen:auto")
    assert "unknown backend" in profiling.backend_reason("frozen:eager", torch.device("cpu"))


def test_bench_writes_json_and_png_and_fails_when_a_row_failed(tmp_path, capsys):
    # "cuda" cannot run here: it must show up as a failed row, not end the run, and make the exit status 1.
    argv = ["bench", *TINY, "--mode", "both", "--backends", "eager,auto,cuda", "--rounds", "2", "--warmup", "1",
            "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "images/s" in captured.out and "median ms" in captured.out
    assert "2 of 6 rows failed: cuda inference, cuda train" in captured.err
    report = json.loads((tmp_path / "bench_cct_2_3x2_32_cpu_fp32.json").read_text())
    assert report["command"] == "cct-kernels " + " ".join(argv) and report["device"]["type"] == "cpu"
    assert report["versions"]["torch"] == torch.__version__ and report["date"]
    assert report["config"]["rounds"] == 2 and "interleaved" in report["config"]["timing"]
    rows = {(r["backend"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(b, m) for b in ("eager", "auto", "cuda") for m in ("inference", "train")}
    for backend in ("eager", "auto"):
        for mode in ("inference", "train"):
            row = rows[backend, mode]
            assert row["error"] is None and row["rounds"] == 2
            assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["spread_pct"] >= 0
            assert row["images_per_s"] == pytest.approx(2 / (row["median_ms"] / 1e3))
    assert rows["eager", "inference"]["speedup_vs_eager"] == 1.0
    assert rows["auto", "inference"]["max_abs_diff"] < 1e-4  # same weights, same images
    assert "not built" in rows["cuda", "train"]["error"] or "CUDA" in rows["cuda", "train"]["error"]
    assert (tmp_path / "bench_cct_2_3x2_32_cpu_fp32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_dropout_builds_every_model_with_it(tmp_path, monkeypatch):
    """--dropout reaches every backend's model (the blocks' linears draw it in training), is recorded in the
    config and the file name, and must be in [0, 1]."""
    rates = []
    build = profiling.build_model

    def recording_build(name, backend, device, dtype, seed=0, **kwargs):
        model = build(name, backend, device, dtype, seed, **kwargs)
        rates.append((backend, {m.dropout2.p for m in model.modules() if hasattr(m, "dropout2")}))
        return model

    monkeypatch.setattr(profiling, "build_model", recording_build)
    argv = ["bench", *TINY, "--mode", "train", "--backends", "eager,auto", "--dropout", "0.2", "--rounds", "1",
            "--warmup", "0", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert rates == [("eager", {0.2}), ("auto", {0.2})]
    report = json.loads((tmp_path / "bench_cct_2_3x2_32_dropout0.2_cpu_fp32.json").read_text())
    assert report["config"]["model_kwargs"] == {"dropout": 0.2}
    with pytest.raises(SystemExit):
        cli.main(["bench", *TINY, "--dropout", "1.5", "--out", str(tmp_path)])


def test_bench_run_as_a_module_exits_0_and_records_its_real_command_line(tmp_path):
    argv = [sys.executable, "-m", "cct_kernels", "bench", *TINY, "--mode", "inference", "--backends", "eager",
            "--rounds", "1", "--warmup", "0", "--no-progress", "--out", str(tmp_path)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "bench_cct_2_3x2_32_cpu_fp32.json").read_text())
    assert report["command"] == shlex.join(argv)  # not "__main__.py bench ..."


BAD_FLAGS = [
    (["bench", "--device", "gpu"], "argument --device: unknown device 'gpu'"),
    (["bench", "--device", "cuda"], "argument --device: 'cuda': torch sees no CUDA device"),
    (["bench", "--batch", "0"], "argument --batch: must be an int >= 1, got 0"),
    (["bench", "--batch", "-2"], "argument --batch: must be an int >= 1, got -2"),
    (["bench", "--batch", "two"], "argument --batch: must be an int >= 1, got 'two'"),
    (["bench", "--iters", "0"], "argument --rounds/--iters: must be an int >= 1, got 0"),
    (["bench", "--min-time", "-1"], "argument --min-time: must be a number in (0, inf), got -1"),
    (["bench", "--backends", "eager,fast"], "argument --backends: unknown backend 'fast'"),
    (["bench", "--model", "cct_7_3x1"], "unknown model 'cct_7_3x1'; did you mean cct_7_3x1_32"),
    (["profile", "--iters", "0"], "argument --iters: must be an int >= 1, got 0"),
    (["profile", "--top", "0"], "argument --top: must be an int >= 1, got 0"),
    (["profile", "--warmup", "-1"], "argument --warmup: must be an int >= 0, got -1"),
    (["profile", "--by", "kernels", "--device", "cpu"], "argument --by: 'kernels' ranks CUDA kernels and needs a CUDA"),
    (["train", "--epochs", "0"], "argument --epochs: must be an int >= 1, got 0"),
    (["train", "--batch-size", "0"], "argument --batch-size: must be an int >= 1, got 0"),
    (["train", "--train-subset", "0"], "argument --train-subset: must be an int >= 1, got 0"),
    (["train", "--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
    (["train", "--lr", "nan"], "argument --lr: must be a number in (0, inf), got nan"),
    (["train", "--label-smoothing", "1"], "argument --label-smoothing: must be a number in [0, 1), got 1"),
    (["train", "--time-limit", "0"], "argument --time-limit: must be a number in (0, inf), got 0"),
    (["train", "--augment", "False"], "unrecognized arguments: False"),
    (["train", "--backend", "fast"], "argument --backend: invalid choice: 'fast'"),
    (["train", "--device", "meta"], "argument --device: unsupported device 'meta'"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_every_bad_flag_is_a_one_line_error_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "error:" in err, err


@pytest.mark.parametrize("out", ["a_file", "a_file/below"])
def test_an_unwritable_out_is_refused_before_any_work(tmp_path, out, capsys):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *TINY, "--out", str(tmp_path / out)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "argument --out: cannot write into" in captured.err and "building" not in captured.err


def test_a_bad_flag_in_a_real_process_has_no_traceback():
    run = subprocess.run([sys.executable, "-m", "cct_kernels", "bench", "--batch", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == ["cct-kernels bench: error: argument --batch: must be an int >= 1, got 0 "
                                       "(see cct-kernels bench --help)"]


def test_train_boolean_flags_are_flags():
    parse = cli.build_parser().parse_args
    assert parse(["train"]).augment is False
    assert parse(["train", "--augment"]).augment is True
    assert parse(["train", "--augment", "--no-augment"]).augment is False
    assert parse(["train", "--resume"]).resume is True and parse(["train"]).resume is False


def test_train_help_describes_every_option_with_units(capsys):
    for field in dataclasses.fields(TrainConfig):
        if field.name != "progress":
            assert len(cli.TRAIN_OPTIONS[field.name]["help"]) > 20, field.name
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--time-limit MINUTES" in out and "in minutes" in out and "--augment, --no-augment" in out
    assert "images per optimizer step" in out and "(default: 128)" in out


def test_train_reports_a_run_stopped_before_its_first_epoch_and_only_on_rank_0(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "train", lambda config: {"epochs": [], "test_accuracy": None})
    assert cli.main(["train", "--out", str(tmp_path), "--no-progress", "--time-limit", "0.01"]) == 0
    assert "stopped by --time-limit before the first epoch ended" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", "--out", str(tmp_path), "--no-progress"]) == 0
    assert capsys.readouterr().out == ""


def test_train_without_its_dataset_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    def missing(config):
        raise FileNotFoundError("Fashion-MNIST not found under /nowhere: `apt-get install dataset-fashion-mnist`")

    monkeypatch.setattr(cli, "train", missing)
    assert cli.main(["train", "--out", str(tmp_path), "--no-progress"]) == 2
    assert capsys.readouterr().err == ("cct-kernels train: error: Fashion-MNIST not found under /nowhere: "
                                       "`apt-get install dataset-fashion-mnist`\n")


def test_profile_prints_fitting_tables_allocated_and_freed_memory_and_paths(tmp_path, capfd):
    argv = ["profile", *TINY, "--backends", "eager,auto", "--mode", "both", "--top", "5", "--iters", "1",
            "--warmup", "0", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out, err = capfd.readouterr()
    assert "USDT" not in err and "STAGE" not in err  # kineto's start/stop lines are silenced
    assert "aten::" in out and "alloc MB" in out and "freed MB" in out
    assert max(len(line) for line in out.splitlines() if str(tmp_path) not in line) <= 120  # paths: pytest's
    for path in [tmp_path / "profile_cct_2_3x2_32_cpu.json", tmp_path / "trace_cct_2_3x2_32_eager_train.json.gz"]:
        assert str(path) in out and path.exists()
    trace = json.loads(gzip.decompress((tmp_path / "trace_cct_2_3x2_32_eager_inference.json.gz").read_bytes()))
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    summary = json.loads((tmp_path / "profile_cct_2_3x2_32_cpu.json").read_text())
    top = summary["modes"]["train"]["top"]["eager"]
    assert 0 < len(top) <= 5 and top == sorted(top, key=lambda r: -r["self_ms"])
    entries = [e for mode in summary["modes"].values() for rows in mode["top"].values() for e in rows]
    assert all(e["allocated_mb"] >= 0 and e["freed_mb"] >= 0 for e in entries)
    assert any(e["allocated_mb"] > 0 for e in entries)


def test_profile_table_shortens_op_names_to_fit_120_columns():
    entries = [{"name": "cct_kernels::" + "x" * 200, "self_ms": 12345.678, "count": 100000, "allocated_mb": 1e4,
                "freed_mb": 0.0}]
    table = cli_bench.profile_table(entries)
    assert max(len(line) for line in table.splitlines()) <= 120 and "..." in table


def test_time_interleaved_rotates_the_order_and_drops_a_failing_step():
    calls = []

    def step(name):
        def run():
            calls.append(name)
            if name == "bad" and calls.count("bad") == 2:
                raise RuntimeError("broken on its second call")
        return run

    steps = {name: step(name) for name in ("a", "b", "bad")}
    timings = profiling.time_interleaved(steps, torch.device("cpu"), estimates_s={"a": 0.0, "b": 0.0, "bad": 0.0},
                                         rounds=4, settle=False)
    assert calls[:3] == ["a", "b", "bad"] and calls[3:5] == ["b", "bad"] and calls.count("bad") == 2
    assert len(timings["a"].times_ms) == 4 and len(timings["b"].times_ms) == 4
    assert isinstance(timings["bad"], RuntimeError)
    summary = timings["a"].summary()
    assert summary["rounds"] == 4 and summary["min_ms"] <= summary["median_ms"] <= summary["max_ms"]
    # Without a round count: about min_time per step from the estimates, within the bounds.
    planned = profiling.time_interleaved({"a": lambda: None}, torch.device("cpu"), estimates_s={"a": 0.1},
                                         min_time=0.35, min_rounds=2, settle=False)
    assert len(planned["a"].times_ms) == 4
    # Settling (the CPU default) calls each step twice a round, and plans half the rounds.
    planned = profiling.time_interleaved({"a": lambda: None}, torch.device("cpu"), estimates_s={"a": 0.1},
                                         min_time=0.35, min_rounds=2)
    assert len(planned["a"].times_ms) == 2


def test_time_interleaved_settles_each_step_before_timing_it():
    # "victim" is slow on its first call after another step (as our backends are after ONNX Runtime's spinning
    # threads): settled, its timed call is the second one, and runs as in a loop of its own.
    previous = []

    def call(name):
        def run():
            if name == "victim" and previous and previous[-1] != "victim":
                time.sleep(0.02)
            previous.append(name)
        return run

    steps = {"other": call("other"), "victim": call("victim")}
    settled = profiling.time_interleaved(steps, torch.device("cpu"), estimates_s={"other": 0.0, "victim": 0.0},
                                         rounds=6)
    assert previous[:4] == ["other", "other", "victim", "victim"]
    unsettled = profiling.time_interleaved(steps, torch.device("cpu"), estimates_s={"other": 0.0, "victim": 0.0},
                                           rounds=6, settle=False)
    # unsettled, the rounds where it runs second (every other round, as the order rotates) time the slow call
    assert sum(t >= 20 for t in unsettled["victim"].times_ms) == 3
    assert sum(t >= 20 for t in settled["victim"].times_ms) == 0


def test_model_flops_counts_the_matmuls_of_the_small_model():
    # cct_2_3x2_32: 2 conv stages (3->64->128, 3x3) then 64 tokens, 2 layers of dim 128, mlp 128, 10 classes.
    conv = 2 * (32 * 32 * 64 * 3 * 9 + 16 * 16 * 128 * 64 * 9)
    layer = 2 * 64 * (128 * 384 + 128 * 128 + 2 * 128 * 128) + 4 * 64 * 64 * 128
    head = 4 * 64 * 128 + 2 * 128 * 10  # SeqPool (scores and weighted sum) and fc
    assert profiling.model_flops("cct_2_3x2_32", 3, "inference") == 3 * (conv + 2 * layer + head)
    assert profiling.model_flops("cct_2_3x2_32", 1, "train") == 3 * (conv + 2 * layer + head)


def test_linear_shapes_lists_every_linear_of_the_small_model():
    model = cct_kernels.create_model("cct_2_3x2_32", backend="eager")
    block = [(2 * 64, 128, 384), (2 * 64, 128, 128), (2 * 64, 128, 128), (2 * 64, 128, 128)]  # qkv, proj, mlp
    assert profiling.linear_shapes(model, (torch.randn(2, 3, 32, 32),)) == block * 2 + [(2, 128, 10)]


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
    env = subprocess_env(CCT_BENCH_JSONL=str(jsonl), CCT_BENCH_QUICK="1")
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
