#!/usr/bin/env bash
# Makes .venv/ with everything cct_kernels needs and installs the package into it (editable, extension built).
# Idempotent and quiet when nothing is missing; otherwise one line per step says what it is doing. On a machine
# whose python3 already has torch (a GPU machine with a CUDA build, no network) the venv sees those packages and
# installs nothing that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
PY=$VENV/bin/python

step() { echo "bootstrap: $*" >&2; }

if [ ! -x "$PY" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    step "creating $VENV (sees $PYTHON's packages: torch is there)"
    # Without a pip of its own: the venv's bundled setuptools (65 on Python 3.11) would shadow the system's and
    # cannot build an editable wheel without the `wheel` package, which a machine with no network cannot fetch.
    "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
  else
    step "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi

# Few retries: a GPU machine has no network, and what it lacks is reported by the tests rather than awaited here.
pip_install() {
  "$PY" -m pip install -q --disable-pip-version-check --retries 1 --timeout 15 "$@" 2>&1 \
    | grep -v "^WARNING: Location" || true
}

# torch: the CPU build that lies on our machines' disk (an unpinned torch would pull a 5 GB CUDA build).
if ! "$PY" -c "import torch" 2>/dev/null; then
  step "installing torch 2.13.0 (CPU build, from local disk: ~20 s)"
  pip_install torch==2.13.0
fi
missing=()
"$PY" -c "import triton" 2>/dev/null || missing+=("triton==3.6.0")
# The Triton interpreter (CPU-only machines) needs numpy < 2.4.
"$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
  || "$PY" -c "import numpy, sys; sys.exit(tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 4))" \
     2>/dev/null || missing+=("numpy<2.4")
# onnx + onnxruntime: the ONNX Runtime row of the model benchmarks (what a CPU user deploys instead of us).
for spec in pytest pytest-benchmark hypothesis ninja pybind11 tqdm matplotlib einops onnx onnxruntime; do
  module=${spec//-/_}
  "$PY" -c "import $module" 2>/dev/null || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  pip_install "${missing[@]}"
fi
# vit-pytorch: an independent official-style CCT the tests compare against (its __init__ needs torchvision,
# so it is installed without dependencies and its cct.py is loaded by path).
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('vit_pytorch') is None)"; then
  step "installing vit-pytorch (without dependencies)"
  pip_install --no-deps vit-pytorch
fi

# Real data for `cct-kernels train` and its tests: Fashion-MNIST from Debian where apt works, else scikit-learn's
# digits as the fallback dataset.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  step "installing Fashion-MNIST with apt (Debian package dataset-fashion-mnist, for training and its tests)"
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && { apt-get install -y -qq dataset-fashion-mnist \
      >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; }; then
    :
  else
    step "apt could not install it: using scikit-learn's digits instead"
    "$PY" -c "import sklearn" 2>/dev/null || pip_install scikit-learn
  fi
fi

# The package itself; the C++ extension is built against the installed torch (no build isolation). A failed
# build stops here with the compiler's error (CCT_KERNELS_REQUIRE_EXTENSION=1 makes setup.py fail instead of
# leaving the kernels to the first-use build).
if ! "$PY" -c "import cct_kernels" 2>/dev/null || [ "${CCT_KERNELS_REBUILD:-0}" = 1 ] \
   || [ -n "$(find csrc setup.py cct_kernels/extension/build.py -newer "$VENV/.cct_kernels_built" 2>/dev/null \
              | head -1)" ] \
   || [ ! -e "$VENV/.cct_kernels_built" ]; then
  jobs=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
  step "building the C++ extension cct_kernels._C ($jobs compile jobs; a few minutes on 2 cores)"
  log=$VENV/extension-build.log
  if ! CCT_KERNELS_REQUIRE_EXTENSION=1 MAX_JOBS=$jobs "$PY" -m pip install --disable-pip-version-check \
       --no-build-isolation --no-deps -e . >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -40 >&2
    echo "bootstrap: building the C++ extension failed (full log: $log)" >&2
    exit 1
  fi
  touch "$VENV/.cct_kernels_built"
fi
"$PY" -c "import cct_kernels" >/dev/null
