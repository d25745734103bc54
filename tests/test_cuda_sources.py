"""The CUDA kernels of csrc/cuda compile for sm_90 without a GPU and without torch (`nvcc -c -arch=sm_90 -Xptxas -v`),
with no register spills and no local-memory stack frames.

nvcc is looked up on PATH, then in $CUDA_HOME/bin and /usr/local/cuda/bin. A machine without nvcc fails here with a
clear message; set CCT_KERNELS_REQUIRE_NVCC=0 to collect no tests from this file instead (CI machines have nvcc).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
# Kernels each file must define (mangled names contain these); a file that silently compiles nothing fails.
EXPECTED_KERNELS = {
    "attention.cu": ["attn_fwd_kernel", "attn_bwd_kernel", "attn_bwd_delta_kernel", "attn_bwd_dq_kernel"],
    "seqpool.cu": ["seqpool_fwd_kernel", "seqpool_bwd_kernel"],
    "tokenize.cu": ["pool_fwd_kernel", "pool_bwd_kernel"],
}


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _find_nvcc()
REQUIRE = os.environ.get("CCT_KERNELS_REQUIRE_NVCC", "1") != "0"


def _compile(source: Path, tmp_path: Path):
    cmd = [NVCC, "-c", "-arch=sm_90", "-Xptxas", "-v", "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", str(source),
           "-o", str(tmp_path / (source.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _kernels(log: str):
    """{mangled kernel name: (registers, spill stores, spill loads, stack frame bytes)} from ptxas -v output."""
    result, current, frame, spills = {}, None, None, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = m.group(1)
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                         line)):
            frame, spills = int(m.group(1)), (int(m.group(2)), int(m.group(3)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            result[current] = (int(m.group(1)), *spills, frame)
            current = None
    return result


if NVCC is not None:

    def test_every_cuda_source_is_checked():
        assert {s.name for s in SOURCES} == set(EXPECTED_KERNELS), "update EXPECTED_KERNELS for new .cu files"

    @pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
    def test_cuda_source_compiles_for_sm90_without_spills(source, tmp_path):
        rc, log = _compile(source, tmp_path)
        assert rc == 0, f"nvcc failed on {source.name}:\n{log}"
        kernels = _kernels(log)
        for name in EXPECTED_KERNELS[source.name]:
            assert any(name in k for k in kernels), f"{source.name}: no kernel {name} in ptxas output:\n{log}"
        for kernel, (regs, spill_st, spill_ld, frame) in kernels.items():
            assert spill_st == 0 and spill_ld == 0, f"{kernel}: {spill_st}/{spill_ld} bytes spilled\n{log}"
            assert frame == 0, f"{kernel}: {frame} bytes stack frame (local memory)\n{log}"
            assert regs <= 255, f"{kernel}: {regs} registers"

elif REQUIRE:

    def test_nvcc_is_available():
        pytest.fail(
            "nvcc was not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): the CUDA sources in csrc/cuda cannot be "
            "checked. Install the CUDA toolkit, or set CCT_KERNELS_REQUIRE_NVCC=0 to skip collecting these tests."
        )
