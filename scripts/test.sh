# The test suite, as CI runs it: lint (ruff), types (mypy, on the framework-free layers), then pytest.
# pytest's "no tests ran" (exit 5) is a failure here, never a pass.
set -uo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}" PYTHONHASHSEED=0
ruff check . || { echo "test.sh: ruff found problems (ruff check --fix . mends most)" >&2; exit 1; }
mypy || { echo "test.sh: mypy found type errors" >&2; exit 1; }
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
