# Benchmarks: each prints ratios measured side by side in one run. Run on a quiet machine.
set -euo pipefail
export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
name="${1:-all}"; shift || true
if [ "$name" = all ]; then
  for b in centered_clip butterfly_round verified_round strategy_step strategy_step_gpu ddp_overlap sim_peers hivemind_round; do echo; python "benchmarks/$b.py" "$@"; done
else
  python "benchmarks/$name.py" "$@"
fi
