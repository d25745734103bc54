"""convert(): an official-style CCT / CVT / ViT-Lite module in, ours out, with the same weights and outputs.

"Official-style" means the official module names (SHI-Labs/Compact-Transformers, or vit-pytorch's CCT):
tokenizer.conv_layers.{i} = Sequential(Conv2d, act, pool), classifier.{class_emb | attention_pool,
positional_emb, blocks.{i}.{pre_norm, self_attn.{qkv, attn_drop, proj, proj_drop}, linear1, dropout1, norm1,
linear2, dropout2, drop_path}, norm, fc}. The configuration is read off the module tree, the state_dict is
loaded strictly, and dropout / drop-path rates are carried over so training behaves the same.
"""
from __future__ import annotations

from torch import nn

from cct_kernels.models.cct import CCT, CVT, ViTLite

ACCEPTS = ("convert() accepts an official-style CCT / CVT / ViT-Lite nn.Module (SHI-Labs Compact-Transformers, "
           "vit-pytorch's CCT, or ours): tokenizer.conv_layers (Sequential(Conv2d, activation, pool) stages) and "
           "classifier.{blocks, norm, fc}")
REQUIRED = ("tokenizer.conv_layers", "classifier.blocks", "classifier.dropout", "classifier.norm", "classifier.fc")
BLOCK_REQUIRED = ("pre_norm", "self_attn.qkv", "self_attn.attn_drop", "self_attn.proj", "linear1", "norm1", "linear2")


def _check_official_style(official) -> None:
    if not isinstance(official, nn.Module):
        raise TypeError(f"{ACCEPTS}; got a {type(official).__name__}, not an nn.Module")
    missing = [path for path in REQUIRED if not _has_submodule(official, path)]
    if missing:
        raise TypeError(f"{ACCEPTS}; this {type(official).__name__} has no {', '.join(missing)}")
    if not len(official.tokenizer.conv_layers):
        raise TypeError(f"{ACCEPTS}; this {type(official).__name__} has no tokenizer stages")
    for i, block in enumerate(official.classifier.blocks):
        missing = [path for path in BLOCK_REQUIRED if not _has_submodule(block, path)]
        if missing:
            raise TypeError(f"{ACCEPTS}, each block with {', '.join(BLOCK_REQUIRED)}; classifier.blocks.{i} has "
                            f"no {', '.join(missing)}")
    fc = official.classifier.fc
    if isinstance(fc, nn.Linear) and fc.out_features == 0:
        raise ValueError("the model's classifier.fc is a Linear with 0 outputs (it returns (B, 0)); ours with "
                         "num_classes=0 returns the pooled features instead: replace its fc by nn.Identity() "
                         "to convert it as a feature extractor")
    if not isinstance(fc, (nn.Linear, nn.Identity)):
        raise TypeError(f"{ACCEPTS}; its classifier.fc is a {type(fc).__name__}, expected nn.Linear or nn.Identity")


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _square(name: str, value, where: str) -> int:
    """An int, or a pair of equal ints (what our tokenizer supports), as one int."""
    values = value if isinstance(value, tuple) else (value, value)
    if values[0] != values[1]:
        raise ValueError(f"convert(): {where} has {name} {value}; our tokenizer supports square ones only")
    return values[0]


def _stage_config(stage: nn.Module, i: int) -> dict:
    """One tokenizer stage's settings; anything our fused tokenize op would compute differently is refused
    (it would load the same weights and silently give other outputs)."""
    where = f"tokenizer.conv_layers.{i}"
    conv = stage[0] if isinstance(stage, nn.Sequential) and len(stage) else stage
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{ACCEPTS}; {where} starts with {type(conv).__name__}, expected nn.Conv2d")
    if conv.groups != 1 or _square("dilation", conv.dilation, where) != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"convert(): {where}.0 has groups {conv.groups}, dilation {conv.dilation}, padding_mode "
                         f"{conv.padding_mode!r}; our tokenizer computes groups 1, dilation 1, zero padding")
    rest = list(stage)[1:]
    pools = [m for m in rest if isinstance(m, nn.MaxPool2d)]
    others = [m for m in rest if not isinstance(m, (nn.MaxPool2d, nn.ReLU, nn.Identity))]
    if others or len(pools) > 1:
        offending = others + (pools if len(pools) > 1 else [])
        raise ValueError(f"convert(): {where} has {', '.join(type(m).__name__ for m in offending)}; our "
                         f"tokenizer computes Conv2d, then ReLU or nothing, then one MaxPool2d or nothing")
    pool = pools[0] if pools else None
    if pool is not None and (_square("pool dilation", pool.dilation, where) != 1 or pool.ceil_mode):
        raise ValueError(f"convert(): {where} max pool has dilation {pool.dilation}, ceil_mode {pool.ceil_mode}; "
                         f"our tokenizer computes dilation 1, ceil_mode False")
    return {
        "conv": conv,
        "settings": (_square("kernel_size", conv.kernel_size, where), _square("stride", conv.stride, where),
                     _square("padding", conv.padding, where), conv.bias is not None,
                     any(isinstance(m, nn.ReLU) for m in rest),
                     None if pool is None else tuple(_square(name, getattr(pool, name), where)
                                                      for name in ("kernel_size", "stride", "padding"))),
    }


def _check_tokenizer(stages: list[dict]):
    """Our tokenizers apply one setting to every stage: CCT conv (no bias) -> ReLU -> max pool; CVT / ViT-Lite one
    patch conv (bias, stride = kernel, no padding) and nothing else."""
    first = stages[0]["settings"]
    for i, stage in enumerate(stages[1:], 1):
        if stage["settings"] != first:
            raise ValueError(f"convert(): tokenizer.conv_layers.{i} differs from stage 0 (kernel, stride, padding, "
                             f"bias, relu, pool: {stage['settings']} vs {first}); our tokenizer uses one setting "
                             f"for every stage")
    kernel, stride, padding, bias, relu, pool = first
    if pool is not None and not relu:
        raise ValueError("convert(): a tokenizer with max pooling but no ReLU; our CCT tokenizer computes ReLU")
    if pool is None and (relu or len(stages) != 1 or stride != kernel or padding != 0 or not bias):
        raise ValueError(f"convert(): a tokenizer without pooling is a patch embedding (CVT / ViT-Lite): one conv "
                         f"with bias, stride = kernel_size and no padding, no ReLU; this one has {len(stages)} "
                         f"stage(s), (kernel, stride, padding, bias, relu) = {first[:5]}")


def _image_size(model_cls, config: dict, num_tokens: int | None, declared) -> int | tuple[int, int]:
    """The model's image size: `declared` (the module's own img_size, which ours and some official-style models
    keep, rectangular ones included) when its token grid has num_tokens tokens; otherwise a square size, the
    largest whose grid has num_tokens tokens (the factories' natural size), or with no positional embedding (any
    size works) the smallest that gives a token."""
    tokenizer = model_cls(img_size=4096, positional_embedding="none", num_layers=0, **config).tokenizer
    if isinstance(declared, int):
        declared = (declared, declared)
    if isinstance(declared, tuple) and len(declared) == 2 and all(isinstance(side, int) for side in declared):
        rows, cols = tokenizer.output_grid(*declared)
        if rows >= 1 and cols >= 1 and (num_tokens is None or rows * cols == num_tokens):
            return declared
    step = config["kernel_size"] if model_cls is not CCT else 1  # patch models need a multiple of the patch
    if num_tokens is None:
        candidates, accept = range(step, 4097, step), lambda rows: rows >= 1
    else:
        candidates, accept = range(4096 // step * step, 0, -step), lambda rows: rows * rows == num_tokens
    side = next((s for s in candidates if accept(tokenizer.output_grid(s, s)[0])), None)
    if side is None:
        raise ValueError(f"no square image size gives {num_tokens} tokens with this tokenizer")
    return side


def convert(official: nn.Module, backend: str | None = None) -> nn.Module:
    """Return our CCT / CVT / ViTLite equal to `official` (weights copied, same outputs, same train/eval mode).

    A classifier.fc that is nn.Identity (a headless model) gives num_classes=0. Raises TypeError for a module
    that is not official-style (see ACCEPTS).
    """
    _check_official_style(official)
    tokenizer, classifier = official.tokenizer, official.classifier
    stages = [_stage_config(s, i) for i, s in enumerate(tokenizer.conv_layers)]
    _check_tokenizer(stages)
    first, last = stages[0], stages[-1]
    blocks = classifier.blocks
    dim = last["conv"].out_channels
    attn = blocks[0].self_attn if len(blocks) else None
    num_heads = getattr(attn, "num_heads", getattr(attn, "heads", 1)) if attn is not None else 1
    common = dict(
        embedding_dim=dim, n_input_channels=first["conv"].in_channels, num_heads=num_heads,
        mlp_ratio=blocks[0].linear1.out_features / dim if len(blocks) else 1.0,
        num_classes=getattr(classifier.fc, "out_features", 0), dropout=classifier.dropout.p,
        attention_dropout=attn.attn_drop.p if attn is not None else 0.0,
    )
    kernel, stride, padding, _, _, pool = first["settings"]
    if pool is not None:  # CCT
        cls = CCT
        config = dict(
            common, n_conv_layers=len(stages), kernel_size=kernel, stride=stride, padding=padding,
            pooling_kernel_size=pool[0], pooling_stride=pool[1], pooling_padding=pool[2],
        )
    else:
        cls = CVT if hasattr(classifier, "attention_pool") else ViTLite
        config = dict(common, kernel_size=kernel)
    pe = classifier.positional_emb
    if pe is None:
        positional_embedding, num_tokens = "none", None
    else:
        positional_embedding = "learnable" if pe.requires_grad else "sine"
        num_tokens = pe.shape[1] - (1 if cls is ViTLite else 0)
    # The official schedule is linspace(0, stochastic_depth, num_layers): its last rate is stochastic_depth.
    last_drop_path = blocks[-1].drop_path if len(blocks) else None
    stochastic_depth = float(getattr(last_drop_path, "drop_prob", 0.0) or 0.0)
    img_size = _image_size(cls, config, num_tokens, getattr(official, "img_size", None))
    ours = cls(img_size=img_size, num_layers=len(blocks),
               positional_embedding=positional_embedding, stochastic_depth=stochastic_depth, backend=backend,
               **config)
    ours.load_state_dict(official.state_dict(), strict=True)
    ours.to(next(official.parameters()).device, next(official.parameters()).dtype)
    return ours.train(official.training)
