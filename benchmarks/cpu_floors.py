"""Floors of whole-model CPU inference, from rates measured on this machine (issue 15: every case within 20% of its
floor, or NOTES.md says what stands between).

    python benchmarks/cpu_floors.py --out benchmarks/results/<date>-cpu/floors.json

Per case (model, batch): the linears' FLOPs at the rate MKL sgemm reaches on each of the model's own linear shapes
(min time over rounds) writing into an output that is already mapped, plus attention's and the convolutions' FLOPs at the best of those rates, plus
the bytes a layer-fused implementation must move (every parameter read once; the residual stream read and written
once per encoder block; the input and the logits) at the bandwidth of a large tensor copy. The FLOPs are the
model_flops count of cct_kernels.profiling, split by kind.
The rate of F.linear with a fresh output (what eager and torch.compile get: glibc maps large outputs anew, and the
GEMM then page-faults them in) is recorded beside it, with the floor it gives (floor_fresh_ms); the cpu backend's
output cache writes into mapped memory, so floor_ms is the one it can reach.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cct_kernels
from cct_kernels import profiling
from cct_kernels.cli_bench import device_name

CASES = (("cct_7_3x1_32", 1), ("cct_7_3x1_32", 64), ("cct_14_7x2_224", 1), ("cct_14_7x2_224", 16))


def _best_ms(fn, rounds: int = 7, min_s: float = 0.2) -> float:
    fn()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s / rounds or calls == 0:
        fn()
        calls += 1
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e3


def copy_gbps() -> float:
    src = torch.randn(64 * 2**20 // 4)  # 64 MB, far beyond any cache
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_ms(lambda: dst.copy_(src)) / 1e6


def case_floor(name: str, batch: int, gbps: float) -> dict:
    model = cct_kernels.create_model(name, backend="eager").eval()
    inputs, _ = profiling.make_inputs(model, batch, torch.device("cpu"), torch.float32)
    shapes = profiling.linear_shapes(model, inputs)
    rates, fresh_rates = {}, {}  # GFLOP/s
    with torch.inference_mode():
        for m, k, n in sorted(set(shapes)):
            x, w, out = torch.randn(m, k), torch.randn(n, k), torch.empty(m, n)
            rates[m, k, n] = 2 * m * k * n / _best_ms(lambda: torch.mm(x, w.t(), out=out)) / 1e6
            fresh_rates[m, k, n] = 2 * m * k * n / _best_ms(lambda: F.linear(x, w)) / 1e6
    linear_flops = sum(2 * m * k * n for m, k, n in shapes)
    linear_ms = sum(2 * m * k * n / rates[m, k, n] / 1e6 for m, k, n in shapes)
    linear_fresh_ms = sum(2 * m * k * n / fresh_rates[m, k, n] / 1e6 for m, k, n in shapes)
    total_flops = profiling.model_flops(name, batch, "inference")
    other_flops = total_flops - linear_flops  # attention and the convolutions (linear_shapes has the fc too)
    best_rate = max(rates.values())
    params = sum(p.numel() for p in model.parameters()) * 4
    blocks = len(model.classifier.blocks)
    tokens, dim = shapes[0][0], model.classifier.embedding_dim
    bytes_moved = params + inputs[0].numel() * 4 + batch * 4 * 1000 + blocks * 2 * tokens * dim * 4
    rest_ms = other_flops / best_rate / 1e6 + bytes_moved / gbps / 1e6
    return {
        "model": name, "batch": batch, "linear_gflop": linear_flops / 1e9, "other_gflop": other_flops / 1e9,
        "sgemm_gflops_by_shape": {f"{m}x{k}x{n}": round(r, 1) for (m, k, n), r in rates.items()},
        "sgemm_fresh_output_gflops_by_shape": {f"{m}x{k}x{n}": round(r, 1) for (m, k, n), r in fresh_rates.items()},
        "linear_ms": linear_ms, "linear_fresh_ms": linear_fresh_ms, "other_ms": other_flops / best_rate / 1e6,
        "bytes_mb": bytes_moved / 1e6, "bytes_ms": bytes_moved / gbps / 1e6, "floor_ms": linear_ms + rest_ms,
        "floor_fresh_ms": linear_fresh_ms + rest_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    gbps = copy_gbps()
    result = {
        "device": device_name(torch.device("cpu")), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "copy_gbps": gbps, "cases": [case_floor(name, batch, gbps) for name, batch in CASES],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for c in result["cases"]:
        print(f"{c['model']} b{c['batch']}: floor {c['floor_ms']:.2f} ms, with fresh outputs {c['floor_fresh_ms']:.2f} "
              f"(linears {c['linear_ms']:.2f}, "
              f"attention+conv {c['other_ms']:.2f}, bytes {c['bytes_ms']:.2f}); sgemm {c['sgemm_gflops_by_shape']}")


if __name__ == "__main__":
    main()
