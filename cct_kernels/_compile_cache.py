"""torch.compile's on-disk caches and our ops: a fingerprint of cct_kernels' sources in their key.

Inductor keeps compiled code on disk (FX-graph and AOTAutograd caches, /tmp/torchinductor_$USER unless
TORCHINDUCTOR_CACHE_DIR says otherwise), keyed on the graph, the configs and torch's version, but not on a custom
op's fake implementation. After an upgrade of cct_kernels that changes an op's output layout, a warm cache would
replay code asserting the old strides (`assert_size_stride` failures; seen when the cpu tokenizer's output became
channels-last). tag_compile_caches() appends a digest of this package's Python sources, where every fake lives, to
torch.compiler.config.cache_key_tag, which torch includes in the key of every compile cache; a tag the user set
(TORCH_COMPILE_CACHE_KEY_TAG) is kept in front of it. The cost: other compiled code of the process gets a new key
once per cct_kernels version, i.e. compiles once more.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

PACKAGE_ROOT = Path(__file__).resolve().parent
TAG_PREFIX = "cct_kernels-"


def source_fingerprint(root: Path = PACKAGE_ROOT) -> str:
    """16 hex digits of a digest of every .py file under root (relative paths and contents, in sorted order)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def tag_compile_caches(root: Path = PACKAGE_ROOT) -> str:
    """Put TAG_PREFIX + source_fingerprint(root) into torch's compile cache key (replacing an earlier tag of ours,
    keeping the user's); returns the whole tag."""
    config = torch.compiler.config
    kept = [part for part in config.cache_key_tag.split("+") if part and not part.startswith(TAG_PREFIX)]
    config.cache_key_tag = "+".join([*kept, TAG_PREFIX + source_fingerprint(root)])
    return config.cache_key_tag
