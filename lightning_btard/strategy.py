"""BTARDStrategy: Lightning's multi-process training with BTARD robust aggregation instead of DDP.

There is no DistributedDataParallel wrapper. After backward (after ``on_after_backward``, once per
optimizer step under gradient accumulation) and before ``on_before_optimizer_step``, gradient
clipping and ``optimizer.step``, the flat gradient of the optimizer's parameters is replaced by its
ButterflyClip aggregate over all peers. Everything else — launching, devices, precision,
checkpoints — is Lightning's, as in its DDP strategy.

This class is glue: the step's aggregation (validators, verified rounds, retries, bans, regroups, the fp16
vote) is the framework-free :class:`~lightning_btard.protocol.engine.PeerEngine`; who is in the run is a
:class:`~lightning_btard.groups.base.Group` per backend; hivemind's joining and admission are
:class:`~lightning_btard.hivemind_peer.HivemindPeer`; every private Lightning API is in :mod:`.compat`. The class is
the aggregation and Lightning's set-up; one concept each is mixed in from beside it: devices, processes and ranks
(``processes.py``), Lightning's collectives over the peers (``collectives.py``), joining a running group
(``joining.py``) and leaving the run (``leaving.py``).

Buffers (e.g. BatchNorm running statistics) are *not* aggregated: every peer keeps its own, as
computed from its own batches, and rank 0's are the ones checkpointed. A Byzantine peer could
poison any buffer it were allowed to share; parameters, which are shared, stay identical on every
peer (checked every ``check_params_every`` steps).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_btard import compat
from lightning_btard.aggregators import Aggregator, resolve_aggregator
from lightning_btard.attacks.base import AttackContext
from lightning_btard.attacks.roster import attacks_of, behaviour_of, count_fired, give_colluders_a_channel
from lightning_btard.collectives import PeerCollectives
from lightning_btard.data_splits import DataSplit
from lightning_btard.errors import TrainingDiverged, UserError
from lightning_btard.event_sinks import attach_run_sinks
from lightning_btard.extras import require
from lightning_btard.groups.base import Group
from lightning_btard.joining import Joining
from lightning_btard.leaving import Leaving
from lightning_btard.lightning_package import (
    CheckpointIO,
    ClusterEnvironment,
    ParallelStrategy,
    Precision,
    SIGTERMException,
    StrategyRegistry,
    TrainerFn,
    pl,
    rank_zero_info,
    rank_zero_warn,
    reset_seed,
)
from lightning_btard.ops.finite import all_finite, well_formed_part
from lightning_btard.ops.partition import assign_grads, flatten_grads, trainable_params
from lightning_btard.ops.workspace import Workspace
from lightning_btard.processes import Processes
from lightning_btard.protocol.agreement import strict_majority
from lightning_btard.protocol.digest import tensors_digest
from lightning_btard.protocol.engine import PeerEngine
from lightning_btard.protocol.events import EventLog
from lightning_btard.protocol.identity import Identity
from lightning_btard.protocol.membership import Ban, Membership
from lightning_btard.protocol.mprng import agree_run_seed, draw
from lightning_btard.protocol.validation import StepRecord, ValidationCheck
from lightning_btard.round_logging import ban_summary, log_round
from lightning_btard.transports.base import Transport
from lightning_btard.verifiable_batches import data_fingerprint
from lightning_btard.verified_steps import VerifiedSteps, split_loader

__all__ = ["BTARDStrategy", "verified"]

log = logging.getLogger(__name__)

_DATA_ADVICE = (
    "Every peer must see the same training data, so that any peer can recompute any other's gradient: seed the "
    "dataset's construction identically on every peer (seed_everything(<the same seed>), not seed_everything(rank)), "
    "seed any random_split, and list files in a fixed order. Peers whose data differ would accuse each other."
)


def verified(aggregator: Any, topology: str, verify: Optional[bool]) -> bool:
    """Whether a run verifies its rounds: by default when it can (CenteredClip on a butterfly); an error when asked to
    verify what the protocol does not check, or for an unknown topology."""
    if topology not in ("butterfly", "server"):
        raise UserError(f"topology must be 'butterfly' or 'server', got {topology!r}")
    verify = (aggregator == "centered_clip" and topology == "butterfly") if verify is None else bool(verify)
    if verify and aggregator != "centered_clip":
        raise UserError(f"verify=True checks CenteredClip aggregates, not {aggregator!r}: use aggregator='centered_clip' "
                        "(or verify=False: the other rules run unverified)")
    if verify and topology != "butterfly":
        raise UserError("topology='server' is the unverified parameter-server baseline: use verify=False")
    return verify


def round_aggregator(aggregator: Any, aggregator_options: Optional[dict[str, Any]], verify: bool, **common: Any) -> Aggregator:
    """The aggregator of a run's rounds, built with the strategy's ``common`` options (``tau``, ``eps``,
    ``max_iters``). CenteredClip certifies its residual exactly when the rounds are verified (its ``certify``
    option): nobody checks an unverified round's aggregates, and a verified round's check needs the certified bound,
    so a verified run that asks for ``certify=False`` is an error."""
    built = resolve_aggregator(aggregator, aggregator_options, certify=verify, **common)
    if verify and getattr(built, "certify", True) is False:
        raise UserError("verify=True checks every aggregate against the residual CenteredClip certifies: drop "
                        "certify=False from aggregator_options (or use verify=False)")
    return built


class BTARDStrategy(Processes, Joining, PeerCollectives, Leaving, ParallelStrategy):
    """Multi-process training where gradients are combined by BTARD's ButterflyClip.

    Args:
        tau: CenteredClip radius (per part). ``float("inf")`` averages.
        aggregator: a registered aggregator name (``"centered_clip"``, ``"mean"``, ``"coordinate_median"``,
            ``"trimmed_mean"``, ``"geometric_median"``, ``"krum"``, ``"multi_krum"``, ``"bucketing"``, ``"nnm"``: see
            ``aggregators/``) or an object ``(parts [n, d], weights [n] | None) -> AggregationResult``.
        aggregator_options: the named aggregator's own options, e.g. ``{"f": 3}`` for Krum or
            ``{"bucket_size": 2, "inner": "coordinate_median"}`` for bucketing (``tau``, ``eps`` and ``max_iters``
            reach the rules that take them without it).
        data_split: how the training data is split among the peers: ``None`` (Lightning's sampler, or under ``verify``
            every peer sampling the whole set), ``"iid"``, or ``{"kind": "dirichlet", "alpha": 0.5}`` /
            ``{"kind": "shards", "shards_per_peer": 2}`` (label skew; public and seeded, so validators rebuild any
            peer's batch: ``data_splits.py``).
        topology: ``"butterfly"`` (every peer aggregates one part) or ``"server"`` (peer 0 aggregates whole vectors
            and is trusted: the paper's "CenteredClip with a parameter server" baseline; needs ``verify=False``).
        eps: CenteredClip's absolute target residual (0: only the relative target ``5e-7 * ||v||``); the same on the
            verified and the unverified path, and allowed for by the verification's check.
        max_iters: cap on CenteredClip iterations.
        check_params_every: every this many steps, check (and log) that every peer holds identical parameters.
        verify: run BTARD's verification protocol in every round (signed commitments, MPRNG, projection
            checks, accusations, bans; see ``protocol/round.py``) and validate gradients by recomputation
            (``protocol/validation.py``). Default: on with CenteredClip (what it checks), off otherwise.
            Installs verifiable batches on the training dataloader and seeds each training step's RNGs.
        validators: peers that validate a random other peer's previous gradient in each step (with
            ``verify``; they skip their own gradient that step). 0 turns validation off.
        validation_rtol: how far a recomputed gradient may be from the published one (relative, per part:
            float non-determinism across machines; attacks differ by far more).
        directions: secret random directions per part for the CenteredClip check (with ``verify``).
        backend: the transport: ``"torch"`` (torch.distributed; Lightning launches one process per device) or
            ``"hivemind"`` (peers that start on their own, one ``btard fit`` per device, anywhere; they find each
            other through hivemind's DHT: see ``transports/hivemind*.py``).
        initial_peers: (hivemind) multiaddresses of running peers; none for the first peer, which prints its own.
            When empty, the ``INITIAL_PEERS`` environment variable (multiaddresses separated by commas or spaces).
        trusted_peers: (hivemind) peer ids (or multiaddresses ending in ``/p2p/<id>``) of members this peer trusts.
            A peer that joins a running run believes only a group at the head of a chain of group changes, each
            signed by a majority of the group before (``groups/hivemind_chain.py``); the chain must carry a
            signature of one of these. Without them, it must start from the one first group the run's members
            name, and a run id claimed by two groups stops the joiner with an error.
        allowed_peers: (hivemind) a permissioned run's allow-list: a file of peer ids (one per line, optionally
            followed by an owner: peers of one owner are tied, a ban refuses them all) or a list of them. Only these
            peers count at the rendezvous, in join requests and in what joiners read. Unset: an open run.
        shuffle_ranks: (hivemind) order the group by a draw every member takes part in (no member chooses its rank).
            Off: by peer id, which a launcher that makes the keys knows beforehand (``swarm``: attacks by rank).
        use_relay, use_auto_relay, client_mode: (hivemind) libp2p circuit relays and hivemind's DHT client mode, for
            peers behind a NAT (``transports/hivemind_node.py``); not tested beyond loopback here.
        max_joins_per_step, max_joins_per_window, join_window: (hivemind) an open run admits at most this many
            peers per admission (default 1) and per ``join_window`` steps (default 4 per 1000); later requests wait.
            An open run is not Sybil-resistant: see ``groups/hivemind_policy.py``.
        num_peers: (hivemind) how many peers train together; training starts when that many have joined ``run_id``.
        run_id: (hivemind) the run's name in the DHT: peers with the same ``run_id`` form one group.
        host_maddrs: (hivemind) where this peer listens (``/ip4/0.0.0.0/tcp/<port>`` to accept other machines).
        announce_maddrs: (hivemind) the addresses other peers should dial, if not ``host_maddrs``.
        identity_path: (hivemind) this peer's RSA key file (its peer id); made if missing; a fresh key if not given.
        rendezvous_timeout: (hivemind) seconds to wait for ``num_peers`` peers to join, or, for a peer that starts
            after the run did, to be admitted.
        join_every: (hivemind) every this many steps the members admit peers that asked to join the running group
            (they download the model and optimizer state, checked against the digest a majority of members publish);
            banned peers are refused. 0 admits nobody.
        process_group_backend: ``"gloo"`` / ``"nccl"``; default by device.
        timeout: collective timeout.
        start_method: ``"popen"`` (a script re-launched per process, like Lightning's ``ddp``) or
            ``"spawn"``/``"fork"``/``"forkserver"``.
    """

    strategy_name = "btard"

    def __init__(
        self,
        tau: float = 1.0,
        aggregator: Union[str, Callable[..., Any]] = "centered_clip",
        eps: float = 0.0,
        max_iters: int = 500,
        check_params_every: int = 100,
        verify: Optional[bool] = None,
        validators: int = 1,
        validation_rtol: float = 1e-3,
        directions: int = 2,
        backend: Literal["torch", "hivemind"] = "torch",
        initial_peers: Sequence[str] = (),
        trusted_peers: Sequence[str] = (),
        allowed_peers: Union[str, Sequence[str], None] = None,
        max_joins_per_step: int = 1,
        max_joins_per_window: int = 4,
        join_window: int = 1000,
        shuffle_ranks: bool = True,
        use_relay: bool = True,
        use_auto_relay: bool = False,
        client_mode: bool = False,
        num_peers: Optional[int] = None,
        run_id: str = "btard",
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Optional[Sequence[str]] = None,
        identity_path: Optional[str] = None,
        rendezvous_timeout: float = 600.0,
        join_every: int = 10,
        process_group_backend: Optional[str] = None,
        timeout: Union[float, timedelta] = 1800.0,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        aggregator_options: Optional[dict[str, Any]] = None,
        topology: Literal["butterfly", "server"] = "butterfly",
        data_split: Union[str, dict[str, Any], None] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        if backend not in ("torch", "hivemind"):
            raise UserError(f"unknown BTARD backend {backend!r}: use backend='torch' or backend='hivemind'")
        if backend == "hivemind" and (num_peers is None or int(num_peers) < 1):
            raise UserError("backend='hivemind' needs num_peers: how many peers (one process each) train together")
        if join_every < 0:
            raise UserError(f"join_every must be >= 0 (0: admit nobody), got {join_every}")
        if check_params_every < 1:
            raise UserError(f"check_params_every must be >= 1, got {check_params_every}")
        if validators < 0:
            raise UserError(f"validators must be >= 0, got {validators}")
        if not validation_rtol > 0:
            raise UserError(f"validation_rtol must be > 0, got {validation_rtol}")
        self.backend = backend
        self.join_every = int(join_every)
        self._hivemind: Optional[Any] = None
        if backend == "hivemind":
            require("hivemind", "BTARDStrategy(backend='hivemind')")
            from lightning_btard.groups.hivemind_policy import AdmissionPolicy, read_allow_list
            from lightning_btard.hivemind_peer import HivemindPeer, initial_peers_from_env

            self._hivemind = HivemindPeer(
                initial_peers=list(initial_peers) or initial_peers_from_env(), num_peers=int(num_peers or 0), run_id=str(run_id),
                trusted_peers=list(trusted_peers),
                policy=AdmissionPolicy(read_allow_list(allowed_peers), int(max_joins_per_step), int(max_joins_per_window),
                                       int(join_window)),
                shuffle_ranks=bool(shuffle_ranks),
                p2p_options={"use_relay": bool(use_relay), "use_auto_relay": bool(use_auto_relay), "client_mode": bool(client_mode)},
                host_maddrs=list(host_maddrs), announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
                identity_path=identity_path, rendezvous_timeout=float(rendezvous_timeout), join_every=self.join_every,
            )
        self.tau = float(tau)
        self.verify = verified(aggregator, topology, verify)
        self.aggregator: Aggregator = round_aggregator(aggregator, aggregator_options, self.verify, tau=self.tau, eps=eps,
                                                       max_iters=max_iters)
        self.check_params_every = int(check_params_every)
        self.topology = topology
        self.data_split = DataSplit.of(data_split)
        self.validators = int(validators) if self.verify else 0
        self.validation_check = ValidationCheck(rtol=float(validation_rtol))
        self.directions = int(directions)
        self.run_seed = 0
        self.engine: Optional[PeerEngine] = None
        self.events = EventLog()
        self._steps: Optional[VerifiedSteps] = None  # under verify: seeded steps, verifiable batches, validators
        self._data_agreed = False
        self._process_group_backend = process_group_backend
        self._timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        self._start_method = start_method
        self._num_nodes = 1
        self._attack_counts: dict[str, float] = {}
        self._buffers = Workspace()

    # ----------------------------------------------------------------- who is in the run
    @property
    def group(self) -> Optional[Group]:
        return self.engine.group if self.engine is not None else None

    @property
    def transport(self) -> Optional[Transport]:
        return self.engine.transport if self.engine is not None else None

    @property
    def membership(self) -> Optional[Membership]:
        return self.engine.membership if self.engine is not None else None

    @property
    def bans(self) -> list[Ban]:
        """Every ban so far (peer = rank, step, reason, evidence kind), the same on every honest peer."""
        return list(self.membership.bans) if self.membership is not None else []

    @property
    def departed(self) -> dict[int, int]:
        """Peers that stopped answering (hivemind backend), with the step: out of the run, not banned."""
        return dict(self.membership.departed) if self.membership is not None else {}

    @property
    def _left(self) -> bool:
        return self.engine is not None and self.engine.left

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        assert self.cluster_environment is not None
        if self._hivemind is not None:
            group = self._hivemind.start(self.cluster_environment, self._timeout.total_seconds())
            if group is None:  # joining a running run: the group, the keys and the seed come with the admission
                return
        else:
            compat.init_process_group(self.cluster_environment, self.process_group_backend, self._timeout, self.root_device)
            from lightning_btard.groups.torch_distributed import TorchGroup

            group = TorchGroup(self.process_group_backend)
        identity, keys = None, []
        if self.verify:
            identity = Identity.generate()
            keys = group.transport.all_gather_object(identity.public)
            self.run_seed = agree_run_seed(group.transport, os.environ.get("PL_GLOBAL_SEED"))
        if self._hivemind is not None and self._hivemind.shuffle_ranks:
            order = group.reorder(draw(group.transport, "ranks"))  # type: ignore[attr-defined]
            keys = [keys[i] for i in order] if keys else keys
            self.cluster_environment.set_global_rank(group.peer)  # (Lightning's environment moves rank zero with it)
            compat.set_rank_zero(0)  # every hivemind peer is its own rank zero
            print(f"BTARD hivemind: ranks drawn by all (no member chose them); this peer is rank {group.peer}", flush=True)
        self._make_engine(group, identity, keys)

    def _make_engine(self, group: Group, identity: Optional[Identity], keys: list[bytes], run_nonce: bytes = b"") -> None:
        self.events.observer = group.peer
        self.engine = PeerEngine(
            group, self.aggregator, verify=self.verify, identity=identity, keys=keys, run_nonce=run_nonce, validators=self.validators,
            validation_check=self.validation_check, directions=self.directions, topology=self.topology, on_banned=self._leave,
            on_group_change=self._after_group_change, events=self.events,
        )

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        attach_run_sinks(self.events, trainer, self.global_rank, shared_filesystem=self._hivemind is None)
        if self._hivemind is not None and self._hivemind.joining:
            self._join_running_group(trainer)
        else:
            self._broadcast_module_state()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._setup_attacks(trainer)
            compat.route_sigterm_broadcast(trainer, lambda: self._broadcast_sigterm(trainer))
            if self.verify:
                self._steps = VerifiedSteps(self.run_seed, self.global_rank, self.root_device, self.data_split, self.world_size)
                self._steps.setup(trainer, self.lightning_module, self.validators, self.world_size)  # type: ignore[arg-type]
        self.setup_precision_plugin()
        if self._hivemind is not None:
            self._hivemind.limit_messages(sum(p.numel() for p in self.model.parameters()))
        if trainer.state.fn == TrainerFn.FITTING:
            compat.optimizers_to_device(self.optimizers, self.root_device)
            self._check_manual_optimization()
            how = "verified" if self.verify else "UNVERIFIED (the verification protocol checks CenteredClip on a butterfly only)"
            where = ", whole vectors at peer 0 (trusted)" if self.topology == "server" else ""
            rank_zero_info(f"BTARD: {self.world_size} peers, aggregator {self.aggregator!r}{where}, {how}, transport {self.backend}")
            if self._hivemind is not None:
                print(f"BTARD hivemind: rank {self.global_rank} set up; training", flush=True)

    def _broadcast_module_state(self) -> None:
        """Start every peer from the same parameters and buffers (nothing else does it without DDP): those a strict
        majority of peers started with, so that no single member chooses them. Peers that started from them keep their
        own; the others take them from a member that announced them and check the digest (a member that announced the
        majority's digest and sends something else is named). With no majority (unseeded peers): on torch.distributed
        the first member's, as DDP does; on hivemind an error, since the first member there is whoever has the lowest
        peer id, which anyone can grind for."""
        assert self.model is not None and self.transport is not None
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        mine = tensors_digest(tensors)
        values = self.transport.all_gather_object(mine)
        top = strict_majority(values)
        if top is None and self._hivemind is not None:
            raise UserError("BTARD: the peers initialised their models differently (no majority started alike). On "
                            "hivemind the start must be a majority's choice: give every peer the same seed "
                            "(seed_everything, or `seed_everything: <seed>` in the config).")
        src = values.index(top) if top is not None else 0
        if top is None:
            rank_zero_warn("BTARD: the peers initialised their models differently (no majority started alike); every peer "
                           "takes the first member's parameters, as DDP does. seed_everything(<the same seed>) on every "
                           "peer makes the start a majority's choice instead of one member's.")
        keep = top is not None and mine == top
        with torch.no_grad():
            for tensor in tensors:
                # a peer that started from the majority's state keeps it: only the others depend on what src sends
                self.transport.broadcast_tensor_(tensor.data.clone() if keep else tensor.data, src=src)
        if top is not None and not keep and tensors_digest(tensors) != top:
            raise UserError(f"BTARD: member {src} announced the state a majority of peers started from, then sent this "
                            "peer another one: it is Byzantine. Restart this peer (it will meet the others again).")

    def _broadcast_sigterm(self, trainer: "pl.Trainer") -> None:
        """Lightning's SIGTERM flag broadcast, over the members (after a ban the default group holds a departed peer)."""
        assert self.transport is not None
        flag = torch.tensor([1.0 if getattr(trainer, "received_sigterm", False) else 0.0], device=self.root_device)
        if self._tolerant(lambda: self.transport.broadcast_tensor_(flag, src=0), lambda: flag).item() > 0:  # type: ignore[union-attr]
            raise SIGTERMException()

    def _setup_attacks(self, trainer: Optional["pl.Trainer"]) -> None:
        assert self.transport is not None and self.membership is not None
        give_colluders_a_channel(attacks_of(trainer), self.transport, self.membership.active)

    def _after_group_change(self) -> None:
        """After a ban, a regroup or an admission: metrics sync over the new group, colluders get a new channel."""
        from lightning_btard.transports.torch_distributed import TorchDistributedTransport

        if isinstance(self.transport, TorchDistributedTransport):
            compat.bind_metrics_process_group(self.lightning_module, self.transport.group)
        self._setup_attacks(self.lightning_module.trainer if self.lightning_module is not None else None)

    def _check_manual_optimization(self) -> None:
        module = self.lightning_module
        if module is not None and not module.automatic_optimization:
            rank_zero_info(
                "BTARD with manual optimization: gradients are aggregated at every `optimizer.step()`; "
                "every peer must call it the same number of times."
            )

    # ----------------------------------------------------------------- verifiable batches and validation
    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Under ``verify`` or a ``data_split``, the training dataloader becomes this peer's verifiable batches
        (``verified_steps.py``), from its part of the data when it is split."""
        module = self.lightning_module
        if module is None or not module.trainer.training:
            return dataloader
        if self._steps is None:
            if self.data_split is None:
                return dataloader
            return split_loader(dataloader, self.run_seed, self.global_rank, module.trainer, self.data_split, self.world_size)[0]
        loader = self._steps.loader(dataloader, module.trainer)
        if not self._data_agreed and self.engine is not None and not self._catching_up:
            self.engine.agree("training data", data_fingerprint(loader.dataset), _DATA_ADVICE)
            self._data_agreed = True
        return loader

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's training step, seeded; a validator's is its target's previous one (``verified_steps.py``)."""
        if self._steps is None or self.lightning_module is None or self.engine is None:
            return super().training_step(*args, **kwargs)
        return self._steps.training_step(super().training_step, self.lightning_module, self.engine, args, kwargs)

    def _recompute(self, record: StepRecord, peer: int) -> Tensor:
        assert self._steps is not None and self.lightning_module is not None
        return self._steps.recompute(self.lightning_module, self.precision_plugin.train_step_context, record, peer)

    # ----------------------------------------------------------------- the aggregation
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union["pl.LightningModule", torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        """Run the closure (forward, backward), replace the gradients by their aggregate, then step."""

        def closure_then_aggregate() -> Any:
            result = closure()
            self.aggregate_gradients(optimizer)
            return result

        output = super().optimizer_step(optimizer, closure_then_aggregate, model, **kwargs)
        self._log_round()
        return output

    def aggregate_gradients(self, optimizer: Optimizer) -> None:
        """Replace the gradients of ``optimizer``'s parameters with the ButterflyClip aggregate over all peers."""
        assert self.engine is not None and self.transport is not None
        params = trainable_params(optimizer.param_groups)
        numel = sum(p.numel() for p in params)
        flat = flatten_grads(params, out=self._buffers.get("flat", (numel,), torch.float32, self.root_device))
        # a fast-path recomputation ran on x_{t-1}; this step updates x_t
        micro_batches = self._steps.end_step(params) if self._steps is not None else 1
        steps = self._steps
        scale = self._grad_scale()
        if scale is not None:
            flat.div_(scale)
        elif self.verify and not well_formed_part(flat):
            self._diverged()
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        ctx = AttackContext(step=trainer.global_step if trainer is not None else 0, rank=self.global_rank,
                            world_size=self.transport.world_size, trainer=trainer, pl_module=self.lightning_module)
        attacks, sent = attacks_of(trainer), flat
        for attack in attacks:
            sent = attack.on_before_aggregate(sent, ctx)

        def count_attackers() -> None:
            self._attack_counts = count_fired(attacks, self.transport, ctx.step, self.root_device)  # type: ignore[arg-type]

        validating = steps is not None and steps.recomputer is not None
        aggregate = self.engine.step(
            sent, ctx.step, computed=flat, recompute=self._recompute if validating else None,
            behaviour=behaviour_of(attacks, ctx), overflow_vote=scale is not None,
            fast_path=steps is not None and steps.fast_path, batch_idx=steps.batch_idx if steps is not None else 0,
            micro_batches=micro_batches, grad_scale=scale, after=count_attackers,
        )
        if aggregate is None:
            # fp16 overflow on a majority: every peer skips this step together (the scalers see inf and back off)
            assign_grads(params, torch.full_like(flat, float("inf")))
            return
        # verified, the aggregate is read-only (the next step's validators read it): the gradients get copies. Unverified,
        # an aggregate in this step's own buffer is read by nobody else: the gradients become views of it (no copy)
        views = not self.verify and aggregate.data_ptr() == flat.data_ptr() and aggregate.numel() == flat.numel()
        assign_grads(params, aggregate, scale=scale, views=views)

    def _grad_scale(self) -> Optional[float]:
        scaler = getattr(self.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

    def _diverged(self) -> None:
        """Stop with what went wrong: a non-finite part would get this peer banned as malformed, and averaging it
        in (as DDP would) poisons the model of every peer."""
        module = self.lightning_module
        names = [n for n, p in module.named_parameters() if p.grad is not None and not all_finite(p.grad)] if module else []
        raise TrainingDiverged.in_gradients(self.global_rank, module.trainer.global_step if module is not None else "?", names)

    def _log_round(self) -> None:
        log_round(self.lightning_module, self.engine.metrics if self.engine is not None else {}, self._attack_counts,
                  self.check_params_every, self.check_parameters_identical)

    def check_parameters_identical(self) -> bool:
        """Compare a digest of the parameters across peers; raise on this peer if it disagrees with the majority."""
        assert self.engine is not None and self.lightning_module is not None
        if self._catching_up:
            return True
        differing = self.engine.compare_digests(tensors_digest(self.lightning_module.parameters()))
        if differing:
            log.warning("BTARD: parameters differ across peers at step %s: peers %s", self.lightning_module.trainer.global_step, differing)
        return not differing

    # ----------------------------------------------------------------- bans in checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Lightning's checkpoint, with the run's ban list and departed peers (restored on resume)."""
        if self.engine is not None:
            checkpoint["btard"] = self.engine.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if self._hivemind is not None and self._hivemind.joined_state is not None:
            rank_zero_warn(f"BTARD: this peer joined a running group and takes its state; ckpt_path={checkpoint_path} is not loaded")
            return self._hivemind.joined_state
        checkpoint = compat.load_checkpoint(super().load_checkpoint, checkpoint_path, weights_only)
        if self.engine is not None and "btard" in checkpoint:
            rank_zero_info(f"BTARD: resumed with the checkpoint's ban list: {[b['peer'] for b in checkpoint['btard']['bans']]}")
            self.engine.load_state_dict(checkpoint["btard"])
        return checkpoint

    # ----------------------------------------------------------------- leaving
    @override
    def on_train_end(self) -> None:
        """Print the ban list at the end of the run (it is also in ``strategy.bans`` and in the logs)."""
        super().on_train_end()
        if self.verify and self.membership is not None:
            rank_zero_info(ban_summary(self.membership.bans))

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("btard", cls, description="BTARD-SGD: ButterflyClip aggregation (popen launcher)")
        strategy_registry.register(
            "btard_spawn", cls, description="BTARD-SGD: ButterflyClip aggregation (spawn launcher)", start_method="spawn"
        )


BTARDStrategy.register_strategies(StrategyRegistry)
