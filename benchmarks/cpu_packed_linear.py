"""What pre-packing the encoder's weights once would save on the CPU: the block's four linears through MKL (what
the cpu backend runs: F.linear's sgemm packs the weight on every call) against oneDNN with the weight reordered
once (torch.ops.mkldnn._reorder_linear_weight, then _linear_pointwise), as ONNX Runtime and inductor's freezing do.

    python benchmarks/cpu_packed_linear.py [--model cct_14_7x2_224] [--batch 1] [--rounds 40] [--out result.json]

Per linear of the model's block shape: M = batch x tokens rows; one weight per block of the model (14 for
cct_14_7x2_224), called in turn after a 96 MB buffer is written, so that every weight is read cold as in a forward
(its 83 MB of weights do not stay in the 2 x 2 MB of L2). Min and median µs per call over rounds, interleaved.
(NOTES.md, cpu extension, eighth round.)
"""
from __future__ import annotations

import statistics
import time

import _cpu_script  # benchmarks/, the script's folder
import torch
import torch.nn.functional as F

import cct_kernels


def packed_against_plain(name: str, batch: int, rounds: int) -> dict:
    model = cct_kernels.create_model(name, backend="cpu").eval()
    classifier = model.classifier
    rows = batch * classifier.sequence_length
    flush = torch.empty(96 << 18)  # 96 MB of float32
    results = {}
    with torch.no_grad():
        for linear in ("self_attn.qkv", "self_attn.proj", "linear1", "linear2"):
            weights = [block.get_submodule(linear).weight.detach() for block in classifier.blocks]
            biases = [torch.zeros(w.shape[0]) for w in weights]
            x = torch.randn(rows, weights[0].shape[1])
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
            largest = max((F.linear(x, w, b) - torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")).abs().max()
                          for w, p, b in zip(weights, packed, biases))
            ways = {
                "mkl": lambda: [F.linear(x, w, b) for w, b in zip(weights, biases)],
                "onednn_packed": lambda: [torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
                                          for p, b in zip(packed, biases)],
            }
            times = {way: [] for way in ways}
            for r in range(rounds):
                for way, fn in ways.items():
                    flush.fill_(r)
                    t0 = time.perf_counter()
                    fn()
                    times[way].append((time.perf_counter() - t0) / len(weights) * 1e6)
            results[linear] = {"shape_mkn": [rows, weights[0].shape[1], weights[0].shape[0]],
                               "max_abs_diff": float(largest),
                               **{way: {"min_us": min(t), "median_us": statistics.median(t)}
                                  for way, t in times.items()}}
    return results


def show(result: dict) -> None:
    for linear, r in result["linears"].items():
        print(f"{linear:16s} {r['shape_mkn']}  mkl {r['mkl']['min_us']:7.0f} / {r['mkl']['median_us']:7.0f} µs  "
              f"oneDNN packed {r['onednn_packed']['min_us']:7.0f} / {r['onednn_packed']['median_us']:7.0f} µs  "
              f"max|diff| {r['max_abs_diff']:.1e}")


if __name__ == "__main__":
    _cpu_script.run(__doc__, 40, lambda model, batch, rounds: {"linears": packed_against_plain(model, batch, rounds)},
                    show)
