"""Verified training steps inside Lightning: verifiable batches, seeded step RNGs, and the validator's recomputation.

Under ``verify`` every peer's batch and random draws derive from ``(run seed, step, peer)``
(``verifiable_batches.py``), so a validator can recompute another peer's gradient through the module's own
``training_step`` (``recomputation.py``). Without gradient accumulation the validator's step *is* the
recomputation (its ``training_step`` runs on the target's batch with ``x_{step-1}`` loaded, and the parameters
are restored in the same optimizer closure); with accumulation the parameters would stay swapped across
Lightning's hooks between micro-batches, so the validator computes its own gradient and recomputes the target's
after it. Which peer validates whom is the engine's (:meth:`PeerEngine.begin_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from lightning_btard.data_splits import DataSplit, dataset_labels
from lightning_btard.errors import UserError
from lightning_btard.lightning_package import rank_zero_warn
from lightning_btard.ops.partition import trainable_params
from lightning_btard.ops.workspace import Workspace
from lightning_btard.protocol.validation import StepRecord
from lightning_btard.recomputation import Recomputer, TrainingData
from lightning_btard.verifiable_batches import seeded_step, verifiable_loader

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from lightning_btard.protocol.engine import PeerEngine

__all__ = ["VerifiedSteps"]


class VerifiedSteps:
    """One peer's verified steps: its micro-batch counter, and (with validators) the kept parameters and the fast path."""

    def __init__(self, run_seed: int, peer: int, device: torch.device, split: Optional[DataSplit] = None, peers: int = 1) -> None:
        self.run_seed, self.peer, self.device = run_seed, peer, device
        self.split, self.peers = split, peers
        """How the training data is split among the ``peers`` initial peers (``data_splits.py``), if it is."""
        self.recomputer: Optional[Recomputer] = None
        self.fast_path = False
        """This step's own gradient is the validator's recomputation (no accumulation)."""
        self.micro = 0
        self.batch_idx = 0
        self._buffers = Workspace()

    def setup(self, trainer: "pl.Trainer", module: "pl.LightningModule", validators: int, world_size: int) -> None:
        """Keep parameters for recomputation when this run has validators."""
        if not validators:
            return
        if not module.automatic_optimization:
            raise UserError(
                "BTARD validators recompute gradients through training_step, which needs automatic optimization; "
                "with manual optimization pass BTARDStrategy(validators=0) (the round is still verified) or verify=False"
            )
        self.recomputer = Recomputer(self.run_seed, trainer.accumulate_grad_batches, [self.device])
        contributing = world_size - validators
        if 0 < contributing < 3:
            rank_zero_warn(
                f"BTARD: validators={validators} of {world_size} peers leaves {contributing} peer(s) contributing "
                "to each step (validators weigh 0): one Byzantine contributor then holds half the weight or more, where "
                "CenteredClip bounds nothing until validation bans it. Use fewer validators or more peers."
            )

    def loader(self, dataloader: Any, trainer: "pl.Trainer") -> Any:
        """The training dataloader as this peer's verifiable batches."""
        loader, parts = split_loader(dataloader, self.run_seed, self.peer, trainer, self.split, self.peers)
        if self.recomputer is not None:
            self.recomputer.data = TrainingData(loader.dataset, loader.batch_sampler.batch_size, loader.collate_fn, parts)  # type: ignore[union-attr, arg-type]
        return loader

    def training_step(self, run: Callable[..., Any], module: "pl.LightningModule", engine: "PeerEngine",
                      args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``run(*args, **kwargs)`` (the module's training step) with the step's RNGs seeded from ``(run seed, step,
        peer)``; a validator on the fast path runs its target's previous step instead, from the kept parameters."""
        step, micro = module.trainer.global_step, self.micro
        self.micro += 1
        if micro == 0 and self.recomputer is not None:
            self._begin_step(module, engine, step, args[1] if len(args) > 1 else kwargs.get("batch_idx", 0))
        if not self.fast_path:
            with seeded_step(self.run_seed, step, self.peer, micro, [self.device]):
                return run(*args, **kwargs)
        assert engine.validating is not None and self.recomputer is not None
        record, target = engine.validating.record, engine.validating.target
        try:
            batch = self.recomputer.batch(module, record.step, target, micro)
            with self.recomputer.seeded(record.step, target, micro):
                return run(batch, record.batch_idx + micro)
        except BaseException:
            self.recomputer.restore(self._params(module))
            raise

    def _begin_step(self, module: "pl.LightningModule", engine: "PeerEngine", step: int, batch_idx: int) -> None:
        """Keep ``x_step``; if this peer validates in this step, load the target's parameters (fast path)."""
        assert self.recomputer is not None
        trainer = module.trainer
        if trainer.accumulate_grad_batches != self.recomputer.accumulate:
            raise UserError(
                f"accumulate_grad_batches changed during training ({self.recomputer.accumulate} -> "
                f"{trainer.accumulate_grad_batches}): verified training needs a fixed accumulation (or validators=0)"
            )
        params = self._params(module)
        self.recomputer.snapshot(step, params)
        self.batch_idx = int(batch_idx)
        task = engine.begin_step(step, kept=self.recomputer.has)
        self.fast_path = task is not None and self.recomputer.accumulate == 1
        if task is not None and self.fast_path:
            self.recomputer.load(task.record.step, params, current=step)  # the snapshot just taken

    def end_step(self, params: list[torch.nn.Parameter]) -> int:
        """The step's micro-batches are done: put back this step's parameters (after a fast-path recomputation);
        returns how many micro-batches the step had."""
        count, self.micro = max(self.micro, 1), 0
        if self.recomputer is not None:
            self.recomputer.restore(params)
        return count

    @staticmethod
    def _params(module: "pl.LightningModule") -> list[torch.nn.Parameter]:
        return trainable_params(module.trainer.strategy.optimizers[0].param_groups)

    def recompute(self, module: "pl.LightningModule", step_context: Callable[[], Any], record: StepRecord, peer: int) -> Tensor:
        """Peer ``peer``'s gradient of ``record.step``, recomputed here through the module's ``training_step``."""
        assert self.recomputer is not None
        params = self._params(module)
        numel = sum(p.numel() for p in params)
        return self.recomputer.gradient(
            module, params, record.step, peer, record.batch_idx, step_context, micro_batches=record.micro_batches,
            scale=record.grad_scale, out=self._buffers.get("recomputed", (numel,), torch.float32, self.device),
        )


def split_loader(dataloader: Any, run_seed: int, peer: int, trainer: "pl.Trainer", split: Optional[DataSplit],
                 peers: int) -> tuple[Any, Optional[list[Any]]]:
    """This peer's verifiable batches, from its part of the data when it is split; and the split's parts."""
    parts = None
    if split is not None:
        if not isinstance(getattr(dataloader, "dataset", None), Sized):
            raise UserError("data_split needs a training DataLoader over a map-style dataset")
        parts = split.parts(dataset_labels(dataloader.dataset), peers)
    try:
        loader = verifiable_loader(dataloader, run_seed, peer, trainer.accumulate_grad_batches, lambda: trainer.global_step,
                                   parts=parts)
    except TypeError as err:
        raise UserError(f"BTARDStrategy(verify=True or data_split): {err}") from err
    return loader, parts
