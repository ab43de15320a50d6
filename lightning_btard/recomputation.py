"""Recomputing another peer's gradient of an earlier step, inside a Lightning training run.

What a validator (and, on an accusation, every peer) needs: the parameters ``x_t`` as they were
before step ``t``'s update (:class:`Recomputer` keeps a copy of the last two steps' parameters), the
target's verifiable batch of step ``t`` (rebuilt from the training dataset), and the target's step
seed for the random draws of the forward pass (dropout). The LightningModule's own ``training_step``
computes the loss, so a module written for DDP is validated unchanged.

A ``training_step`` whose gradient depends on anything else that differs between peers (the peer's
rank, wall-clock time, state it mutates across steps) cannot be validated: honest peers would be
accused. Nor can gradients changed after backward by the module's ``backward`` override or by
``on_after_backward`` hooks (the recomputation calls ``loss.backward()`` itself). ``batch_idx`` is
reproduced; ``self.global_step`` during a recomputation is the current step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_btard.compat import apply_batch_transfer_handler
from lightning_btard.lightning_package import pl
from lightning_btard.ops.partition import flatten_grads
from lightning_btard.verifiable_batches import VerifiableCollate, VerifiableDataset, rebuild_batch, seeded_step

__all__ = ["Recomputer", "TrainingData"]


class TrainingData:
    """The pieces of the training loader a validator needs to rebuild anybody's batch."""

    def __init__(self, dataset: VerifiableDataset, batch_size: int, collate_fn: VerifiableCollate,
                 parts: Optional[Sequence[Sequence[int]]] = None) -> None:
        self.dataset, self.batch_size, self.collate_fn, self.parts = dataset, batch_size, collate_fn, parts

    def batch(self, step: int, peer: int, micro: int) -> Any:
        return rebuild_batch(self.dataset, self.batch_size, step, peer, micro, self.collate_fn, self.parts)


@contextlib.contextmanager
def _silenced(module: "pl.LightningModule") -> Iterator[None]:
    """``self.log`` calls in a recomputed training step must not log the target's loss as this peer's."""
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log, module.log_dict


class Recomputer:
    """Keeps ``x_t`` for the last two steps and recomputes a peer's gradient of step ``t`` from it."""

    def __init__(self, run_seed: int, accumulate: int, devices: Sequence[torch.device]) -> None:
        self.run_seed, self.accumulate, self.devices = run_seed, accumulate, list(devices)
        self.data: Optional[TrainingData] = None
        self._snapshots: dict[int, list[Tensor]] = {}  # step -> parameter copies (two buffers, reused)
        self._spare: list[list[Tensor]] = []
        self._stash: list[Tensor] = []
        self._back: list[Tensor] = []  # what restore() copies back: a kept snapshot, or the stash
        self.loaded = False
        """Whether the parameters hold a kept copy (until :meth:`restore`)."""

    # ------------------------------------------------------------- parameter copies
    def snapshot(self, step: int, params: Sequence[Tensor]) -> None:
        """Keep the parameters as they are now as ``x_step``; forget all but the previous step's copy."""
        for old in [s for s in self._snapshots if s < step - 1 or s == step]:
            if self.loaded and self._snapshots[old] is self._back:
                raise RuntimeError("the parameters to restore are this kept copy: restore them before the next snapshot")
            self._spare.append(self._snapshots.pop(old))
        buf = self._spare.pop() if self._spare else [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(buf, [p.detach() for p in params])
        self._snapshots[step] = buf

    def has(self, step: int) -> bool:
        return step in self._snapshots

    def load(self, step: int, params: Sequence[Tensor], current: Optional[int] = None) -> None:
        """Put ``x_step`` into the parameters, keeping the current values to :meth:`restore`.

        ``current``: a step whose kept copy the parameters equal right now (its :meth:`snapshot` was just taken, and
        nothing changed them since, as at the start of a validator's step): :meth:`restore` copies that back, and the
        current values need no copy of their own."""
        if self.loaded:
            raise RuntimeError("kept parameters are already loaded: restore them first")
        if current is not None and current in self._snapshots:
            self._back = self._snapshots[current]
        else:
            if not self._stash:
                self._stash = [torch.empty_like(p) for p in params]
            with torch.no_grad():
                torch._foreach_copy_(self._stash, [p.detach() for p in params])
            self._back = self._stash
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in params], self._snapshots[step])
        self.loaded = True

    def restore(self, params: Sequence[Tensor]) -> None:
        """Put back the parameters :meth:`load` replaced (nothing to do if none are loaded)."""
        if not self.loaded:
            return
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in params], self._back)
        self.loaded = False

    # ------------------------------------------------------------- the step itself
    def seeded(self, step: int, peer: int, micro: int) -> contextlib.AbstractContextManager:
        """The random draws of peer ``peer``'s training step ``step`` (micro-batch ``micro``)."""
        return seeded_step(self.run_seed, step, peer, micro, self.devices)

    def batch(self, module: "pl.LightningModule", step: int, peer: int, micro: int) -> Any:
        """Peer ``peer``'s micro-batch of ``step``, on the module's device (through its batch-transfer hooks)."""
        if self.data is None:
            raise RuntimeError("no verifiable training data installed: the strategy must process the train dataloader first")
        return apply_batch_transfer_handler(module, self.data.batch(step, peer, micro))

    def gradient(
        self,
        module: "pl.LightningModule",
        params: Sequence[torch.nn.Parameter],
        step: int,
        peer: int,
        batch_idx: int,
        step_context: Callable[[], contextlib.AbstractContextManager],
        micro_batches: int = 1,
        scale: Optional[float] = None,
        out: Optional[Tensor] = None,
    ) -> Tensor:
        """Peer ``peer``'s flat gradient of ``step`` (``micro_batches`` micro-batches, each loss divided by the
        accumulation as Lightning does; multiplied by the fp16 loss ``scale`` before backward and divided after,
        as the peer's own step was), recomputed from ``x_step``. The optimizer's parameters, their gradients
        and the module's buffers are left as they were."""
        grads = [p.grad for p in params]
        buffers = [b.detach().clone() for b in module.buffers()]
        self.load(step, params)
        try:
            for p in params:
                p.grad = None
            with _silenced(module), torch.enable_grad():
                for micro in range(micro_batches):
                    batch = self.batch(module, step, peer, micro)
                    with self.seeded(step, peer, micro), step_context():
                        output = module.training_step(batch, batch_idx + micro)
                    loss = output["loss"] if isinstance(output, dict) else output
                    if loss is not None:
                        (loss * (scale or 1.0) / self.accumulate).backward()
            flat = flatten_grads(params, out=out)
            return flat.div_(scale) if scale else flat
        finally:
            self.restore(params)
            with torch.no_grad():
                for b, saved in zip(module.buffers(), buffers):
                    b.copy_(saved)
            for p, g in zip(params, grads):
                p.grad = g
