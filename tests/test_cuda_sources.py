"""The CUDA kernels of csrc/cuda compile for sm_90 without a GPU and without torch (`nvcc -c -arch=sm_90 -Xptxas -v`),
with no register spills and no local-memory stack frames; benchmarks/results/cuda_sm90_static.json (written by
scripts/cuda_static.py) matches what the sources compile to; targets below sm_80 fail with a clear message.

nvcc is looked up on PATH, then in $CUDA_HOME/bin and /usr/local/cuda/bin. A machine without nvcc fails here with a
clear message; set CCT_KERNELS_REQUIRE_NVCC=0 to collect no tests from this file instead (CI machines have nvcc).
"""
import importlib.util
import json
import os
import re
import subprocess
import types
from pathlib import Path

import pytest
import torch

from cct_kernels.extension import attention as ext_attention
from cct_kernels.extension import seqpool as ext_seqpool

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_static", ROOT / "scripts" / "cuda_static.py")
cuda_static = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_static)

SOURCES = cuda_static.SOURCES
# Kernels each file must define (mangled names contain these); a file that silently compiles nothing fails.
EXPECTED_KERNELS = {
    "attention_forward.cu": ["attn_fwd_kernel"],
    "attention_backward.cu": ["attn_bwd_kernel", "attn_bwd_delta_kernel", "attn_bwd_dq_kernel"],
    "seqpool.cu": ["seqpool_fwd_kernel", "seqpool_bwd_kernel", "seqpool_combine_kernel"],
    "tokenize.cu": ["pool_fwd_kernel", "pool_bwd_kernel"],
}
NVCC = cuda_static.find_tool("nvcc")
CUOBJDUMP = cuda_static.find_tool("cuobjdump")
REQUIRE = os.environ.get("CCT_KERNELS_REQUIRE_NVCC", "1") != "0"



@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (9, 0)])
def test_cuda_attention_declines_gpus_below_sm80(capability, monkeypatch):
    """The attention sources stop at #error below sm_80, so the extension has no attention kernel for such a GPU: the
    adapter says so (and "auto" picks another backend) instead of failing at launch."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    qkv = types.SimpleNamespace(shape=(2, 70, 3 * 2 * 64), dtype=torch.float16, is_cuda=True,
                                device=torch.device("cuda", 0))
    reason = ext_attention.unsupported(qkv, 2, 0.125, 0.0, backend="cuda")
    if capability < (8, 0):
        assert reason is not None and "8.0" in reason and "7.5" in reason
    else:
        assert reason is None


if NVCC is not None:

    @pytest.fixture(scope="module")
    def compiled(tmp_path_factory):
        """{source name: (exit status, ptxas log, object path)}, each source compiled once for this module."""
        out = tmp_path_factory.mktemp("cuda_objects")
        return {s.name: cuda_static.compile_source(NVCC, s, out) for s in SOURCES}

    def test_every_cuda_source_is_checked():
        assert {s.name for s in SOURCES} == set(EXPECTED_KERNELS), "update EXPECTED_KERNELS for new .cu files"
        missing = [k for ks in EXPECTED_KERNELS.values() for k in ks if k not in cuda_static.THREADS]
        assert not missing, f"scripts/cuda_static.py THREADS needs the block size of {missing}"

    @pytest.mark.parametrize("source", [s.name for s in SOURCES])
    def test_cuda_source_compiles_for_sm90_without_spills(source, compiled):
        rc, log, _ = compiled[source]
        assert rc == 0, f"nvcc failed on {source}:\n{log}"
        kernels = cuda_static.parse_ptxas(log)
        for name in EXPECTED_KERNELS[source]:
            assert any(name in k for k in kernels), f"{source}: no kernel {name} in ptxas output:\n{log}"
        for kernel, k in kernels.items():
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{kernel}: spills\n{log}"
            assert k["stack_frame"] == 0, f"{kernel}: {k['stack_frame']} bytes stack frame (local memory)\n{log}"
            assert k["registers"] <= 255, f"{kernel}: {k['registers']} registers"

    @pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found (CUDA toolkit or triton's bundled copy)")
    def test_static_figures_file_is_current(compiled):
        """The committed JSON is what the sources compile to now: rerun scripts/cuda_static.py after a change."""
        committed = json.loads(cuda_static.DEFAULT_OUT.read_text())
        here = cuda_static.nvcc_version(NVCC)
        if committed["nvcc"] != here:
            pytest.skip(f"the figures were made with nvcc {committed['nvcc']}, this one is {here}")
        committed = committed["kernels"]
        for source in SOURCES:
            rc, log, obj = compiled[source.name]
            assert rc == 0, log
            fresh = cuda_static.figures(log, cuda_static.sass_counts(CUOBJDUMP, obj))
            assert committed.get(source.name) == fresh, (
                f"{cuda_static.DEFAULT_OUT.name} is stale for {source.name}: run `python scripts/cuda_static.py`"
            )

    def test_every_launcher_in_kernels_h_is_defined(compiled, tmp_path):
        """Each launcher declared in csrc/cuda/kernels.h links against the compiled sources with that exact
        signature: a declaration and definition that drift apart fail here, not at import on a GPU machine."""
        names = re.findall(r"cudaError_t (\w+_launch)\(", (ROOT / "csrc" / "cuda" / "kernels.h").read_text())
        assert len(names) >= 6, names
        main = tmp_path / "launchers.cpp"
        main.write_text('#include "cuda/kernels.h"\nint main() {\n  const void* launchers[] = {'
                        + ", ".join(f"(const void*)&cct::{n}" for n in names)
                        + "};\n  return launchers[0] == nullptr;\n}\n")
        objects = [str(obj) for rc, _, obj in compiled.values() if rc == 0]
        assert len(objects) == len(SOURCES)
        proc = subprocess.run([NVCC, "-std=c++17", f"-I{ROOT / 'csrc'}", str(main), *objects, "-o",
                               str(tmp_path / "launchers")], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    @pytest.mark.parametrize("source", ["attention_forward.cu", "attention_backward.cu"])
    def test_attention_names_the_minimum_arch(source, tmp_path):
        """A build for sm_75 stops with the #error naming sm_80, not with a ptxas error about cp.async."""
        proc = subprocess.run([NVCC, "-c", "-arch=sm_75", "-std=c++17", f"-I{ROOT / 'csrc'}",
                               str(ROOT / "csrc" / "cuda" / source), "-o", str(tmp_path / "x.o")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0 and "need sm_80+" in proc.stdout + proc.stderr, proc.stdout + proc.stderr

    @pytest.fixture(scope="module")
    def header_max_d(tmp_path_factory):
        """seqpool_cuda_max_d of csrc/cuda/kernels.h, compiled into a small host program: (element size, D) -> int."""
        tmp = tmp_path_factory.mktemp("max_d")
        main = tmp / "max_d.cpp"
        main.write_text('#include <cstdio>\n#include <cstdlib>\n#include "cuda/kernels.h"\n'
                        'int main(int, char** v) {\n'
                        '  std::printf("%lld", (long long)cct::seqpool_cuda_max_d(atoll(v[1]), atoll(v[2])));\n}\n')
        homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", str(Path(NVCC).resolve().parents[1])]
        cuda_include = next(Path(h) / "include" for h in homes
                            if h and (Path(h) / "include" / "cuda_runtime.h").exists())
        exe = tmp / "max_d"
        subprocess.run(["g++", "-std=c++17", f"-I{ROOT / 'csrc'}", f"-I{cuda_include}", str(main), "-o", str(exe)],
                       check=True, capture_output=True, timeout=120)

        def max_d(element_size, D):
            out = subprocess.run([str(exe), str(element_size), str(D)], capture_output=True, text=True, check=True)
            return int(out.stdout)

        return max_d

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_seqpool_d_limit_matches_the_kernels_header(dtype, header_max_d):
        """cct_kernels.extension.seqpool.cuda_max_d mirrors seqpool_cuda_max_d in csrc/cuda/kernels.h, and
        unsupported() declines exactly the rows beyond it."""
        for D in (100, 130, 256, 257, 384, 520, 1024, 1032, 2048):
            x = torch.empty(1, 1, D, dtype=dtype)
            expected = header_max_d(x.element_size(), D)
            assert ext_seqpool.cuda_max_d(x) == expected, (D, dtype)
            reason = ext_seqpool.unsupported(x, None, None, backend="cuda")
            assert (reason is None) == (D <= expected), (D, dtype, reason)

elif REQUIRE:

    def test_nvcc_is_available():
        pytest.fail(
            "nvcc was not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): the CUDA sources in csrc/cuda cannot be "
            "checked. Install the CUDA toolkit, or set CCT_KERNELS_REQUIRE_NVCC=0 to skip collecting these tests."
        )
