"""Installing: the wheel ships the C++ sources, the first-use build compiles and caches the kernels, a missing
compiler is a clear error, and the CUDA architecture default never breaks the build (setup.py, extension/build.py).

The ahead-of-time build (`pip install --no-build-isolation`) is what CI's own environment uses (.ci/run requires
it); the first-use build is compiled here once, into a temporary cache (~1-2 minutes on 2 cores).
"""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from cct_kernels.extension import build

ROOT = Path(__file__).resolve().parent.parent

# An editable install maps cct_kernels._C to the checkout's compiled file whatever sys.path says: hide it, so the
# copy below is what `pip install .` (build isolation) installs.
HIDE_INSTALLED_EXTENSION = textwrap.dedent("""
    import importlib.abc, sys
    class HideInstalledExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "cct_kernels._C":
                raise ImportError("no compiled cct_kernels._C in this installation")
    sys.meta_path.insert(0, HideInstalledExtension())
""")

USE_KERNELS = textwrap.dedent("""
    import torch, cct_kernels
    from cct_kernels import extension
    assert extension.info()["cpu"], extension.describe()
    torch.manual_seed(0)
    kernel = cct_kernels.create_model("cct_2_3x2_32", backend="cpu").eval()
    eager = cct_kernels.create_model("cct_2_3x2_32", backend="eager").eval()
    eager.load_state_dict(kernel.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        error = (kernel(x) - eager(x)).abs().max().item()
    assert error < 1e-4, error
    print("DESCRIBE", extension.describe())
""")


@pytest.fixture(scope="module")
def uncompiled_copy(tmp_path_factory):
    """The package and its sources as `pip install .` leaves them (no compiled cct_kernels._C), frozen for the
    test: a copy of cct_kernels/ without .so files, beside csrc/."""
    copy = tmp_path_factory.mktemp("uncompiled")
    for folder in ("cct_kernels", "csrc"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return copy


def clean_env(**extra):
    """This environment without our CCT_KERNELS_* settings, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CCT_KERNELS")}, "MAX_JOBS": "2", **extra}


def run_in(copy, code, **env):
    return subprocess.run([sys.executable, "-c", HIDE_INSTALLED_EXTENSION + code], cwd=copy,
                          env=clean_env(PYTHONPATH=str(copy), **env),
                          capture_output=True, text=True, timeout=900)


def test_first_use_build_compiles_once_then_loads_from_the_cache(uncompiled_copy, tmp_path):
    cache = str(tmp_path / "cache")
    first = run_in(uncompiled_copy, USE_KERNELS, CCT_KERNELS_CACHE_DIR=cache)
    assert first.returncode == 0, first.stdout + first.stderr
    building = [line for line in first.stderr.splitlines() if "building the C++ extension" in line]
    assert len(building) == 1, first.stderr  # one line says what happens while it compiles
    assert "DESCRIBE built: cpu kernels yes" in first.stdout
    (built,) = (tmp_path / "cache").iterdir()
    assert (built / "complete").is_file() and (built / f"{build.LIBRARY_NAME}.so").is_file()

    second = run_in(uncompiled_copy, USE_KERNELS, CCT_KERNELS_CACHE_DIR=cache)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "building" not in second.stderr, second.stderr  # cached: no second compile
    assert list((tmp_path / "cache").iterdir()) == [built]


def test_a_missing_compiler_is_a_clear_error_and_the_package_still_imports(uncompiled_copy, tmp_path):
    code = "from cct_kernels import extension, ops; print(extension.describe())"
    result = run_in(uncompiled_copy, code, CCT_KERNELS_CACHE_DIR=str(tmp_path / "cache"), CXX="/nonexistent/c++")
    assert result.returncode == 0, result.stderr
    assert "first-use build failed" in result.stdout
    assert "the C++ compiler '/nonexistent/c++' was not found" in result.stdout
    assert not (tmp_path / "cache").exists()


def test_no_build_env_turns_the_first_use_build_off(uncompiled_copy, tmp_path):
    result = run_in(uncompiled_copy, "from cct_kernels import extension; print(extension.describe())",
                    CCT_KERNELS_CACHE_DIR=str(tmp_path / "cache"), CCT_KERNELS_NO_BUILD="1")
    assert result.returncode == 0, result.stderr
    assert "CCT_KERNELS_NO_BUILD=1" in result.stdout and not (tmp_path / "cache").exists()


def test_the_wheel_ships_the_sources_for_the_first_use_build(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("cct_kernels", "csrc"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = clean_env(CCT_KERNELS_NO_EXTENSION="1")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                             str(source), "-w", str(tmp_path / "wheel")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"cct_kernels/_csrc/{p.relative_to(ROOT / 'csrc')}" for p in build.all_source_files(ROOT / "csrc")}
    assert expected and expected <= names, sorted(expected - names)
    assert "cct_kernels/extension/build.py" in names


@pytest.mark.parametrize("requested, visible, expected", [
    (None, [], build.DEFAULT_CUDA_ARCHS),  # no GPU: torch's own detection would raise IndexError
    ("", [], build.DEFAULT_CUDA_ARCHS),
    (None, [(9, 0)], "9.0"),
    (None, [(9, 0), (8, 0), (9, 0)], "8.0;9.0"),
    ("9.0", [], "9.0"),
    ("8.0 9.0a", [], "8.0;9.0a"),
    ("7.5;8.6;9.0+PTX", [], "8.6;9.0+PTX"),  # sm_75 cannot compile cp.async: dropped
    ("Turing;Hopper", [], "Hopper"),
    ("7.0;7.5", [], None),  # nothing left: CUDA kernels skipped, CPU kernels still built
    (None, [(7, 5)], None),  # a visible pre-Ampere GPU could not run them
])
def test_cuda_arch_list(requested, visible, expected):
    archs, note = build.cuda_arch_list(requested, visible)
    assert archs == expected, note
    if expected is None:
        assert "skipped" in note and ("8.0" in note or "sm_80" in note)
    if requested and expected and expected.count(";") < requested.replace(" ", ";").count(";"):
        assert "dropped" in note


def test_cpu_arch_flags(monkeypatch):
    monkeypatch.delenv("CCT_KERNELS_CPU_ARCH", raising=False)
    wide = "-mprefer-vector-width=512"  # x86-64 only: GCC on aarch64 rejects it
    assert build.cpu_arch_flags(machine="x86_64") == ["-march=native", wide]
    assert build.cpu_arch_flags(machine="aarch64") == []
    assert build.cpu_arch_flags("none") == [] and build.cpu_arch_flags("") == []
    assert build.cpu_arch_flags("x86-64-v3", machine="x86_64") == ["-march=x86-64-v3", wide]
    assert build.cpu_arch_flags("armv8.2-a", machine="aarch64") == ["-march=armv8.2-a"]
    assert build.arch_name(build.cpu_arch_flags("x86-64-v3", machine="x86_64")) == "x86-64-v3"


def test_source_root_finds_the_sources_of_a_checkout():
    root = build.source_root()
    assert root is not None and (root / "ops.cpp").is_file()
    assert {p.name for p in build.cpu_sources(root)} >= {"ops.cpp", "attention.cpp", "seqpool.cpp", "tokenize.cpp"}
    assert all(p.suffix == ".cu" for p in build.cuda_sources(root))


def test_bootstrap_stops_with_the_error_of_a_failed_extension_build(tmp_path):
    # A copy of the repository's layout whose setup.py fails as a broken compile would, run against the ready
    # venv: bootstrap must exit non-zero, show the error and not mark the extension built.
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", tmp_path / "scripts" / "bootstrap.sh")
    (tmp_path / "csrc").mkdir()
    (tmp_path / "setup.py").write_text("raise SystemExit('error: planted compiler failure')\n")
    venv, ready_venv = tmp_path / ".venv", Path(sys.prefix)
    venv.mkdir()
    for entry in ready_venv.iterdir():  # the ready venv's interpreter and packages; the marker file stays here
        if not entry.name.startswith("."):
            (venv / entry.name).symlink_to(entry)
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "bootstrap.sh")], env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "planted compiler failure" in result.stderr
    assert "bootstrap: building the C++ extension" in result.stderr
    assert not (venv / ".cct_kernels_built").exists()
