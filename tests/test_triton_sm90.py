"""Every shipped Triton kernel, compiled for sm_90 as the JIT specialises it at launch, has no spills and matches
the committed static figures (benchmarks/results/sm90_static.json; regenerate with
`python -m cct_kernels.triton.sm90 --out benchmarks/results/sm90_static.json`). No GPU needed.

Runs the compiler in a subprocess without TRITON_INTERPRET, since the test process may have the interpreter on.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from cct_kernels.triton.sm90 import OPS

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "sm90_static.json"
REGENERATE = "python -m cct_kernels.triton.sm90 --out benchmarks/results/sm90_static.json"


def _fresh(op: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "cct_kernels.triton.sm90", "--ops", op], capture_output=True,
                          text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)[op]


@pytest.mark.parametrize("op", OPS)
def test_launch_specialised_sm90_build_has_no_spills_and_matches_committed_figures(op):
    fresh = _fresh(op)
    assert fresh, f"cct_kernels.triton.{op} lists no SM90_CHECKS"
    for name, r in fresh.items():
        assert r["spill_bytes"] == 0, f"{op}/{name} spills: {r}"
        assert r["registers"] <= 255, (name, r)
        assert r["shared_bytes"] <= 227 * 1024, (name, r)
    committed = json.loads(COMMITTED.read_text())[op]
    assert committed == fresh, f"{COMMITTED.name} is stale for {op}: run `{REGENERATE}` and commit it"

