"""Installs cct_kernels and, when a C++ compiler is there, builds the extension cct_kernels._C.

The CPU kernels (csrc/cpu) are built whenever torch's C++ extension toolchain works; the CUDA kernels (csrc/cuda)
are added when nvcc is found and torch is a CUDA build. Without a compiler the pure-Python package still installs
(the eager and triton backends work). Build with `pip install --no-build-isolation -e .` so the installed torch is
used rather than a fresh one. CCT_KERNELS_NO_EXTENSION=1 skips the extension.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def _extension():
    if os.environ.get("CCT_KERNELS_NO_EXTENSION") == "1" or not glob.glob("csrc/*.cpp"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("cct_kernels: torch is not installed at build time; skipping the C++ extension")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("cct_kernels: no C++ compiler; skipping the C++ extension")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp", "-march=x86-64-v2" if os.uname().machine == "x86_64" else "-O3"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = cpp_extension.CUDAExtension(
            "cct_kernels._C", sources, define_macros=[("CCT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "cct_kernels._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
        )
    print(f"cct_kernels: building the extension ({'CPU + CUDA' if with_cuda else 'CPU only'})")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

setup(
    name="cct_kernels",
    version="0.1.0",
    description="Fast Compact Convolutional Transformers: Triton and C++/CUDA kernels behind drop-in modules",
    packages=find_packages(include=["cct_kernels", "cct_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "pytest-benchmark", "hypothesis"]},
    entry_points={"console_scripts": ["cct-kernels=cct_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
