"""A longer soak of the adaptive-attacker harness (tests/adversary_harness.py): random cases where 1 or 2 colluders
of 5 mutate any board record of the verified round; prints how many cases ran, how many banned a colluder, and any
case that broke an invariant (none should: no honest peer banned or raising, honest peers agreeing).

    ./run bench adversary [--cases 2000] [--hivemind]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=2000)
    p.add_argument("--hivemind", action="store_true", help="run on a loopback hivemind swarm (slower) instead of in-process")
    args = p.parse_args()
    from adversary_harness import check_case
    from peers import run_peers

    runner, swarm = run_peers, None
    if args.hivemind:
        from hivemind_swarm import Swarm

        swarm = Swarm(5)
        runner = lambda n, fn, timeout=30.0: swarm.run(n, fn, timeout=timeout)  # noqa: E731
    tried, banned = [0], [0]

    @settings(max_examples=args.cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def soak(data: st.DataObject) -> None:
        _, bans = check_case(data, runner)
        tried[0] += 1
        banned[0] += bool(bans)

    started = time.perf_counter()
    try:
        soak()
        verdict = "no invariant broken"
    except Exception as e:  # noqa: BLE001 - reported: hypothesis prints the minimal failing case above
        verdict = f"INVARIANT BROKEN: {e!r}"
    finally:
        if swarm is not None:
            swarm.shutdown()
    print(f"adversary soak ({'hivemind' if args.hivemind else 'in-process'}): {tried[0]} cases in "
          f"{time.perf_counter() - started:.0f}s; a colluder was banned in {banned[0]}; {verdict}")
    sys.exit(0 if verdict == "no invariant broken" else 1)


if __name__ == "__main__":
    main()
