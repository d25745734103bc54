"""Whole-model timing and profiling, shared by `python -m cct_kernels bench|profile` and benchmarks/.

A "speed backend" is what a benchmark compares: "eager" (the reference), "compile" (torch.compile of the eager
model, the bar a kernel library has to beat), each kernel backend ("triton", "cuda", "cpu"), "auto", and
"compile:<backend>" (torch.compile over a model that runs our ops with that backend, e.g. "compile:auto"), and on
CUDA "graphs:<backend>" (the inference forward, or the whole training step with a capturable AdamW, captured once in
a CUDA graph and replayed: no host work per kernel at all), and on CPU
"onnxruntime" (the eager model exported to ONNX and run by ONNX Runtime, where onnxruntime is installed); inference
only, "frozen:<backend>" (the model after cct_kernels.freeze) and "compile-frozen" (torch.compile of the eager model
with inductor's freezing, what a user tuning CPU inference with torch.compile sets). The wrappers behind the
graphs, ONNX Runtime and compile-frozen rows are in cct_kernels/speed_models.py.
Every model is built from the same seed, so all backends run the same weights on the same images.

    step = make_step(build_model("cct_7_3x1_32", "auto", device, dtype), "train", *make_inputs(...))
    timings = time_interleaved({"auto": step, "eager": eager_step}, device, estimates_s=..., min_time=10.0)
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from cct_kernels import backends, ops
from cct_kernels.models import create_model
from cct_kernels.nn import freeze
from cct_kernels.speed_models import FreezingCompiled, GraphedInference, OnnxRuntimeInference, graphed_train_step
from cct_kernels.train import adamw

DEFAULT_MODEL = "cct_7_3x1_32"
COMPILE = "compile"
# torch.compile(mode="reduce-overhead") of the eager model: inductor's code replayed from CUDA graphs, what a user
# would set against our graphs:* rows (CUDA only)
COMPILE_GRAPHS = "compile-graphs"
COMPILE_OURS = "compile:"  # prefix: "compile:auto" is torch.compile over the model with backend "auto"
# prefix: "compile-graphs:auto" is the same with mode="reduce-overhead", our kernels inside inductor's CUDA graphs
COMPILE_GRAPHS_OURS = COMPILE_GRAPHS + ":"
GRAPHS = "graphs:"  # prefix: "graphs:auto" replays the model's inference forward or training step from a CUDA graph
ONNXRUNTIME = "onnxruntime"
FROZEN = "frozen:"  # prefix: "frozen:cpu" is the model with backend "cpu" after cct_kernels.freeze (inference only)
COMPILE_FROZEN = "compile-frozen"  # torch.compile of the eager model with inductor's freezing (inference only)


def compiles(name: str) -> bool:
    """Whether speed backend `name` is a torch.compile one (compile, compile-graphs, compile-frozen, compile:B,
    compile-graphs:B)."""
    return name in (COMPILE, COMPILE_GRAPHS, COMPILE_FROZEN) or name.startswith((COMPILE_OURS, COMPILE_GRAPHS_OURS))


def runs_mode(name: str, mode: str) -> bool:
    """Whether speed backend `name` has a `mode` step (the ONNX Runtime and frozen rows are inference only)."""
    return mode != "train" or not (name in (ONNXRUNTIME, COMPILE_FROZEN) or name.startswith(FROZEN))
MODES = ("inference", "train")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_batch(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 64


def default_dtype(device: torch.device) -> str:
    """bf16 on a GPU (tensor cores), fp32 on a CPU (bf16 matmuls are slow on most CPUs)."""
    return "bf16" if device.type == "cuda" else "fp32"


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def compile_reason(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot generate code for `device`, or None when it can."""
    if device.type == "cpu":
        if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
            return "inductor needs a C++ compiler (g++ or clang++) for CPU code"
        return None
    if device.type == "cuda":
        return "inductor needs triton for CUDA code" if importlib.util.find_spec("triton") is None else None
    return f"inductor does not generate {device.type} code"


def backend_reason(name: str, device: torch.device) -> str | None:
    """Why speed backend `name` cannot run whole models on `device` for a benchmark, or None when it can.

    Triton on a CPU tensor is its interpreter (TRITON_INTERPRET=1): right for tests, meaningless for speed.
    A kernel backend that passes here may still lack a kernel for some op; the model then raises and the
    benchmark reports that error.
    """
    if name in ("eager", "auto"):
        return None
    if name in (COMPILE, COMPILE_FROZEN):
        return compile_reason(device)
    if name == COMPILE_GRAPHS:
        return "CUDA graphs need a CUDA device" if device.type != "cuda" else compile_reason(device)
    if name.startswith(COMPILE_GRAPHS_OURS):
        inner = COMPILE_OURS + name[len(COMPILE_GRAPHS_OURS):]
        return "CUDA graphs need a CUDA device" if device.type != "cuda" else backend_reason(inner, device)
    if name.startswith(COMPILE_OURS):
        return _ours_reason(name, COMPILE_OURS) or compile_reason(device) or backend_reason(
            name[len(COMPILE_OURS):], device)
    if name == ONNXRUNTIME:
        if device.type != "cpu":
            return "the onnxruntime row runs ONNX Runtime's CPU provider"
        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        return f"{' and '.join(missing)} not installed" if missing else None
    if name.startswith(FROZEN):
        return _ours_reason(name, FROZEN) or backend_reason(name[len(FROZEN):], device)
    if name.startswith(GRAPHS):
        inner = name[len(GRAPHS):]
        if inner not in backends.BACKENDS:
            return f"unknown backend {name!r}: graphs: takes {', '.join(backends.BACKENDS)}"
        if device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        return backend_reason(inner, device)
    if name not in backends.KERNEL_BACKENDS:
        return f"unknown backend {name!r}"
    reason = backends.availability(device)[name]
    if reason is None and name == "triton" and device.type != "cuda":
        return "Triton on CPU runs only in its interpreter, a test aid rather than a speed path"
    return reason


def _ours_reason(name: str, prefix: str) -> str | None:
    """For a `prefix` + backend name over our ops (compile:B, frozen:B): why B is not one, or None."""
    ours = [b for b in backends.BACKENDS if b != "eager"]
    inner = name[len(prefix):]
    return None if inner in ours else f"unknown backend {name!r}: {prefix} takes {', '.join(ours)}"


def speed_backends(device: torch.device) -> list[str]:
    """eager, compile, on CUDA compile-graphs, each kernel backend that can run on `device`, auto, compile:auto, on
    CUDA graphs:auto, and on CPU frozen:auto, compile-frozen and onnxruntime where it is installed (the default
    comparison; freezing changes nothing on CUDA)."""
    cpu_only = [FROZEN + "auto", COMPILE_FROZEN] if device.type == "cpu" else []
    names = (["eager", COMPILE, COMPILE_GRAPHS] + list(backends.KERNEL_BACKENDS)
             + ["auto", COMPILE_OURS + "auto", GRAPHS + "auto", *cpu_only, ONNXRUNTIME])
    return [n for n in names if backend_reason(n, device) is None]


def build_model(name: str, backend: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                **model_kwargs) -> nn.Module:
    """Model `name` for speed backend `backend`, its weights drawn from `seed` so every backend gets the same;
    model_kwargs go to the factory (e.g. dropout=0.1).

    For the torch.compile rows (compiles(backend)) this raises dynamo's recompile limit: dynamo keeps its compiled
    entries per code object (every model's forward is the same function), and past the limit it silently runs eager,
    so a process that builds many models (the benchmark suite) would time eager under the name "compile". (Resetting
    dynamo instead would throw away the code of the compiled models built before, which then recompile while timed.)
    """
    torch.manual_seed(seed)
    ops_backend = ("eager" if backend in (COMPILE, COMPILE_GRAPHS, COMPILE_FROZEN, ONNXRUNTIME)
                   else backend.removeprefix(COMPILE_OURS).removeprefix(COMPILE_GRAPHS_OURS).removeprefix(GRAPHS)
                   .removeprefix(FROZEN))
    model = create_model(name, backend=ops_backend, **model_kwargs).to(device=device, dtype=dtype)
    if backend.startswith(FROZEN):
        return freeze(model)
    if backend.startswith(GRAPHS):
        return GraphedInference(model)
    if backend == ONNXRUNTIME:
        return OnnxRuntimeInference(model)
    if compiles(backend):
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 64)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
        if backend == COMPILE_FROZEN:
            return FreezingCompiled(model)
        graphs = backend == COMPILE_GRAPHS or backend.startswith(COMPILE_GRAPHS_OURS)
        model = torch.compile(model, mode="reduce-overhead" if graphs else None)
    return model


def make_inputs(model: nn.Module, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 1):
    """(inputs, labels) for `model`: its forward's arguments and random class labels.

    Image models: (images,) of the model's size. Text models: (token ids, lengths) with lengths uniform in
    [min(8, seq_len), seq_len], a realistic mix of sentence lengths padded to seq_len.
    """
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, (GraphedInference, OnnxRuntimeInference, FreezingCompiled)):
        model = model.model
    if hasattr(model, "seq_len"):  # a text model: token ids and how many of them are real
        vocab = model.embedder.embeddings.num_embeddings
        ids = torch.randint(0, vocab, (batch, model.seq_len), generator=generator)
        lengths = torch.randint(min(8, model.seq_len), model.seq_len + 1, (batch,), generator=generator)
        inputs = (ids.to(device), lengths.to(device))
    else:
        height, width = model.img_size
        images = torch.randn(batch, model.n_input_channels, height, width, generator=generator)
        inputs = (images.to(device=device, dtype=dtype),)
    labels = torch.randint(0, model.classifier.fc.out_features, (batch,), generator=generator)
    return inputs, labels.to(device)


def make_step(model: nn.Module, mode: str, inputs: tuple, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One inference forward (returns logits) or one training step (forward, loss, backward, AdamW update: fused
    where torch has it, train.adamw) on model(*inputs) (make_inputs)."""
    if mode == "inference":
        model.eval()

        def step():
            with torch.inference_mode():
                return model(*inputs)

        return step
    if mode != "train":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(model, GraphedInference):
        return graphed_train_step(model.model, inputs, labels)
    model.train()
    optimizer = adamw(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(*inputs).float(), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Per-round wall times of one step (ms) and how long its warm-up took (s, compile included)."""

    times_ms: list[float] = field(default_factory=list)
    warmup_s: float = 0.0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def summary(self) -> dict:
        """min, median, mean, max, stdev and the spread (interquartile range over the median, in %)."""
        times = self.times_ms
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        return {
            "min_ms": min(times), "median_ms": self.median_ms, "mean_ms": statistics.fmean(times),
            "max_ms": max(times), "stdev_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
            "spread_pct": 100 * (quartiles[2] - quartiles[0]) / self.median_ms, "rounds": len(times),
            "warmup_s": self.warmup_s,
        }


def time_interleaved(
    steps: dict[str, Callable], device: torch.device, *, estimates_s: dict[str, float], rounds: int | None = None,
    min_time: float = 1.0, min_rounds: int = 5, max_rounds: int = 1000, on_round: Callable[[], None] | None = None,
    settle: bool | None = None,
) -> dict[str, Timing | Exception]:
    """Time several already warmed-up steps fairly: in each round every step runs once, in an order that rotates
    from round to round, so a change in machine load (another process, clocks) hits every step alike. Compare the
    minimum and median over rounds; back-to-back loops per step let a load change decide the ratio.

    Without `rounds`, the count makes the whole loop last about `min_time` seconds per step, from `estimates_s`
    (one call's time per step), within [min_rounds, max_rounds]. A step that raises is dropped from later rounds
    and its exception returned in its place. On CUDA each step is timed with CUDA events (device time).

    settle (default: on CPU): each timed call follows an untimed call of the same step, so that it runs as in a
    loop of its own, whatever ran before it. Without it a step inherits the previous one's leftovers: ONNX Runtime's
    thread pool spins on both cores after a run, and our backends' first call after it took 67.7 ms against 46.9
    after an idle gap (cct_14_7x2_224, batch 1, the 2-core VM; benchmarks/cpu_interference.py, NOTES.md, cpu
    extension, eighth round).
    """
    if settle is None:
        settle = device.type == "cpu"
    calls = 2 if settle else 1
    if rounds is None:
        per_round = max(calls * sum(estimates_s[name] for name in steps), 1e-6)
        rounds = min(max_rounds, max(min_rounds, math.ceil(min_time * len(steps) / per_round)))
    results: dict[str, Timing | Exception] = {name: Timing() for name in steps}
    names = list(steps)
    for r in range(rounds):
        shift = r % len(names) if names else 0
        events = {}
        for name in names[shift:] + names[:shift]:
            if isinstance(results[name], Exception):
                continue
            try:
                if settle:
                    steps[name]()
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    steps[name]()
                    end.record()
                    events[name] = (start, end)
                else:
                    t0 = time.perf_counter()
                    steps[name]()
                    results[name].times_ms.append((time.perf_counter() - t0) * 1e3)
            except Exception as e:  # one backend's failure must not end the others' timing
                results[name] = e
        synchronize(device)
        for name, (start, end) in events.items():
            results[name].times_ms.append(start.elapsed_time(end))
        if on_round:
            on_round()
    return results


def model_flops(name: str, batch: int, mode: str) -> float:
    """FLOPs (2 per multiply-add) of one step of model `name` at `batch`: convs, linears and attention matmuls.

    Counted from the shapes seen in one batch-1 eager forward on CPU; a training step counts 3x the forward
    (backward is about two forwards), the usual convention. Elementwise work is left out. Text models are counted
    dense (every token real): the work a kernel that skips padding does is at most this.
    """
    from cct_kernels.nn.text import TextTokenizer
    from cct_kernels.nn.tokenizer import ConvStage
    from cct_kernels.ops.tokenize import output_size

    model = create_model(name, backend="eager").eval()
    inputs, _ = make_inputs(model, 1, torch.device("cpu"), torch.float32)
    # without a mask (text models: every token real)
    total = sum(2 * m * k * n for m, k, n in linear_shapes(model, inputs[:1]))

    def conv_hook(stage, args, _output):
        nonlocal total
        conv, x = stage[0], args[0]
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        ho, wo = output_size(x.shape[2], kh, sh, ph), output_size(x.shape[3], kw, sw, pw)
        total += 2 * x.shape[0] * conv.out_channels * ho * wo * conv.in_channels * kh * kw

    def counted_attention(qkv, *args, **kwargs):
        nonlocal total
        b, n, three_d = qkv.shape
        total += 2 * 2 * b * n * n * (three_d // 3)  # q k^T and p v
        return run_attention(qkv, *args, **kwargs)

    def counted_seqpool(x, *args, **kwargs):
        nonlocal total
        b, n, d = x.shape
        total += 2 * 2 * b * n * d  # scores x w and the weighted sum over tokens
        return run_seqpool(x, *args, **kwargs)

    def text_conv_hook(tokenizer, args, _output):  # the text tokenizer's conv (run by ops.text_tokenize)
        nonlocal total
        conv, x = tokenizer.conv_layers[0], args[0]
        kh, kw = conv.kernel_size
        rows = output_size(x.shape[1], kh, conv.stride[0], conv.padding[0])
        total += 2 * x.shape[0] * conv.out_channels * rows * kh * kw

    for module in model.modules():
        if isinstance(module, ConvStage):
            module.register_forward_hook(conv_hook)
        elif isinstance(module, TextTokenizer):
            module.register_forward_hook(text_conv_hook)
    run_attention, run_seqpool = ops.attention, ops.seqpool
    with (torch.inference_mode(), mock.patch.object(ops, "attention", counted_attention),
          mock.patch.object(ops, "seqpool", counted_seqpool)):
        model(*inputs[:1])
    return float(total) * batch * (3 if mode == "train" else 1)


def linear_shapes(model: nn.Module, inputs: tuple) -> list[tuple[int, int, int]]:
    """(M, K, N) of every nn.Linear of one inference forward of `model`, in call order, SeqPool's scorer
    (`attention_pool`, counted with SeqPool by model_flops) left out. Each is hooked, so the blocks run their
    modules one by one (nn/_fusable.py) and every linear is seen as its module's call."""
    shapes = []

    def module_hook(linear, args, _output):
        shapes.append((args[0].numel() // args[0].shape[-1], linear.in_features, linear.out_features))

    hooks = [m.register_forward_hook(module_hook) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rpartition(".")[2] != "attention_pool"]
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def error_text(error: BaseException) -> str:
    """One line for a table: the exception type and the first line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}".strip()


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 for the enclosed calls: the profiler's C++ side (kineto) prints USDT / STAGE
    lines at every start and stop, which no Python setting turns off."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_step(step: Callable, device: torch.device, *, warmup: int, iters: int, trace_path=None):
    """Run `step` `iters` times under torch.profiler (after `warmup` calls); return the profiler.

    Records CPU ops (and CUDA kernels on a GPU) with memory; writes a Chrome trace to `trace_path` if given.
    Only the profiler's own start and stop are silenced on stderr; what the steps print still shows.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, profile_memory=True, record_shapes=False)
    with _quiet_native_stderr():
        prof.__enter__()
    try:
        for _ in range(iters):
            step()
        synchronize(device)
    finally:
        with _quiet_native_stderr():
            prof.__exit__(None, None, None)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    return prof


def memory_by_op(prof, device: torch.device) -> dict[str, tuple[int, int]]:
    """Bytes allocated and bytes freed on `device`, per innermost operator (name -> (allocated, freed)).

    torch.profiler's per-op memory is the net of both, negative when an op frees more than it allocates (the
    backward ops free activations); kept apart, both are meaningful. Frees outside any op are under "(no op)".
    """
    from torch._C._profiler import _EventType

    totals: dict[str, list[int]] = {}
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag != _EventType.Allocation or event.extra_fields.device.type != device.type:
            continue
        size = event.extra_fields.alloc_size
        entry = totals.setdefault(event.parent.name if event.parent is not None else "(no op)", [0, 0])
        entry[0 if size > 0 else 1] += abs(size)
    return {name: (allocated, freed) for name, (allocated, freed) in totals.items()}


def top_ops(prof, device: torch.device, top: int, by: str = "ops") -> list[dict]:
    """The `top` entries by self time: name, self_ms, count, allocated_mb and freed_mb (MiB on the device).

    by="ops": operators (aten::mm, cct_kernels::attention_forward, ...), with their self CPU time on a CPU and
    the device time of the kernels they launched directly on a GPU. by="kernels" (GPU only): the CUDA kernels
    themselves; a kernel allocates nothing, so its memory is None.
    """
    from torch.autograd import DeviceType

    on_gpu = device.type == "cuda"
    if by == "kernels" and not on_gpu:
        raise ValueError("by='kernels' needs a CUDA device; use by='ops' on CPU")
    memory = memory_by_op(prof, device)
    rows = []
    for event in prof.key_averages():
        is_kernel = event.device_type == DeviceType.CUDA
        if is_kernel != (by == "kernels") or event.key.startswith("ProfilerStep"):
            continue
        self_us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if self_us <= 0:
            continue
        allocated, freed = (None, None) if is_kernel else memory.get(event.key, (0, 0))
        rows.append({"name": event.key, "self_ms": self_us / 1e3, "count": event.count,
                     "allocated_mb": None if is_kernel else allocated / 2**20,
                     "freed_mb": None if is_kernel else freed / 2**20})
    rows.sort(key=lambda r: r["self_ms"], reverse=True)
    return rows[:top]


def allocated_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes of tensor memory `fn` allocates on `device`: the peak above the start on CUDA; on CPU the sum of the
    allocations torch.profiler records (tensors freed inside fn count too), which shows whether a path writes
    full-size intermediates (a conv activation, an N x N score matrix) that a fused kernel avoids."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
