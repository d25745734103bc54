"""The official model factories (cct_7_3x1_32, cct_14_7x2_224, cvt_*, vit_lite_*, their _sine twins, ...).

Each factory takes (pretrained=False, progress=False, *, img_size, positional_embedding, num_classes, **kwargs):
kwargs go to the model class (dropout, stochastic_depth, backend, ...). `pretrained` may be True (the official
checkpoint, downloaded once through torch.hub's cache: cct_kernels.models.pretrained; `progress` shows a bar), or
a checkpoint path or state_dict, loaded by load_checkpoint.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from cct_kernels.models.cct import CCT, CVT, ViTLite
from cct_kernels.models.checkpoint import load_checkpoint
from cct_kernels.models.pretrained import checkpoint_for, load_pretrained

# size -> (num_layers, num_heads, embedding_dim, mlp_ratio); head dim 64 throughout.
SIZES = {2: (2, 2, 128, 1), 4: (4, 2, 128, 1), 6: (6, 4, 256, 2), 7: (7, 4, 256, 2), 14: (14, 6, 384, 3)}

# name -> (class, size, extra constructor arguments, default img_size, default num_classes)
_CCT = [
    ("cct_2_3x2_32", 2, 3, 2, 32, 10), ("cct_4_3x2_32", 4, 3, 2, 32, 10),
    ("cct_6_3x1_32", 6, 3, 1, 32, 10), ("cct_6_3x2_32", 6, 3, 2, 32, 10),
    ("cct_7_3x1_32", 7, 3, 1, 32, 10), ("cct_7_3x1_32_c100", 7, 3, 1, 32, 100),
    ("cct_7_3x2_32", 7, 3, 2, 32, 10), ("cct_7_7x2_224", 7, 7, 2, 224, 102),
    ("cct_14_7x2_224", 14, 7, 2, 224, 1000), ("cct_14_7x2_384", 14, 7, 2, 384, 1000),
    ("cct_14_7x2_384_fl", 14, 7, 2, 384, 102),
]
_SUFFIXES = ("_c100", "_fl")

MODELS: dict[str, Callable[..., nn.Module]] = {}


def _sine_name(name: str) -> str:
    """The _sine twin's name: before a dataset suffix, as the official cct_7_3x1_32_sine_c100."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + "_sine" + suffix
    return name + "_sine"


def _make_factory(name, cls, size, arch, img_size, num_classes, positional_embedding, aliases=()):
    num_layers, num_heads, embedding_dim, mlp_ratio = SIZES[size]

    def factory(pretrained=False, progress=False, *, img_size=img_size, positional_embedding=positional_embedding,
                num_classes=num_classes, **kwargs):
        if pretrained is True:
            checkpoint_for(name)  # before building the model: a name without weights is an error at once
        model = cls(
            img_size=img_size, num_layers=num_layers, num_heads=num_heads, embedding_dim=embedding_dim,
            mlp_ratio=mlp_ratio, num_classes=num_classes, positional_embedding=positional_embedding,
            **{**arch, **kwargs},
        )
        if pretrained is True:
            load_pretrained(model, name, progress)
        elif pretrained is not False and pretrained is not None:
            load_checkpoint(model, pretrained)
        return model

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"{cls.__name__} with {num_layers} layers, {num_heads} heads, dim {embedding_dim}, mlp ratio {mlp_ratio}, "
        f"{arch}; defaults img_size={img_size}, num_classes={num_classes}, "
        f"positional_embedding={positional_embedding!r}."
    )
    for n in (name, *aliases):
        MODELS[n] = factory


def _register(name, cls, size, arch, img_size, num_classes, aliases=()):
    _make_factory(name, cls, size, arch, img_size, num_classes, "learnable", aliases)
    _make_factory(_sine_name(name), cls, size, arch, img_size, num_classes, "sine", [_sine_name(a) for a in aliases])


for _name, _size, _kernel, _layers, _img, _classes in _CCT:
    _register(_name, CCT, _size, {"kernel_size": _kernel, "n_conv_layers": _layers,
                                  "stride": max(1, _kernel // 2 - 1), "padding": max(1, _kernel // 2)},
              _img, _classes)
for _size in (2, 4, 6, 7):
    _register(f"cvt_{_size}_4_32", CVT, _size, {"kernel_size": 4}, 32, 10)
    _register(f"vit_lite_{_size}_4_32", ViTLite, _size, {"kernel_size": 4}, 32, 10, aliases=[f"vit_{_size}_4_32"])


def list_models() -> list[str]:
    """Names accepted by create_model, sorted."""
    return sorted(MODELS)


def create_model(name: str, pretrained=False, **kwargs) -> nn.Module:
    """Build a model by factory name, e.g. create_model("cct_7_3x1_32", num_classes=100, backend="triton").

    pretrained: False, True (the official checkpoint through torch.hub's cache, see cct_kernels.models.pretrained),
    or a checkpoint path or state_dict.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; cct_kernels.list_models() lists the {len(MODELS)} known names")
    return MODELS[name](pretrained, **kwargs)
