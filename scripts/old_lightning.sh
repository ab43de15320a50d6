# CI's third path: the fast Lightning-facing tests against the oldest Lightning release we claim.
# pytorch-lightning and lightning of that release are installed once (no dependencies: the rest is the project's
# virtualenv) into a directory that goes first on PYTHONPATH. Run by scripts/test.sh, inside the project's venv.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
release="${BTARD_OLDEST_LIGHTNING:-2.5.6}"
dir="$(dirname "$VIRTUAL_ENV")/lightning-$release-$(basename "$VIRTUAL_ENV")"
(
  flock 9
  if [ ! -f "$dir/.complete" ]; then
    echo "[old-lightning] installing pytorch-lightning and lightning $release into $dir (once)" >&2
    rm -rf "$dir"
    pip install -q --no-deps --target "$dir" "pytorch-lightning==$release" "lightning==$release" >&2
    touch "$dir/.complete"
  fi
) 9>"$(dirname "$VIRTUAL_ENV")/.lock"
export PYTHONPATH="$dir:$here${PYTHONPATH:+:$PYTHONPATH}"
python - "$release" <<'PY'
import sys
import lightning, pytorch_lightning
assert pytorch_lightning.__version__ == lightning.__version__ == sys.argv[1], (pytorch_lightning.__version__, lightning.__version__)
print(f"[old-lightning] pytorch_lightning {pytorch_lightning.__version__} and lightning {lightning.__version__} from {pytorch_lightning.__file__}")
PY
cd "$here"
# the strategy's life cycle under both Lightning packages (fit with each launcher, checkpoints and resume, precision,
# manual optimization, sync_dist, lightning.pytorch), the CLI and the bundled modules: not the protocol (Lightning-free)
# (the protocol-attack cases once each launcher, not three times: the rest is the protocol, Lightning-free; the
# equality with DDP once, with Lightning's default zero_grad: kept gradients are the strategy's own path)
python -m pytest -q -n "${BTARD_TEST_WORKERS:-2}" --dist worksteal -m "not slow" -p no:cacheprovider tests/lightning/test_strategy.py tests/lightning/test_cli.py \
  tests/lightning/test_sim_strategy.py tests/models/test_models.py tests/datamodules/test_cifar10_datamodule.py \
  -k "not (leaves_cleanly and (EquivocatingAggregate or WrongAggregate)) and not match_processes and not run_resumes_from and not options1" "$@"
