"""ops.linear benchmarks: the encoder block's four linears with what the kernels fuse into them, eager vs
torch.compile of the reference vs every kernel backend that can run here.

Cases (CCT-7/3x1's block, D = 256, mlp 512, in training: dropout 0.1 where the block has one):
    qkv      pre_norm in the prologue, 256 -> 768, no bias
    proj     256 -> 256, dropout, + residual, norm1 in the epilogue
    linear1  256 -> 512, GELU, dropout
    linear2  512 -> 256, dropout, + residual
On CUDA M = 128 x 256 tokens (batch 128) in bf16; on CPU M = 8 x 256 in fp32 with 5 rounds (a smoke run of every
backend, not a speed figure; no Triton interpreter). Forward (no gradient) and forward+backward. extra_info holds
GB/s of the fused kernels' bytes (below) and, on a GPU of known peaks, floor_us (benchmarks/conftest.py; NOTES.md
"## linear").

    pytest benchmarks/test_bench_linear.py --benchmark-only
"""
import pytest
import torch

from benchmarks.speed_paths import kernel_backends, row_function

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
M = {"cuda": 128 * 256, "cpu": 8 * 256}[DEVICE.type]
D = 256
# name -> (K, N, bias, activation, residual, dropout_p, output norm, input norm)
CASES = {
    "qkv": (D, 3 * D, False, "none", False, 0.0, False, True),
    "proj": (D, D, True, "none", True, 0.1, True, False),
    "linear1": (D, 2 * D, True, "gelu", False, 0.1, False, False),
    "linear2": (2 * D, D, True, "none", True, 0.1, False, False),
}


def _inputs(case, rows=M):
    K, N, bias, activation, residual, dropout_p, norm, input_norm = CASES[case]

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=DEVICE, dtype=DTYPE) * scale

    tensors = {"x": rand(rows, K), "weight": rand(N, K, scale=K**-0.5), "bias": rand(N) if bias else None,
               "residual": rand(rows, N) if residual else None,
               "norm_weight": rand(N) if norm else None, "norm_bias": rand(N) if norm else None,
               "input_norm_weight": rand(K) if input_norm else None,
               "input_norm_bias": rand(K) if input_norm else None}
    return tensors, dict(activation=activation, dropout_p=dropout_p)


def _selection_inputs(case):
    tensors, options = _inputs(case, rows=1)
    return (tensors["x"], tensors["weight"], tensors["bias"], tensors["residual"], options["activation"],
            tensors["norm_weight"])


BACKENDS = ["eager", "compile"] + kernel_backends("linear", [_selection_inputs(c) for c in CASES], DEVICE)


def _bytes(case, backward):
    """Fused-kernel traffic: x, W, the residual read and the output written; the backward reads grad_out, x, W
    (and h for GELU) and writes grad_x and grad_W (the residual's gradient is grad_out itself)."""
    K, N, _, activation, residual, _, _, _ = CASES[case]
    size = torch.finfo(DTYPE).bits // 8
    forward = (M * K + N * K + M * N * (2 if residual else 1) + (M * N if activation == "gelu" else 0)) * size
    if not backward:
        return forward
    return forward + (M * N * (2 if activation == "gelu" else 1) + 2 * M * K + 2 * N * K) * size


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_linear(measure, mode, case, backend):
    tensors, options = _inputs(case)
    fn = row_function("linear", backend)
    backward = mode == "forward_backward"
    x, weight, bias = tensors.pop("x"), tensors.pop("weight"), tensors.pop("bias")
    kwargs = {**{k: v for k, v in tensors.items() if v is not None}, **options}
    if not backward:
        kwargs["dropout_p"] = 0.0  # inference

        def step():
            with torch.no_grad():
                return fn(x, weight, bias, **kwargs)
    else:
        leaves = [t.requires_grad_() for t in (x, weight, bias, *tensors.values()) if t is not None]
        grad_out = torch.randn(M, CASES[case][1], device=DEVICE, dtype=DTYPE)

        def step():
            return torch.autograd.grad(fn(x, weight, bias, **kwargs), leaves, grad_out)

    K, N = CASES[case][:2]
    rounds = None if DEVICE.type == "cuda" else 5  # CPU: a smoke run of every backend, not a speed figure
    info = measure(step, flops=(6 if backward else 2) * M * K * N, bytes_moved=_bytes(case, backward), items=M,
                   dtype=DTYPE, rounds=rounds)
    info["backend"], info["case"], info["dtype"] = backend, case, str(DTYPE)
