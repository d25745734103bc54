"""Tokenizer benchmarks (all conv stages of a model): eager vs torch.compile of the reference vs every kernel backend
that can run here.

On CUDA in bf16, the model shapes: cct_7_3x1 (B=128, 32x32, 3->256, one k3 stage), cct_2_3x2 (B=128, 32x32,
3->64->128) and cct_14_7x2 (B=64, 224x224, 3->64->384, k7 s2 p3 stages); each stage is conv -> ReLU -> maxpool 3/2/1.
On CPU in fp32 at small sizes (batch 2; the 7x2 model at 64x64, batch 1), 5 rounds, without the Triton interpreter (a
test aid, not a speed path). Forward and forward+backward. extra_info holds GB/s and TFLOP/s (bytes_moved and
flops below: traffic and conv FLOPs of this design, forward fused, backward writing the conv gradient once) and,
on a GPU of known peaks, floor_us, the larger of bytes at its peak bandwidth and FLOPs at its peak tensor throughput
(benchmarks/conftest.py; NOTES.md "## tokenize").

    pytest benchmarks/test_bench_tokenize.py --benchmark-only
"""
import pytest
import torch

from benchmarks.speed_paths import kernel_backends
from cct_kernels import ops, reference
from cct_kernels.ops.tokenize import output_size

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
POOL = (3, 2, 1)

# name: (batch, image size, channels per stage, kernel, stride, padding) on CUDA; CPU shrinks batch and size.
MODELS = {
    "cct_7_3x1_32": (128, 32, (3, 256), 3, 1, 1),
    "cct_2_3x2_32": (128, 32, (3, 64, 128), 3, 1, 1),
    "cct_14_7x2_224": (64, 224, (3, 64, 384), 7, 2, 3),
}
if DEVICE.type == "cpu":
    MODELS = {name: (2 if size == 32 else 1, 32 if size == 32 else 64, *rest)
              for name, (_, size, *rest) in MODELS.items()}


def stage_costs(B, C_in, H, C_out, k, stride, padding, pool=POOL, bytes_per=2):
    """(forward bytes, forward FLOPs, backward bytes, backward FLOPs, pooled size) of one square stage, fused.

    Forward: read x and the weight, write the pooled output; conv FLOPs counted once (2 per multiply-add).
    Backward: read grad_out, out and the int8 index, write the conv gradient (full resolution), read it twice
    (dgrad and wgrad) with the weight and x, write grad_x and grad_weight; dgrad + wgrad are 2x the conv FLOPs.
    """
    Ho = output_size(H, k, stride, padding)
    Hp = output_size(Ho, *pool)
    x, w, out, conv = B * C_in * H * H, C_out * C_in * k * k, B * C_out * Hp * Hp, B * C_out * Ho * Ho
    flops = 2 * conv * C_in * k * k
    fwd_bytes = (x + w + out) * bytes_per
    bwd_bytes = (2 * out + 3 * conv + 2 * w + 2 * x) * bytes_per + out
    return fwd_bytes, flops, bwd_bytes, 2 * flops, Hp


def model_costs(name, bytes_per=2):
    """(forward bytes, forward FLOPs, forward+backward bytes, forward+backward FLOPs) of a model's tokenizer."""
    B, size, channels, k, stride, padding = MODELS[name]
    totals = [0, 0, 0, 0]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        fb, ff, bb, bf, size = stage_costs(B, c_in, size, c_out, k, stride, padding, bytes_per=bytes_per)
        totals = [totals[0] + fb, totals[1] + ff, totals[2] + fb + bb, totals[3] + ff + bf]
    return totals


def _inputs(name):
    B, size, channels, k, *_ = MODELS[name]
    x = torch.randn(B, channels[0], size, size, device=DEVICE, dtype=DTYPE)
    weights = [torch.randn(c_out, c_in, k, k, device=DEVICE, dtype=DTYPE) * (2 / (c_in * k * k)) ** 0.5
               for c_in, c_out in zip(channels[:-1], channels[1:])]
    return x, weights


def _tokenizer(name, tokenize):
    _, _, _, _, stride, padding = MODELS[name]

    def run(x, *weights):
        for i, w in enumerate(weights):
            x = tokenize(x, w, None, stride=stride, padding=padding, relu=True, pool=POOL,
                         to_tokens=i == len(weights) - 1)
        return x

    return run


def _stage_inputs(name):
    """Inputs of every stage (as the backend check sees them), from shapes only."""
    B, size, channels, k, stride, padding = MODELS[name]
    stages = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        x = torch.empty(1, c_in, size, size, device=DEVICE, dtype=DTYPE)
        w = torch.empty(c_out, c_in, k, k, device=DEVICE, dtype=DTYPE)
        stages.append((x, w, None, stride, padding, True, *POOL, c_out == channels[-1]))
        size = output_size(output_size(size, k, stride, padding), *POOL)
    return stages


BACKENDS = ["eager", "compile"] + kernel_backends(
    "tokenize", [args for model in MODELS for args in _stage_inputs(model)], DEVICE)


def _fn(model, backend):
    if backend == "eager":
        return _tokenizer(model, reference.tokenize)
    if backend == "compile":
        return torch.compile(_tokenizer(model, reference.tokenize))
    return _tokenizer(model, lambda *a, **k: ops.tokenize(*a, **k, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_tokenize(measure, mode, model, backend):
    x, weights = _inputs(model)
    fn = _fn(model, backend)
    backward = mode == "forward_backward"
    if backward:
        for w in weights:
            w.requires_grad_()
        x.requires_grad_()  # the op computes grad_x for every stage; ask for it so every backend does the same work
        grad_out = torch.randn_like(fn(x, *weights))

        def step():
            return torch.autograd.grad(fn(x, *weights), (x, *weights), grad_out)
    else:
        def step():
            with torch.no_grad():
                return fn(x, *weights)

    fwd_bytes, fwd_flops, all_bytes, all_flops = model_costs(model, torch.finfo(DTYPE).bits // 8)
    moved, flops = (all_bytes, all_flops) if backward else (fwd_bytes, fwd_flops)
    rounds = None if DEVICE.type == "cuda" else 5  # CPU: a smoke run of every backend, not a speed figure
    info = measure(step, flops=flops, bytes_moved=moved, items=x.shape[0], dtype=DTYPE, rounds=rounds)
    info["backend"], info["model"], info["dtype"] = backend, model, str(DTYPE)
