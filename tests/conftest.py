import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
from peers import run_peers  # noqa: E402


@pytest.fixture(scope="session")
def hivemind_swarm():
    """Five hivemind nodes on loopback, shared by the tests of a session (each run gets its own session id)."""
    from hivemind_swarm import Swarm

    swarm = Swarm(5)
    yield swarm
    swarm.shutdown()


@pytest.fixture(params=["in_process", "hivemind"])
def peers(request):
    """``peers(n, fn, timeout)``: ``fn(transport)`` on ``n`` peers of one transport, results in rank order; the
    protocol tests take it to run on every transport."""
    if request.param == "in_process":
        return run_peers
    swarm = request.getfixturevalue("hivemind_swarm")
    return lambda n, fn, timeout=30.0: swarm.run(n, fn, timeout=timeout)
