"""How the extension cct_kernels._C is built: sources, compiler flags, CUDA architectures, and the first-use build.

Two builds share this file: the ahead-of-time one of setup.py (`pip install --no-build-isolation`), which loads it
by path before torch may be importable, and the first-use build (`build_and_load`), which compiles the same sources
with torch.utils.cpp_extension.load + ninja into a per-user cache when the installed package has no compiled
extension (`pip install .` with build isolation cannot see torch, so its wheel is pure Python).
Hence: no import of cct_kernels here, and torch only inside the functions that build.

Environment:
  CCT_KERNELS_CPU_ARCH=<arch>   -march for the CPU kernels (default "native" on x86-64, "none": compiler default)
  CCT_KERNELS_NO_CUDA=1         CPU kernels only, even with a CUDA torch and nvcc
  TORCH_CUDA_ARCH_LIST          CUDA architectures (default: the visible GPUs' if all are sm_80+, else 8.0;9.0+PTX;
                                architectures below 8.0 are dropped: the attention kernel needs cp.async)
  CCT_KERNELS_CACHE_DIR         where first-use builds go (default $XDG_CACHE_HOME/cct_kernels or ~/.cache/...)
  CXX                           the C++ compiler (default c++)
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LIBRARY_NAME = "cct_kernels_C"  # the first-use build's file name; the ops live in torch.ops.cct_kernels_C either way
MIN_CUDA_ARCH = (8, 0)  # csrc/cuda/attention_*.cu stream tiles with cp.async (sm_80+)
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # A100 and H100/H200 natively; PTX for later GPUs to JIT
_NAMED_ARCHS = {"kepler": "3.5", "maxwell": "5.0", "pascal": "6.0", "volta": "7.0", "turing": "7.5",
                "ampere": "8.0", "ada": "8.9", "hopper": "9.0"}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def source_root() -> Path | None:
    """The folder holding ops.cpp, cpu/ and cuda/: shipped inside the package (cct_kernels/_csrc, copied there by
    setup.py's build_py) or, in a source checkout, the repository's csrc/. None when neither exists."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "_csrc", here.parent.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def cpu_sources(root: Path) -> list[Path]:
    return sorted(root.glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))


def cuda_sources(root: Path) -> list[Path]:
    return sorted((root / "cuda").glob("*.cu"))


def all_source_files(root: Path) -> list[Path]:
    """Every file the build reads (sources and headers), for the cache key and the package data."""
    return sorted(p for p in root.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh") and p.is_file())


def cpu_arch_flags(arch: str | None = None, machine: str | None = None) -> list[str]:
    """-march flags: CCT_KERNELS_CPU_ARCH, else "native" on x86-64 (this machine's AVX2/AVX-512), else none."""
    if arch is None:
        arch = os.environ.get("CCT_KERNELS_CPU_ARCH")
    if arch is None:
        arch = "native" if (machine or platform.machine()) in ("x86_64", "AMD64") else "none"
    if arch in ("", "none"):
        return []
    # GCC keeps to 256-bit vectors on AVX-512 machines unless told otherwise; the exp/erf/softmax loops of
    # csrc/cpu ran ~5% faster (attention up to 15% at batch 1) with 512 (NOTES.md, cpu extension, fifth round).
    wide = ["-mprefer-vector-width=512"] if (machine or platform.machine()) in ("x86_64", "AMD64") else []
    return [f"-march={arch}", *wide]


def cxx_flags(arch_flags: list[str]) -> list[str]:
    # -fno-trapping-math/-fno-math-errno (as torch's own build): without them GCC keeps float compares and floor as
    # branches/calls, and the softmax/exp loops of csrc/cpu stay scalar.
    return ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", *arch_flags]


NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++17"]
LINK_FLAGS = ["-fopenmp"]


def arch_name(arch_flags: list[str]) -> str:
    return arch_flags[0][len("-march="):] if arch_flags else "default"


def _parse_arch(entry: str) -> tuple[int, int] | None:
    """(major, minor) of a TORCH_CUDA_ARCH_LIST entry such as "8.6", "9.0a", "8.0+PTX" or "Ampere"; None if unknown."""
    entry = _NAMED_ARCHS.get(entry.split("+")[0].lower(), entry)
    match = re.match(r"^(\d+)\.(\d+)", entry)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_arch_list(requested: str | None, visible: list[tuple[int, int]]) -> tuple[str | None, str]:
    """The TORCH_CUDA_ARCH_LIST to build with, and a note on how it was chosen (or why CUDA is skipped: None).

    requested: the user's TORCH_CUDA_ARCH_LIST (None or "" when unset); visible: compute capabilities of the visible
    GPUs. Without a request: the visible GPUs' architectures when there are some (torch's own detection raises
    IndexError when there are none), else DEFAULT_CUDA_ARCHS. Architectures below sm_80 cannot compile the
    attention kernel (cp.async): they are dropped with a note, and a list left empty skips the CUDA kernels.
    """
    if requested and requested.strip():
        entries = [e for e in re.split(r"[;\s]+", requested.strip()) if e]
        kept = [e for e in entries if (_parse_arch(e) or MIN_CUDA_ARCH) >= MIN_CUDA_ARCH]
        dropped = [e for e in entries if e not in kept]
        if not kept:
            return None, (f"TORCH_CUDA_ARCH_LIST={requested!r} has no architecture >= 8.0, which the CUDA kernels "
                          f"need (cp.async); CUDA kernels skipped")
        note = f"TORCH_CUDA_ARCH_LIST={';'.join(kept)}"
        if dropped:
            note += f" (dropped {';'.join(dropped)}: below 8.0, which the CUDA kernels need)"
        return ";".join(kept), note
    if visible:
        too_old = sorted({cap for cap in visible if cap < MIN_CUDA_ARCH})
        if too_old:
            names = ", ".join(f"sm_{major}{minor}" for major, minor in too_old)
            return None, (f"a visible GPU ({names}) is older than sm_80, which the CUDA kernels need; CUDA kernels "
                          f"skipped")
        archs = ";".join(f"{major}.{minor}" for major, minor in sorted(set(visible)))
        return archs, f"TORCH_CUDA_ARCH_LIST={archs} (the visible GPUs)"
    return DEFAULT_CUDA_ARCHS, f"TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS} (default: no GPU visible)"


def visible_cuda_capabilities() -> list[tuple[int, int]]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def compiler_problem(cxx: str, flags: list[str]) -> str | None:
    """None when `cxx` compiles and links an OpenMP C++ program with `flags`, else what is wrong (with its error)."""
    if shutil.which(cxx) is None:
        return f"the C++ compiler {cxx!r} was not found (install g++, or set CXX to a C++ compiler)"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        cmd = [cxx, *flags, src, "-o", os.path.join(tmp, "t")]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return (f"the C++ compiler {cxx!r} cannot build an OpenMP program with {' '.join(flags)}: "
                f"{_error_lines(result.stdout + result.stderr)}")
    return None


def _error_lines(output: str, limit: int = 4) -> str:
    """The compiler's error lines (or its last lines), joined on one line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines[-limit:]
    return " | ".join(errors[:limit]) or "no output"


def cuda_plan(root: Path) -> tuple[str | None, str]:
    """(TORCH_CUDA_ARCH_LIST, note) for a build with the CUDA kernels, or (None, why they are not built)."""
    import torch
    from torch.utils import cpp_extension

    if env_flag("CCT_KERNELS_NO_CUDA"):
        return None, "CCT_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return None, "torch is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return None, "no CUDA_HOME/nvcc"
    if not cuda_sources(root):
        return None, "no CUDA sources"
    return cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), visible_cuda_capabilities())


def cache_dir(root: Path, flags: list[str]) -> Path:
    """<cache>/<torch version>-<hash of the sources, flags, Python and CUDA versions>."""
    import torch

    digest = hashlib.sha256()
    for path in all_source_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(repr((flags, sys.version_info[:2], torch.version.cuda, os.environ.get("CXX"))).encode())
    base = os.environ.get("CCT_KERNELS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cct_kernels")
    return Path(base) / f"{torch.__version__.replace('+', '_')}-{digest.hexdigest()[:16]}"


class BuildError(RuntimeError):
    """The first-use build failed; the message names the compiler problem."""


def build_and_load() -> str:
    """Build (first use) or reuse the cached extension and load it into this process; returns the library's path.

    The first call per torch version and source version compiles the CPU kernels (and the CUDA kernels with a
    CUDA torch and nvcc) with ninja, printing one line to stderr (1-2 minutes on 2 cores); later calls load the
    cached library. A failed CUDA compile falls back to the CPU kernels alone, saying so. Raises BuildError
    naming the compiler problem when nothing can be built.
    """
    import torch
    from torch.utils import cpp_extension

    root = source_root()
    if root is None:
        raise BuildError("the extension's C++ sources are not in this installation (cct_kernels/_csrc is missing)")
    arch_flags = cpu_arch_flags()
    cxx = os.environ.get("CXX", "c++")
    archs, cuda_note = cuda_plan(root)
    plans = [archs] if archs is None else [archs, None]  # with CUDA first, then the CPU kernels alone
    for archs in plans:
        macros = [f'-DCCT_CPU_ARCH="{arch_name(arch_flags)}"']
        if archs is not None:
            macros += ["-DCCT_WITH_CUDA=1", f'-DCCT_CUDA_ARCHS="{archs}"']
        flags = cxx_flags(arch_flags) + macros
        directory = cache_dir(root, flags + ([archs] if archs else []))
        library = directory / f"{LIBRARY_NAME}.so"
        if (directory / "complete").is_file():
            torch.ops.load_library(str(library))
            return str(library)
        problem = compiler_problem(cxx, ["-fopenmp", *arch_flags])
        if problem is not None:
            raise BuildError(problem)
        what = (f"CPU kernels; CUDA kernels not built: {cuda_note}" if archs is None
                else f"CPU and CUDA kernels, {cuda_note}")
        print(f"cct_kernels: building the C++ extension ({what}) for torch {torch.__version__} into "
              f"{directory}; this happens once and takes a few minutes", file=sys.stderr, flush=True)
        directory.mkdir(parents=True, exist_ok=True)
        sources = cpu_sources(root) + (cuda_sources(root) if archs is not None else [])
        if archs is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        try:
            # cpp_extension.load locks the folder: processes starting together (torchrun ranks) build once.
            cpp_extension.load(
                name=LIBRARY_NAME, sources=[str(s) for s in sources], extra_cflags=_shell_quoted(flags),
                extra_cuda_cflags=NVCC_FLAGS + _shell_quoted(macros), extra_ldflags=LINK_FLAGS,
                build_directory=str(directory), with_cuda=archs is not None, is_python_module=False, verbose=False,
            )
        except Exception as e:  # noqa: BLE001  (ninja, compiler and linker failures come as several types)
            message = f"compiling {', '.join(s.name for s in sources)} with {cxx} failed: {_error_lines(str(e))}"
            if archs is not None:
                print(f"cct_kernels: WARNING: the CUDA kernels did not build ({message}); building the CPU kernels "
                      f"alone", file=sys.stderr, flush=True)
                cuda_note = f"the CUDA compile failed: {message}"
                continue
            raise BuildError(message) from e
        (directory / "complete").write_text(cuda_note + "\n")
        return str(library)
    raise AssertionError("unreachable: the last plan builds the CPU kernels or raises")


def _shell_quoted(flags: list[str]) -> list[str]:
    """Flags as ninja's shell sees them: the string macros keep their quotes."""
    return [flag.replace('"', '\\"') for flag in flags]
