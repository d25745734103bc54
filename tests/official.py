"""An official-style CCT built by someone else: vit-pytorch's vit_pytorch/cct.py (MIT), same weight names.

Its package __init__ imports torchvision, which does not import beside the CPU torch, so cct.py is loaded by path.
"""
import importlib.util
import pathlib

_spec = importlib.util.find_spec("vit_pytorch")
if _spec is None:
    raise ImportError("vit-pytorch is needed for these tests: pip install --no-deps vit-pytorch einops")
_path = pathlib.Path(_spec.submodule_search_locations[0]) / "cct.py"
_module_spec = importlib.util.spec_from_file_location("vit_pytorch_cct", _path)
vit_pytorch_cct = importlib.util.module_from_spec(_module_spec)
_module_spec.loader.exec_module(vit_pytorch_cct)


def official_cct(*, num_layers, num_heads, mlp_ratio, embedding_dim, kernel_size, n_conv_layers, img_size,
                 num_classes, positional_embedding="learnable", n_input_channels=3):
    """vit-pytorch's CCT with the official factory's stride/padding rule."""
    return vit_pytorch_cct._cct(
        num_layers, num_heads, mlp_ratio, embedding_dim, kernel_size=kernel_size, n_conv_layers=n_conv_layers,
        img_size=img_size, num_classes=num_classes, positional_embedding=positional_embedding,
        n_input_channels=n_input_channels,
    )
