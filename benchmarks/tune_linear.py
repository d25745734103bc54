"""Tile sweep of the Triton linear kernels against cuBLAS at the CCT-7 training shapes, for a GPU session.

    python3 benchmarks/tune_linear.py                 # every case and candidate within --budget seconds (240)
    python3 benchmarks/tune_linear.py --dry-run       # the plan: cases and candidates, nothing run
    python3 benchmarks/tune_linear.py --interpret     # tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script)

Why: on the H200 (2026-11-30, bf16 CCT-7 training step at batch 128) the Triton GEMMs took 4.66 ms a step against
~2.1 ms of cuBLAS for the same linears (benchmarks/NOTES.md, "First GPU run"); their tiles were chosen from static
sm_90 figures only. Each candidate (block sizes, warps, stages) replaces linear_tiles' entry for its kernel kind
("forward", "grad_x", "grad_w"), runs the op's own launcher (triton/linear.py) once against a torch reference
(max error / max |reference| below TOLERANCE), and is timed with triton.testing.do_bench (median). The baseline is
cuBLAS with the epilogue as ATen passes (what the cuda backend runs; for the backward cases, what the triton
backend's backward itself now runs on a GPU, with its grad_h pass as one Triton kernel: a candidate that beats the
baseline there argues for the fused path back, see triton/linear._vendor_gemm). A backward candidate's time is the whole
backward (grad_x and grad_W kernels) with that kind's entry replaced. Prints one table per case, fastest first,
and writes JSON (--out; default $OUT/tune_linear.json when $OUT is a folder, else
benchmarks/results/tune_linear.json). Candidates that fail to compile or to match are recorded with the error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cct_kernels.triton import linear as triton_linear  # noqa: E402
from cct_kernels.triton import linear_tiles  # noqa: E402

TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}
# (name, M, K, N, bias, activation, residual, pass): CCT-7/3x1 at batch 128 (256 tokens an image, D 256, MLP 512).
# The backward cases first: their baseline is the split the next decision is about (benchmarks/NOTES.md, "Second
# look at the H200 trace"), so a sweep cut by --budget still answers it; qkv (on cuBLAS in the op since) last.
CASES = [
    ("linear1", 32768, 256, 512, True, "gelu", False, "backward"),
    ("linear2", 32768, 512, 256, True, "none", True, "backward"),
    ("linear1", 32768, 256, 512, True, "gelu", False, "forward"),
    ("linear2", 32768, 512, 256, True, "none", True, "forward"),
    ("qkv", 32768, 256, 768, False, "none", False, "forward"),
]
# Per kernel kind: (rows, cols, reduction block, num_warps, num_stages) in linear_tiles' order; the first is the
# shipped entry. 16-bit shared memory per stage: (rows + cols) * reduction * 2 bytes (grad_x also loads an h tile).
CANDIDATES = {
    "forward": [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3),
                (128, 128, 64, 4, 4), (64, 256, 64, 4, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3)],
    "grad_x": [(128, 256, 64, 8, 2), (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 4, 3),
               (128, 256, 32, 8, 4), (128, 128, 64, 4, 4)],
    "grad_w": [(256, 64, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 3), (256, 64, 128, 8, 2),
               (128, 64, 64, 4, 4), (256, 128, 32, 8, 4)],
}
KINDS = {"forward": ("forward",), "backward": ("grad_x", "grad_w")}


def _inputs(M, K, N, bias, activation, residual, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return dict(x=rand(M, K), weight=rand(N, K, scale=K ** -0.5), bias=rand(N) if bias else None,
                residual=rand(M, N) if residual else None, h=rand(M, N) if activation == "gelu" else None,
                grad_out=rand(M, N))


def _reference(t, activation, pass_):
    """The op's function through torch: the forward's output, or (grad_x, grad_weight, grad_bias)."""
    if pass_ == "forward":
        out = F.linear(t["x"], t["weight"], t["bias"])
        out = F.gelu(out) if activation == "gelu" else out
        return (out + t["residual"] if t["residual"] is not None else out,)
    grad_h = torch.ops.aten.gelu_backward(t["grad_out"], t["h"]) if activation == "gelu" else t["grad_out"]
    grad_b = grad_h.sum(0, dtype=torch.float32).to(grad_h.dtype) if t["bias"] is not None else None
    return tuple(r for r in (grad_h @ t["weight"], grad_h.t() @ t["x"], grad_b) if r is not None)


def _ours(t, activation, pass_):
    if pass_ == "forward":
        return triton_linear.forward(t["x"], t["weight"], t["bias"], t["residual"], activation, False)[:1]
    out = triton_linear.backward(t["grad_out"], t["x"], t["weight"], t["bias"] is not None, t["h"], activation)
    return out if t["bias"] is not None else out[:2]


def _max_relative_error(got, expected) -> float:
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
               for a, b in zip(got, expected))


def _time_ms(fn, device) -> float:
    if device.type != "cuda":  # the interpreter: one call, timed for the record only
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _with_entry(kind: str, entry: tuple, dtype: torch.dtype):
    """linear_tiles' entry for `kind` and `dtype` set to `entry` (config's cache cleared); returns the old one."""
    key = (kind, dtype == torch.float32)
    old = linear_tiles._CONFIGS[key]
    linear_tiles._CONFIGS[key] = entry
    linear_tiles.config.cache_clear()
    return old


def run(args) -> dict:
    # every case through the fused kernels, the plain qkv GEMM and the backward too (which the op itself leaves to
    # cuBLAS on a GPU): the sweep asks whether a tile makes them beat cuBLAS
    triton_linear._vendor_gemm = lambda x: False
    device = torch.device("cpu" if args.interpret else "cuda")
    dtype = torch.float32 if args.interpret else torch.bfloat16  # the interpreter computes bfloat16 wrongly
    started, results = time.perf_counter(), []
    for name, M, K, N, bias, activation, residual, pass_ in CASES:
        M = 96 if args.interpret else M
        t = _inputs(M, K // 8 if args.interpret else K, N // 8 if args.interpret else N, bias, activation, residual,
                    dtype, device)
        expected = _reference(t, activation, pass_)
        case = {"case": f"{name} {pass_}", "M": M, "K": t["x"].shape[1], "N": t["weight"].shape[0],
                "baseline_ms": _time_ms(lambda: _reference(t, activation, pass_), device), "candidates": []}
        for kind in KINDS[pass_]:
            for entry in CANDIDATES[kind][:2 if args.interpret else None]:
                if time.perf_counter() - started > args.budget:
                    case["cut"] = f"budget of {args.budget:.0f} s reached"
                    break
                old = _with_entry(kind, entry, dtype)
                row = {"kind": kind, "entry": list(entry), "shipped": entry == old}
                try:
                    error = _max_relative_error(_ours(t, activation, pass_), expected)
                    row["max_rel_error"] = error
                    if error > TOLERANCE[dtype]:
                        row["error"] = f"max relative error {error:.2e} > {TOLERANCE[dtype]}"
                    else:
                        row["ms"] = _time_ms(lambda: _ours(t, activation, pass_), device)
                except Exception as e:  # a candidate that does not compile (shared memory, registers) is a result
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                finally:
                    _with_entry(kind, old, dtype)
                case["candidates"].append(row)
        results.append(case)
        _print_case(case)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "dtype": str(dtype), "seconds": round(time.perf_counter() - started, 1),
            "cases": results}


def _print_case(case: dict) -> None:
    print(f"\n{case['case']}: M {case['M']}, K {case['K']}, N {case['N']}; cuBLAS + ATen epilogue "
          f"{case['baseline_ms']:.4f} ms{' (' + case['cut'] + ')' if case.get('cut') else ''}", flush=True)
    ranked = sorted(case["candidates"], key=lambda r: (r["kind"], r.get("ms", float("inf"))))
    for r in ranked:
        timing = f"{r['ms']:.4f} ms" if "ms" in r else r["error"]
        print(f"  {r['kind']:<8} {str(tuple(r['entry'])):<22} {'shipped' if r['shipped'] else '':<8} {timing}",
              flush=True)


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for the sweep (default 240)")
    parser.add_argument("--dry-run", action="store_true", help="print the cases and candidates, run nothing")
    parser.add_argument("--interpret", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1)")
    out = os.environ.get("OUT")
    default = (Path(out) if out and os.path.isdir(out) else Path(__file__).parent / "results") / "tune_linear.json"
    parser.add_argument("--out", type=Path, default=default, help=f"JSON file (default {default})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.dry_run:
        for name, M, K, N, bias, activation, residual, pass_ in CASES:
            kinds = ", ".join(f"{k}: {len(CANDIDATES[k])} candidates" for k in KINDS[pass_])
            print(f"{name} {pass_}: M {M}, K {K}, N {N}, bias {bias}, {activation}, residual {residual} ({kinds})")
        return 0
    if not args.interpret and not torch.cuda.is_available():
        print("tune_linear: no GPU visible (use --interpret to check the script on CPU)", file=sys.stderr)
        return 2
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
