"""Loading official (or our own) checkpoints, adapting the positional embedding and the classifier head."""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cct_kernels.models.cct import _TokenizerClassifier
from cct_kernels.nn import sinusoidal_embedding

PE_KEY = "classifier.positional_emb"
FC_KEYS = ("classifier.fc.weight", "classifier.fc.bias")
# Prefixes that wrappers add to every key: DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
EXPECTED = "a state_dict saved with torch.save(model.state_dict(), path) (a dict of parameter name -> tensor)"
MAX_LISTED = 8


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that cannot be read, is not a state_dict, or does not fit the model's architecture.

    A ValueError (the argument is wrong) and a RuntimeError (what load_state_dict raises for a mismatch)."""


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


def _is_sine_table(pe: torch.Tensor) -> bool:
    """Whether a (1, n, D) positional embedding is the fixed sine table (the _sine models' PE), not learned values."""
    return torch.allclose(pe.float(), sinusoidal_embedding(pe.shape[1], pe.shape[2]), atol=1e-2, rtol=0)  # bf16-safe


def _load_file(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file; expected {EXPECTED}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); expected {EXPECTED}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes): {reason}. Expected {EXPECTED}; a truncated download "
            f"or a file of another format fails like this"
        ) from e


def _read(path_or_state_dict) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, a name for it in messages) from a path or a mapping, unwrapped from training wrappers."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = f"checkpoint {os.fspath(path_or_state_dict)}"
        state = _load_file(Path(path_or_state_dict))
    elif isinstance(path_or_state_dict, Mapping):
        source, state = "the state_dict", path_or_state_dict
    else:
        raise TypeError(f"expected a checkpoint path or a state_dict, got {type(path_or_state_dict).__name__}")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} holds a {type(state).__name__}; expected {EXPECTED}")
    for wrapper in ("state_dict", "model"):  # training scripts often nest the weights
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    not_tensors = [repr(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors or not state:
        what = "is empty" if not state else f"has entries that are not (name, tensor) pairs: {_listed(not_tensors)}"
        raise CheckpointError(f"{source} {what}; expected {EXPECTED}")
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return dict(state), source


def _listed(items: list[str]) -> str:
    more = f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _architecture(state: Mapping[str, torch.Tensor]) -> str:
    """A short description of the architecture a state_dict came from: blocks and embedding width."""
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"classifier\.blocks\.(\d+)\.", key))}
    norm = state.get("classifier.norm.weight")
    width = f", embedding_dim {norm.shape[0]}" if norm is not None and norm.ndim == 1 else ""
    return f"{len(blocks)} encoder blocks{width}"


def _mismatch(state: dict, own: dict, strict: bool) -> list[str]:
    """What keeps `state` from loading into a model with state_dict `own`, PE and head adaptations aside."""
    adaptable = {PE_KEY, *FC_KEYS}
    problems = []
    missing = [k for k in own if k not in state and k not in adaptable]
    unexpected = [k for k in state if k not in own and k not in FC_KEYS]  # a headless model ignores the head
    if strict and missing:
        problems.append(f"{len(missing)} missing keys: {_listed(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
    shapes = []
    for key, value in state.items():
        if key not in own or value.shape == own[key].shape:
            continue
        ours = own[key].shape
        if key == PE_KEY and value.ndim == 3 and value.shape[0] == 1 and value.shape[2] == ours[2]:
            continue  # same width, another resolution: resized
        if key in FC_KEYS and value.shape[1:] == ours[1:]:
            continue  # same width, another class count: a fresh head
        shapes.append(f"{key} checkpoint {tuple(value.shape)} vs model {tuple(ours)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_listed(shapes)}")
    return problems


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True) -> nn.Module:
    """Load an official-format checkpoint into `model` (CCT, CVT or ViTLite) and return the model.

    `path_or_state_dict`: a file written by torch.save (a state_dict, or a dict nesting it under "state_dict" or
    "model"; keys prefixed by DDP's "module." or torch.compile's "_orig_mod." are accepted), or the mapping itself.
    - positional embedding of another resolution: bilinearly resized to the model's token grid (a fixed sine
      table, recognised by its values, is recomputed for the model instead, since it is a function of the size);
    - classifier head of another class count: the checkpoint's fc is dropped and the model keeps its fresh fc
      (a model built with num_classes=0 has no head and ignores the checkpoint's).
    Everything else must match the model, key for key (strict=True) as in load_state_dict.
    Raises TypeError for a model that is not one of ours, FileNotFoundError for a missing file and CheckpointError (a ValueError and RuntimeError) for a file
    that cannot be read, is not a state_dict, or comes from another architecture (the message lists the missing
    and unexpected keys and the shape mismatches).
    """
    if not isinstance(model, _TokenizerClassifier):
        raise TypeError(f"load_checkpoint loads into a CCT, CVT or ViTLite model (cct_kernels.create_model(...)), "
                        f"got {type(model).__name__}; use model.load_state_dict for other modules")
    state, source = _read(path_or_state_dict)
    own = model.state_dict()
    problems = _mismatch(state, own, strict)
    if problems:
        raise CheckpointError(
            f"{source} does not fit this {type(model).__name__} (saved from another architecture? checkpoint: "
            f"{_architecture(state)}; model: {_architecture(own)}): " + "; ".join(problems)
        )
    pe = state.get(PE_KEY)
    if pe is not None and PE_KEY in own and pe.shape != own[PE_KEY].shape:
        if _is_sine_table(pe):  # a function of the size: the model's own table is the right one
            state[PE_KEY] = own[PE_KEY]
        else:  # learned values (even loaded into a model built with a sine table): resized
            prefix = 0 if model.classifier.seq_pool else 1
            state[PE_KEY] = resize_positional_embedding(pe.float(), model.token_grid, prefix).to(pe.dtype)
    for key in FC_KEYS:
        if key not in own:  # no head (num_classes=0)
            state.pop(key, None)
        elif key not in state or state[key].shape != own[key].shape:
            state[key] = own[key]
    model.load_state_dict(state, strict=strict)
    return model
