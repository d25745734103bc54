"""cct_kernels.freeze: a model's weights kept in the form the cpu backend's kernels read, for inference."""
from __future__ import annotations

from torch import nn

from cct_kernels.extension import frozen
from cct_kernels.nn.attention import Attention
from cct_kernels.nn.encoder import TransformerEncoderLayer
from cct_kernels.nn.tokenizer import ConvStage


def freezable_weights(model: nn.Module) -> list:
    """The weights the cpu backend's kernels read that freezing keeps ready: the encoder blocks' four linears (qkv,
    proj, linear1, linear2) and the image tokenizer's convolutions, once each."""
    weights = {}
    for module in model.modules():
        if isinstance(module, (Attention, TransformerEncoderLayer, ConvStage)):
            for child in module.children():
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    weights[id(child.weight)] = child.weight
    return list(weights.values())


def freeze(model: nn.Module) -> nn.Module:
    """Prepares `model` for fast CPU inference on the cpu backend ("auto" on CPU): its linear weights (float32) are
    packed into MKL's GEMM format once per batch shape (at the first call with it), its convolution weights copied to
    channels-last once, instead of both on every call. Returns `model`; its values, mode and state_dict do not
    change, and the outputs equal the unfrozen model's (MKL's same GEMM kernel on a copy made once). It pays at small
    batches: inputs of up to 4096 rows (batch x tokens) read the packed weights, where packing per call is a large
    part of the product (cct_14_7x2_224 at batch 1: 43 against 53 ms on our 2-core test machine; README, Results).

    Memory: about one more copy of the linear weights per batch shape (the latest four shapes are kept) and one of
    the convolution weights. Updates through the weights' version counter (optimizer steps, load_state_dict,
    in-place ops) are seen and the copies remade at the next call; writes through `.data` are not: call freeze again
    after them, or unfreeze. Moving or copying the model (.to(), .half(), copy.deepcopy) gives it new weights, which
    are not frozen. A frozen model may run in several threads at once. GPU weights, other backends and torch builds
    without MKL's packed GEMM ignore freezing. Raises ValueError for weights made under torch.inference_mode (build
    the model outside it) and ImportError when the C++ extension is not built.
    """
    frozen.freeze(w for w in freezable_weights(model) if w.device.type == "cpu")
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Drops the frozen copies of `model`'s weights (freeze); they also go when the weights are freed."""
    frozen.unfreeze(freezable_weights(model))
    return model
