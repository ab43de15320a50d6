# CI's second path: the package as `pip install` gives it, NOT the lock. Run by scripts/test.sh after pytest.
#   1. a clean virtualenv with plain `pip install ".[all]"`: the demo config (10 steps, 4 peers) and the tiny ALBERT config
#      (6 steps, 2 peers) train offline, from a directory outside the clone, with the configs shipped in the package;
#   2. a clean virtualenv with `pip install .` (the core): the core imports and trains nothing optional, and the
#      ALBERT model, the hivemind backend and the demo's datamodule each fail with one message naming their extra.
# The dependencies are resolved by pip from pyproject.toml once per change of it (virtualenvs cached beside the
# project's, keyed by the digest of its dependencies); the project itself is reinstalled (not editable) on every run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${BTARD_PYTHON:-$(command -v python3.11 || command -v python3)}"
root="${BTARD_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning-btard}"
# keyed by pyproject's dependency tables (scripts/lock.py's digest) and the Python version
key="$(cd "$here/scripts" && "$py" -c 'import sys, lock; print(lock.source_digest(), sys.version)' | sha256sum | cut -c1-16)"

clean_venv() {  # clean_venv NAME SPEC: a virtualenv where pip resolved SPEC from pyproject.toml alone
  local venv="$root/pip-$1-$key"
  (
    flock 9
    if [ ! -f "$venv/.complete" ]; then
      echo "[install-check] pip install \".$2\" into a clean virtualenv $venv (once per pyproject.toml)" >&2
      rm -rf "$venv"; "$py" -m venv "$venv"
      "$venv/bin/pip" install -q --upgrade pip >&2
      "$venv/bin/pip" install -q "$here$2" >&2
      touch "$venv/.complete"
    fi
    "$venv/bin/pip" install -q --no-deps --force-reinstall "$here" >&2   # this checkout's code, as a wheel
  ) 9>"$root/.lock"
  echo "$venv"
}

work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
cd "$work"   # outside the clone: everything comes from the installed package
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline PYTHONWARNINGS=ignore

all="$(clean_venv all "[all]")"
echo "[install-check] [all]: btard fit --config configs/demo.yaml --trainer.max_steps=10 --trainer.devices=4" >&2
"$all/bin/btard" fit --config configs/demo.yaml --trainer.max_steps=10 --trainer.devices=4 --trainer.enable_progress_bar=false > demo.log 2>&1 \
  || { tail -30 demo.log; echo "install-check: the demo config failed in the [all] install" >&2; exit 1; }
grep -q "SYNTHETIC STAND-IN DATA, NOT CIFAR-10" demo.log || { tail -30 demo.log; echo "install-check: no synthetic-data banner" >&2; exit 1; }
echo "[install-check] [all]: btard fit --config configs/albert_tiny.yaml --trainer.max_steps=6 --trainer.devices=2" >&2
"$all/bin/btard" fit --config configs/albert_tiny.yaml --trainer.max_steps=6 --trainer.devices=2 --trainer.enable_progress_bar=false \
  > albert.log 2>&1 || { tail -30 albert.log; echo "install-check: the tiny ALBERT config failed in the [all] install" >&2; exit 1; }
echo "[install-check] [all]: python -m lightning_btard.demo --help" >&2
"$all/bin/python" -m lightning_btard.demo --help > /dev/null

core="$(clean_venv core "")"
echo "[install-check] core: what it imports and the messages naming the missing extras" >&2
"$core/bin/python" "$here/scripts/core_install_check.py"
echo "[install-check] passed" >&2
