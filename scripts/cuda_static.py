"""Static sm_90 figures of the CUDA kernels in csrc/cuda, without a GPU: registers, spills, stack frame, static
shared memory and barriers (from `nvcc -c -arch=sm_90 -Xptxas -v`), resident CTAs per SM from those, and SASS
instruction counts (from `cuobjdump -sass` of the same object): tensor-core MMAs (HMMA), async copies (LDGSTS),
global reductions/atomics (RED/ATOM), 128-bit global loads/stores, shared-matrix loads (LDSM), exp2 (MUFU.EX2),
barriers (BAR), and the total.

    python scripts/cuda_static.py [--out benchmarks/results/cuda_sm90_static.json]

tests/test_cuda_sources.py uses the same functions (compile checks, and that the committed JSON is current).
nvcc: PATH, $CUDA_HOME/bin or /usr/local/cuda/bin; cuobjdump: beside nvcc, else triton's bundled copy.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cuda_sm90_static.json"
# Threads per CTA of each kernel (its __launch_bounds__ in the source), for the occupancy estimate.
THREADS = {
    "attn_fwd_kernel": 128, "attn_bwd_kernel": 128, "attn_bwd_delta_kernel": 128, "attn_bwd_dq_kernel": 256,
    "seqpool_fwd_kernel": 512, "seqpool_bwd_kernel": 512, "seqpool_combine_kernel": 256,
    "pool_fwd_kernel": 256, "pool_bwd_kernel": 256,
}
# Dynamic shared memory per CTA that ptxas does not see (kBwdSmem in attention_backward.cu); seqpool's is 8*D (forward) or
# 16*D (backward) bytes, at most 32 KB, and its 512-thread CTAs are limited by threads first.
DYNAMIC_SMEM = {"attn_bwd_kernel": 7 * 64 * 64 * 2 + 4 * 64 * 4}
# sm_90 limits per SM (CUDA occupancy calculator): registers, shared memory, threads, CTAs.
SM90 = {"registers": 65536, "smem": 228 * 1024, "threads": 2048, "ctas": 32, "smem_per_cta_reserved": 1024}
NVCC_FLAGS = ["-c", "-arch=sm_90", "-Xptxas", "-v", "-std=c++17", "-O3"]


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "bin" / name).exists():
            return str(Path(home) / "bin" / name)
    if name == "cuobjdump":  # triton ships one
        try:
            import triton
        except ImportError:
            return None
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(bundled) if bundled.exists() else None
    return None


def compile_source(nvcc: str, source: Path, out_dir: Path) -> tuple[int, str, Path]:
    """nvcc -c the raw-pointer source for sm_90; returns (exit status, ptxas log, object path)."""
    obj = out_dir / (source.stem + ".o")
    cmd = [nvcc, *NVCC_FLAGS, f"-I{ROOT / 'csrc'}", str(source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, obj


def parse_ptxas(log: str) -> dict[str, dict]:
    """{mangled kernel: {registers, spill_stores, spill_loads, stack_frame, smem, barriers}} from ptxas -v."""
    result, current, props = {}, None, {}
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current, props = m.group(1), {}
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                         line)):
            props.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            barriers = re.search(r"used (\d+) barriers", line)
            result[current] = {"registers": int(m.group(1)), **props, "smem": int(smem.group(1)) if smem else 0,
                               "barriers": int(barriers.group(1)) if barriers else 0}
            current = None
    return result


def sass_counts(cuobjdump: str, obj: Path) -> dict[str, Counter]:
    """{mangled kernel: Counter of opcode classes} from cuobjdump -sass."""
    text = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True,
                          timeout=600).stdout
    counts, current = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            current = counts.setdefault(m.group(1), Counter())
        elif current is not None and (m := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)",
                                                     line)):
            op = m.group(1)
            current["total"] += 1
            base = {"REDG": "RED", "ATOMG": "ATOM"}.get(op.split(".")[0], op.split(".")[0])
            if base in ("HMMA", "LDGSTS", "RED", "ATOM", "LDSM", "BAR"):
                current[base] += 1
            if base in ("LDG", "STG") and ".128" in op:
                current[base + ".128"] += 1
            elif base in ("LDG", "STG"):
                current[base + ".narrow"] += 1
            if op.startswith("MUFU.EX2"):
                current["MUFU.EX2"] += 1
    return counts


def short_name(mangled: str) -> str:
    """kernel<type> from the mangled name, e.g. attn_fwd_kernel<__half>."""
    demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() \
        if shutil.which("c++filt") else mangled
    m = re.search(r"(\w+_kernel)(<[^>]*>)?", demangled)
    return (m.group(1) + (m.group(2) or "")) if m else mangled


def ctas_per_sm(registers: int, smem: int, threads: int) -> int:
    """Resident CTAs per SM, limited by registers (allocated per warp in units of 256), shared memory, threads."""
    warps = (threads + 31) // 32
    regs_per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256
    by_regs = SM90["registers"] // (regs_per_warp * warps)
    by_smem = SM90["smem"] // (smem + SM90["smem_per_cta_reserved"]) if smem else SM90["ctas"]
    return min(by_regs, by_smem, SM90["threads"] // threads, SM90["ctas"])


def figures(log: str, sass: dict[str, Counter]) -> dict:
    """{kernel<type>: figures} of one compiled source from its ptxas log and SASS counts."""
    per_kernel = {}
    for mangled, props in sorted(parse_ptxas(log).items()):
        name = short_name(mangled)
        base = name.split("<")[0]
        threads, dynamic = THREADS.get(base), DYNAMIC_SMEM.get(base, 0)
        per_kernel[name] = {**props, "dynamic_smem": dynamic, "threads": threads,
                            "ctas_per_sm": ctas_per_sm(props["registers"], props["smem"] + dynamic, threads)
                            if threads else None,
                            "sass": dict(sorted(sass.get(mangled, Counter()).items()))}
    return per_kernel


def collect(nvcc: str, cuobjdump: str, work_dir: Path) -> dict:
    """{source name: {kernel<type>: figures}}; raises RuntimeError naming the source when nvcc fails."""
    result = {}
    for source in SOURCES:
        rc, log, obj = compile_source(nvcc, source, work_dir)
        if rc != 0:
            raise RuntimeError(f"nvcc failed on {source.name}:\n{log}")
        result[source.name] = figures(log, sass_counts(cuobjdump, obj))
    return result


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\S+), (V\S+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        print(f"error: nvcc ({nvcc}) and cuobjdump ({cuobjdump}) are both needed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        kernels = collect(nvcc, cuobjdump, Path(tmp))
    result = {"command": "python scripts/cuda_static.py", "target": "sm_90", "nvcc": nvcc_version(nvcc),
              "nvcc_flags": NVCC_FLAGS, "kernels": kernels}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for source, per_kernel in kernels.items():
        for name, k in per_kernel.items():
            s = k["sass"]
            print(f"{source:14} {name:42} regs {k['registers']:3} smem {k['smem']:6} CTAs/SM {k['ctas_per_sm']} "
                  f"HMMA {s.get('HMMA', 0):4} LDGSTS {s.get('LDGSTS', 0):3} RED {s.get('RED', 0):3} "
                  f"LDG.128 {s.get('LDG.128', 0):3} total {s.get('total', 0)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
