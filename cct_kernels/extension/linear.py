"""Linear + epilogue kernels of the "cpu" and "cuda" backends. Interface: cct_kernels/ops/linear.py.

No hand-written GEMM here: vendor GEMMs already run at the machine's peak at these shapes, and what is worth fusing
is the epilogue, which they take as a post-op.
"cpu": oneDNN's matmul (torch.ops.mkldnn._linear_pointwise, the kernel inductor's CPU freezing path uses) with the
    bias, the GELU and the residual add applied as post-ops on each output tile while it is in cache. float32 and,
    where the CPU has native bf16 (AVX512-BF16 / AMX), bfloat16, from ONEDNN_MIN_ROWS rows up; fewer rows (batch
    1: 256 rows), other dtypes, or a torch built without oneDNN use MKL's sgemm (F.linear) with the epilogue in
    place on its output, still in cache at that size.
"cuda": cuBLAS (F.linear) with the epilogue as ATen passes: cuBLASLt's fused GELU epilogue is the tanh
    approximation, not the exact GELU of the official model. The fused GPU kernel is the triton backend's.
Training (save_pre_activation) keeps x @ W.T + b, the GELU's input, for the backward: the GEMM then writes it with
the bias fused, and the GELU (and residual add) follow in one extra pass.
Backward, both devices: grad_h = GELU'(h) * grad_out (ATen's one-pass gelu_backward), grad_x = grad_h @ W,
grad_W = grad_h.T @ x (vendor GEMMs), grad_b = the column sums of grad_h (float32 accumulation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cct_kernels import extension


# Below this many rows oneDNN's fixed cost per call (~20 µs: primitive lookup, post-op setup) and its slower small-M
# kernels lose to MKL's sgemm with the epilogue as separate passes over an output that still sits in cache.
ONEDNN_MIN_ROWS = 1024


def _onednn_serves(x: torch.Tensor) -> bool:
    if not (x.device.type == "cpu" and torch.backends.mkldnn.is_available() and x.shape[0] >= ONEDNN_MIN_ROWS):
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def unsupported(x, weight, bias, residual, activation, *, backend: str) -> str | None:
    return extension.dtype_reason(x.dtype)


def forward(x, weight, bias, residual, activation, save_pre_activation):
    """-> (out (M, N), pre_activation (M, N) when activation == "gelu" and save_pre_activation, else empty (0,))."""
    gelu = activation == "gelu"
    if gelu and save_pre_activation:
        pre_activation = _gemm(x, weight, bias, "none", None)
        out = F.gelu(pre_activation)
        return (out if residual is None else out.add_(residual)), pre_activation
    return _gemm(x, weight, bias, activation, residual), x.new_empty(0)


def _gemm(x, weight, bias, activation, residual):
    """activation(x @ weight.T + bias) + residual with the epilogue fused where the vendor library takes it."""
    if _onednn_serves(x):
        linear = torch.ops.mkldnn._linear_pointwise
        if residual is not None and activation == "none":
            return linear.binary(x, residual, weight, bias, "add")
        out = linear(x, weight, bias, activation, [], "none" if activation == "gelu" else "")
        return out if residual is None else out.add_(residual)
    out = F.linear(x, weight, bias)
    if activation == "gelu":
        out = torch.ops.aten.gelu_(out)
    return out if residual is None else out.add_(residual)


def backward(grad_out, x, weight, has_bias, pre_activation, activation):
    """-> (grad_x (M, K), grad_weight (N, K), grad_bias (N,) or empty (0,) without bias)."""
    grad_h = torch.ops.aten.gelu_backward(grad_out, pre_activation) if activation == "gelu" else grad_out
    grad_x = grad_h @ weight
    grad_weight = grad_h.t() @ x
    grad_bias = grad_h.sum(0, dtype=torch.float32).to(x.dtype) if has_bias else x.new_empty(0)
    return grad_x, grad_weight, grad_bias
