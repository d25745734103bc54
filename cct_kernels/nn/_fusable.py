"""When a fused module may compute a submodule from its parameters instead of calling it.

A fused forward (the encoder block, attention, a tokenizer stage) reads its submodules' parameters and runs one op.
That computes the official function only while each submodule is the stock class with nothing attached: a replaced
submodule (a LoRA or quantized linear, a custom norm) has a forward of its own, and a hook (forward, pre-forward or
backward; on the module or global) expects the module to be called. Where a submodule is not fusable the module
runs the official module-by-module forward instead, calling each submodule.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as torch_module


def global_hooks() -> bool:
    """Whether hooks for every module are installed (torch.nn.modules.module.register_module_*_hook)."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def fusable(module: nn.Module, *types: type) -> bool:
    """Whether `module` is exactly one of `types` (not a subclass: it may override forward) with no hooks of its
    own and no forward set on the instance (as accelerate's add_hook_to_module does). Global hooks are the caller's
    to check, once (global_hooks)."""
    return type(module) in types and not (module._forward_hooks or module._forward_pre_hooks
                                          or module._backward_hooks or module._backward_pre_hooks
                                          or "forward" in module.__dict__)


def fusable_stage(conv: nn.Module, activation: nn.Module, pool: nn.Module) -> bool:
    """Whether a tokenizer's fused op computes what calling a stage's conv, activation and pool would: each the
    stock class (Conv2d; ReLU or Identity; MaxPool2d or Identity) with no hooks, and no global hooks."""
    return (fusable(conv, nn.Conv2d) and fusable(activation, nn.ReLU, nn.Identity)
            and fusable(pool, nn.MaxPool2d, nn.Identity) and not global_hooks())
