"""Every shipped Triton kernel configuration compiles for sm_90 without spills (no GPU needed).

Runs the compiler in a subprocess without TRITON_INTERPRET, since the test process may have the interpreter on.
"""
import json
import os
import subprocess
import sys

import pytest

OPS = ["attention", "seqpool", "tokenize"]

SCRIPT = """
import importlib, json, sys
from cct_kernels.triton.sm90 import compile_sm90
module = importlib.import_module("cct_kernels.triton." + sys.argv[1])
results = []
for check in module.SM90_CHECKS:
    report = compile_sm90(**check)
    report.pop("ptx")
    results.append({"name": check["name"], **report})
print(json.dumps(results))
"""


@pytest.mark.parametrize("op", OPS)
def test_compiles_for_sm90_without_spills(op):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, op], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results, f"cct_kernels.triton.{op} lists no SM90_CHECKS"
    for r in results:
        assert r["spill_bytes"] == 0, f"{op}/{r['name']} spills: {r}"
        assert r["registers"] <= 255, r
        assert r["shared"] <= 227 * 1024, r
