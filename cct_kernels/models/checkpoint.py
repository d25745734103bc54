"""Loading official (or our own) checkpoints, adapting the positional embedding and the classifier head."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

PE_KEY = "classifier.positional_emb"
FC_KEYS = ("classifier.fc.weight", "classifier.fc.bias")


def resize_positional_embedding(pe: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Bilinearly resize a (1, prefix + h*w, D) table on its token grid to `grid` (rows, cols).

    The checkpoint's grid is taken as square (as every official checkpoint's is); prefix tokens (ViT-Lite's class
    token) are kept as they are.
    """
    prefix, table = pe[:, :num_prefix_tokens], pe[0, num_prefix_tokens:]
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ValueError(f"cannot resize a positional embedding of {table.shape[0]} tokens: not a square grid")
    table = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=grid, mode="bilinear")
    table = table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([prefix, table], dim=1)


def _read(path_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        state = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    elif isinstance(path_or_state_dict, Mapping):
        state = path_or_state_dict
    else:
        raise TypeError(f"expected a checkpoint path or a state_dict, got {type(path_or_state_dict).__name__}")
    for wrapper in ("state_dict", "model"):  # training scripts often nest the weights
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    return dict(state)


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True) -> nn.Module:
    """Load an official-format checkpoint into `model` (CCT, CVT or ViTLite) and return the model.

    - positional embedding of another resolution: bilinearly resized to the model's token grid (a fixed sine
      table is recomputed for the model instead, since it is a function of the size);
    - classifier head of another class count: the checkpoint's fc is dropped and the model keeps its fresh fc.
    Everything else must match the model, key for key (strict=True) as in load_state_dict.
    """
    state = _read(path_or_state_dict)
    own = model.state_dict()
    pe = state.get(PE_KEY)
    if pe is not None and PE_KEY in own and pe.shape != own[PE_KEY].shape:
        if model.classifier.positional_emb.requires_grad:
            prefix = 0 if model.classifier.seq_pool else 1
            state[PE_KEY] = resize_positional_embedding(pe.float(), model.token_grid, prefix).to(pe.dtype)
        else:
            state[PE_KEY] = own[PE_KEY]
    if FC_KEYS[0] in state and state[FC_KEYS[0]].shape != own[FC_KEYS[0]].shape:
        for key in FC_KEYS:
            state[key] = own[key]
    model.load_state_dict(state, strict=strict)
    return model
