"""A local hivemind swarm on loopback for transport tests: n nodes in this process, and a runner like ``run_peers``."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from peers import run_in_threads

from lightning_btard.groups.hivemind_state import serve_states
from lightning_btard.transports.base import Transport
from lightning_btard.transports.hivemind import HivemindTransport
from lightning_btard.transports.hivemind_node import HivemindNode


class Swarm:
    """``n`` :class:`HivemindNode` on 127.0.0.1 (each a DHT process and a p2pd), the later ones bootstrapped
    from the first."""

    def __init__(self, n: int) -> None:
        self.nodes: list[HivemindNode] = []
        try:
            self.nodes.append(HivemindNode(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
            first = self.nodes[0].visible_maddrs
            for _ in range(n - 1):
                self.nodes.append(HivemindNode(initial_peers=first, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
            self.states = [serve_states(node) for node in self.nodes]
            """What each node offers joining peers (``groups/hivemind_state.py``)."""
        except BaseException:
            self.shutdown()
            raise

    def run(self, n: int, fn: Callable[[Transport], Any], timeout: float = 30.0, nodes: Optional[list[int]] = None) -> list[Any]:
        """``fn(transport)`` on ``n`` of the nodes (the first ``n`` unless ``nodes`` picks them) in threads, a fresh
        session each call; results in rank order, the first non-transport error re-raised."""
        chosen = [self.nodes[i] for i in (nodes if nodes is not None else range(n))]
        members, session = [node.peer_id for node in chosen], os.urandom(16)
        transports = [HivemindTransport(node, members, session, timeout=timeout) for node in chosen]
        try:
            return run_in_threads(transports, fn, timeout)
        finally:
            for t in transports:
                t.close()

    @staticmethod
    def run_transports(transports: list[Transport], fn: Callable[[Transport], Any], timeout: float = 30.0) -> list[Any]:
        """``fn(transport)`` on transports the caller made (and closes), in threads."""
        return run_in_threads(transports, fn, timeout)

    def shutdown(self) -> None:
        for node in self.nodes:
            node.shutdown()
        self.nodes = []
