"""An official-style CCT built by someone else: vit-pytorch's vit_pytorch/cct.py (MIT), same weight names.

vit-pytorch is optional (the GPU image lacks it): nothing happens at import, and a test that asks for the model
without the package is skipped with the reason, never a collection error. Its package __init__ imports
torchvision, which does not import beside the CPU torch, so cct.py is loaded by path.
"""
import functools
import importlib.util
import pathlib

import pytest

MISSING_REASON = ("vit-pytorch is not installed (pip install --no-deps vit-pytorch einops; on a GPU machine carry "
                  "its wheel, see README 'GPU run')")


@functools.cache
def _vit_pytorch_cct():
    """vit_pytorch/cct.py as a module; skips the calling test when vit-pytorch or einops is missing."""
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None:
        pytest.skip(MISSING_REASON)
    pytest.importorskip("einops", reason="einops is needed by vit_pytorch/cct.py (pip install einops)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "cct.py"
    module_spec = importlib.util.spec_from_file_location("vit_pytorch_cct", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def official_cct(*, num_layers, num_heads, mlp_ratio, embedding_dim, kernel_size, n_conv_layers, img_size,
                 num_classes, positional_embedding="learnable", n_input_channels=3):
    """vit-pytorch's CCT with the official factory's stride/padding rule (skips the test without vit-pytorch)."""
    return _vit_pytorch_cct()._cct(
        num_layers, num_heads, mlp_ratio, embedding_dim, kernel_size=kernel_size, n_conv_layers=n_conv_layers,
        img_size=img_size, num_classes=num_classes, positional_embedding=positional_embedding,
        n_input_channels=n_input_channels,
    )
