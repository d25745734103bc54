"""cct_kernels' source fingerprint in torch.compile's cache key: an op whose output layout changed between two
versions is never replayed from a warm on-disk cache."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import cct_kernels  # noqa: F401  (its import tags the caches)
from cct_kernels._compile_cache import TAG_PREFIX, source_fingerprint, tag_compile_caches

ROOT = Path(__file__).resolve().parents[1]

# A custom op standing for one of ours, in two "versions": its kernel and fake return row-major or column-major
# outputs; `sources` stands for the package sources whose fingerprint tags the caches.
_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from cct_kernels._compile_cache import tag_compile_caches

    layout, sources = sys.argv[1], Path(sys.argv[2])

    def empty(x):
        return torch.empty_like(x) if layout == "rows" else x.new_empty(x.shape[::-1]).t()

    @torch.library.custom_op("stale_cache_demo::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return empty(x).copy_(x * 2)

    double.register_fake(empty)
    tag_compile_caches(sources)
    print(torch.compile(lambda x: double(x) + 1)(torch.ones(4, 3)).sum().item())
""")


def _run(tmp_path, layout, version):
    sources = tmp_path / f"sources_{version}"
    sources.mkdir(exist_ok=True)
    (sources / "op.py").write_text(f"version {version}\n")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "PYTHONPATH": str(ROOT),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    return subprocess.run([sys.executable, "-c", _RUN, layout, str(sources)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_changed_output_layout_recompiles_when_the_sources_changed(tmp_path):
    first = _run(tmp_path, "rows", 1)
    assert first.returncode == 0 and float(first.stdout) == 36.0, first.stderr[-2000:]
    stale = _run(tmp_path, "cols", 1)  # new layout, same fingerprint: the warm cache replays the old strides
    assert stale.returncode != 0 and "assert_size_stride" in stale.stderr, stale.stderr[-2000:]
    upgraded = _run(tmp_path, "cols", 2)  # new layout, new fingerprint (what an upgrade of cct_kernels gives)
    assert upgraded.returncode == 0 and float(upgraded.stdout) == 36.0, upgraded.stderr[-2000:]


def test_the_tag_is_set_at_import_and_keeps_the_users(tmp_path):
    config = torch.compiler.config
    assert config.cache_key_tag.endswith(TAG_PREFIX + source_fingerprint())
    saved = config.cache_key_tag
    try:
        config.cache_key_tag = "mine"
        assert tag_compile_caches() == f"mine+{TAG_PREFIX}{source_fingerprint()}"
        assert tag_compile_caches() == f"mine+{TAG_PREFIX}{source_fingerprint()}"  # replaced, not appended twice
        (tmp_path / "a.py").write_text("x = 1\n")
        before = source_fingerprint(tmp_path)
        (tmp_path / "a.py").write_text("x = 2\n")
        assert source_fingerprint(tmp_path) != before
    finally:
        config.cache_key_tag = saved
