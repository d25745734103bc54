"""Host time of the training step with the Triton kernels' launches stubbed out: what our Python and the ATen glue
cost per step, the part a GPU without CUDA graphs cannot hide (NOTES.md, "Second look at the H200 trace").

    python benchmarks/host_time.py [--rounds 30]

The model is a miniature of cct_7_3x1_32 with the same ops in the same order (one 3x3 conv stage, 7 encoder blocks
of 4 heads and MLP ratio 2, SeqPool, attention dropout 0.1, stochastic depth 0.1) at tiny sizes (embedding 32, one
8x8 image), so that the ATen ops around our kernels, which run for real on these CPU tensors, cost their dispatch
and not their arithmetic: on cct_7_3x1_32's own sizes grad_W's partial sums, the AccumulateGrad copies and the like
added ~30% of real CPU work. Runs under TRITON_INTERPRET=1 with every Triton launch a no-op (the kernels' outputs
are garbage; only the time means anything). Counted: the ops' checks, backend selection, autograd, the launchers'
argument handling and allocations, the ATen glue. Not counted: Triton's own launcher (the stub replaces it), CUDA's
launch latency, and the optimizer. Prints the minimum over rounds of one encoder block's forward and forward +
backward, the model's forward, and forward + backward.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from cct_kernels.models.cct import CCT  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_block_parts import best_us  # noqa: E402


def _no_launch(self, *args, grid, warmup, **kwargs):
    return None


def best_ms(fn, rounds: int) -> float:
    return best_us(fn, rounds) / 1e3


def miniature_cct_7_3x1() -> CCT:
    """cct_7_3x1_32's structure at tiny sizes (see the module docstring), on the triton backend, in training mode."""
    return CCT(img_size=8, embedding_dim=32, n_conv_layers=1, kernel_size=3, stride=1, padding=1, num_layers=7,
               num_heads=4, mlp_ratio=2, num_classes=10, attention_dropout=0.1, stochastic_depth=0.1,
               backend="triton").train()


def host_times(rounds: int) -> dict[str, float]:
    interpreter.InterpretedFunction.run = _no_launch
    torch.manual_seed(0)
    model = miniature_cct_7_3x1()
    images = torch.randn(1, 3, 8, 8)
    block = model.classifier.blocks[0]
    tokens = torch.randn(1, model.classifier.sequence_length, 32, requires_grad=True)
    return {
        "block forward": best_ms(lambda: block(tokens), rounds),
        "block forward + backward": best_ms(lambda: block(tokens).sum().backward(), rounds),
        "model forward": best_ms(lambda: model(images), rounds),
        "model forward + backward": best_ms(lambda: model(images).sum().backward(), rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    for name, ms in host_times(parser.parse_args().rounds).items():
        print(f"{name:26s} {ms:7.3f} ms")


if __name__ == "__main__":
    main()
