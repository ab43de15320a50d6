"""BTARDStrategy: Lightning's multi-process training with BTARD robust aggregation instead of DDP.

There is no DistributedDataParallel wrapper. After backward (after ``on_after_backward``, once per
optimizer step under gradient accumulation) and before ``on_before_optimizer_step``, gradient
clipping and ``optimizer.step``, the flat gradient of the optimizer's parameters is replaced by its
ButterflyClip aggregate over all peers. Everything else — launching, devices, precision,
checkpoints — is Lightning's, as in its DDP strategy.

Buffers (e.g. BatchNorm running statistics) are *not* aggregated: every peer keeps its own, as
computed from its own batches, and rank 0's are the ones checkpointed. A Byzantine peer could
poison any buffer it were allowed to share; parameters, which are shared, stay identical on every
peer (checked every ``check_params_every`` steps).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning_fabric.utilities.distributed import _init_dist_connection
from lightning_fabric.utilities.optimizer import _optimizers_to_device
from lightning_fabric.utilities.seed import reset_seed
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from pytorch_lightning.strategies import StrategyRegistry
from pytorch_lightning.strategies.parallel import ParallelStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_btard.aggregators import Aggregator, resolve_aggregator
from lightning_btard.attacks.base import Attack, AttackContext
from lightning_btard.ops.finite import all_finite
from lightning_btard.ops.workspace import Workspace
from lightning_btard.ops.partition import assign_grads, flatten_grads, trainable_params
from lightning_btard.protocol.butterfly import ButterflyStats, butterfly_aggregate
from lightning_btard.protocol.identity import Identity
from lightning_btard.protocol.membership import Ban, Membership
from lightning_btard.protocol.round import Behaviour, RoundConfig, verified_round
from lightning_btard.protocol.validation import StepRecord, ValidationCheck, assign_validators, resolve_validations
from lightning_btard.recomputation import Recomputer, TrainingData
from lightning_btard.transports.base import Transport, TransportError
from lightning_btard.transports.torch_distributed import TorchDistributedTransport
from lightning_btard.errors import TrainingDiverged, UserError
from lightning_btard.verifiable_batches import seeded_step, verifiable_loader

__all__ = ["BTARDStrategy"]

log = logging.getLogger(__name__)


class BTARDStrategy(ParallelStrategy):
    """Multi-process training where gradients are combined by BTARD's ButterflyClip.

    Args:
        tau: CenteredClip radius (per part). ``float("inf")`` averages.
        aggregator: a registered aggregator name (``"centered_clip"``, ``"mean"``) or an object
            ``(parts [n, d], weights [n] | None) -> AggregationResult``.
        eps: CenteredClip's target residual.
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
        eps: float = 1e-6,
        max_iters: int = 500,
        check_params_every: int = 100,
        verify: Optional[bool] = None,
        validators: int = 1,
        validation_rtol: float = 1e-3,
        directions: int = 2,
        backend: Literal["torch", "hivemind"] = "torch",
        initial_peers: Sequence[str] = (),
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
        self._hivemind = dict(
            initial_peers=list(initial_peers), num_peers=int(num_peers or 0), run_id=str(run_id),
            host_maddrs=list(host_maddrs), announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
            identity_path=identity_path, rendezvous_timeout=float(rendezvous_timeout),
        )
        self._node: Any = None
        if join_every < 0:
            raise UserError(f"join_every must be >= 0 (0: admit nobody), got {join_every}")
        self.join_every = int(join_every)
        self._joining = False  # this peer started after the run did: it is admitted instead of meeting the others
        self._catching_up = False  # admitted, restoring the group's state: no collectives until its first batch
        self._joined_state: Optional[dict[str, Any]] = None  # the group's checkpoint, downloaded and checked
        self._joins_checked_at = -1
        self._admitted_nonces: list[bytes] = []  # join requests admitted so far (a request is admitted once)
        self._running_announced = 0.0
        if check_params_every < 1:
            raise UserError(f"check_params_every must be >= 1, got {check_params_every}")
        self.tau = float(tau)
        self.aggregator: Aggregator = resolve_aggregator(aggregator, tau=self.tau, eps=eps, max_iters=max_iters)
        self.check_params_every = int(check_params_every)
        self.verify = (aggregator == "centered_clip") if verify is None else bool(verify)
        if self.verify and aggregator != "centered_clip":
            raise UserError("verify=True checks CenteredClip aggregates: use aggregator='centered_clip' (or verify=False)")
        if validators < 0:
            raise UserError(f"validators must be >= 0, got {validators}")
        if not validation_rtol > 0:
            raise UserError(f"validation_rtol must be > 0, got {validation_rtol}")
        self.validators = int(validators) if self.verify else 0
        self.validation_check = ValidationCheck(rtol=float(validation_rtol))
        self._run_seed = 0
        self._recomputer: Optional[Recomputer] = None
        self._record: Optional[StepRecord] = None
        self._left = False  # banned, and finishing fit() without the others (rank 0 under the fork/spawn launchers)
        self._broken: Optional[Exception] = None  # a failed collective, not yet followed by a regroup (hivemind)
        self._unvalidated_step: Optional[int] = None  # the step of the last regroup: nobody validates it
        self._stand_ins: set[int] = set()
        self._validating: Optional[int] = None
        self._fast_path = False
        """This step's own gradient is the validator's recomputation (no accumulation; see ``_begin_step``)."""
        self._micro = 0
        self._step_micro = 1
        self._batch_idx = 0
        self._validation_metrics: dict[str, float] = {}
        self.round_config = RoundConfig(tau=self.tau, directions=int(directions), max_iters=int(max_iters))
        self.membership: Optional[Membership] = None
        self._identity: Optional[Identity] = None
        self._keys: list[bytes] = []
        self.backend = backend
        self._process_group_backend = process_group_backend
        self._timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        self._start_method = start_method
        self._num_nodes = 1
        self.transport: Optional[Transport] = None
        self._round_seconds = 0.0
        self._attack_counts: dict[str, float] = {}
        self._round_metrics: dict[str, float] = {}
        self._buffers = Workspace()

    # ----------------------------------------------------------------- devices and processes
    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        """Tells Lightning to install its distributed sampler and to sync ``self.log(sync_dist=True)``."""
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @property
    def process_group_backend(self) -> str:
        return self._process_group_backend or ("nccl" if self.root_device.type == "cuda" else "gloo")

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.backend == "hivemind":
            if self.num_processes != 1:
                raise UserError(
                    f"backend='hivemind' runs one device per process (got devices={self.num_processes}): start one "
                    "`btard fit` per device, or use `python -m lightning_btard.swarm` to start several on this machine"
                )
            self._launcher = None
        elif self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self._start_method)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        assert self.cluster_environment is not None
        if self.backend == "hivemind":
            self.transport = self._join_swarm()
            if self._joining:  # the group, the keys and the seed come with the admission (in setup)
                self._identity = Identity.generate()
                return
        else:
            kwargs: dict[str, Any] = {"timeout": self._timeout}
            if self.root_device.type != "cpu":
                kwargs["device_id"] = self.root_device
            _init_dist_connection(self.cluster_environment, self.process_group_backend, **kwargs)
            self.transport = TorchDistributedTransport()
        self.membership = Membership(peers=list(range(self.transport.world_size)))
        if self.verify:
            self._identity = Identity.generate()
            self._keys = self.transport.all_gather_object(self._identity.public)
            seed = os.environ.get("PL_GLOBAL_SEED")
            mine = int(seed) if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self._run_seed = int(self.transport.broadcast_object(mine, 0))

    def _join_swarm(self) -> Transport:
        """Start this peer's hivemind node, print its addresses, wait for the group; take the rank it gives us."""
        from lightning_btard.transports.hivemind_admission import run_is_running
        from lightning_btard.transports.hivemind_node import HivemindNode
        from lightning_btard.transports.hivemind_rendezvous import rendezvous

        cfg = self._hivemind
        self._node = HivemindNode(
            initial_peers=cfg["initial_peers"], host_maddrs=cfg["host_maddrs"], announce_maddrs=cfg["announce_maddrs"],
            identity_path=cfg["identity_path"],
        )
        join = f"  --trainer.strategy.initial_peers=[{','.join(self._node.visible_maddrs)}]"
        assert self.cluster_environment is not None
        if run_is_running(self._node, cfg["run_id"]):
            self._joining = True
            # a rank no member has, until the admission gives this peer its own (not 0: rank-zero-only output stays
            # the first member's)
            self.cluster_environment.set_world_size(cfg["num_peers"] + 1)
            self.cluster_environment.set_global_rank(cfg["num_peers"])
            rank_zero_only.rank = utils_rank_zero_only.rank = cfg["num_peers"]
            print(f"BTARD hivemind peer {self._node.peer_id}: run {cfg['run_id']!r} is running; this peer joins it "
                  f"once set up. Other peers join with:\n{join}", flush=True)
            return None
        print(
            f"BTARD hivemind peer {self._node.peer_id} (run {cfg['run_id']!r}, waiting for {cfg['num_peers']} peers). "
            f"Other peers join with:\n{join}",
            flush=True,
        )
        transport = rendezvous(self._node, cfg["run_id"], cfg["num_peers"], cfg["rendezvous_timeout"])
        transport.timeout = self._timeout.total_seconds()
        self._hivemind_members = list(transport.members)
        self._mark_running(0)  # peers that start from now on ask to join instead
        self.cluster_environment.set_world_size(transport.world_size)
        self.cluster_environment.set_global_rank(transport.rank)
        rank_zero_only.rank = utils_rank_zero_only.rank = transport.rank
        print(f"BTARD hivemind: {transport.world_size} peers joined; this peer is rank {transport.rank}", flush=True)
        return transport

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if self._joining:
            self._join_running_group(trainer)
        else:
            self._broadcast_module_state()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._setup_attacks(trainer)
            self._route_sigterm_broadcast(trainer)
            self._setup_validation(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
            self._check_manual_optimization()
            rank_zero_info(f"BTARD: {self.world_size} peers, aggregator {self.aggregator!r}, transport {self.backend}")
            if self.backend == "hivemind":
                print(f"BTARD hivemind: rank {self.global_rank} set up; training", flush=True)

    def _broadcast_module_state(self) -> None:
        """Start every peer from rank 0's parameters and buffers (nothing else does it without DDP)."""
        assert self.model is not None and self.transport is not None
        with torch.no_grad():
            for tensor in list(self.model.parameters()) + list(self.model.buffers()):
                self.transport.broadcast_tensor_(tensor.data, src=0)

    def _route_sigterm_broadcast(self, trainer: "pl.Trainer") -> None:
        """Lightning broadcasts rank 0's SIGTERM flag over the default process group before every batch;
        after a ban that group holds a departed peer and would hang, so send the flag over the members."""
        loop = trainer.fit_loop.epoch_loop
        if not hasattr(loop, "_broadcast_sigterm_tensor"):
            return

        def broadcast_over_members() -> None:
            assert self.transport is not None
            flag = torch.tensor([1.0 if getattr(trainer, "received_sigterm", False) else 0.0], device=self.root_device)
            if self._tolerant(lambda: self.transport.broadcast_tensor_(flag, src=0), lambda: flag).item() > 0:  # type: ignore[union-attr]
                raise SIGTERMException()

        loop._broadcast_sigterm_tensor = broadcast_over_members

    def _setup_attacks(self, trainer: Optional["pl.Trainer"]) -> None:
        """Give colluding attacks their channel among the active Byzantine peers (a collective: every peer calls
        it, at the start and after every ban)."""
        assert self.transport is not None
        active = self.membership.active if self.membership is not None else list(range(self.transport.world_size))
        for attack in self._attacks(trainer):
            colluders = [m for m, peer in enumerate(active) if peer in attack.byzantine]
            if attack.colluding and colluders:
                attack.collusion = self.transport.subgroup(colluders)

    def _setup_validation(self, trainer: "pl.Trainer") -> None:
        module = self.lightning_module
        if not self.validators or module is None:
            return
        if not module.automatic_optimization:
            raise UserError(
                "BTARD validators recompute gradients through training_step, which needs automatic optimization; "
                "with manual optimization pass BTARDStrategy(validators=0) (the round is still verified) or verify=False"
            )
        self._recomputer = Recomputer(self._run_seed, trainer.accumulate_grad_batches, [self.root_device])
        contributing = self.world_size - self.validators
        if 0 < contributing < 3:
            rank_zero_warn(
                f"BTARD: validators={self.validators} of {self.world_size} peers leaves {contributing} peer(s) contributing "
                "to each step (validators weigh 0): one Byzantine contributor then holds half the weight or more, where "
                "CenteredClip bounds nothing until validation bans it. Use fewer validators or more peers."
            )

    def _check_manual_optimization(self) -> None:
        module = self.lightning_module
        if module is not None and not module.automatic_optimization:
            rank_zero_info(
                "BTARD with manual optimization: gradients are aggregated at every `optimizer.step()`; "
                "every peer must call it the same number of times."
            )

    @staticmethod
    def _attacks(trainer: Optional["pl.Trainer"]) -> list[Attack]:
        return [cb for cb in (trainer.callbacks if trainer is not None else []) if isinstance(cb, Attack)]

    # ----------------------------------------------------------------- verifiable batches and validation
    def process_dataloader(self, dataloader: object) -> object:
        """Under ``verify``, the training dataloader becomes this peer's verifiable batches (see ``verifiable_batches.py``)."""
        module = self.lightning_module
        trainer = module.trainer if module is not None else None
        if not self.verify or trainer is None or not trainer.training:
            return dataloader
        try:
            loader = verifiable_loader(
                dataloader, self._run_seed, self.global_rank, trainer.accumulate_grad_batches, lambda: trainer.global_step  # type: ignore[arg-type]
            )
        except TypeError as err:
            raise UserError(f"BTARDStrategy(verify=True): {err}") from err
        if self._recomputer is not None:
            self._recomputer.data = TrainingData(loader.dataset, loader.batch_sampler.batch_size, loader.collate_fn)  # type: ignore[union-attr, arg-type]
        return loader

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module's training step with the step's RNGs seeded from ``(run seed, step, peer)``; a validator
        runs its target's previous step instead, from the kept parameters, on the target's batch."""
        if not self.verify or self.lightning_module is None:
            return super().training_step(*args, **kwargs)
        trainer = self.lightning_module.trainer
        step, micro = trainer.global_step, self._micro
        self._micro += 1
        if micro == 0 and self._recomputer is not None:
            self._begin_step(step, args[1] if len(args) > 1 else kwargs.get("batch_idx", 0))
        if not self._fast_path:
            with seeded_step(self._run_seed, step, self.global_rank, micro, [self.root_device]):
                return super().training_step(*args, **kwargs)
        assert self._record is not None and self._recomputer is not None and self._validating is not None
        try:
            batch = self._recomputer.batch(self.lightning_module, self._record.step, self._validating, micro)
            with self._recomputer.seeded(self._record.step, self._validating, micro):
                return super().training_step(batch, self._record.batch_idx + micro)
        except BaseException:
            self._recomputer.restore(self._params())
            raise

    def _begin_step(self, step: int, batch_idx: int) -> None:
        """Keep ``x_step``; if this peer validates in this step, note its target.

        Without gradient accumulation the validator's step *is* the recomputation (its ``training_step`` runs
        on the target's batch with ``x_{step-1}`` loaded, and the parameters are restored in the same optimizer
        closure); with accumulation the parameters would stay swapped across Lightning's hooks between
        micro-batches, so the validator computes its own gradient and recomputes the target's after it."""
        assert self._recomputer is not None
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.accumulate_grad_batches != self._recomputer.accumulate:
            raise UserError(
                f"accumulate_grad_batches changed during training ({self._recomputer.accumulate} -> "
                f"{trainer.accumulate_grad_batches}): verified training needs a fixed accumulation (or validators=0)"
            )
        params = self._params()
        self._recomputer.snapshot(step, params)
        self._batch_idx = int(batch_idx)
        self._validating, self._fast_path = None, False
        record = self._previous_record(step)
        if record is not None and self._recomputer.has(record.step):
            mine = [a.target for a in record.assignments if a.validator == self.global_rank]
            if mine:
                self._validating = mine[0]
                self._fast_path = self._recomputer.accumulate == 1
                if self._fast_path:
                    self._recomputer.load(record.step, params)

    def _params(self) -> list[torch.nn.Parameter]:
        return trainable_params(self.optimizers[0].param_groups)

    def _previous_record(self, step: int) -> Optional[StepRecord]:
        """The record of step ``step - 1``, which ``step``'s validators check (none after a skipped step or a resume)."""
        return self._record if self._record is not None and self._record.step == step - 1 else None

    def _validators_now(self, step: int) -> set[int]:
        """The peers that validate (and contribute weight 0) in ``step``: public, from the previous step's seed."""
        if step == self._unvalidated_step:
            return set(self._stand_ins)
        record = self._previous_record(step)
        return {a.validator for a in record.assignments} if record is not None else set()

    def _resolve_validations(self, flat: Tensor, ctx: AttackContext, behaviour: Behaviour) -> None:
        """Publish this validator's verdict and judge every accusation (by recomputing); apply the bans."""
        assert self.transport is not None and self.membership is not None and self._recomputer is not None
        record = self._previous_record(ctx.step)
        self._validation_metrics = {}
        started = time.perf_counter()
        if record is None or not record.assignments:
            return
        module, params = self.lightning_module, self._params()
        assert module is not None

        def recompute(peer: int) -> Tensor:
            return self._recomputer.gradient(  # type: ignore[union-attr]
                module, params, record.step, peer, record.batch_idx, self.precision_plugin.train_step_context,
                micro_batches=record.micro_batches, scale=record.grad_scale,
                out=self._buffers.get("recomputed", (flat.numel(),), torch.float32, flat.device),
            )

        def recompute_accused(peer: int) -> Tensor:
            log.warning("BTARD: step %d: recomputing peer %d's gradient of step %d (accused by its validator)", ctx.step, peer, record.step)
            return recompute(peer)

        claims: list[int] = []
        if self._validating is not None:
            # on the fast path (no accumulation) this step's gradient is the recomputation
            mine = flat if self._fast_path else recompute(self._validating)
            agrees = self.validation_check.agrees(record, self._validating, mine) if all_finite(mine) else True
            claims = behaviour.validation_claims(ctx.step, self._validating, agrees)
            self._validation_metrics["validation_agreed"] = float(agrees)

        bans = resolve_validations(
            self.transport, self.membership.active, claims, record, recompute_accused, self.validation_check, ctx.step
        )
        self._validation_metrics["validations"] = float(len(record.assignments))
        self._validation_metrics["time_validation"] = time.perf_counter() - started
        self._validation_metrics["validation_bans"] = float(len(bans))
        if bans:
            self._apply_bans(bans)

    def _apply_bans(self, bans: list[Ban]) -> None:
        """Record bans; a banned peer leaves, the others continue in a group of the remaining peers."""
        assert self.membership is not None
        for ban in bans:
            if self.membership.ban(ban.peer, ban.step, ban.reason, ban.evidence):
                log.warning("BTARD: banned peer %d at step %d: %s (%s)", ban.peer, ban.step, ban.reason, ban.evidence)
        if self.global_rank in self.membership.banned:
            self._leave()
            if self._left:
                return
        self._rebuild_transport()
        self._setup_attacks(self.lightning_module.trainer if self.lightning_module is not None else None)

    # ----------------------------------------------------------------- the aggregation
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
        assert self.transport is not None
        start = time.perf_counter()
        self._step_micro, self._micro = max(self._micro, 1), 0
        params = trainable_params(optimizer.param_groups)
        numel = sum(p.numel() for p in params)
        flat = flatten_grads(params, out=self._buffers.get("flat", (numel,), torch.float32, self.root_device))
        if self._recomputer is not None:
            self._recomputer.restore(params)  # a fast-path recomputation ran on x_{t-1}; this step updates x_t
        scale = self._grad_scale()
        if scale is not None:
            flat.div_(scale)
        elif self.verify and not all_finite(flat):
            self._diverged()
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        ctx = AttackContext(
            step=trainer.global_step if trainer is not None else 0,
            rank=self.global_rank,
            world_size=self.transport.world_size,
            trainer=trainer,
            pl_module=self.lightning_module,
        )
        sent = flat
        for attack in self._attacks(trainer):
            sent = attack.on_before_aggregate(sent, ctx)
        aggregate = self._with_regroup(ctx.step, lambda: self._aggregate_once(sent, ctx, flat, scale))
        if aggregate is None:
            # fp16 overflow somewhere: every peer skips this step together (the scaler sees inf and backs off)
            assign_grads(params, torch.full_like(flat, float("inf")))
            self._round_metrics = {}  # nothing was aggregated: log nothing for this step
            return
        if scale is not None:
            aggregate.mul_(scale)
        assign_grads(params, aggregate)
        self._round_seconds = time.perf_counter() - start

    def _aggregate_once(self, sent: Tensor, ctx: AttackContext, flat: Tensor, scale: Optional[float]) -> Optional[Tensor]:
        """This step's collectives, once: the fp16 overflow vote (``None``: every peer skips the step), the
        (verified) aggregation, the attack counts."""
        assert self.transport is not None
        if self._left:  # banned, finishing fit() without the others: no more collectives
            return sent
        if scale is not None and self._any_peer_overflowed(flat):
            return None
        if self.verify:
            aggregate = self._verified_aggregate(sent, ctx, flat)
        else:
            # on hivemind a failed try is retried after regrouping: keep the gradient, aggregate elsewhere
            out = flat if self.backend != "hivemind" else self._buffers.get("aggregate", (flat.numel(),), flat.dtype, flat.device)
            aggregate, stats = butterfly_aggregate(sent, self.transport, self.aggregator, out=out)
            self._round_metrics = _butterfly_metrics(stats)
        self._attack_counts = self._count_attackers(ctx.trainer, ctx.step)
        return aggregate

    # ----------------------------------------------------------------- peers joining a running group (hivemind)
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """A joining peer learns the group's state in ``setup`` (after its data and model are ready): Lightning restores
        it after that, as from a checkpoint file."""
        return self._joining

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if self._joined_state is not None:
            rank_zero_warn(f"BTARD: this peer joined a running group and takes its state; ckpt_path={checkpoint_path} is not loaded")
            return self._joined_state
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def _join_running_group(self, trainer: "pl.Trainer") -> None:
        """Ask the running group to admit this peer; take the group, keys and seed from the admission a majority of
        members wrote, and their training state from one of them, checked against the digest they published."""
        from hivemind.p2p import PeerID

        from lightning_btard.transports.hivemind_admission import ask_to_join, download_agreed_state, wait_for_admission

        if trainer.state.fn != TrainerFn.FITTING:
            raise UserError(f"run {self._hivemind['run_id']!r} is running: a peer can only join it to train (`btard fit`)")
        assert self._identity is not None and self.cluster_environment is not None
        node, run_id = self._node, self._hivemind["run_id"]
        nonce = ask_to_join(node, run_id, self._identity.public, wait=self._hivemind["rendezvous_timeout"])
        print(f"BTARD hivemind: asked run {run_id!r} to admit this peer (its members admit joiners every "
              f"join_every={self.join_every} steps of theirs)", flush=True)
        record = wait_for_admission(node, run_id, nonce, self._hivemind["rendezvous_timeout"])
        self._hivemind_members = [PeerID.from_base58(p) for p in record["peers"]]
        membership = Membership(peers=list(range(len(self._hivemind_members))), generation=int(record["generation"]))
        membership.bans = [Ban(int(p), int(t), str(reason), str(evidence)) for p, t, reason, evidence in record["bans"]]
        membership.departed = {int(p): int(t) for p, t in record["departed"]}
        self.membership, self._keys, self._run_seed = membership, list(record["keys"]), int(record["seed"])
        self._admitted_nonces = list(record["admitted"])
        me, step, active = int(record["id"]), int(record["step"]), membership.active
        self._rebuild_transport()  # the group's transport, as its members derive it
        self.cluster_environment.set_world_size(len(self._hivemind_members))
        self.cluster_environment.set_global_rank(me)
        rank_zero_only.rank = utils_rank_zero_only.rank = me
        def agreed(checkpoint: dict[str, Any]) -> bool:
            return checkpoint.get("global_step") == step and self._state_digest(checkpoint) == record["digest"]

        others = [m for m in self.transport.members if m != node.peer_id]
        self._joined_state, source = download_agreed_state(node, others, step, agreed, self._timeout.total_seconds())
        trainer._checkpoint_connector._loaded_checkpoint = self._joined_state  # Lightning restores it after setup
        self._catching_up = True
        self._mark_running(step)  # a member now: later peers find the run through it too
        print(f"BTARD hivemind: joined run {run_id!r} at step {step} as peer {me}; {len(active)} peers {active}; "
              f"state from {source}, its digest the one the members published", flush=True)

    def _state_digest(self, checkpoint: dict[str, Any]) -> bytes:
        """The digest of what every member in sync holds identically (``hivemind_state.shared_state_digest``)."""
        from lightning_btard.transports.hivemind_state import shared_state_digest

        names = [n for n, _ in self.lightning_module.named_parameters()]  # type: ignore[union-attr]
        return shared_state_digest(checkpoint, names, type(self.precision_plugin).__qualname__)

    def _mark_running(self, step: int) -> None:
        """Mark the run as running in the DHT (peers starting later ask to join); refreshed now and then."""
        from lightning_btard.transports.hivemind_admission import announce_running

        announce_running(self._node, self._hivemind["run_id"], step)
        self._running_announced = time.monotonic()

    def on_train_start(self) -> None:
        self._joined_state = None  # restored by now: free it

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """At a step boundary every ``join_every`` steps, the members admit the peers that asked to join."""
        if self._catching_up:  # a joiner's first batch: the members admitted it at this very point
            self._catching_up = False
            return
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self._node is None or not self.join_every or trainer is None:
            return
        step = trainer.global_step
        if step % self.join_every or batch_idx % trainer.accumulate_grad_batches or step == self._joins_checked_at:
            return
        self._joins_checked_at = step
        self._tolerant(lambda: self._admit_joiners(trainer, step), lambda: None)

    def _admit_joiners(self, trainer: "pl.Trainer", step: int) -> None:
        """One board collective: admit the join requests a majority of members saw, refuse banned peers, offer the
        state, write the admission records, continue in the larger group (``transports/hivemind_admission.py``)."""
        from lightning_btard.transports.hivemind import encode_record
        from lightning_btard.transports.hivemind_admission import agree_on_joiners, publish_admission, publish_refusal
        from lightning_btard.transports.hivemind_state import to_plain

        assert self.membership is not None and self.transport is not None
        node, run_id, timeout = self._node, self._hivemind["run_id"], self._timeout.total_seconds()
        if time.monotonic() - self._running_announced > 600:
            self._mark_running(step)
        node.states.withdraw()  # the previous admission's offer: its joiners have it by now, or have gone
        group = list(self.transport.members)
        bans = {self._hivemind_members[b.peer]: b for b in self.membership.bans}
        admitted, refused = agree_on_joiners(self.transport, run_id, group, bans, self._admitted_nonces)
        for peer in refused:
            ban = bans[peer]
            publish_refusal(node, run_id, peer, group, f"banned at step {ban.step} as peer {ban.peer} ({ban.evidence})", timeout)
            log.warning("BTARD: step %d: refused banned peer %d (%s), which asked to join again", step, ban.peer, peer)
        if not admitted:
            return
        checkpoint = _between_batches(trainer._checkpoint_connector.dump_checkpoint(weights_only=False))
        try:
            data = encode_record(to_plain(checkpoint))
        except (TypeError, ValueError, RuntimeError) as e:  # the same on every member: all refuse alike
            rank_zero_warn(f"BTARD: the training state cannot be sent to joining peers, who are refused: {e}")
            for request in admitted:
                publish_refusal(node, run_id, request.peer, group, f"the run's state cannot be sent: {e}", timeout)
            return
        digest = self._state_digest(checkpoint)
        node.states.offer(step, data)
        # the records first: if writing them fails (a TransportError: regroup), the group is still the old one
        first, generation = len(self.membership.peers), self.membership.generation + 1
        ids = list(range(first, first + len(admitted)))
        peers = self._hivemind_members + [r.peer for r in admitted]
        keys = self._keys + [r.key for r in admitted] if self.verify else []
        record = {
            "step": step, "group": [m.to_base58() for m in group], "peers": [m.to_base58() for m in peers],
            "keys": keys, "seed": self._run_seed, "generation": generation,
            "bans": [[b.peer, b.step, b.reason, b.evidence] for b in self.membership.bans],
            "departed": [[p, t] for p, t in self.membership.departed.items()], "digest": digest,
            "admitted": self._admitted_nonces + [r.nonce for r in admitted],
        }
        for request, peer in zip(admitted, ids):
            publish_admission(node, run_id, request, {**record, "id": peer}, timeout)
        self.membership.admit(len(admitted))  # ids and generation as in the records
        self._hivemind_members, self._keys = peers, keys
        self._admitted_nonces += [r.nonce for r in admitted]
        self._record = None  # the previous step's validation spanned the old group: it is not resolved in the new one
        self._rebuild_transport()
        self._setup_attacks(trainer)
        print(f"BTARD: step {step}: admitted peer(s) {ids} ({', '.join(str(r.peer) for r in admitted)}); continuing with "
              f"{self.transport.world_size} peers {self.membership.active}", flush=True)

    # ----------------------------------------------------------------- peers that stop answering (hivemind)
    def _with_regroup(self, step: int, attempt: Callable[[], Any]) -> Any:
        """``attempt()``; on the hivemind backend, a collective that fails (a peer stopped answering) is followed by
        a regroup among the peers still there, and the attempt is made again in the new group."""
        while True:
            if self._broken is not None:
                self._regroup(step)
            try:
                return attempt()
            except TransportError as err:
                if self.backend != "hivemind":
                    raise
                log.warning("BTARD: step %d: a collective failed: %s", step, err)
                self._broken = err

    def _tolerant(self, attempt: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        """A collective outside the aggregation (logging, barriers, broadcasts): after a failure on the hivemind
        backend, this peer stops calling collectives (``fallback()``) until the next aggregation regroups."""
        if self._broken is not None or self._left or self._catching_up:
            return fallback()
        try:
            return attempt()
        except TransportError as err:
            if self.backend != "hivemind":
                raise
            log.warning("BTARD: a collective failed (%s); regrouping at the next aggregation", err)
            self._broken = err
            return fallback()

    def _regroup(self, step: int) -> None:
        """Continue with the peers still answering (``transports/hivemind_regroup.py``); the others leave the run."""
        from lightning_btard.transports.hivemind import HivemindTransport
        from lightning_btard.transports.hivemind_regroup import Alone, regroup

        assert self.membership is not None and isinstance(self.transport, HivemindTransport)
        failure, self._broken = self._broken, None
        old, active = self.transport, self.membership.active
        stand_in = bool(self._fast_path and self._validating is not None)  # my gradient is a recomputation

        def at_my_step(state: Any) -> bool:  # a malformed announcement, or one from another step, is left out
            return isinstance(state, tuple) and len(state) == 2 and state[0] == int(step) and isinstance(state[1], bool)

        try:
            result = regroup(old, (int(step), stand_in), window=self._timeout.total_seconds(), accept=at_my_step)
        except Alone as err:
            raise RuntimeError(f"BTARD: step {step}: {err} (the failure: {failure})") from err
        if result.refused and 2 * len(result.members) <= len(result.members) + len(result.refused):
            # peers that answered from another step are as many as this group: neither side may claim to be the run
            raise RuntimeError(
                f"BTARD: step {step}: after a failed collective, {len(result.members)} peers answered at this step and "
                f"{len(result.refused)} at another step or malformed, so no group holds a majority. Restart the peers "
                "that stopped here: while the run is marked as running they ask to join it and download its state"
            )
        gone = [p for i, p in enumerate(active) if i not in result.members]
        for peer in gone:
            self.membership.depart(peer, step)
        old.close()
        self.transport = result.transport
        # the previous step's validation spanned the old group, and this step's gradients go unvalidated: a peer on
        # the validators' fast path holds a recomputation, not its own gradient (it contributes weight 0)
        self._record = None
        self._unvalidated_step = step
        self._stand_ins = {active[i] for i, state in result.states.items() if state[1]}
        self._setup_attacks(self.lightning_module.trainer if self.lightning_module is not None else None)
        what = f"peer(s) {gone} stopped answering (crashed or disconnected)" if gone else "a collective failed, nobody left"
        print(f"BTARD: step {step}: {what}; continuing with {self.transport.world_size} peers {self.membership.active}", flush=True)

    def _diverged(self) -> None:
        """Stop with what went wrong: a non-finite part would get this peer banned as malformed, and averaging it
        in (as DDP would) poisons the model of every peer."""
        module = self.lightning_module
        names = [n for n, p in module.named_parameters() if p.grad is not None and not all_finite(p.grad)] if module else []
        step = module.trainer.global_step if module is not None and module._trainer is not None else "?"
        raise TrainingDiverged(
            f"BTARD: peer {self.global_rank}'s own gradient at step {step} is not finite (NaN or Inf in "
            f"{', '.join(names[:5]) + (' ...' if len(names) > 5 else '') or 'the gradients'}): the model diverged. An honest "
            "peer does not send it (the others would ban it as a malformed part). Lower the learning rate, clip "
            "gradients (Trainer(gradient_clip_val=...)), or train in 16-mixed precision, whose loss scaler skips such steps."
        )

    def _verified_aggregate(self, sent: Tensor, ctx: AttackContext, computed: Tensor) -> Tensor:
        """Validation of the previous step, then verified rounds among the active peers until one completes
        (banned peers are dropped between tries). ``computed`` is this peer's flat gradient (a validator's
        recomputation of its target's, on the fast path)."""
        assert self.transport is not None and self.membership is not None and self._identity is not None
        behaviour = self._behaviour(ctx)
        if self._recomputer is not None:
            self._resolve_validations(computed, ctx, behaviour)
            if self._left:
                return sent
        validating = self._validators_now(ctx.step)
        retries = 0
        while True:
            active = self.membership.active
            weights = [0.0 if p in validating else 1.0 for p in active]
            if not any(weights):
                weights = [1.0] * len(active)
            outcome = verified_round(
                sent, self.transport, self._identity, [self._keys[p] for p in active], active, ctx.step,
                self.round_config, behaviour, weights, out=self._buffers.get("aggregate", (sent.numel(),), torch.float32, sent.device),
            )
            # the limit on unprovable claims between two peers: past it both are banned (the round itself stands)
            limited = [b for c, a in outcome.refuted for b in self.membership.count_refuted_claim(c, a, ctx.step)]
            if outcome.aggregate is not None:
                if limited:
                    self._apply_bans(limited)
                self._round_metrics = {
                    "clipped": outcome.stats.get("clipped", 0.0),
                    "cc_iterations": outcome.stats.get("iterations", 0.0),
                    **{k: v for k, v in outcome.stats.items() if k.startswith("time_")},
                    "retries": float(retries),
                    "peers": float(len(active)),
                    "banned": float(len(self.membership.bans)),
                    **self._validation_metrics,
                }
                self._remember(ctx.step, active, weights, outcome)
                return outcome.aggregate.to(sent.device)
            retries += 1
            self._apply_bans(outcome.bans + limited)
            if self._left:
                return sent

    def _remember(self, step: int, active: list[int], weights: list[float], outcome: Any) -> None:
        """What the next step's validators check: this round's published projections and the next validators."""
        if self._recomputer is None or step == self._unvalidated_step:
            return
        contributors = [p for p, w in zip(active, weights) if w > 0]
        record = StepRecord(
            step=step,
            peers=list(active),
            sizes=list(outcome.sizes),
            seed=outcome.seed,
            projections={p: [list(nums[2]) for nums in outcome.numbers[i]] for i, p in enumerate(active)},
            contributors=contributors,
            batch_idx=self._batch_idx,
            directions=self.round_config.directions,
            micro_batches=self._step_micro,
            grad_scale=self._grad_scale(),
            direction_cache=list(outcome.directions),
        )
        record.assignments = assign_validators(outcome.seed, active, self.validators, contributors)
        self._record = record

    def _behaviour(self, ctx: AttackContext) -> Behaviour:
        """This peer's conduct in the round: honest, unless a protocol attack callback scripts it."""
        for attack in self._attacks(ctx.trainer):
            scripted = attack.behaviour(ctx)
            if scripted is not None:
                return scripted
        return Behaviour()

    def _rebuild_transport(self) -> None:
        """A private process group of the remaining peers (only they call this: no stall on the banned)."""
        assert self.membership is not None
        active = self.membership.active
        if self.backend == "hivemind":
            from lightning_btard.transports.hivemind import HivemindTransport
            from lightning_btard.transports.hivemind_rendezvous import session_of

            members = [self._hivemind_members[p] for p in active]
            old = self.transport
            self.transport = HivemindTransport(
                self._node, members, session_of(self._hivemind["run_id"], members, "group", self.membership.generation),
                timeout=self._timeout.total_seconds(),
            )
            if old is not None:
                old.close()  # type: ignore[attr-defined]
            return
        group = dist.new_group(ranks=active, backend=self.process_group_backend, use_local_synchronization=True)
        self.transport = TorchDistributedTransport(group=group, ranks=active)
        # torchmetrics metrics sync over the default group (which holds the departed peer) unless told otherwise
        import torchmetrics

        for module in self.lightning_module.modules() if self.lightning_module is not None else []:
            if isinstance(module, torchmetrics.Metric):
                module.process_group = group

    def on_train_end(self) -> None:
        """Print the ban list at the end of the run (it is also in ``strategy.bans`` and in the logs)."""
        super().on_train_end()
        if self.verify and self.membership is not None:
            bans = self.membership.bans
            lines = [f"BTARD: {len(bans)} peer(s) banned during the run" + (":" if bans else ".")]
            lines += [f"  step {b.step:>6}  peer {b.peer:>3}  {b.reason} [{b.evidence}]" for b in bans]
            rank_zero_info("\n".join(lines))

    def _leave(self) -> None:
        """A banned peer stops here, with exit code 0 (the popen launcher kills every process on a non-zero exit)."""
        assert self.membership is not None
        ban = next(b for b in self.membership.bans if b.peer == self.global_rank)
        print(
            f"BTARD: this peer (rank {self.global_rank}) was banned at step {ban.step}: {ban.reason} "
            f"[{ban.evidence}]. Leaving the training.",
            flush=True,
        )
        self._mark_left()
        if self.global_rank == 0 and isinstance(self._launcher, _MultiProcessingLauncher):
            # the launching process waits for rank 0's result: rank 0 ends fit() here (no more collectives), and
            # hosts the store in teardown until the others have finished
            self._left = True
            if self.lightning_module is not None:
                self.lightning_module.trainer.should_stop = True
            return
        self._host_the_store_until_the_others_leave()
        sys.stdout.flush()
        sys.stderr.flush()
        self._announce_finished()
        self._shutdown_node()
        os._exit(0)

    def _mark_left(self) -> None:
        """Tell the process group's store that this peer is done with it (torch backend)."""
        if self.backend == "torch" and dist.is_initialized():
            try:
                dist.distributed_c10d._get_default_store().set(f"btard/left/{self.global_rank}", "1")
            except Exception as e:  # noqa: BLE001 - the host may be gone already; nothing to tell then
                log.debug("BTARD: could not mark rank %d as left: %s", self.global_rank, e)

    def _host_the_store_until_the_others_leave(self) -> None:
        """Rank 0 serves torch.distributed's TCPStore, which the others need to form each new group after a ban:
        a banned rank 0 keeps its process (idle) until every other peer has finished or left."""
        if self.backend != "torch" or self.global_rank != 0 or not dist.is_initialized():
            return
        print("BTARD: rank 0 hosts the process group's store; it stays until the other peers have finished.", flush=True)
        keys = [f"btard/left/{r}" for r in range(1, self.world_size)]
        try:
            dist.distributed_c10d._get_default_store().wait(keys, self._timeout)
        except Exception as e:  # noqa: BLE001 - a peer that crashed never says so: leave after the timeout
            log.warning("BTARD: not every peer finished within the timeout (%s); rank 0 leaves now", e)

    def _announce_finished(self) -> None:
        """A member leaving at the end tells peers still asking to join that its part of the run is over."""
        if self._node is None or self._joining and self.membership is None:
            return
        from lightning_btard.transports.hivemind_admission import announce_finished

        step = self.lightning_module.trainer.global_step if self.lightning_module is not None and self.lightning_module._trainer else 0
        try:
            announce_finished(self._node, self._hivemind["run_id"], step)
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            log.warning("BTARD: could not mark the run as finished in the DHT (%s)", e)

    def _shutdown_node(self) -> None:
        if self._node is not None:
            self._node.shutdown()
            self._node = None

    def teardown(self) -> None:
        """Leave the swarm after the others have finished their last collective (their records stay readable)."""
        self._mark_left()
        if self._left:  # a banned rank 0 that ended fit() early (fork/spawn launchers); the others still need the store
            self._host_the_store_until_the_others_leave()
        if self._node is not None and self.transport is not None and self._broken is None and not self._left:
            self.transport.timeout = min(self.transport.timeout, 60.0)  # type: ignore[attr-defined]
            try:
                self.transport.barrier()
            except Exception as e:  # noqa: BLE001 - a peer gone at the end changes nothing for this one
                log.warning("BTARD: final barrier failed (%s); leaving anyway", e)
        self._announce_finished()
        self._shutdown_node()
        super().teardown()

    @property
    def departed(self) -> dict[int, int]:
        """Peers that stopped answering (hivemind backend), with the step: out of the run, not banned."""
        return dict(self.membership.departed) if self.membership is not None else {}

    @property
    def bans(self) -> list[Ban]:
        """Every ban so far (peer = rank, step, reason, evidence kind), the same on every honest peer."""
        return list(self.membership.bans) if self.membership is not None else []

    def _count_attackers(self, trainer: Optional["pl.Trainer"], step: int) -> dict[str, float]:
        """How many peers fired each attack at ``step`` (one small collective; every peer runs the same callbacks)."""
        attacks = self._attacks(trainer)
        if not attacks or self._left:
            return {}
        assert self.transport is not None
        mine = torch.tensor([float(a.fired_at(step)) for a in attacks], device=self.root_device)
        counts = self.transport.all_reduce(mine, "sum").tolist()
        return {f"attack/{a.name}": c for a, c in zip(attacks, counts)}

    def _grad_scale(self) -> Optional[float]:
        scaler = getattr(self.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

    def _any_peer_overflowed(self, flat: Tensor) -> bool:
        assert self.transport is not None
        mine = torch.tensor([0.0 if all_finite(flat) else 1.0], device=flat.device)
        return bool(self.transport.all_reduce(mine, "max").item() > 0)

    def _log_round(self) -> None:
        module = self.lightning_module
        if module is None or not self._round_metrics or module._current_fx_name is None:
            return
        metrics = {f"btard/{k}": v for k, v in self._round_metrics.items()}
        metrics["btard/time_aggregation"] = self._round_seconds
        metrics.update(self._attack_counts)
        module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        module.log("btard/clipped_bar", metrics["btard/clipped"], prog_bar=True, on_step=True, on_epoch=False, batch_size=1, logger=False)
        if module.trainer.global_step % self.check_params_every == 0:
            module.log("btard/params_in_sync", float(self.check_parameters_identical()), on_step=True, on_epoch=False, batch_size=1)

    def check_parameters_identical(self) -> bool:
        """Compare a digest of the parameters across peers; raise on this peer if it disagrees with the majority."""
        assert self.transport is not None and self.lightning_module is not None
        digest = hashlib.blake2b(digest_size=16)
        for p in self.lightning_module.parameters():
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        digests = self._tolerant(lambda: self.transport.all_gather_object(digest.hexdigest()), lambda: None)  # type: ignore[union-attr]
        if digests is None:
            return True  # a peer stopped answering: nothing compared this time
        majority = max(set(digests), key=digests.count)
        differing = [r for r, d in enumerate(digests) if d != majority]
        if differing:
            log.warning("BTARD: parameters differ across peers at step %s: peers %s", self.lightning_module.trainer.global_step, differing)
            if digests[self.transport.rank] != majority:
                raise RuntimeError(
                    f"BTARD: this peer's parameters differ from the majority's (peers out of sync: {differing}). "
                    "Every peer must apply the same aggregate with the same optimizer: check for non-deterministic "
                    "optimizer code or per-rank parameter changes outside the optimizer."
                )
        return not differing

    # ----------------------------------------------------------------- collectives Lightning uses
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Union[str, Any]] = "mean") -> Any:
        """Sum/mean/max/min of a logged tensor over peers (``self.log(sync_dist=True)``)."""
        if not isinstance(tensor, Tensor) or self.transport is None:
            return tensor
        op = str(reduce_op).lower().split(".")[-1] if reduce_op is not None else "mean"
        op = {"avg": "mean", "average": "mean"}.get(op, op)
        if op not in ("sum", "mean", "max", "min"):
            raise ValueError(f"BTARDStrategy.reduce does not support reduce_op={reduce_op!r}")
        transport = self.transport

        def reduce_over_peers() -> Tensor:
            out = transport.all_reduce(tensor.float() if op == "mean" else tensor, "sum" if op == "mean" else op)
            return out / transport.world_size if op == "mean" else out

        return self._tolerant(reduce_over_peers, lambda: tensor)

    def _connected(self) -> bool:
        return self.transport is not None and (self._node is not None or dist.is_initialized())

    def barrier(self, name: Optional[str] = None) -> None:
        if self._connected():
            self._tolerant(self.transport.barrier, lambda: None)  # type: ignore[union-attr]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self._connected():
            return obj
        return self._tolerant(lambda: self.transport.broadcast_object(obj, src), lambda: obj)  # type: ignore[union-attr]

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("btard", cls, description="BTARD-SGD: ButterflyClip aggregation (popen launcher)")
        strategy_registry.register(
            "btard_spawn", cls, description="BTARD-SGD: ButterflyClip aggregation (spawn launcher)", start_method="spawn"
        )


def _between_batches(checkpoint: dict[str, Any]) -> dict[str, Any]:
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


def _butterfly_metrics(stats: ButterflyStats) -> dict[str, float]:
    summary = stats.summary()
    return {
        "clipped": summary["clipped"],
        "cc_iterations": summary["iterations"],
        "cc_residual": summary["residual"],
        "malformed": summary["malformed"],
        "time_scatter": summary["time_scatter"],
        "time_aggregate": summary["time_aggregate"],
        "time_gather": summary["time_gather"],
        "mbytes_sent": stats.bytes_sent / 2**20,
    }


BTARDStrategy.register_strategies(StrategyRegistry)
