#!/usr/bin/env bash
# One-time, re-runnable set-up: virtual environment, pinned packages, the `calib` package,
# the Jupyter kernel the pipeline runs on, the offline Fashion-MNIST files, headless Chromium,
# Slurm + munge (for the scale-out test) and tcmalloc (the stages' allocator).
# A second run reuses what is there (each step is skipped when its stamp is current).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: no python3 found; install Python 3.11 first" >&2; exit 1; }

# 1. Virtual environment (conda users: `conda env create -f environment.yml` instead, then
#    `VENV=$CONDA_PREFIX make ...`).
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

# 2. Pinned packages (re-installed only when requirements.txt changes).
stamp="$VENV/.calib-requirements.sha256"
want=$(sha256sum requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing pinned packages (first run downloads about 5 GB: torch wheels)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  # robustbench pins an older timm than ours: installed without its dependencies (they are in
  # requirements.txt, less timm); see requirements-nodeps.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -r requirements-nodeps.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi

# 3. The Jupyter kernel papermill runs every stage on (inside the environment: --sys-prefix).
if ! "$VENV/bin/jupyter" kernelspec list 2>/dev/null | grep -q "^ *calib "; then
  echo "setup: registering the Jupyter kernel 'calib'"
  "$VENV/bin/python" -m ipykernel install --sys-prefix --name calib --display-name "Python (calib)" >/dev/null
fi

# 4. Fashion-MNIST offline: Debian's dataset package where apt is usable as root; otherwise the
#    data stage downloads the files through torchvision (and says what to do if it cannot).
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing the Debian package dataset-fashion-mnist"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
      apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
      echo "setup: apt could not install dataset-fashion-mnist; the data stage will try a download"
  else
    echo "setup: $FMNIST not found and apt is not usable as root here;"
    echo "       the data stage will download Fashion-MNIST through torchvision (needs internet)."
    echo "       Offline? Run 'sudo apt-get install dataset-fashion-mnist', or put the four"
    echo "       Fashion-MNIST .gz files in data/raw/fashion_mnist/."
  fi
fi
# 5. Headless Chromium for the HTML report's browser tests: Debian's package, which Playwright
#    drives through executable_path (`playwright install` and its browser download are not used).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing the Debian package chromium (the report's browser tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 || {
      apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } || \
      echo "setup: apt could not install chromium; the browser tests will skip (fail on CI)"
  else
    echo "setup: chromium not found and apt is not usable as root here;"
    echo "       the report's browser tests will skip (and fail where CI is set)."
    echo "       Run 'sudo apt-get install chromium', or set CHROMIUM=/path/to/chromium."
  fi
fi
# 6. Slurm and munge for the scale-out test (tests/test_launch.py starts a one-node cluster of
#    its own; nothing is started or configured here): Debian's slurm-wlm and munge packages.
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing the Debian packages slurm-wlm and munge (the Slurm launch test)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || {
      apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; } || \
      echo "setup: apt could not install slurm-wlm munge; the Slurm test will skip (fail on CI)"
  else
    echo "setup: slurm-wlm/munge not found and apt is not usable as root here;"
    echo "       the Slurm launch test will skip (and fail where CI is set)."
  fi
fi
# 7. tcmalloc, the memory allocator every stage's kernel runs with where it is installed (the
#    same numbers, faster CPU stages; calib/allocator.py): Debian's libtcmalloc-minimal4.
if ! "$VENV/bin/python" -c 'import sys; from calib.allocator import find_tcmalloc; sys.exit(find_tcmalloc() is None)'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing the Debian package libtcmalloc-minimal4 (the stages' allocator)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || {
      apt-get update -q >/dev/null && apt-get install -y -q libtcmalloc-minimal4 >/dev/null; } || \
      echo "setup: apt could not install libtcmalloc-minimal4; stages use the system allocator"
  else
    echo "setup: tcmalloc not found and apt is not usable as root here; the stages will use the"
    echo "       system allocator (slower). Run 'sudo apt-get install libtcmalloc-minimal4'."
  fi
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import torch, torchvision, timm; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")'))"
