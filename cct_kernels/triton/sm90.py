"""Compile Triton kernels for Hopper (sm_90) without a GPU, to check registers, spills and shared memory.

Each op module in this package lists the kernel configurations it ships in `SM90_CHECKS`:
    [{"name": str, "fn": jit function, "signature": {arg: "*fp16" | "i32" | "fp32" | "constexpr" ...},
      "constexprs": {arg: value}, "num_warps": int, "num_stages": int}, ...]
tests/test_triton_sm90.py compiles every one of them and fails on spills. Run in a process where
TRITON_INTERPRET is not set (the interpreter replaces the compiler).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)


def _ptxas() -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else "ptxas"


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3, **_) -> dict:
    """Compile `fn` for sm_90; returns registers, spill_bytes (stores + loads), shared (bytes), wgmma and ptx."""
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run(
            [_ptxas(), "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return {
        "registers": registers, "spill_bytes": spills, "shared": compiled.metadata.shared,
        "wgmma": "wgmma" in ptx, "ptx": ptx,
    }
