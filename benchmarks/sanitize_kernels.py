"""One small forward + backward call of every kernel, for compute-sanitizer (memcheck, racecheck) on a GPU.

    python benchmarks/sanitize_kernels.py                     # run every case on this device's kernel backends
    python benchmarks/sanitize_kernels.py --list              # the cases, run nothing
    python benchmarks/sanitize_kernels.py --list --device cuda  # what a GPU would run (works without one)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py

Cases: each op (tokenize, attention, seqpool) at tiny shapes chosen to hit the masked edges of every tile
(N = 197, odd image sizes, channels not a power of two) and each code path (RGB stem with a flat K, a deep
stage, a 7x7 stride-2 stage, attention with dropout), in bfloat16 and float32, on each kernel backend of the
device (CUDA: triton and cuda; CPU: cpu, and triton under TRITON_INTERPRET=1), where the backend serves the case.
Each case runs forward and backward once on fresh random inputs and checks the output and gradients against
the float64 reference (max error over max |reference| at most TOLERANCE; dropout cases only check that the
results are finite), so a kernel that computes garbage under the sanitizer fails here too.
Exit status 1 when any case fails; the last line reads "sanitize_kernels: P passed, F failed of N cases".
Under compute-sanitizer, set PYTORCH_NO_CUDA_MEMORY_CACHING=1: PyTorch's caching allocator would hide an
out-of-bounds access that lands inside another block of its pool.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors, before triton is imported

from cct_kernels import backends, ops, reference  # noqa: E402

BACKENDS_ON = {"cuda": ("triton", "cuda"), "cpu": ("cpu", "triton")}
KERNEL_PACKAGES = {"triton": "cct_kernels.triton", "cuda": "cct_kernels.extension", "cpu": "cct_kernels.extension"}
# bfloat16 only on GPUs: the Triton interpreter's bf16 arithmetic is wrong (DESIGN.md).
DTYPES_ON = {"cuda": (torch.bfloat16, torch.float32), "cpu": (torch.float32,)}
TOLERANCE = {torch.bfloat16: 5e-2, torch.float32: 1e-2}  # float32 may run its dots in TF32


@dataclass(frozen=True)
class Case:
    """One op call: `shapes` of its tensor inputs and `options` (the op's keyword arguments)."""
    op: str
    name: str
    shapes: tuple
    options: dict

    def inputs(self, device, dtype, requires_grad=False):
        generator = torch.Generator().manual_seed(0)
        tensors = []
        for i, shape in enumerate(self.shapes):
            if self.op == "tokenize":
                # x, weight and bias in {-1, 0, 1} (weight and bias / 8): every conv output is a multiple of 1/8
                # below 32, exact in bfloat16 and TF32, so each pool window's argmax (the gradient's route) is the
                # reference's. With random values, rounding the conv output flips near-ties, and the gradient
                # then goes to another position (the 2026-11-30 H200 run failed the cuda backend's unfused
                # cuDNN conv this way, errors 0.05-0.24).
                values = torch.randint(-1, 2, shape, generator=generator).double()
                t = (values if i == 0 else values / 8).to(device, dtype)
                tensors.append(t.requires_grad_(requires_grad))
                continue
            scale = shape[-1] ** -0.5 if self.op == "seqpool" and i == 1 else 1.0  # weight: O(1) scores
            t = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device, dtype)
            tensors.append(t.requires_grad_(requires_grad))
        return tensors

    def support_args(self, tensors) -> tuple:
        """The arguments the kernel modules' unsupported() take for this case."""
        o = self.options
        if self.op == "tokenize":
            x, weight, bias = (*tensors, None)[:3]
            pool = o.get("pool") or (0, 1, 0)
            return (x, weight, bias, o["stride"], o["padding"], True, *pool, o["to_tokens"])
        if self.op == "attention":
            head_dim = tensors[0].shape[2] // (3 * o["num_heads"])
            return (tensors[0], o["num_heads"], head_dim**-0.5, o.get("dropout_p", 0.0))
        return tuple(tensors)

    def call(self, tensors, backend):
        """The op through its public API (backend a kernel backend) or the reference (backend None)."""
        o = dict(self.options)
        if self.op == "tokenize":
            x, weight, bias = (*tensors, None)[:3]
            if backend is None:
                return reference.tokenize(x, weight, bias, **o)
            return ops.tokenize(x, weight, bias, **o, backend=backend)
        if self.op == "attention":
            if backend is None:
                return reference.attention(tensors[0], **o)
            return ops.attention(tensors[0], **o, backend=backend)
        return (reference.seqpool if backend is None else
                lambda *t: ops.seqpool(*t, backend=backend))(*tensors)


CASES = [  # the most intricate kernels first (attention: cp.async, atomics), in case a run is cut off
    Case("attention", "B2_H2_N197_d64", ((2, 197, 3 * 2 * 64),), dict(num_heads=2)),
    Case("attention", "B1_H3_N65_d32", ((1, 65, 3 * 3 * 32),), dict(num_heads=3)),
    Case("attention", "dropout_B2_H2_N197_d64", ((2, 197, 3 * 2 * 64),), dict(num_heads=2, dropout_p=0.1)),
    Case("tokenize", "stem_k3_rgb_17px", ((2, 3, 17, 17), (24, 3, 3, 3), (24,)),
         dict(stride=1, padding=1, pool=(3, 2, 1), to_tokens=True)),
    Case("tokenize", "deep_k3_24ch_9px_nchw_out", ((2, 24, 9, 9), (40, 24, 3, 3)),
         dict(stride=1, padding=1, pool=(3, 2, 1), to_tokens=False)),
    Case("tokenize", "stem_k7_s2_33px", ((1, 3, 33, 33), (16, 3, 7, 7)),
         dict(stride=2, padding=3, pool=(3, 2, 1), to_tokens=True)),
    Case("tokenize", "no_pool_k3_20ch", ((2, 20, 11, 11), (24, 20, 3, 3), (24,)),
         dict(stride=1, padding=0, pool=None, to_tokens=True)),
    Case("seqpool", "B2_N197_D96", ((2, 197, 96), (1, 96), (1,)), {}),
    Case("seqpool", "B3_N5_D40", ((3, 5, 40), (1, 40), (1,)), {}),
]


def plan(device_type: str, backend_names=None, op_names=None) -> list[tuple[Case, str, torch.dtype, str | None]]:
    """(case, backend, dtype, reason it is not served or None) for every combination on `device_type`, decided
    on meta tensors by each kernel module's unsupported() (so a CPU machine can list what a GPU would run)."""
    rows = []
    for case in CASES:  # case by case over the backends: a run cut off by its time limit has covered both
        if op_names and case.op not in op_names:
            continue
        for backend in backend_names or BACKENDS_ON[device_type]:
            module = importlib.import_module(f"{KERNEL_PACKAGES[backend]}.{case.op}")
            for dtype in DTYPES_ON[device_type]:
                reason = module.unsupported(*case.support_args(case.inputs("meta", dtype)), backend=backend)
                rows.append((case, backend, dtype, reason))
    return rows


def _relative_error(out, ref) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1.0)).item()


def run_case(case: Case, backend: str, dtype, device) -> str:
    """Forward and backward of `case` on `backend`; returns a summary, raises AssertionError on a wrong result."""
    tensors = case.inputs(device, dtype, requires_grad=True)
    reason = backends.unsupported_reason(backend, case.op, device, *case.support_args(tensors))
    if reason is not None:
        raise AssertionError(f"backend {backend} declines on the device: {reason}")
    out = case.call(tensors, backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, tensors, grad_out.to(device, dtype))
    if device.type == "cuda":
        torch.cuda.synchronize()  # a kernel fault surfaces here, inside this case
    results = {"out": out, **{f"grad{i}": g for i, g in enumerate(grads)}}
    for name, value in results.items():
        assert torch.isfinite(value).all(), f"{name} has non-finite values"
    if case.options.get("dropout_p"):
        return "finite (dropout: no reference)"
    exact = [t.detach().double().requires_grad_() for t in tensors]
    ref_out = case.call(exact, None)
    expected = {"out": ref_out, **{f"grad{i}": g for i, g in
                                   enumerate(torch.autograd.grad(ref_out, exact, grad_out.to(device)))}}
    errors = {name: _relative_error(results[name], expected[name]) for name in results}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE[dtype], f"{worst}: relative error {errors[worst]:.2e} > {TOLERANCE[dtype]}"
    return f"max relative error {errors[worst]:.1e} ({worst})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(BACKENDS_ON), help="default: cuda when available, else cpu")
    parser.add_argument("--backend", nargs="+", choices=sorted(KERNEL_PACKAGES), help="default: the device's")
    parser.add_argument("--op", nargs="+", choices=sorted({c.op for c in CASES}), help="default: every op")
    parser.add_argument("--list", action="store_true", help="print the cases and run nothing")
    args = parser.parse_args(argv)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = plan(device_type, args.backend, args.op)
    runnable = [(case, backend, dtype) for case, backend, dtype, reason in rows if reason is None]
    for case, backend, dtype, reason in rows:
        label = f"{case.op:<9} {backend:<6} {str(dtype)[6:]:<8} {case.name}"
        if reason is not None:
            print(f"not served  {label}: {reason}")
        elif args.list:
            print(f"case        {label}")
    if args.list:
        print(f"sanitize_kernels: {len(runnable)} cases on {device_type}")
        return 0
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a visible GPU (use --list to see its cases)")
    device, failed = torch.device(device_type), 0
    for case, backend, dtype in runnable:
        label = f"{case.op:<9} {backend:<6} {str(dtype)[6:]:<8} {case.name}"
        try:
            print(f"ok          {label}: {run_case(case, backend, dtype, device)}", flush=True)
        except Exception as e:  # every case runs; the report lists each failure
            failed += 1
            print(f"FAILED      {label}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3)
    print(f"sanitize_kernels: {len(runnable) - failed} passed, {failed} failed of {len(runnable)} cases")
    return 1 if failed or not runnable else 0


if __name__ == "__main__":
    sys.exit(main())
