"""The backend a module passes to its op; set for a whole model by cct_kernels.set_backend."""
from __future__ import annotations

from torch import nn

from cct_kernels import backends


class UsesBackend:
    """Mixin for modules that call an op: `backend` None means the ambient choice (context, env var, auto)."""

    backend: str | None = None


def set_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Make every op-calling module of `model` use `backend` (None: follow use_backend / env var / auto)."""
    if backend is not None:
        backends.check_name(backend)
    for module in model.modules():
        if isinstance(module, UsesBackend):
            module.backend = backend
    return model
