"""Compile the Triton kernels exactly as the JIT builds them at launch, for Hopper (sm_90), without a GPU.

Each op module in this package lists the launches it ships in `SM90_CHECKS`:
    [{"name": str, "launch": callable, "score_elements": optional callable(kernel kwargs) -> int}, ...]
`launch()` calls the op's own launcher (forward/backward) on meta tensors of a representative shape; every kernel
launch it makes is recorded instead of run, then compiled with Triton's own launch specialisation (the binder
JITFunction.run uses: 16-byte-divisible pointers and integers divisible by 16 get tt.divisibility=16, integers
equal to 1 become constants), so the figures describe the kernel a GPU would run, not a hand-written signature.

Figures per kernel: registers and spill bytes (ptxas -v), shared memory, the MMA kind in the SASS (wgmma =
HGMMA, mma = HMMA, fma = neither), cp.async (LDGSTS) and 128-bit global loads (LDG.E.128) present, the SASS
length of the innermost loop (warp instructions per iteration) and, for kernels whose loop walks score tiles
(attention), thread instructions per score element = loop length * 32 * num_warps / (BLOCK_M * BLOCK_N); a check
named "<case>_dropout" also gets dropout_instruction_ratio, that figure over the one of "<case>"'s same kernel.

    python -m cct_kernels.triton.sm90 --out benchmarks/results/sm90_static.json   # regenerate the committed file

Must run in a process without TRITON_INTERPRET (the interpreter replaces the compiler); tests/test_triton_sm90.py
runs it in a subprocess and compares with the committed file.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)
OPS = ("attention", "linear", "seqpool", "text_tokenize", "tokenize")
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _tool(name: str) -> str:
    bundled = os.path.join(_BIN, name)
    return bundled if os.path.exists(bundled) else name


@contextlib.contextmanager
def recorded_launches():
    """Within the block, `kernel[grid](*args, **kwargs)` records (kernel, args, kwargs) in the yielded list instead
    of running."""
    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict):
    """triton.compile of `fn` for sm_90 with the signature, constexprs and attributes that fn[grid](*args, **kwargs)
    would specialise (the same binder and _pack_args as JITFunction.run)."""
    backend = make_backend(HOPPER)
    kwargs = {"debug": False, **kwargs}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=HOPPER, options=options.__dict__)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def _sass_instructions(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(address, instruction text) of every SASS instruction, and each label's address."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _SASS_LINE.search(line)
        if match:
            address = int(match.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            instructions.append((address, match.group(2)))
    return instructions, labels


def innermost_loop_length(sass: str) -> int:
    """SASS instructions in the body of the longest innermost loop (a backward branch whose range holds no other
    backward branch); 0 when the kernel has no loop."""
    instructions, labels = _sass_instructions(sass)
    loops = []
    for address, text in instructions:
        target = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+|0x[0-9a-f]+)", text)
        if not target:
            continue
        name = target.group(1)
        start = labels.get(name) if name.startswith(".L") else int(name, 16)
        if start is not None and start < address:  # a branch to itself is the end-of-kernel trap, not a loop
            loops.append((start, address))
    innermost = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    return max((sum(s <= a <= e for a, _ in instructions) for s, e in innermost), default=0)


def figures(compiled, num_warps: int, score_elements: int | None = None) -> dict:
    """Static figures of one compiled kernel (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", ptx_path, "-o", os.path.join(tmp, "v.cubin")],
                                capture_output=True, text=True, check=True).stderr
        with open(cubin_path, "wb") as f:
            f.write(compiled.asm["cubin"])  # the cubin Triton itself built: the SASS that would run
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True,
                              check=True).stdout
    opcodes = [text.split()[0] if not text.startswith("@") else text.split()[1]
               for _, text in _sass_instructions(sass)[0]]
    mma = "wgmma" if any(o.startswith("HGMMA") for o in opcodes) else (
        "mma" if any(o.startswith("HMMA") for o in opcodes) else "fma")
    loop = innermost_loop_length(sass)
    result = {
        "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
        "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)),
        "shared_bytes": compiled.metadata.shared,
        "num_warps": num_warps,
        "mma": mma,
        "cp_async": any(o.startswith("LDGSTS") for o in opcodes),
        "ldg_128": any(o.startswith("LDG") and ".128" in o for o in opcodes),
        "sass_instructions": len(opcodes),
        "loop_instructions": loop,
    }
    if score_elements:
        result["score_elements_per_iteration"] = score_elements
        result["instructions_per_score_element"] = round(loop * 32 * num_warps / score_elements, 2)
    return result


def check_figures(check: dict) -> dict:
    """{"<check name>/<kernel name>": figures} for every kernel that check["launch"]() launches."""
    with recorded_launches() as launches:
        check["launch"]()
    if not launches:
        raise RuntimeError(f"sm90 check {check['name']} launched no kernel")
    results = {}
    for fn, args, kwargs in launches:
        compiled = compile_launch(fn, args, kwargs)
        score = check.get("score_elements")
        name = f"{check['name']}/{fn.__name__}"
        results[name] = figures(compiled, kwargs.get("num_warps", 4), score(kwargs) if score else None)
    return results


def op_figures(op: str) -> dict:
    module = importlib.import_module(f"cct_kernels.triton.{op}")
    results = {}
    for check in module.SM90_CHECKS:
        results.update(check_figures(check))
    for name, figure in results.items():  # "<case>_dropout/<kernel>" beside its twin "<case>/<kernel>"
        twin = results.get(name.replace("_dropout/", "/"))
        if "_dropout/" in name and twin and twin.get("instructions_per_score_element"):
            figure["dropout_instruction_ratio"] = round(
                figure["instructions_per_score_element"] / twin["instructions_per_score_element"], 2)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the figures of every op as JSON here (else print them)")
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    results = {op: op_figures(op) for op in args.ops}
    text = json.dumps(results, indent=1, sort_keys=True) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
