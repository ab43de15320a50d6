"""A hivemind peer inside a Lightning run: meeting the others, joining a running group, admitting joiners.

``BTARDStrategy(backend="hivemind")`` holds one :class:`HivemindPeer`. The protocols themselves are in
``groups/hivemind_rendezvous.py`` (forming the group), ``groups/hivemind_admission.py`` (join requests
and admission records) and ``groups/hivemind_state.py`` (serving the training state); this module connects
them to Lightning's checkpoints and to the strategy's group.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from lightning_btard import compat
from lightning_btard.errors import UserError
from lightning_btard.groups.hivemind import HivemindGroup
from lightning_btard.groups.hivemind_policy import AdmissionPolicy
from lightning_btard.protocol.membership import Ban, Membership

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from lightning_btard.strategy import BTARDStrategy

__all__ = ["HivemindPeer", "between_batches", "initial_peers_from_env", "state_size_cap", "trusted_peer_id"]

log = logging.getLogger(__name__)


def initial_peers_from_env() -> list[str]:
    """The multiaddresses in the ``INITIAL_PEERS`` environment variable (separated by commas or spaces)."""
    return [m for m in os.environ.get("INITIAL_PEERS", "").replace(",", " ").split() if m]


def trusted_peer_id(peer: str) -> str:
    """A base58 peer id from a peer id or a multiaddress ending in ``/p2p/<peer id>``; :class:`UserError` otherwise."""
    from lightning_btard.groups.hivemind_policy import peer_id_text

    return peer_id_text(str(peer), "trusted_peers")


def state_size_cap(module: Any) -> int:
    """The largest training state a joiner downloads: 6 times its own model's parameters and buffers (the parameters,
    an optimizer's state of up to 4 tensors per parameter, some slack) plus 64 MiB of loops, schedulers and callbacks.
    A member offering more is skipped for the next (it could otherwise make the joiner allocate up to 16 GiB)."""
    model_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values()) if module is not None else 0
    return 6 * model_bytes + 2**26


def between_batches(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint dumped at ``on_train_batch_start`` as Lightning would have saved it after the previous batch: the
    batch already fetched is not counted. (On restart Lightning rolls back only the epoch's counters, not the totals,
    and ``val_check_interval`` counts the totals: a joiner would otherwise validate one batch before the members, in
    a collective they are not in.)"""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    for counters in (progress.get("total"), progress.get("current")):
        if isinstance(counters, dict) and "completed" in counters:
            for key in ("ready", "started", "processed"):
                if key in counters:
                    counters[key] = counters["completed"]
    return checkpoint


class HivemindPeer:
    """This process's hivemind node and its place in the run ``run_id``."""

    def __init__(self, initial_peers: list[str], num_peers: int, run_id: str, host_maddrs: list[str],
                 announce_maddrs: Optional[list[str]], identity_path: Optional[str], rendezvous_timeout: float,
                 join_every: int, trusted_peers: Sequence[str] = (), policy: Optional[AdmissionPolicy] = None,
                 p2p_options: Optional[dict[str, Any]] = None, shuffle_ranks: bool = True) -> None:
        self.shuffle_ranks = bool(shuffle_ranks)
        """Order the group by a draw at the start (``HivemindGroup.reorder``) instead of by peer id."""
        self.p2p_options = dict(p2p_options or {})
        """``use_relay``, ``use_auto_relay``, ``client_mode``: passed to hivemind's DHT and P2P."""
        self.initial_peers, self.num_peers, self.run_id = initial_peers, num_peers, run_id
        self.trusted_peers = [trusted_peer_id(p) for p in trusted_peers]
        """Base58 peer ids whose signature anchors what this peer believes when it joins (``hivemind_chain.py``)."""
        self.policy = policy if policy is not None else AdmissionPolicy()
        """Who may join, and how fast (``groups/hivemind_policy.py``)."""
        self.host_maddrs, self.announce_maddrs, self.identity_path = host_maddrs, announce_maddrs, identity_path
        self.rendezvous_timeout, self.join_every = rendezvous_timeout, join_every
        self.node: Any = None
        self.states: Any = None
        """The training state this peer offers to joining peers (``groups/hivemind_state.py``)."""
        self.joining = False
        """This peer started after the run did: it is admitted instead of meeting the others."""
        self.catching_up = False
        """Admitted, restoring the group's state: no collectives until its first batch."""
        self.joined_state: Optional[dict[str, Any]] = None
        self._joins_checked_at = -1
        self._admitted_nonces: list[bytes] = []
        self._running_announced = 0.0
        self.genesis = b""
        """The digest of the run's first group (``hivemind_chain.py``), named in this peer's running marks."""

    # ----------------------------------------------------------------- meeting the others
    def limit_messages(self, numel: int) -> None:
        """Refuse tensor messages larger than two float32 copies of a ``numel``-parameter model (and 1 MiB): no
        collective sends more (a part and an own part, a broadcast parameter), and any member could otherwise make this
        peer buffer up to 2 GiB per message."""
        if self.node is not None:
            self.node.mailbox.max_message_bytes = 8 * int(numel) + 2**20

    def start(self, cluster_environment: Any, timeout: float) -> Optional[HivemindGroup]:
        """Start the node, print its addresses, wait for the group; take the rank it gives us (``None``: this peer
        joins a running run, in :meth:`join`)."""
        from lightning_btard.groups.hivemind_admission import run_is_running
        from lightning_btard.groups.hivemind_rendezvous import rendezvous
        from lightning_btard.groups.hivemind_state import serve_states
        from lightning_btard.transports.hivemind_node import HivemindNode

        self.node = HivemindNode(initial_peers=self.initial_peers, host_maddrs=self.host_maddrs,
                                 announce_maddrs=self.announce_maddrs, identity_path=self.identity_path, **self.p2p_options)
        self.states = serve_states(self.node)
        join = f"  --trainer.strategy.initial_peers=[{','.join(self.node.visible_maddrs)}]"
        if run_is_running(self.node, self.run_id, self.policy.allowed):
            self.joining = True
            # a rank no member has, until the admission gives this peer its own; every hivemind peer is its own
            # rank zero for Lightning's output (progress bar, logs, checkpoints): it is its own run on its own machine
            cluster_environment.set_world_size(self.num_peers + 1)
            cluster_environment.set_global_rank(self.num_peers)
            compat.set_rank_zero(0)
            print(f"BTARD hivemind peer {self.node.peer_id}: run {self.run_id!r} is running; this peer joins it "
                  f"once set up. Other peers join with:\n{join}", flush=True)
            return None
        print(f"BTARD hivemind peer {self.node.peer_id} (run {self.run_id!r}, waiting for {self.num_peers} peers). "
              f"Other peers join with:\n{join}", flush=True)
        transport = rendezvous(self.node, self.run_id, self.num_peers, self.rendezvous_timeout, allowed=self.policy.allowed)
        transport.timeout = timeout
        self.genesis = transport.chain.links[0].digest
        self.mark_running(0)  # peers that start from now on ask to join instead
        cluster_environment.set_world_size(transport.world_size)
        cluster_environment.set_global_rank(transport.rank)
        compat.set_rank_zero(0)  # every peer logs, shows progress and checkpoints on its own (``is_global_zero``)
        print(f"BTARD hivemind: {transport.world_size} peers joined; this peer is rank {transport.rank}", flush=True)
        membership = Membership(peers=list(range(transport.world_size)))
        return HivemindGroup(self.node, self.run_id, transport.members, membership, transport.rank, timeout, transport,
                             salt=transport.salt, chain=transport.chain)

    def mark_running(self, step: int) -> None:
        """Mark the run as running in the DHT (peers starting later ask to join); refreshed now and then."""
        from lightning_btard.groups.hivemind_admission import announce_running

        announce_running(self.node, self.run_id, step, self.genesis)
        self._running_announced = time.monotonic()

    # ----------------------------------------------------------------- joining a running group
    def join(self, strategy: "BTARDStrategy", trainer: "pl.Trainer", identity_public: bytes,
             timeout: float) -> tuple[HivemindGroup, list[bytes], int, bytes]:
        """Ask the running group to admit this peer; take the group, keys and seed from the admission a majority of
        members wrote, and their training state from one of them, checked against the digest they published.
        Returns the group, the keys, the run seed and the run nonce."""
        from hivemind.p2p import PeerID

        from lightning_btard.groups.hivemind_admission import Refused, ask_to_join, download_agreed_state, wait_for_admission

        if trainer.state.fn != "fit":
            raise UserError(f"run {self.run_id!r} is running: a peer can only join it to train (`btard fit`)")
        node, run_id = self.node, self.run_id
        nonce = ask_to_join(node, run_id, identity_public, wait=self.rendezvous_timeout)
        print(f"BTARD hivemind: asked run {run_id!r} to admit this peer (its members admit joiners every "
              f"join_every={self.join_every} steps of theirs)", flush=True)
        try:
            record, chain = wait_for_admission(node, run_id, nonce, self.rendezvous_timeout, trusted=self.trusted_peers,
                                               allowed=self.policy.allowed)
        except Refused as refusal:
            strategy.events.emit("refusal", 0, (), refusal.reason)
            raise
        members = [PeerID.from_base58(p) for p in record["peers"]]
        membership = Membership(peers=list(range(len(members))), generation=int(record["generation"]))
        membership.bans = [Ban(int(p), int(t), str(reason), str(evidence)) for p, t, reason, evidence in record["bans"]]
        membership.departed = {int(p): int(t) for p, t in record["departed"]}
        self._admitted_nonces = list(record["admitted"])
        self.policy.joins = [int(s) for s in record.get("joins", [])]
        me, step = int(record["id"]), int(record["step"])
        salt = record.get("salt")
        if type(salt) is not bytes:
            raise UserError(f"run {run_id!r}'s admission record has no run salt: its members run another version")
        group = HivemindGroup(node, run_id, members, membership, me, timeout, salt=salt, chain=chain)  # as members derive it
        chain.extend(group.transport.members, group.transport.session)  # the admission, as the members' chains have it
        silenced = record.get("silenced", {})
        group.silenced = {str(p): int(n) for p, n in silenced.items()} if isinstance(silenced, dict) else {}
        self.genesis = chain.links[0].digest
        assert strategy.cluster_environment is not None
        strategy.cluster_environment.set_world_size(len(members))
        strategy.cluster_environment.set_global_rank(me)
        compat.set_rank_zero(0)

        def agreed(checkpoint: dict[str, Any]) -> bool:
            return checkpoint.get("global_step") == step and strategy.state_digest(checkpoint) == record["digest"]

        others = [m for m in group.transport.members if m != node.peer_id]
        self.joined_state, source = download_agreed_state(node, others, step, agreed, timeout,
                                                          max_bytes=state_size_cap(strategy.lightning_module))
        compat.set_loaded_checkpoint(trainer, self.joined_state)  # Lightning restores it after setup
        self.catching_up = True
        self.mark_running(step)  # a member now: later peers find the run through it too
        print(f"BTARD hivemind: joined run {run_id!r} at step {step} as peer {me}; {len(membership.active)} peers "
              f"{membership.active}; state from {source}, its digest the one the members published", flush=True)
        strategy.events.observer = me
        strategy.events.emit("joined", step, [me], f"state from {source}", members=membership.active)
        return group, list(record["keys"]), int(record["seed"]), bytes(record["run_nonce"])

    # ----------------------------------------------------------------- admitting joiners
    def due(self, trainer: "pl.Trainer", batch_idx: int) -> bool:
        """Whether the members check for join requests at this batch (a step boundary every ``join_every`` steps)."""
        if self.catching_up:  # a joiner's first batch: the members admitted it at this very point
            self.catching_up = False
            return False
        step = trainer.global_step
        if not self.join_every or step % self.join_every or batch_idx % trainer.accumulate_grad_batches:
            return False
        if step == self._joins_checked_at:
            return False
        self._joins_checked_at = step
        return True

    def admit(self, strategy: "BTARDStrategy", trainer: "pl.Trainer", step: int) -> None:
        """One board collective: admit the join requests a majority of members saw, refuse banned peers, offer the
        state, write the admission records, continue in the larger group."""
        from hivemind.p2p import PeerID

        from lightning_btard.groups.hivemind_admission import agree_on_joiners, publish_admission, publish_refusal
        from lightning_btard.groups.hivemind_state import to_plain
        from lightning_btard.groups.silence import SILENCES_BEFORE_OUT
        from lightning_btard.transports.codec import encode_record

        engine = strategy.engine
        assert engine is not None and isinstance(engine.group, HivemindGroup)
        group_obj, membership = engine.group, engine.membership
        node, run_id, timeout = self.node, self.run_id, group_obj.timeout
        if time.monotonic() - self._running_announced > 600:
            self.mark_running(step)
        self.states.withdraw()  # the previous admission's offer: its joiners have it by now, or have gone
        group = list(group_obj.transport.members)
        bans = {group_obj.members[b.peer]: b for b in membership.bans}
        banned_keys = [engine.keys[b.peer] for b in membership.bans if b.peer < len(engine.keys)]
        out = {PeerID.from_base58(p) for p, n in group_obj.silenced.items() if n >= SILENCES_BEFORE_OUT}
        admitted, refused = agree_on_joiners(group_obj.transport, run_id, group, set(bans) | out, self._admitted_nonces,
                                             self.policy, group_obj.salt, step, banned_keys)
        chain = group_obj.chain
        if chain is not None and not chain.collect(node):
            log.warning("BTARD: the group's chain of changes lacks the signatures of a majority of some group (too many "
                        "members left at once): joiners cannot verify this group, and are not admitted")
        for peer in refused:
            ban = bans.get(peer)
            if ban is not None:
                reason, who, evidence = f"banned at step {ban.step} as peer {ban.peer} ({ban.evidence})", [ban.peer], ban.evidence
            elif peer in out:
                reason, who, evidence = (f"removed from the group {group_obj.silenced[peer.to_base58()]} times after "
                                         "reports of silence (withholding messages)", [], "silence")
            else:
                reason, who, evidence = "tied to a banned peer (its owner in the allow-list, or its signing key)", [], "tied"
            publish_refusal(node, run_id, peer, group, reason, timeout, chain)
            engine.events.emit("refusal", step, who, f"({peer}), which asked to join", evidence)
        if not admitted:
            return
        checkpoint = between_batches(compat.dump_checkpoint(trainer))
        try:
            data = encode_record(to_plain(checkpoint))
        except (TypeError, ValueError, RuntimeError) as e:  # the same on every member: all refuse alike
            log.warning("BTARD: the training state cannot be sent to joining peers, who are refused: %s", e)
            for request in admitted:
                publish_refusal(node, run_id, request.peer, group, f"the run's state cannot be sent: {e}", timeout, chain)
            return
        digest = strategy.state_digest(checkpoint)
        self.states.offer(step, data)
        # the records first: if writing them fails (a TransportError: regroup), the group is still the old one
        first, generation = len(membership.peers), membership.generation + 1
        ids = list(range(first, first + len(admitted)))
        peers = group_obj.members + [r.peer for r in admitted]
        keys = engine.keys + [r.key for r in admitted] if strategy.verify else []
        record = {
            "step": step, "group": [m.to_base58() for m in group], "peers": [m.to_base58() for m in peers], "salt": group_obj.salt,
            "keys": keys, "seed": strategy.run_seed, "generation": generation, "run_nonce": engine.run_nonce,
            "bans": [[b.peer, b.step, b.reason, b.evidence] for b in membership.bans],
            "departed": [[p, t] for p, t in membership.departed.items()], "digest": digest,
            "admitted": self._admitted_nonces + [r.nonce for r in admitted],
            "joins": self.policy.joins + [step] * len(admitted),
            "silenced": dict(group_obj.silenced),
            "chain": chain.to_record() if chain is not None else None,
        }
        for request, peer in zip(admitted, ids):
            publish_admission(node, run_id, request, {**record, "id": peer}, timeout)
        engine.keys = keys
        group_obj.admit([r.peer for r in admitted])  # ids and generation as in the records
        self._admitted_nonces += [r.nonce for r in admitted]
        self.policy.record(step, len(admitted))
        engine.record = None  # the previous step's validation spanned the old group: it is not resolved in the new one
        engine.on_group_change()
        engine.events.emit("admission", step, ids, f"({', '.join(str(r.peer) for r in admitted)})",
                           members=membership.active)

    # ----------------------------------------------------------------- leaving
    def announce_finished(self, step: int) -> None:
        """A member leaving at the end tells peers still asking to join that its part of the run is over."""
        from lightning_btard.groups.hivemind_admission import announce_finished

        try:
            announce_finished(self.node, self.run_id, step)
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            log.warning("BTARD: could not mark the run as finished in the DHT (%s)", e)

    def shutdown(self) -> None:
        if self.node is not None:
            self.node.shutdown()
            self.node = None
