"""The fused encoder block of the "cpu" backend (csrc/cpu/encoder_layer.cpp). Interface: cct_kernels/ops/encoder_layer.py.

"cpu": the block's LayerNorms (ATen), linears and attention (this extension's kernels) called from C++ in the
    official order: one call from Python instead of eight, and one call for a stack of blocks (forward_layers).
    float32/float16/bfloat16; no mask (key padding runs op by op).
"cuda": none. On a GPU the per-op launches are what CUDA graphs remove (`cct-kernels bench` graphs:<backend>), and
    the block runs op by op on the triton or cuda kernels.
"""
from __future__ import annotations

import torch

from cct_kernels import extension

# The op is traced as itself under torch.compile (no Python custom op around it): its fake states the output, a
# contiguous (B, N, D) tensor like src.
torch.library.register_fake("cct_kernels_C::encoder_layer_forward", lambda src, *_args: src.new_empty(src.shape))
torch.library.register_fake("cct_kernels_C::encoder_layers_forward", lambda src, *_args: src.new_empty(src.shape))


def unsupported(src, mask, *, backend: str) -> str | None:
    if backend == "cuda":
        return "the cuda backend has no fused encoder block (the block runs op by op; CUDA graphs remove launch costs)"
    if mask is not None:
        return "the fused encoder block takes no mask (the text models' key padding runs op by op)"
    return extension.dtype_reason(src.dtype)


def forward(src, pre_norm_weight, pre_norm_bias, qkv_weight, proj_weight, proj_bias, norm1_weight, norm1_bias,
            linear1_weight, linear1_bias, linear2_weight, linear2_bias, num_heads, scale, pre_norm_eps, norm1_eps):
    # torch.ops directly, not extension.ops(): this module is imported only once the extension has loaded, and
    # torch.compile traces this call (extension.ops() checks the build, which dynamo cannot trace)
    return torch.ops.cct_kernels_C.encoder_layer_forward(src, pre_norm_weight, pre_norm_bias, qkv_weight,
                                                         proj_weight, proj_bias, norm1_weight, norm1_bias,
                                                         linear1_weight, linear1_bias, linear2_weight, linear2_bias,
                                                         num_heads, scale, pre_norm_eps, norm1_eps)


def forward_layers(src, parameters, num_heads, scale, pre_norm_eps, norm1_eps):
    """Blocks in sequence in one call: parameters holds each layer's 11 tensors in forward's order, the other
    arguments are lists with one entry per layer."""
    return torch.ops.cct_kernels_C.encoder_layers_forward(src, parameters, num_heads, scale, pre_norm_eps, norm1_eps)
