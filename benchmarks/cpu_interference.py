"""How much one backend's call slows the next one's on the CPU: why `cct-kernels bench` settles each step first.

    python benchmarks/cpu_interference.py [--model cct_14_7x2_224] [--batch 1] [--rounds 30] [--out result.json]

Times (ms, min and median over rounds, inference) the cpu backend and ONNX Runtime on the same weights and images,
each call right after: a call of the other backend, an idle gap of 50 ms, and a call of its own (as in a loop of
its own, what profiling.time_interleaved's settle does). ONNX Runtime's thread pool spins after a run, on the cores
our threads need (NOTES.md, cpu extension, eighth round).
"""
from __future__ import annotations

import statistics
import time

import _cpu_script  # benchmarks/, the script's folder
import torch

import cct_kernels
from cct_kernels import profiling, speed_models


def interference(name: str, batch: int, rounds: int) -> dict:
    ours = cct_kernels.create_model(name, backend="cpu").eval()
    official = cct_kernels.create_model(name, backend="eager").eval()
    official.load_state_dict(ours.state_dict())
    onnx = speed_models.OnnxRuntimeInference(official).eval()
    inputs, _ = profiling.make_inputs(ours, batch, torch.device("cpu"), torch.float32)
    steps = {"cpu": lambda: ours(*inputs), "onnxruntime": lambda: onnx(*inputs)}
    times = {f"{step} after {before}": [] for step in steps for before in ("the other", "an idle gap", "itself")}

    def timed(step: str, before: str):
        t0 = time.perf_counter()
        steps[step]()
        times[f"{step} after {before}"].append((time.perf_counter() - t0) * 1e3)

    with torch.inference_mode():
        for step in steps.values():
            step()
        for _ in range(rounds):
            for step, other in (("cpu", "onnxruntime"), ("onnxruntime", "cpu")):
                steps[other]()
                timed(step, "the other")
                time.sleep(0.05)
                timed(step, "an idle gap")
                timed(step, "itself")
    return {case: {"min_ms": min(t), "median_ms": statistics.median(t)} for case, t in times.items()}


def show(result: dict) -> None:
    for case, t in result["cases"].items():
        print(f"{case:32s} min {t['min_ms']:7.2f} ms  median {t['median_ms']:7.2f} ms")


if __name__ == "__main__":
    _cpu_script.run(__doc__, 30, lambda model, batch, rounds: {"cases": interference(model, batch, rounds)}, show)
