"""A local hivemind swarm on loopback for transport tests: n nodes in this process, and a runner like ``run_peers``."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional

from lightning_btard.transports.base import Transport, TransportError
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
        except BaseException:
            self.shutdown()
            raise

    def run(self, n: int, fn: Callable[[Transport], Any], timeout: float = 30.0, nodes: Optional[list[int]] = None) -> list[Any]:
        """``fn(transport)`` on ``n`` of the nodes (the first ``n`` unless ``nodes`` picks them) in threads, a fresh
        session each call; results in rank order, the first non-transport error re-raised."""
        chosen = [self.nodes[i] for i in (nodes if nodes is not None else range(n))]
        members = [node.peer_id for node in chosen]
        session = os.urandom(16)
        results: list[Any] = [None] * n
        errors: list[Optional[BaseException]] = [None] * n

        def target(rank: int) -> None:
            transport = HivemindTransport(chosen[rank], members, session, timeout=timeout)
            try:
                results[rank] = fn(transport)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors[rank] = e
            finally:
                transport.close()

        threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout * 4)
        for rank, e in enumerate(errors):
            if e is not None and not isinstance(e, TransportError):
                raise RuntimeError(f"hivemind peer {rank} failed: {e!r}") from e
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed:  # every peer's view: the first one's may only be the consequence of another's failure
            raise TransportError("\n".join(f"peer {rank}: {e}" for rank, e in failed)) from failed[0][1]
        if any(t.is_alive() for t in threads):
            raise TransportError("hivemind peers did not finish")
        return results

    def shutdown(self) -> None:
        for node in self.nodes:
            node.shutdown()
        self.nodes = []
