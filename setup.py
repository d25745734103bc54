"""Installs cct_kernels and, when a working C++ toolchain is there, builds the extension cct_kernels._C.

What gets built (printed at build time, and at run time by cct_kernels.extension.info()):
- always the pure-Python package (the eager and triton backends need nothing else);
- the CPU kernels (csrc/ops.cpp + csrc/cpu/*.cpp, OpenMP) when torch imports at build time and the C++ compiler
  compiles a test program;
- the CUDA kernels (csrc/cuda/*.cu) in addition when torch is a CUDA build and CUDA_HOME (nvcc) is found.

Build with `pip install --no-build-isolation -e .` so the installed torch is used rather than a fresh one.
Environment:
  CCT_KERNELS_NO_EXTENSION=1       skip the extension (pure-Python install)
  CCT_KERNELS_REQUIRE_EXTENSION=1  fail the install when the extension cannot be built (default: warn, go on)
  CCT_KERNELS_NO_CUDA=1            build the CPU kernels only, even with a CUDA torch
  CCT_KERNELS_CPU_ARCH=<arch>      -march for the CPU kernels (default "native" on x86-64: this machine's vector
                                   units, e.g. AVX2; set e.g. x86-64-v3 for a build that runs on other machines,
                                   or "none" for the compiler's default)
  TORCH_CUDA_ARCH_LIST, MAX_JOBS   as for any torch extension (e.g. TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=1)
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"cct_kernels: {msg}", file=sys.stderr)


def _env_flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _compiler_works(cxx, flags):
    """True when `cxx` compiles and links an OpenMP C++ program with `flags` (a missing or broken compiler: False)."""
    if shutil.which(cxx) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        cmd = [cxx, *flags, src, "-o", os.path.join(tmp, "t")]
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def _cpu_arch_flags():
    arch = os.environ.get("CCT_KERNELS_CPU_ARCH")
    if arch is None:
        arch = "native" if platform.machine() in ("x86_64", "AMD64") else "none"
    return [] if arch in ("", "none") else [f"-march={arch}"]


def _extension():
    """([Extension], cmdclass, description) for the C++/CUDA extension, or ([], {}, reason) when it is skipped."""
    if _env_flag("CCT_KERNELS_NO_EXTENSION"):
        return [], {}, "skipped (CCT_KERNELS_NO_EXTENSION=1)"
    if not glob.glob(os.path.join(HERE, "csrc", "*.cpp")):
        return [], {}, "skipped (no csrc/*.cpp in this source tree)"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}, "skipped (torch is not importable at build time; use pip install --no-build-isolation)"
    cxx = os.environ.get("CXX", "c++")
    arch_flags = _cpu_arch_flags()
    if not _compiler_works(cxx, ["-fopenmp", *arch_flags]):
        return [], {}, f"skipped (the C++ compiler {cxx!r} is missing or cannot build an OpenMP program)"

    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu")
    with_cuda = (
        not _env_flag("CCT_KERNELS_NO_CUDA") and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None and bool(cuda_sources)
    )
    arch_name = arch_flags[0][len("-march="):] if arch_flags else "default"
    macros = [("CCT_CPU_ARCH", f'"{arch_name}"')]
    # -fno-trapping-math/-fno-math-errno (as torch's own build): without them GCC keeps float compares and floor as
    # branches/calls, and the softmax/exp loops of csrc/cpu stay scalar.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", *arch_flags]
    if with_cuda:
        macros.append(("CCT_WITH_CUDA", "1"))
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "default")
        macros.append(("CCT_CUDA_ARCHS", f'"{arch_list}"'))
        ext = cpp_extension.CUDAExtension(
            "cct_kernels._C", sources + cuda_sources, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
        what = f"CPU kernels (-march={arch_name}) + CUDA kernels (TORCH_CUDA_ARCH_LIST={arch_list})"
    else:
        why = ("CCT_KERNELS_NO_CUDA=1" if _env_flag("CCT_KERNELS_NO_CUDA")
               else "torch is a CPU build" if torch.version.cuda is None else "no CUDA_HOME/nvcc")
        ext = cpp_extension.CppExtension(
            "cct_kernels._C", sources, define_macros=macros, extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"],
        )
        what = f"CPU kernels only (-march={arch_name}); CUDA kernels not built: {why}"
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExt(build_ext):
        """A failed compile leaves a working pure-Python install unless CCT_KERNELS_REQUIRE_EXTENSION=1."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001  (compiler errors come as several exception types)
                if _env_flag("CCT_KERNELS_REQUIRE_EXTENSION"):
                    raise
                _log(f"WARNING: building the extension failed ({e}); installing the pure-Python package only")

    return [ext], {"build_ext": OptionalBuildExt}, what


ext_modules, cmdclass, _what = _extension()
_log(f"extension cct_kernels._C: {_what}")

setup(
    name="cct_kernels",
    version="0.1.0",
    description="Fast Compact Convolutional Transformers: Triton and C++/CUDA kernels behind drop-in modules",
    packages=find_packages(include=["cct_kernels", "cct_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "bench": ["matplotlib", "pytest-benchmark"],
        # vit-pytorch too, but with --no-deps (its dependencies pull torchvision): see scripts/bootstrap.sh
        "test": ["pytest", "pytest-benchmark", "hypothesis", "einops"],
    },
    entry_points={"console_scripts": ["cct-kernels=cct_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
