"""The official pretrained checkpoints (SHI-Labs/Compact-Transformers, src/cct.py), fetched through torch.hub's cache.

`cct_7_3x1_32(pretrained=True)` or `create_model("cct_7_3x1_32", pretrained=True)` downloads the checkpoint once
into torch.hub.get_dir()/checkpoints (TORCH_HOME moves it) and loads it with load_checkpoint (which adapts the
positional embedding to another img_size and drops the head for another num_classes). No hashes are published for
these files, so a download is checked by loading it: a file that is not a state_dict fitting the model (a truncated
or wrong download) is reported, deleted and fetched once more. Without network the error names the URL and how to
pass a file downloaded elsewhere: `pretrained="path/to/file.pth"` or `cct_kernels.load_checkpoint(model, path)`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from cct_kernels.models.checkpoint import load_checkpoint

_BASE = "http://ix.cs.uoregon.edu/~alih/compact-transformers/checkpoints"


class Checkpoint(NamedTuple):
    url: str
    dataset: str
    num_classes: int  # the head the checkpoint was trained with: the factory's default num_classes


# As in the official src/cct.py's model_urls (the Flowers-102 224x224 checkpoint is listed there under the sine name).
CHECKPOINTS = {
    "cct_7_3x1_32": Checkpoint(f"{_BASE}/pretrained/cct_7_3x1_32_cifar10_300epochs.pth", "CIFAR-10", 10),
    "cct_7_3x1_32_sine": Checkpoint(f"{_BASE}/pretrained/cct_7_3x1_32_sine_cifar10_5000epochs.pth", "CIFAR-10", 10),
    "cct_7_3x1_32_c100": Checkpoint(f"{_BASE}/pretrained/cct_7_3x1_32_cifar100_300epochs.pth", "CIFAR-100", 100),
    "cct_7_3x1_32_sine_c100": Checkpoint(f"{_BASE}/pretrained/cct_7_3x1_32_sine_cifar100_5000epochs.pth",
                                         "CIFAR-100", 100),
    "cct_7_7x2_224_sine": Checkpoint(f"{_BASE}/pretrained/cct_7_7x2_224_flowers102.pth", "Flowers-102", 102),
    "cct_14_7x2_224": Checkpoint(f"{_BASE}/pretrained/cct_14_7x2_224_imagenet.pth", "ImageNet-1k", 1000),
    "cct_14_7x2_384": Checkpoint(f"{_BASE}/finetuned/cct_14_7x2_384_imagenet.pth", "ImageNet-1k", 1000),
    "cct_14_7x2_384_fl": Checkpoint(f"{_BASE}/finetuned/cct_14_7x2_384_flowers102.pth", "Flowers-102", 102),
}


def checkpoint_for(name: str) -> Checkpoint:
    """The official checkpoint of model `name`; ValueError naming those that have one when it has none."""
    if name not in CHECKPOINTS:
        raise ValueError(f"{name} has no official pretrained weights; models with weights: {', '.join(CHECKPOINTS)} "
                         f"(or pass pretrained=<checkpoint path or state_dict>)")
    return CHECKPOINTS[name]


def cached_path(name: str) -> Path:
    """Where torch.hub keeps model `name`'s checkpoint: <torch.hub.get_dir()>/checkpoints/<file name of the URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(checkpoint_for(name).url)


def _download(name: str, path: Path, progress: bool) -> None:
    url = checkpoint_for(name).url
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=progress)  # writes a temporary file, then renames
    except OSError as e:  # URLError, connection refused, timeouts, HTTP errors: all OSError subclasses
        raise RuntimeError(
            f"could not download the pretrained weights of {name} from {url} ({e}). Without network, download that "
            f"file elsewhere and pass it: {name}(pretrained='path/to/{path.name}'), or "
            f"cct_kernels.load_checkpoint(model, 'path/to/{path.name}'); or copy it to {path}"
        ) from e


def load_pretrained(model: nn.Module, name: str, progress: bool = False) -> nn.Module:
    """Load the official checkpoint of `name` into `model` (downloading it into torch.hub's cache once).

    A cached or downloaded file that does not load (not a state_dict, or keys/shapes that do not fit the model) is
    reported on stderr, deleted and downloaded once more; a second failure raises RuntimeError naming the URL.
    """
    checkpoint, path = checkpoint_for(name), cached_path(name)
    for attempt in (1, 2):
        if not path.exists():
            _download(name, path, progress)
        try:
            return load_checkpoint(model, str(path))
        except Exception as e:  # noqa: BLE001  (a broken file fails in torch.load or in load_state_dict)
            path.unlink(missing_ok=True)
            if attempt == 2:
                raise RuntimeError(
                    f"the checkpoint downloaded from {checkpoint.url} does not fit {name} twice in a row ({e}); it "
                    f"was deleted. Check the URL, or pass a checkpoint file with pretrained='path/to/file.pth'"
                ) from e
            print(f"cct_kernels: the cached checkpoint {path} of {name} does not load ({_first_line(e)}); deleted, "
                  f"downloading it again", file=sys.stderr)
    raise AssertionError("unreachable")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
