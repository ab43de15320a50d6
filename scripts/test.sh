# The test suite, as CI runs it:
#   1. lint (ruff), types (mypy, on the framework-free layers), the locks against pyproject.toml (scripts/lock.py);
#   2. pytest, in the project's virtualenv (the lock), with both Lightning packages installed: on
#      $BTARD_TEST_WORKERS (default 2) pytest-xdist workers (work stealing: a long test late in the order does not
#      leave one worker idle), then the `serial` tests alone (swarm runs and regroups whose
#      peers judge each other by short deadlines: a neighbouring test's load must not make an honest peer late);
#   3. the Lightning-facing fast tests against the oldest Lightning release claimed (scripts/old_lightning.sh);
#   4. the package as plain `pip install ".[all]"` and `pip install .` give it (scripts/install_check.sh).
# Arguments go to pytest (step 2, one process, no markers chosen) and skip steps 3 and 4: `./run test tests/ops -k clip`.
# pytest's "no tests ran" (exit 5) is a failure here, never a pass.
set -uo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}" PYTHONHASHSEED=0
ruff check . || { echo "test.sh: ruff found problems (ruff check --fix . mends most)" >&2; exit 1; }
mypy || { echo "test.sh: mypy found type errors" >&2; exit 1; }
python scripts/lock.py --check || { echo "test.sh: the locks disagree with pyproject.toml" >&2; exit 1; }

pytest_step() {  # pytest_step NAME COMMAND...: exit 5 (no tests ran) fails
  "${@:2}"; local rc=$?
  if [ "$rc" -eq 5 ]; then echo "test.sh: $1 collected no tests: failing" >&2; return 1; fi
  return "$rc"
}
if [ "$#" -gt 0 ]; then pytest_step pytest python -m pytest "$@"; exit $?; fi
workers="${BTARD_TEST_WORKERS:-2}"
pytest_step "pytest on $workers workers" python -m pytest -n "$workers" --dist worksteal -m "not serial" || exit $?
pytest_step "the serial tests" python -m pytest -m serial || exit $?
pytest_step "the oldest-Lightning tests" bash scripts/old_lightning.sh || { echo "test.sh: failed against the oldest Lightning claimed" >&2; exit 1; }
bash scripts/install_check.sh || { echo "test.sh: the pip-installed package failed" >&2; exit 1; }
