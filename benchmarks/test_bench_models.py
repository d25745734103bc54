"""Whole-model benchmarks: latency (batch 1) and throughput, inference and training step, per backend.

Models: cct_7_3x1_32 (the main one), cct_2_3x2_32, cct_7_7x2_224, cct_14_7x2_224, and text_cct_6 (token ids at
seq_len 64 with sentence lengths uniform in [8, 64], profiling.make_inputs). Throughput batch: 128 at
32x32, 64 at 224x224 (8 at 224x224 in quick mode, the default without a GPU: see peaks.quick_mode).
Backends: profiling.speed_backends: eager, compile (torch.compile of the eager model), each kernel backend that can
run on this device (never the Triton interpreter on CPU), auto (only when some kernel backend can run: otherwise it
is eager), compile:auto (torch.compile over our ops), on CUDA graphs:auto (inference forward or whole training step
replayed from a CUDA graph) and on CPU onnxruntime where installed (inference only). All
share weights (same seed) and images. A training step is forward, cross-entropy, backward and an AdamW update
(cct_kernels.profiling.make_step).

Group "<model> <case> <mode>" holds one row per backend, so the table reads as a comparison:
    pytest benchmarks/test_bench_models.py --benchmark-only
    pytest benchmarks/test_bench_models.py --benchmark-only -k "cct_7_3x1_32 and inference"
    pytest benchmarks --benchmark-only --benchmark-autosave      # then later: --benchmark-compare
extra_info: images/s (items_per_s), TFLOP/s and the fraction of the GPU's peak (FLOPs counted by
profiling.model_flops), and on CUDA the device times of benchmarks/conftest.py (loop_ms; graph_ms, the time
per CUDA-graph replay, for inference latency only).
"""
import pytest

from benchmarks.peaks import quick_mode
from cct_kernels import backends, profiling

DEVICE = profiling.default_device()
DTYPE = profiling.DTYPES[profiling.default_dtype(DEVICE)]
QUICK = quick_mode()
MODELS = ["cct_7_3x1_32", "cct_2_3x2_32", "cct_7_7x2_224", "cct_14_7x2_224", "text_cct_6"]
# Without a kernel backend for this device, auto runs exactly the eager code: timing it again adds nothing.
BACKENDS = [b for b in profiling.speed_backends(DEVICE)
            if b != "auto" or any(profiling.backend_reason(k, DEVICE) is None for k in backends.KERNEL_BACKENDS)]


def _throughput_batch(model: str) -> int:
    if model.endswith("_224"):
        return 8 if QUICK and DEVICE.type == "cpu" else 64
    return 128


# Explicit order, the main model and throughput first: a run cut short by a time limit (gpu_report.py) still
# has the most useful cases.
CASES = [
    (model, case, batch, mode, backend)
    for model in MODELS
    for case, batch in (("throughput", _throughput_batch(model)), ("latency", 1))
    for mode in profiling.MODES
    for backend in BACKENDS
    if profiling.runs_mode(backend, mode)
]
_FLOPS = {}


def _flops(model: str, batch: int, mode: str) -> float:
    if (model, mode) not in _FLOPS:
        _FLOPS[model, mode] = profiling.model_flops(model, 1, mode)
    return _FLOPS[model, mode] * batch


@pytest.mark.parametrize(
    "model,case,batch,mode,backend", CASES,
    ids=[f"{m}-{c}_b{b}-{mode}-{be}" for m, c, b, mode, be in CASES],
)
def test_model(measure, benchmark, model, case, batch, mode, backend):
    benchmark.group = f"{model} {case} b{batch} {mode}"
    net = profiling.build_model(model, backend, DEVICE, DTYPE)
    step = profiling.make_step(net, mode, *profiling.make_inputs(net, batch, DEVICE, DTYPE))
    slow = QUICK and case == "throughput"
    # The first call compiles (torch.compile, Triton autotuning); quick mode keeps slow CPU cases to one more.
    warmup = 1 if slow else (2 if DEVICE.type == "cpu" else 5)
    # CUDA-graph replay of the step (graph_ms) only for inference latency; graphs:* rows replay their own graph,
    # training steps included (profiling.make_step).
    info = measure(step, flops=_flops(model, batch, mode), items=batch, dtype=DTYPE, warmup=warmup,
                   rounds=1 if slow else None, backend=backend, graph=case == "latency" and mode == "inference")
    info.update(model=model, case=case, batch=batch, mode=mode, dtype=profiling.dtype_name(DTYPE))
