"""Host time of a training step with the Triton kernels' launches stubbed out: what our Python and ATen glue cost
per step, the part a GPU without CUDA graphs cannot hide (NOTES.md, "Second look at the H200 trace").

    python benchmarks/host_time.py [--model cct_7_3x1_32] [--batch 2] [--rounds 30]

Runs on the CPU under TRITON_INTERPRET=1 with every Triton launch replaced by a no-op, so the kernels' outputs are
garbage and only the time means anything: the ops' checks, backend selection, autograd, the launchers' argument
handling and allocations, and the ATen glue around the kernels. Not counted: Triton's own launcher (the stub
replaces it) and CUDA's launch latency. What the ATen glue computes on the CPU (the tokenizer's convolution
backward, the loss, AdamW on CPU tensors) is real work here, so the step times include it; the block rows do not.
Prints the minimum over rounds of one encoder block's forward and forward + backward, the model's forward, and
forward + backward.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import cct_kernels  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_block_parts import best_us  # noqa: E402


def _no_launch(self, *args, grid, warmup, **kwargs):
    return None


def best_ms(fn, rounds: int) -> float:
    return best_us(fn, rounds) / 1e3


def host_times(model_name: str, batch: int, rounds: int) -> dict[str, float]:
    interpreter.InterpretedFunction.run = _no_launch
    torch.manual_seed(0)
    model = cct_kernels.create_model(model_name, backend="triton").train()
    images = torch.randn(batch, model.n_input_channels, *model.img_size)
    block = model.classifier.blocks[0]
    width = block.pre_norm.weight.shape[0]
    tokens = torch.randn(batch, model.classifier.sequence_length or 64, width, requires_grad=True)
    return {
        "block forward": best_ms(lambda: block(tokens), rounds),
        "block forward + backward": best_ms(lambda: block(tokens).sum().backward(), rounds),
        "model forward": best_ms(lambda: model(images), rounds),
        "model forward + backward": best_ms(lambda: model(images).sum().backward(), rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cct_7_3x1_32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    for name, ms in host_times(args.model, args.batch, args.rounds).items():
        print(f"{name:26s} {ms:7.3f} ms")


if __name__ == "__main__":
    main()
