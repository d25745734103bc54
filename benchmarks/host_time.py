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
backward, the model's forward, forward + backward, and eval-mode forward without gradients: each with the block as
one op (ops.encoder_layer, one autograd node in training) and with the block's ops one by one (each its own
autograd node, as traced code runs them), interleaved round by round.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from cct_kernels.models.cct import CCT  # noqa: E402

BLOCK_OP = importlib.import_module("cct_kernels.ops.encoder_layer")  # ops.encoder_layer is the function
MODES = ("block op", "ops one by one")


def _no_launch(self, *args, grid, warmup, **kwargs):
    return None


@contextlib.contextmanager
def ops_one_by_one():
    """ops.encoder_layer runs the block's ops one by one, as it does for traced calls."""
    traced = BLOCK_OP.traced
    BLOCK_OP.traced = lambda tensors: True
    try:
        yield
    finally:
        BLOCK_OP.traced = traced


def best_ms_interleaved(parts: dict, rounds: int) -> dict[str, dict[str, float]]:
    """{part: {mode: min ms}}, every part timed in both modes in each round (after 3 warm-up rounds)."""
    best = {part: dict.fromkeys(MODES, float("inf")) for part in parts}
    for round_ in range(rounds + 3):
        for part, fn in parts.items():
            for mode in MODES:
                with ops_one_by_one() if mode == "ops one by one" else contextlib.nullcontext():
                    start = time.perf_counter()
                    fn()
                    elapsed = time.perf_counter() - start
                if round_ >= 3:
                    best[part][mode] = min(best[part][mode], elapsed * 1e3)
    return best


def miniature_cct_7_3x1() -> CCT:
    """cct_7_3x1_32's structure at tiny sizes (see the module docstring), on the triton backend, in training mode."""
    return CCT(img_size=8, embedding_dim=32, n_conv_layers=1, kernel_size=3, stride=1, padding=1, num_layers=7,
               num_heads=4, mlp_ratio=2, num_classes=10, attention_dropout=0.1, stochastic_depth=0.1,
               backend="triton").train()


def host_times(rounds: int) -> dict[str, dict[str, float]]:
    interpreter.InterpretedFunction.run = _no_launch
    torch.manual_seed(0)
    model = miniature_cct_7_3x1()
    evaluated = miniature_cct_7_3x1().eval()
    images = torch.randn(1, 3, 8, 8)
    block = model.classifier.blocks[0]
    tokens = torch.randn(1, model.classifier.sequence_length, 32, requires_grad=True)

    def evaluate():
        with torch.no_grad():
            evaluated(images)

    return best_ms_interleaved({
        "block forward": lambda: block(tokens),
        "block forward + backward": lambda: block(tokens).sum().backward(),
        "model forward": lambda: model(images),
        "model forward + backward": lambda: model(images).sum().backward(),
        "model eval forward": evaluate,
    }, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    print(f"{'':26s} {MODES[0]:>10s} {MODES[1]:>16s}")
    for name, ms in host_times(parser.parse_args().rounds).items():
        print(f"{name:26s} {ms[MODES[0]]:7.3f} ms {ms[MODES[1]]:13.3f} ms")


if __name__ == "__main__":
    main()
