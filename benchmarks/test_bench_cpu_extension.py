"""The extension's "cpu" backend against eager on this CPU: ops and whole models, float32.

Each group holds an eager row and a cpu row (eager first); the cpu row's extra_info carries `speedup_vs_eager`
(median eager time / median cpu time), also printed (run with -s to see it):
    pytest benchmarks/test_bench_cpu_extension.py --benchmark-only -s
Targets (2-core AVX2 machine, see benchmarks/NOTES.md "## cpu extension"): models >= 1.3x in inference
(cct_7_3x1_32 and cct_14_7x2_224, batch 1 and 64), SeqPool >= 2x, a training step faster than eager.
Each inference group also times a "linears" row: the model's linears alone (F.linear at the same shapes),
which every backend leaves to ATen; its extra_info `ceiling_vs_eager` (eager / linears) bounds any backend's
speedup that keeps ATen's linears (Amdahl).
Rounds are kept low: one cct_14_7x2_224 forward at batch 64 takes tens of seconds on 2 cores.
Collected only on machines without CUDA (on a GPU machine the GPU suites are the ones to run) and when the
extension is built (its absence is a failure of test_extension.py, not a reason to time eager twice).
"""
import pytest
import torch
import torch.nn.functional as F

import cct_kernels
from cct_kernels import extension, ops, profiling, reference

CPU = torch.device("cpu")
_MEDIANS: dict[str, dict[str, float]] = {}


def _record(benchmark, info, backend):
    group = _MEDIANS.setdefault(benchmark.group, {})
    group[backend] = benchmark.stats.stats.median
    if backend == "cpu" and "eager" in group:
        info["speedup_vs_eager"] = group["eager"] / group["cpu"]
        print(f"\n{benchmark.group}: cpu {info['speedup_vs_eager']:.2f}x eager")
    if backend == "linears" and "eager" in group:
        info["ceiling_vs_eager"] = group["eager"] / group["linears"]
        print(f"\n{benchmark.group}: linears alone take 1/{info['ceiling_vs_eager']:.2f} of eager")


def _linears_only(model, images):
    """The model's linears alone (F.linear on ATen), in order, with their input and weight shapes (inference)."""
    model.eval()
    calls = [(torch.randn(m, k), torch.randn(n, k), torch.randn(n))
             for m, k, n in profiling.linear_shapes(model, (images,))]

    def run():
        with torch.inference_mode():
            for x, w, b in calls:
                F.linear(x, w, b)
    return run


def _op_case(op, shape, mode):
    """A closure running op forward (or forward+backward) for `backend`, and the op's byte count."""
    torch.manual_seed(0)
    if op == "seqpool":
        B, N, D = shape
        x, w, b = torch.randn(B, N, D), torch.randn(1, D) * D**-0.5, torch.randn(1)
        inputs = (x, w, b)
        fn = {"eager": lambda *t: reference.seqpool(*t), "cpu": lambda *t: ops.seqpool(*t, backend="cpu")}
        nbytes = x.numel() * 4
    elif op == "linear":  # linear1 of a block: bias + exact GELU in the epilogue
        M, K, N = shape
        inputs = (torch.randn(M, K), torch.randn(N, K) * K**-0.5, torch.randn(N))
        fn = {"eager": lambda x, w, b: reference.linear(x, w, b, activation="gelu"),
              "cpu": lambda x, w, b: ops.linear(x, w, b, activation="gelu", backend="cpu")}
        nbytes = (M * K + N * K + M * N) * 4
    elif op == "linear_norm":  # proj of a block: bias + residual + norm1 (LayerNorm) in the epilogue
        M, K, N = shape
        inputs = (torch.randn(M, K), torch.randn(N, K) * K**-0.5, torch.randn(N), torch.randn(M, N),
                  torch.rand(N) + 0.5, torch.randn(N))
        fn = {backend: (lambda backend: lambda x, w, b, res, nw, nb: ops.linear(
            x, w, b, residual=res, norm_weight=nw, norm_bias=nb, backend=backend))(backend)
            for backend in ("eager", "cpu")}
        nbytes = (M * K + N * K + 2 * M * N) * 4
    elif op == "linear_dropout":  # linear1 of a block in training with CCT's dropout: GELU + dropout 0.1
        M, K, N = shape
        inputs = (torch.randn(M, K), torch.randn(N, K) * K**-0.5, torch.randn(N))
        fn = {backend: (lambda backend: lambda x, w, b: ops.linear(
            x, w, b, activation="gelu", dropout_p=0.1, backend=backend))(backend) for backend in ("eager", "cpu")}
        nbytes = (M * K + N * K + M * N) * 4
    elif op in ("encoder_layer", "encoder_layers"):  # eval mode: one C++ call on cpu for a block, or for the stack
        B, N, D, H, *layers = shape
        names = ("pre_norm_weight", "pre_norm_bias", "qkv_weight", "proj_weight", "proj_bias", "norm1_weight",
                 "norm1_bias", "linear1_weight", "linear1_bias", "linear2_weight", "linear2_bias")
        shapes = ((D,), (D,), (3 * D, D), (D, D), (D,), (D,), (D,), (2 * D, D), (2 * D,), (D, 2 * D), (D,))
        count = layers[0] if layers else 1
        inputs = (torch.randn(B, N, D), *(torch.randn(s) * s[-1] ** -0.5 for _ in range(count) for s in shapes))

        def block_stack(backend):
            def run(src, *p):
                blocks = [{"num_heads": H, **dict(zip(names, p[i:i + len(names)]))}
                          for i in range(0, len(p), len(names))]
                if op == "encoder_layer":
                    return ops.encoder_layer(src, **blocks[0], backend=backend)
                return ops.encoder_layers(src, blocks, backend=backend)
            return run

        fn = {backend: block_stack(backend) for backend in ("eager", "cpu")}
        nbytes = sum(t.numel() for t in inputs) * 4 + B * N * D * 4
    elif op == "attention":
        B, N, H = shape
        inputs = (torch.randn(B, N, 3 * H * 64),)
        fn = {"eager": lambda t: reference.attention(t, H), "cpu": lambda t: ops.attention(t, H, backend="cpu")}
        nbytes = inputs[0].numel() * 4 * 4 // 3
    else:  # tokenize: the CCT-7/3x1 stem, conv 3 -> 256, k3, ReLU, pool 3/2/1, tokens
        B = shape[0]
        inputs = (torch.randn(B, 3, 32, 32), torch.randn(256, 3, 3, 3) / 5)
        fn = {"eager": lambda x, w: reference.tokenize(x, w, None, stride=1, padding=1),
              "cpu": lambda x, w: ops.tokenize(x, w, None, stride=1, padding=1, backend="cpu")}
        nbytes = B * 256 * 32 * 32 * 4

    def make(backend):
        if mode == "forward":
            def run():
                with torch.inference_mode():
                    return fn[backend](*inputs)
            return run
        leaves = [t.clone().requires_grad_() for t in inputs]

        def run():
            out = fn[backend](*leaves)
            out.backward(torch.ones_like(out))
        return run

    return make, nbytes


OP_CASES = [
    ("seqpool", (64, 256, 256)), ("seqpool", (64, 196, 384)), ("seqpool", (1, 196, 384)),
    ("attention", (64, 256, 4)), ("attention", (64, 196, 6)), ("attention", (1, 256, 4)),
    ("tokenize", (64,)), ("linear", (16384, 256, 512)), ("linear", (256, 256, 512)),
    ("linear_norm", (3136, 384, 384)), ("linear_dropout", (16384, 256, 512)),
    ("encoder_layer", (1, 256, 256, 4)), ("encoder_layer", (64, 256, 256, 4)),
    ("encoder_layers", (1, 256, 256, 4, 7)),  # CCT-7/3x1's stack at batch 1
]
MODEL_CASES = [
    ("cct_7_3x1_32", 1, "inference"), ("cct_7_3x1_32", 64, "inference"),
    ("cct_14_7x2_224", 1, "inference"), ("cct_14_7x2_224", 64, "inference"),
    ("cct_7_3x1_32", 16, "train"),
]

if not torch.cuda.is_available() and extension.load_error() is None:

    @pytest.mark.parametrize("backend", ["eager", "cpu"])
    @pytest.mark.parametrize("mode", ["forward", "forward_backward"])
    @pytest.mark.parametrize("op,shape", OP_CASES, ids=[f"{o}-{'x'.join(map(str, s))}" for o, s in OP_CASES])
    def test_cpu_op(measure, benchmark, op, shape, mode, backend):
        benchmark.group = f"cpu-ext {op} {'x'.join(map(str, shape))} {mode}"
        make, nbytes = _op_case(op, shape, mode)
        info = measure(make(backend), bytes_moved=nbytes, rounds=5 if shape[0] > 1 else 20, warmup=1)
        _record(benchmark, info, backend)

    MODEL_RUNS = [(*case, backend) for case in MODEL_CASES
                  for backend in ("eager", "cpu", "linears") if backend != "linears" or case[2] == "inference"]

    @pytest.mark.parametrize("name,batch,mode,backend", MODEL_RUNS, ids=["-".join(map(str, r)) for r in MODEL_RUNS])
    def test_cpu_model(measure, benchmark, name, batch, mode, backend):
        benchmark.group = f"cpu-ext {name} b{batch} {mode}"
        torch.manual_seed(0)
        model = cct_kernels.create_model(name, backend="eager" if backend == "linears" else backend)
        size = model.img_size
        images = torch.randn(batch, 3, *size)
        labels = torch.randint(0, model.classifier.fc.out_features, (batch,))
        if backend == "linears":
            step = _linears_only(model, images)
        else:
            step = profiling.make_step(model, mode, (images,), labels)
        slow = name.endswith("_224") and batch > 1
        info = measure(step, items=batch, rounds=1 if slow else (3 if batch > 1 else 10), warmup=1)
        _record(benchmark, info, backend)
