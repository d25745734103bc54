"""Installs cct_kernels and, when torch and a working C++ toolchain are there at build time, builds the extension.

Two ways to get the C++ kernels (README, Install):
- `pip install --no-build-isolation .` (or `-e .`) builds the extension cct_kernels._C now, against the installed
  torch: the CPU kernels (csrc/ops.cpp + csrc/cpu/*.cpp, OpenMP), plus the CUDA kernels (csrc/cuda/*.cu) with a
  CUDA torch and nvcc. A failed CUDA compile still installs the CPU kernels (said loudly).
- `pip install .` (build isolation, the default) cannot see torch at build time, so it installs the package with
  the C++ sources inside (cct_kernels/_csrc) and the kernels are compiled once at first use
  (cct_kernels/extension/build.py), into ~/.cache/cct_kernels.
Compiler flags, sources and the CUDA architecture default are shared with the first-use build
(cct_kernels/extension/build.py, loaded here by path since the package cannot be imported before it is installed).
Environment:
  CCT_KERNELS_NO_EXTENSION=1       build nothing now (the first-use build still runs unless CCT_KERNELS_NO_BUILD=1)
  CCT_KERNELS_REQUIRE_EXTENSION=1  fail the install when the extension (CPU kernels at least) cannot be built now
  CCT_KERNELS_NO_CUDA=1            build the CPU kernels only, even with a CUDA torch
  CCT_KERNELS_CPU_ARCH=<arch>      -march for the CPU kernels (default "native" on x86-64: this machine's vector
                                   units, e.g. AVX2; set e.g. x86-64-v3 for a build that runs on other machines,
                                   or "none" for the compiler's default)
  TORCH_CUDA_ARCH_LIST             CUDA architectures; default the visible GPUs' (sm_80+), else "8.0;9.0+PTX";
                                   entries below 8.0 are dropped (the attention kernel uses cp.async)
  MAX_JOBS                         parallel compile jobs, as for any torch extension
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _load_build_module():
    spec = importlib.util.spec_from_file_location("cct_kernels_build", os.path.join(HERE, "cct_kernels", "extension",
                                                                                     "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_module()


def _log(msg):
    print(f"cct_kernels: {msg}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package as cct_kernels/_csrc, for the first-use build of a non-editable install."""

    def run(self):
        super().run()
        if not os.path.isdir(CSRC):
            return
        target = os.path.join(self.build_lib, "cct_kernels", "_csrc")
        for path in build.all_source_files(Path(CSRC)):
            dest = os.path.join(target, os.path.relpath(path, CSRC))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(path, dest)


def _extension():
    """([Extension], {build_ext}, description) for the ahead-of-time build, or ([], {}, why it is skipped)."""
    if build.env_flag("CCT_KERNELS_NO_EXTENSION"):
        return [], {}, "not built now (CCT_KERNELS_NO_EXTENSION=1)"
    if not os.path.isfile(os.path.join(CSRC, "ops.cpp")):
        return [], {}, "not built now (no csrc/ in this source tree)"
    try:
        from torch.utils import cpp_extension
    except ImportError:
        if build.env_flag("CCT_KERNELS_REQUIRE_EXTENSION"):
            raise RuntimeError("cct_kernels: CCT_KERNELS_REQUIRE_EXTENSION=1, but torch is not importable at build "
                               "time (build isolation): install with pip install --no-build-isolation") from None
        return [], {}, ("not built now: torch is not importable at build time (build isolation); the kernels are "
                        "compiled at first use instead. `pip install --no-build-isolation .` builds them now")
    cxx = os.environ.get("CXX", "c++")
    arch_flags = build.cpu_arch_flags()
    problem = build.compiler_problem(cxx, ["-fopenmp", *arch_flags])
    if problem is not None:
        if build.env_flag("CCT_KERNELS_REQUIRE_EXTENSION"):
            raise RuntimeError(f"cct_kernels: cannot build the extension: {problem}")
        return [], {}, f"not built now ({problem}); the first-use build will try again"

    root = Path(CSRC)
    rel = lambda paths: [os.path.relpath(p, HERE) for p in paths]  # noqa: E731  (setuptools wants relative paths)
    cpu_macros = [("CCT_CPU_ARCH", f'"{build.arch_name(arch_flags)}"')]
    cxx_flags = build.cxx_flags(arch_flags)
    cpu_ext = cpp_extension.CppExtension(
        "cct_kernels._C", rel(build.cpu_sources(root)), define_macros=cpu_macros, extra_compile_args=cxx_flags,
        extra_link_args=build.LINK_FLAGS,
    )
    cpu_what = f"CPU kernels (-march={build.arch_name(arch_flags)})"
    archs, cuda_note = build.cuda_plan(root)
    if archs is None:
        extensions, what = [cpu_ext], f"{cpu_what}; CUDA kernels not built: {cuda_note}"
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch's own default raises IndexError without a visible GPU
        try:
            cuda_ext = cpp_extension.CUDAExtension(
                "cct_kernels._C", rel(build.cpu_sources(root) + build.cuda_sources(root)),
                define_macros=cpu_macros + [("CCT_WITH_CUDA", "1"), ("CCT_CUDA_ARCHS", f'"{archs}"')],
                extra_compile_args={"cxx": cxx_flags, "nvcc": build.NVCC_FLAGS}, extra_link_args=build.LINK_FLAGS,
            )
            extensions, what = [cuda_ext], f"{cpu_what} + CUDA kernels ({cuda_note})"
        except OSError as e:  # CUDA libraries or headers not found
            _log(f"WARNING: the CUDA kernels cannot be built ({e}); building the CPU kernels alone")
            extensions, what = [cpu_ext], f"{cpu_what}; CUDA kernels not built: {e}"
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtWithFallback(build_ext):
        """A failed CUDA compile builds the CPU kernels alone; a failed CPU compile leaves the first-use build to
        try again (or fails the install with CCT_KERNELS_REQUIRE_EXTENSION=1)."""

        def run(self):
            inplace = self.inplace  # setuptools' run() clears it while building and restores it only on success
            try:
                super().run()
                return
            except Exception as e:  # noqa: BLE001  (compiler errors come as several exception types)
                if self.extensions[0] is cpu_ext:
                    if build.env_flag("CCT_KERNELS_REQUIRE_EXTENSION"):
                        raise
                    _log(f"WARNING: building the CPU kernels failed ({e}); installing without them (the first-use "
                         f"build will try again and report the compiler problem)")
                    return
                _log("=" * 100)
                _log(f"WARNING: the CUDA kernels failed to build ({e}).")
                _log("Building the CPU kernels alone: the 'cuda' backend will be unavailable (see the error above).")
                _log("=" * 100)
            for attr, value in vars(self.extensions[0]).items():  # what finalize_options set for this name
                if attr.startswith("_"):
                    setattr(cpu_ext, attr, value)
            self.extensions, self.inplace = [cpu_ext], inplace
            self.compiler = None  # run() made a compiler object of the compiler name: start again from the default
            self.run()

    return extensions, {"build_ext": BuildExtWithFallback}, what


ext_modules, cmdclass, _what = _extension()
cmdclass["build_py"] = BuildPyWithSources
_log(f"extension cct_kernels._C: {_what}")

setup(
    name="cct_kernels",
    version="0.1.0",
    description="Fast Compact Convolutional Transformers: Triton and C++/CUDA kernels behind drop-in modules",
    packages=find_packages(include=["cct_kernels", "cct_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "ninja"],  # ninja: the first-use build
    extras_require={
        "triton": ["triton>=3.0"],
        "bench": ["matplotlib", "pytest-benchmark", "onnx", "onnxruntime"],
        # vit-pytorch too, but with --no-deps (its dependencies pull torchvision): see scripts/bootstrap.sh
        "test": ["pytest", "pytest-benchmark", "hypothesis", "einops"],
    },
    entry_points={"console_scripts": ["cct-kernels=cct_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
