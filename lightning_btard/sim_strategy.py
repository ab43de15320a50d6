"""BTARDSimStrategy (``strategy="btard_sim"``): N BTARD peers simulated in one process, on one device.

For research on attacks and defences at the paper's scale (16 peers) on one GPU or a laptop. Each optimizer step:

1. every active peer's gradient is computed in turn on the one module: peer ``i``'s verifiable batch (the batch it
   draws in an N-process run), its step seed, its own BatchNorm buffers, its attack callbacks' data hooks; a validator
   computes its target's previous gradient instead, from the kept parameters, as on a validator's fast path;
2. every peer runs its attack callbacks and its :class:`~lightning_btard.protocol.engine.PeerEngine` step in a thread
   of its own, over an in-process group: the same butterfly parts, CenteredClip, verification, validation, accusations
   and bans as N processes (``simulated_peers.py``);
3. the honest peers' aggregates (all equal, or the step fails) become the gradient of the one optimizer step.

The parameters after each step are those of an N-process ``BTARDStrategy`` run with the same seed, configuration and
attacks (``tests/lightning/test_sim_strategy.py`` compares them), when that run draws verifiable batches (``verify``
or a ``data_split``; here they always are). Metrics are logged as rank 0 of such a run would log them; the module's
``self.log(..., on_epoch=True)`` values average over every peer's batches. The module's buffers between steps (what
validation uses and a checkpoint keeps) are the *reporter's*: the first active peer that no attack names (rank 0 of the
N-process run, unless rank 0 attacks); validation runs once, on the whole validation set.

Limits: automatic optimization, no gradient accumulation, no fp16 loss scaling (``bf16-mixed`` and ``32-true`` work);
a module's ``on_before_batch_transfer``/``transfer_batch_to_device`` hooks see one peer's batch, except that Lightning
first calls ``on_before_batch_transfer`` with the whole :class:`~lightning_btard.simulated_peers.PeerBatches`.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_btard import compat
from lightning_btard.attacks.base import AttackContext
from lightning_btard.attacks.roster import attacks_of, behaviour_of, count_fired, give_colluders_a_channel
from lightning_btard.data_splits import DataSplit, dataset_labels
from lightning_btard.errors import UserError
from lightning_btard.event_sinks import attach_run_sinks
from lightning_btard.groups.in_process import InProcessGroup, InProcessRegistry
from lightning_btard.lightning_package import (
    CheckpointIO,
    Precision,
    SingleDeviceStrategy,
    StrategyRegistry,
    TrainerFn,
    pl,
    rank_zero_info,
)
from lightning_btard.ops.partition import assign_grads, flatten_grads, trainable_params
from lightning_btard.ops.workspace import Workspace
from lightning_btard.protocol.engine import PeerEngine
from lightning_btard.protocol.events import EventLog
from lightning_btard.protocol.identity import Identity
from lightning_btard.protocol.membership import Ban, Membership
from lightning_btard.protocol.mprng import agree_run_seed
from lightning_btard.protocol.validation import StepRecord, ValidationCheck
from lightning_btard.recomputation import Recomputer, TrainingData
from lightning_btard.round_logging import ban_summary, log_round
from lightning_btard.simulated_peers import (
    PeerBatches,
    PeerThreads,
    PeerView,
    ReporterOnly,
    SimulatedPeer,
    peer_batches_loader,
)
from lightning_btard.strategy import round_aggregator, verified
from lightning_btard.transports.in_process import InProcessHub
from lightning_btard.verifiable_batches import seeded_step

__all__ = ["BTARDSimStrategy"]


class BTARDSimStrategy(SingleDeviceStrategy):
    """``num_peers`` BTARD peers simulated in this process, on one device (see the module doc).

    Args:
        num_peers: how many peers to simulate (the Trainer's ``devices`` must be 1).
        tau, aggregator, aggregator_options, eps, max_iters, verify, validators, validation_rtol, directions,
            topology, data_split, check_params_every: as :class:`~lightning_btard.strategy.BTARDStrategy`'s.
        timeout: seconds a simulated peer waits for the others in a collective (a bug, never the network, here).
        device: the one device (set by the Trainer's ``accelerator``/``devices``).
    """

    strategy_name = "btard_sim"

    def __init__(
        self,
        num_peers: int = 4,
        tau: float = 1.0,
        aggregator: Union[str, Callable[..., Any]] = "centered_clip",
        aggregator_options: Optional[dict[str, Any]] = None,
        eps: float = 0.0,
        max_iters: int = 500,
        verify: Optional[bool] = None,
        validators: int = 1,
        validation_rtol: float = 1e-3,
        directions: int = 2,
        topology: Literal["butterfly", "server"] = "butterfly",
        data_split: Union[str, dict[str, Any], None] = None,
        check_params_every: int = 100,
        timeout: Union[float, timedelta] = 1800.0,
        device: Union[str, torch.device] = "cpu",
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
    ) -> None:
        super().__init__(device=device, accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin)
        if int(num_peers) < 1:
            raise UserError(f"btard_sim needs num_peers >= 1, got {num_peers}")
        if validators < 0:
            raise UserError(f"validators must be >= 0, got {validators}")
        if check_params_every < 1:
            raise UserError(f"check_params_every must be >= 1, got {check_params_every}")
        self.num_peers = int(num_peers)
        self.tau = float(tau)
        self.verify = verified(aggregator, topology, verify)
        self._aggregator_spec = (aggregator, aggregator_options, {"tau": self.tau, "eps": eps, "max_iters": max_iters})
        self.aggregator = round_aggregator(aggregator, aggregator_options, self.verify, tau=self.tau, eps=eps, max_iters=max_iters)
        self.topology = topology
        self.data_split = DataSplit.of(data_split)
        self.validators = int(validators) if self.verify else 0
        self.validation_check = ValidationCheck(rtol=float(validation_rtol))
        self.directions = int(directions)
        self.check_params_every = int(check_params_every)
        self._timeout = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        self.run_seed = 0
        self.peers: list[SimulatedPeer] = []
        self.events = EventLog()
        self._byzantine: set[int] = set()
        """Every rank an attack callback names (fixed at set-up)."""
        self._threads: Optional[PeerThreads] = None
        self._recomputer: Optional[Recomputer] = None
        self._current: Optional[SimulatedPeer] = None
        self._recomputed: dict[tuple[Any, ...], Tensor] = {}
        self._recompute_lock = threading.Lock()
        self._resume: Optional[dict[str, Any]] = None
        self._attack_counts: dict[str, float] = {}
        self._buffers = Workspace()
        self._devices: list[torch.device] = []
        self._batch_idx = 0
        self._log_filter = ReporterOnly()

    # ----------------------------------------------------------------- one device
    @property
    def parallel_devices(self) -> list[torch.device]:
        return self._devices

    @parallel_devices.setter
    def parallel_devices(self, devices: Optional[list[torch.device]]) -> None:
        """The Trainer's devices: one (the peers are simulated on it)."""
        if devices and len(devices) > 1:
            raise UserError(f"btard_sim simulates its peers on one device, but the Trainer has {len(devices)}: use devices=1 "
                            "(num_peers sets how many peers), or strategy='btard' for one process per device")
        self._devices = [torch.device(d) for d in devices or []]
        if self._devices:
            self._root_device = self._devices[0]

    # ----------------------------------------------------------------- who is who
    @property
    def reporter(self) -> Optional[SimulatedPeer]:
        """The peer whose view is logged and reported: the first active peer that no attack callback names (rank 0 of an
        N-process run, unless that one attacks)."""
        active = [p for p in self.peers if not p.left]
        return next((p for p in active if p.rank not in self._byzantine), active[0] if active else None)

    def reporter_rank(self) -> int:
        """The reporter at set-up: the first rank no attack names (0 if every rank attacks)."""
        return next((r for r in range(self.num_peers) if r not in self._byzantine), 0)

    @property
    def bans(self) -> list[Ban]:
        """Every ban so far (peer = simulated rank, step, reason, evidence kind), as the honest peers agree on them."""
        peer = self.reporter
        return list(peer.engine.membership.bans) if peer is not None else []

    # ----------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        module = self.lightning_module
        assert module is not None
        if not module.automatic_optimization:
            raise UserError("btard_sim computes every peer's gradient through the module's training_step in turn, which needs "
                            "automatic optimization: use strategy='btard' (one process per peer) for manual optimization")
        if trainer.accumulate_grad_batches != 1:
            raise UserError("btard_sim does not accumulate gradients (accumulate_grad_batches must be 1): raise the batch size, "
                            "or use strategy='btard'")
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            raise UserError("btard_sim does not support fp16 loss scaling (precision='16-mixed'): use 'bf16-mixed' or '32-true', "
                            "or strategy='btard'")
        self._make_peers(trainer)
        how = "verified" if self.verify else "UNVERIFIED (the verification protocol checks CenteredClip on a butterfly only)"
        rank_zero_info(f"BTARD (simulated): {self.num_peers} peers in this process, aggregator {self.aggregator!r}, {how}")

    def _make_peers(self, trainer: "pl.Trainer") -> None:
        n = self.num_peers
        hub = InProcessHub(n, self._timeout)
        self._threads = threads = PeerThreads(hub)
        registry = InProcessRegistry()
        identities = [Identity.generate() for _ in range(n)] if self.verify else [None] * n
        keys = [i.public for i in identities if i is not None]
        attacks = attacks_of(trainer)
        # the peers' own copies are the attacks; the callbacks themselves would see every peer's batches at once
        trainer.callbacks = [cb for cb in trainer.callbacks if cb not in attacks]
        self._byzantine = {r for a in attacks for r in a.byzantine}
        first = self.reporter_rank()  # whose events go to the run's files and loggers
        self.peers = []
        for rank in range(n):
            group = InProcessGroup(Membership(peers=list(range(n))), rank, hub, registry, window=self._timeout)
            peer_attacks = [copy.deepcopy(a) for a in attacks]
            engine = PeerEngine(
                group, round_aggregator(self._aggregator_spec[0], self._aggregator_spec[1], self.verify, **self._aggregator_spec[2]),
                verify=self.verify, identity=identities[rank], keys=keys, validators=self.validators,
                validation_check=self.validation_check, directions=self.directions, topology=self.topology,
                events=self.events if rank == first else EventLog(observer=rank),
            )
            self.peers.append(SimulatedPeer(rank, engine, peer_attacks))
        for peer in self.peers:
            peer.engine.on_group_change = self._channels_of(peer)
            peer.save_buffers(trainer.lightning_module)  # every peer starts from the module's buffers
        self.events.observer = first
        attach_run_sinks(self.events, trainer, 0)
        self._log_filter.install()
        seed = os.environ.get("PL_GLOBAL_SEED")
        seeds = threads.run(self.peers, lambda p: agree_run_seed(p.engine.transport, seed) if self.verify else 0)
        self.run_seed = seeds[0]
        threads.run(self.peers, lambda p: self._channels_of(p)())
        if self.validators:
            self._recomputer = Recomputer(self.run_seed, 1, [self.root_device])
        if self._resume is not None:
            self._load_peers(self._resume)
            self._resume = None

    def _channels_of(self, peer: SimulatedPeer) -> Callable[[], None]:
        def give() -> None:
            give_colluders_a_channel(peer.attacks, peer.engine.transport, peer.engine.membership.active)

        return give

    # ----------------------------------------------------------------- batches
    @override
    def process_dataloader(self, dataloader: object) -> object:
        """The training dataloader becomes one of :class:`PeerBatches`: every peer's verifiable batch of each step."""
        module = self.lightning_module
        if module is None or not module.trainer.training or not self.peers:
            return dataloader
        parts = None
        if self.data_split is not None:
            parts = self.data_split.parts(dataset_labels(dataloader.dataset), self.num_peers)  # type: ignore[attr-defined]
        trainer = module.trainer
        try:
            loader = peer_batches_loader(dataloader, self.run_seed, self.num_peers, lambda: trainer.global_step, parts)  # type: ignore[arg-type]
        except TypeError as err:
            raise UserError(str(err)) from err
        if self._recomputer is not None:
            self._recomputer.data = TrainingData(loader.dataset, loader.batch_sampler.samplers[0].batch_size,  # type: ignore[union-attr, arg-type]
                                                 loader.collate_fn.collate, parts)  # type: ignore[union-attr]
        return loader

    @override
    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        """Each peer's batch through the module's batch-transfer hooks, on its own."""
        if isinstance(batch, PeerBatches):
            return PeerBatches(super(BTARDSimStrategy, self).batch_to_device(b, device, dataloader_idx) for b in batch)
        return super().batch_to_device(batch, device, dataloader_idx)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The current peer's training step: its batch, its step seed, its attacks' data hooks; a validator's is its
        target's previous step (from the kept parameters, which :meth:`_gradients` loaded)."""
        peer, module = self._current, self.lightning_module
        batches = args[0] if args else kwargs.get("batch")
        if peer is None or module is None or not isinstance(batches, PeerBatches):
            return super().training_step(*args, **kwargs)
        batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
        self._batch_idx = int(batch_idx)
        trainer = module.trainer
        if peer.task is not None:
            record, target = peer.task.record, peer.task.target
            assert self._recomputer is not None
            batch = self._recomputer.batch(module, record.step, target, 0)
            with self._recomputer.seeded(record.step, target, 0):
                return super().training_step(batch, record.batch_idx)
        batch = batches[peer.rank]
        view = PeerView(trainer, peer.rank, len(peer.engine.membership.active))
        for attack in peer.attacks:
            attack.on_train_batch_start(view, module, batch, batch_idx)  # type: ignore[arg-type]
        with seeded_step(self.run_seed, trainer.global_step, peer.rank, 0, [self.root_device]):
            return super().training_step(batch, batch_idx)

    # ----------------------------------------------------------------- the step
    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: Optional[Union["pl.LightningModule", torch.nn.Module]] = None, **kwargs: Any) -> Any:
        """Every peer's gradient (``closure`` once per peer), their aggregation by every peer, then one step."""
        if not self.peers:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def every_peer_then_aggregate() -> Any:
            result = self._gradients(optimizer, closure)
            self._aggregate(optimizer)
            return result

        output = super().optimizer_step(optimizer, every_peer_then_aggregate, model, **kwargs)
        reporter = self.reporter
        log_round(self.lightning_module, reporter.engine.metrics if reporter is not None else {}, self._attack_counts,
                  self.check_params_every, lambda: True)
        return output

    def _gradients(self, optimizer: Optimizer, closure: Callable[[], Any]) -> Any:
        """Each active peer's gradient into its row of ``[num_peers, d]``, the reporter's last (Lightning keeps the last
        closure's loss); the module's buffers are then the reporter's."""
        module = self.lightning_module
        assert module is not None
        params = trainable_params(optimizer.param_groups)
        numel = sum(p.numel() for p in params)
        rows = self._buffers.get("rows", (self.num_peers, numel), torch.float32, self.root_device)
        step = module.trainer.global_step
        recomputer = self._recomputer
        if recomputer is not None:
            recomputer.snapshot(step, params)
        self._recomputed.clear()
        reporter = self.reporter
        order = [p for p in self.peers if not p.left and p is not reporter] + ([reporter] if reporter is not None else [])
        result = None
        for peer in order:
            peer.task = peer.engine.begin_step(step, kept=recomputer.has) if recomputer is not None else None
            peer.load_buffers(module)
            self._current = peer
            try:
                if peer.task is not None:
                    assert recomputer is not None
                    recomputer.load(peer.task.record.step, params, current=step)  # nothing changed them since the snapshot
                result = closure()
            finally:
                self._current = None
                if recomputer is not None:
                    recomputer.restore(params)
            flatten_grads(params, out=rows[peer.rank])
            peer.save_buffers(module)
        return result

    def _aggregate(self, optimizer: Optimizer) -> None:
        """Every peer's attacks and engine step, in threads; the honest peers' aggregate becomes the gradient."""
        module = self.lightning_module
        assert module is not None and self._threads is not None
        params = trainable_params(optimizer.param_groups)
        rows = self._buffers.get("rows", (self.num_peers, sum(p.numel() for p in params)), torch.float32, self.root_device)
        trainer, step = module.trainer, module.trainer.global_step
        batch_idx = self._batch_idx
        active = [p for p in self.peers if not p.left]

        def peer_step(peer: SimulatedPeer) -> Optional[Tensor]:
            view = PeerView(trainer, peer.rank, len(peer.engine.membership.active))
            ctx = AttackContext(step=step, rank=peer.rank, world_size=len(peer.engine.membership.active), trainer=view,  # type: ignore[arg-type]
                                pl_module=module)
            computed = rows[peer.rank]
            sent = computed
            for attack in peer.attacks:
                sent = attack.on_before_aggregate(sent, ctx)

            def count() -> None:
                peer.counts = count_fired(peer.attacks, peer.engine.transport, step, self.root_device)

            out = peer.engine.step(sent, step, computed=computed, recompute=self._recompute if self.validators else None,
                                   behaviour=behaviour_of(peer.attacks, ctx), fast_path=peer.task is not None,
                                   batch_idx=batch_idx, micro_batches=1, after=count)
            return None if peer.left else out

        self._log_filter.reporter = self.reporter.rank if self.reporter is not None else None
        aggregates = dict(zip([p.rank for p in active], self._threads.run(active, peer_step)))
        reporter = self.reporter
        if reporter is None:
            raise UserError("btard_sim: every simulated peer was banned")
        agreed = aggregates[reporter.rank]
        assert agreed is not None
        # every check_params_every steps (a full comparison per peer costs as much as the gather), as BTARDStrategy
        # compares the peers' parameters
        checked = aggregates.items() if step % self.check_params_every == 0 else []
        for rank, aggregate in checked:
            if rank not in self._byzantine and aggregate is not None and not _bitwise_equal(aggregate, agreed):
                raise RuntimeError(f"btard_sim: honest peers {reporter.rank} and {rank} got different aggregates at step {step}")
        self._attack_counts = reporter.counts
        assign_grads(params, agreed)

    def _recompute(self, record: StepRecord, peer: int) -> Tensor:
        """Peer ``peer``'s gradient of ``record.step``, recomputed once for every simulated peer that asks (they ask from
        their threads: one module, so one at a time)."""
        module = self.lightning_module
        assert module is not None and self._recomputer is not None
        key = (record.step, peer, record.batch_idx, record.micro_batches, record.grad_scale)
        with self._recompute_lock:
            if key not in self._recomputed:
                params = trainable_params(self.optimizers[0].param_groups)
                self._recomputed[key] = self._recomputer.gradient(
                    module, params, record.step, peer, record.batch_idx, self.precision_plugin.train_step_context,
                    micro_batches=record.micro_batches, scale=record.grad_scale,
                )
            return self._recomputed[key].clone()

    # ----------------------------------------------------------------- checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Lightning's checkpoint (the module's buffers are the reporter's), with every simulated peer's ban list, buffers and
        attack states."""
        if self.peers:
            reporter = self.reporter
            if reporter is not None:
                checkpoint["btard"] = reporter.engine.state_dict()
            checkpoint["btard_sim"] = {
                "num_peers": self.num_peers,
                "engines": [p.engine.state_dict() for p in self.peers],
                "buffers": [[b.cpu() for b in p.buffers] if p.buffers is not None else None for p in self.peers],
                "attacks": [[a.state_dict() for a in p.attacks] for p in self.peers],
            }
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = compat.load_checkpoint(super().load_checkpoint, checkpoint_path, weights_only)
        state = checkpoint.get("btard_sim")
        if state is not None:
            if int(state.get("num_peers", -1)) != self.num_peers:
                raise UserError(f"the checkpoint simulated {state.get('num_peers')} peers; this run has num_peers={self.num_peers}")
            self._resume = state  # applied when the peers exist (setup comes after Lightning restores the checkpoint)
        return checkpoint

    def _load_peers(self, state: dict[str, Any]) -> None:
        assert self._threads is not None
        for peer, buffers, attacks in zip(self.peers, state["buffers"], state["attacks"]):
            peer.buffers = [b.to(self.root_device) for b in buffers] if buffers is not None else None
            for attack, attack_state in zip(peer.attacks, attacks):
                attack.load_state_dict(attack_state)
        self._threads.run(self.peers, lambda p: p.engine.load_state_dict(state["engines"][p.rank]))
        rank_zero_info(f"BTARD (simulated): resumed with the checkpoint's ban list: {[b.peer for b in self.bans]}")

    @override
    def teardown(self) -> None:
        self._log_filter.remove()
        if self._threads is not None:
            self._threads.close()
            self._threads = None
        super().teardown()

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self.verify and self.peers:
            rank_zero_info(ban_summary(self.bans))

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("btard_sim", cls, description="BTARD-SGD with N peers simulated in one process")


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """The same bits (a diverged run's NaNs included, which ``torch.equal`` calls different)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


BTARDSimStrategy.register_strategies(StrategyRegistry)
