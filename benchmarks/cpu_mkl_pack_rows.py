"""Why cct_kernels.freeze packs a linear weight once per row count: MKL's packed GEMM (cblas_sgemm_pack /
cblas_sgemm_compute, exported by torch's x86-64 wheels) against sgemm (F.linear), with the weight packed for one row
count and used at another.

    python benchmarks/cpu_mkl_pack_rows.py [--out result.json]

Per (K, N) of the encoder linears of cct_14_7x2_224 and cct_7_3x1_32: 14 weights called in turn (read cold, as in a
forward), x (M, K) for each M of ROWS; for each row count P the weights were packed for, the packed product's time
over sgemm's (min over rounds; below 1: packing pays). (NOTES.md, cpu extension, ninth round.)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import torch

from cct_kernels.cli_bench import device_name

SHAPES = [(384, 1152), (1152, 384), (256, 768), (512, 256)]  # (K, N): qkv / linear1, linear2 of cct_14; cct_7's
ROWS = (4, 64, 196, 256, 784, 1024, 3136)
PACKED_FOR = (1, 196, 512, 1024, 4096)
COL_MAJOR, NO_TRANS, TRANS, PACKED, A_MATRIX = 102, 111, 112, 151, 161


def _mkl():
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    lib.cblas_sgemm_pack_get_size.argtypes = [ctypes.c_int] * 5
    lib.cblas_sgemm_pack.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                                          ctypes.c_void_p]
    lib.cblas_sgemm_compute.argtypes = [ctypes.c_int] * 6 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                                             ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    return lib


def measure(weights_per_shape: int = 14, rounds: int = 12) -> list[dict]:
    mkl, rows_out = _mkl(), []
    for K, N in SHAPES:
        weights = [torch.randn(N, K) for _ in range(weights_per_shape)]
        packs = {}
        for p in PACKED_FOR:  # W (N, K) as the A operand of the column-major out^T = W x^T
            size = mkl.cblas_sgemm_pack_get_size(A_MATRIX, N, p, K, 0)
            packs[p] = [torch.empty(size, dtype=torch.uint8) for _ in weights]
            for w, buf in zip(weights, packs[p]):
                mkl.cblas_sgemm_pack(COL_MAJOR, A_MATRIX, TRANS, N, p, K, 1.0, w.data_ptr(), K, buf.data_ptr())
        for M in ROWS:
            x, out = torch.randn(M, K), torch.empty(M, N)

            def packed(p):
                for buf in packs[p]:
                    mkl.cblas_sgemm_compute(COL_MAJOR, PACKED, NO_TRANS, N, M, K, buf.data_ptr(), K, x.data_ptr(), K,
                                            0.0, out.data_ptr(), N)

            ways = {"sgemm": lambda: [torch.mm(x, w.t(), out=out) for w in weights],
                    **{p: (lambda p=p: packed(p)) for p in PACKED_FOR}}
            best = dict.fromkeys(ways, float("inf"))
            for _ in range(rounds):
                for way, fn in ways.items():
                    t = time.perf_counter()
                    fn()
                    best[way] = min(best[way], (time.perf_counter() - t) / len(weights))
            rows_out.append({"K": K, "N": N, "M": M, "sgemm_us": best["sgemm"] * 1e6,
                             "packed_over_sgemm": {str(p): best[p] / best["sgemm"] for p in PACKED_FOR}})
            print(f"K {K:4d} N {N:4d} M {M:5d}: sgemm {best['sgemm'] * 1e6:7.0f} us; packed for "
                  + ", ".join(f"{p}: {best[p] / best['sgemm']:.2f}" for p in PACKED_FOR))
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"device": device_name(torch.device("cpu")), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "threads": torch.get_num_threads(), "rows": measure()}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
