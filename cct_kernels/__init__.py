"""cct_kernels: fast Compact Convolutional Transformers (CCT, CVT, ViT-Lite) behind drop-in PyTorch modules.

    import cct_kernels
    model = cct_kernels.cct_7_3x1_32(backend="auto")         # same state_dict as the official model
    cct_kernels.load_checkpoint(model, "cct_7_3x1_32.pth")    # official checkpoints load unchanged
    with cct_kernels.use_backend("eager"):                    # or CCT_KERNELS_BACKEND=eager
        logits = model(images)
"""
from cct_kernels import ops
from cct_kernels.backends import BACKENDS, BackendUnavailable, use_backend
from cct_kernels.models import *  # noqa: F401,F403  (the classes, factories and helpers)
from cct_kernels.models import __all__ as _model_names
from cct_kernels.models.checkpoint import CheckpointError
from cct_kernels.nn import freeze, set_backend, unfreeze

__version__ = "0.1.0"
__all__ = [
    "BACKENDS", "BackendUnavailable", "CheckpointError", "freeze", "ops", "set_backend", "unfreeze", "use_backend",
    *_model_names,
]

from cct_kernels._compile_cache import tag_compile_caches as _tag_compile_caches  # noqa: E402
from cct_kernels.backends import load_kernel_backends as _load_kernel_backends  # noqa: E402

_load_kernel_backends()
_tag_compile_caches()  # compiled graphs of another cct_kernels version are never replayed (see _compile_cache.py)
