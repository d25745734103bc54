"""Where a CCT encoder block's time goes on the cpu backend at batch 1 (issue 15, NOTES.md "Fifth round").

    python benchmarks/cpu_block_parts.py [--model cct_7_3x1_32] [--batch 1] [--freeze] [--out result.json]

Times (min over calls, 2 threads, float32, inference) for block 0 of the model with its own weights and a random
input of the given batch: each kernel of the block alone, called from Python on its real inputs (LayerNorm, qkv, attention, proj +
residual, LayerNorm, linear1 + GELU, linear2 + residual), the same calls back to back, the fused block op
(`ops.encoder_layer`'s C++ kernel) and the module call (the fused op plus the Python around it); all the model's blocks
as one ops.encoder_layers call, one ops.encoder_layer call per block and the block modules called one by one. Also
the output cache's statistics after the run. --freeze: the model's weights frozen first (cct_kernels.freeze).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cct_kernels
from cct_kernels import extension
from cct_kernels.cli_bench import device_name


def best_us(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e6


def block_parts(name: str, batch: int, freeze: bool) -> dict:
    model = cct_kernels.create_model(name, backend="cpu").eval()
    if freeze:
        cct_kernels.freeze(model)
    block = model.classifier.blocks[0]
    attn = block.self_attn
    ops = extension.ops()
    tokens = model.classifier.sequence_length
    x = torch.randn(batch * tokens, block.linear1.in_features)
    dim = x.shape[1]
    seed = torch.zeros(1, dtype=torch.long)
    calls = max(10, 300 // batch)
    with torch.inference_mode():
        p = {k: v.detach() for k, v in block.named_parameters()}
        normed = F.layer_norm(x, (dim,), p["pre_norm.weight"], p["pre_norm.bias"])
        qkv = ops.linear_forward(normed, p["self_attn.qkv.weight"], None, None, False, False, None)[0]
        heads = ops.attention_forward(qkv.view(batch, tokens, -1), attn.num_heads, attn.scale, 0.0, seed, None)[0]
        heads = heads.view(batch * tokens, dim)
        norm1 = (p["norm1.weight"], p["norm1.bias"], block.norm1.eps)
        stream = ops.linear_forward(heads, p["self_attn.proj.weight"], p["self_attn.proj.bias"], x, False, False,
                                    None, 0.0, None, *norm1)[0]
        hidden = ops.linear_forward(stream, p["linear1.weight"], p["linear1.bias"], None, True, False, None)[0]
        steps = {
            "pre_norm": lambda: F.layer_norm(x, (dim,), p["pre_norm.weight"], p["pre_norm.bias"]),
            "qkv": lambda: ops.linear_forward(normed, p["self_attn.qkv.weight"], None, None, False, False, None),
            "attention": lambda: ops.attention_forward(qkv.view(batch, tokens, -1), attn.num_heads, attn.scale, 0.0,
                                                       seed, None),
            "proj+residual+norm1": lambda: ops.linear_forward(heads, p["self_attn.proj.weight"],
                                                              p["self_attn.proj.bias"], x, False, False, None, 0.0,
                                                              None, *norm1),
            "linear1+gelu": lambda: ops.linear_forward(stream, p["linear1.weight"], p["linear1.bias"], None, True,
                                                       False, None),
            "linear2+residual": lambda: ops.linear_forward(hidden, p["linear2.weight"], p["linear2.bias"], stream,
                                                           False, False, None),
        }
        alone = {k: best_us(f, calls) for k, f in steps.items()}

        def in_sequence():
            for f in steps.values():
                f()

        args = block.layer_arguments()
        fused = [args[k] for k in ("pre_norm_weight", "pre_norm_bias", "qkv_weight", "proj_weight", "proj_bias",
                                   "norm1_weight", "norm1_bias", "linear1_weight", "linear1_bias", "linear2_weight",
                                   "linear2_bias")]
        src = x.view(batch, tokens, dim)
        result = {
            "model": name, "batch": batch, "frozen": freeze, "tokens": tokens, "dim": dim, "alone_us": alone, "sum_alone_us": sum(alone.values()),
            "in_sequence_us": best_us(in_sequence, calls),
            "fused_op_us": best_us(lambda: ops.encoder_layer_forward(src, *fused, attn.num_heads, attn.scale,
                                                                     args["pre_norm_eps"], args["norm1_eps"]), calls),
            "module_us": best_us(lambda: block(src), calls),
        }
        result["all_blocks_us"] = all_blocks(model, src, calls)
    result["output_cache"] = extension.output_cache_stats()
    return result


def all_blocks(model, src, calls: int) -> dict[str, float]:
    """The model's blocks on src three ways, interleaved (min per way): one ops.encoder_layers call (what the
    classifier runs), one ops.encoder_layer call per block, and each block module called."""
    blocks = model.classifier.blocks
    layers = [block.layer_arguments() for block in blocks]

    def stacked():
        cct_kernels.ops.encoder_layers(src, layers)

    def op_per_block():
        x = src
        for layer in layers:
            x = cct_kernels.ops.encoder_layer(x, **layer)

    def modules():
        x = src
        for block in blocks:
            x = block(x)

    ways = {"stacked": stacked, "op_per_block": op_per_block, "modules": modules}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(calls):
        for way, fn in ways.items():
            fn()  # settled: the timed call follows one of its own
            t = time.perf_counter()
            fn()
            best[way] = min(best[way], time.perf_counter() - t)
    return {way: t * 1e6 for way, t in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cct_7_3x1_32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--freeze", action="store_true", help="freeze the model's weights first (cct_kernels.freeze)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    result = {"device": device_name(torch.device("cpu")), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), **block_parts(args.model, args.batch, args.freeze)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
