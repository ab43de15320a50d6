"""Peers joining a running group (hivemind backend), as the Lightning strategy sees it.

A peer that starts after the run did asks to be admitted (``hivemind_peer.HivemindPeer.join``), receives the group's
keys, run seed and training state, and Lightning restores that state as if from a checkpoint; until its first step it
is *catching up* (no collectives of its own). Every ``join_every`` steps, at a step boundary, the members admit the
peers that asked (``HivemindPeer.admit``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from typing_extensions import override

from lightning_btard.protocol.identity import Identity

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["Joining"]


class Joining:
    """Mixed into :class:`~lightning_btard.BTARDStrategy` (which provides the hivemind peer, the engine factory and
    Lightning's module and precision plugin)."""

    _hivemind: Any
    _timeout: Any
    verify: bool
    run_seed: int
    lightning_module: Any
    precision_plugin: Any
    _make_engine: Callable[..., None]
    _tolerant: Callable[..., Any]

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """A joining peer learns the group's state in ``setup`` (after its data and model are ready): Lightning restores
        it after that, as from a checkpoint file."""
        return self._hivemind is not None and self._hivemind.joining

    @property
    def _catching_up(self) -> bool:
        return self._hivemind is not None and self._hivemind.catching_up

    def _join_running_group(self, trainer: "pl.Trainer") -> None:
        assert self._hivemind is not None
        identity = Identity.generate()
        group, keys, self.run_seed, run_nonce = self._hivemind.join(self, trainer, identity.public, self._timeout.total_seconds())
        self._make_engine(group, identity if self.verify else None, keys, run_nonce)

    def state_digest(self, checkpoint: dict[str, Any]) -> bytes:
        """The digest of what every member in sync holds identically (``hivemind_state.shared_state_digest``)."""
        from lightning_btard.groups.hivemind_state import shared_state_digest

        names = [n for n, _ in self.lightning_module.named_parameters()]  # type: ignore[union-attr]
        return shared_state_digest(checkpoint, names, type(self.precision_plugin).__qualname__)

    @override
    def on_train_start(self) -> None:
        if self._hivemind is not None:
            self._hivemind.joined_state = None  # restored by now: free it

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """At a step boundary every ``join_every`` steps, the members admit the peers that asked to join."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self._hivemind is None or trainer is None or not self._hivemind.due(trainer, batch_idx):
            return
        step = trainer.global_step
        self._tolerant(lambda: self._hivemind.admit(self, trainer, step), lambda: None)  # type: ignore[union-attr]
