"""Text tokenizer benchmarks: eager (the official Conv2d -> ReLU -> MaxPool2d) vs torch.compile of it vs every kernel
backend that can run here (ops.text_tokenize).

Shapes: the official text tokenizers at seq_len 64, word_dim 300: text_cct_6 (k=4, stride 1, padding 2, ReLU,
pool 2/2/1, E=256: 33 tokens) and text_cvt_6 (k=4 patches, stride 4, no ReLU, no pool, E=128: 16 tokens), at batch
64 (throughput) and 1 (latency). bf16 on CUDA, fp32 on CPU (5 rounds). Forward and forward+backward. extra_info
holds TFLOP/s and GB/s against flops/bytes_moved below (and the floors on a GPU of known peaks; NOTES.md).

    pytest benchmarks/test_bench_text_tokenize.py --benchmark-only
"""
import pytest
import torch

from benchmarks.speed_paths import kernel_backends, row_function
from cct_kernels import reference
from cct_kernels.ops.text_tokenize import output_length

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
L, C = 64, 300
# name: (E, k, stride, padding, relu, pool)
TOKENIZERS = {
    "text_cct_6": (256, 4, 1, 2, True, (2, 2, 1)),
    "text_cvt_6": (128, 4, 4, 0, False, None),
}
CASES = {f"{name}_B{b}": (b, name) for name in TOKENIZERS for b in (64, 1)}


def _inputs(B, name):
    E, k = TOKENIZERS[name][:2]
    x = torch.randn(B, L, C, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(E, 1, k, C, device=DEVICE, dtype=DTYPE) * (2 / (k * C)) ** 0.5
    return x, weight


def _kwargs(name):
    stride, padding, relu, pool = TOKENIZERS[name][2:]
    return dict(stride=stride, padding=padding, relu=relu, pool=pool)


def _kernel_inputs(name):
    stride, padding, relu, pool = TOKENIZERS[name][2:]
    x, weight = _inputs(1, name)
    return x, weight.squeeze(1), stride, padding, relu, *(pool or (0, 1, 0))


BACKENDS = ["eager", "compile"] + kernel_backends("text_tokenize", [_kernel_inputs(n) for n in TOKENIZERS], DEVICE)


def flops_and_bytes(B, name, backward):
    """Conv FLOPs (2 per multiply-add; the backward's grad_x and grad_weight GEMMs are twice the forward) and the HBM
    traffic of a fused kernel: forward reads x and the weight, writes the tokens and their int8 pool_index; the
    backward reads grad_out, out, pool_index and x, writes grad_x and grad_weight (the conv-row gradient stays on
    chip: a lower bound)."""
    E, k, stride, padding, relu, pool = TOKENIZERS[name]
    rows = output_length(L, k, stride, padding, 0, 1, 0)
    n = output_length(L, k, stride, padding, *(pool or (0, 1, 0)))
    size = torch.finfo(DTYPE).bits // 8
    flops = 2 * B * rows * k * C * E
    x, w, out, index = B * L * C * size, E * k * C * size, B * n * E * size, B * n * E if pool else 0
    forward = x + w + out + index
    if not backward:
        return flops, forward
    return 3 * flops, forward + (2 * out + index) + x + (x + w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_text_tokenize(measure, mode, case, backend):
    B, name = CASES[case]
    x, weight = _inputs(B, name)
    kw = _kwargs(name)
    fn = row_function("text_tokenize", backend)
    backward = mode == "forward_backward"
    if backward:
        x.requires_grad_()
        weight.requires_grad_()
        grad_out = torch.randn_like(reference.text_tokenize(x.detach(), weight.detach(), **kw))

        def step():
            return torch.autograd.grad(fn(x, weight, **kw), (x, weight), grad_out)
    else:
        def step():
            with torch.no_grad():
                return fn(x, weight, **kw)

    flops, moved = flops_and_bytes(B, name, backward)
    rounds = None if DEVICE.type == "cuda" else 5
    info = measure(step, flops=flops, bytes_moved=moved, items=B, dtype=DTYPE, rounds=rounds)
    info["backend"], info["shape"], info["dtype"] = backend, case, str(DTYPE)
