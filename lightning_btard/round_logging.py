"""What a step's aggregation logs through the LightningModule (``btard/*`` and ``attack/*``), for every strategy."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Optional

from lightning_btard import compat

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from lightning_btard.protocol.membership import Ban

__all__ = ["ban_summary", "log_round"]


def log_round(module: Optional["pl.LightningModule"], metrics: Mapping[str, float], attack_counts: Mapping[str, float],
              check_every: int, in_sync: Callable[[], bool]) -> None:
    """Log the engine's ``metrics`` as ``btard/<key>`` and the attack counts, per step; every ``check_every`` steps also
    ``btard/params_in_sync`` (``in_sync()``). Nothing outside a hook where ``self.log`` is allowed, or after a skipped
    step (no metrics)."""
    if module is None or not metrics or compat.current_fx_name(module) is None:
        return
    logged = {f"btard/{k}": v for k, v in metrics.items()}
    logged.update(attack_counts)
    module.log_dict(logged, on_step=True, on_epoch=False, batch_size=1)
    module.log("btard/clipped_bar", logged["btard/clipped"], prog_bar=True, on_step=True, on_epoch=False, batch_size=1, logger=False)
    if module.trainer.global_step % check_every == 0:
        module.log("btard/params_in_sync", float(in_sync()), on_step=True, on_epoch=False, batch_size=1)


def ban_summary(bans: Sequence["Ban"]) -> str:
    """The end-of-run report of the ban list."""
    lines = [f"BTARD: {len(bans)} peer(s) banned during the run" + (":" if bans else ".")]
    lines += [f"  step {b.step:>6}  peer {b.peer:>3}  {b.reason} [{b.evidence}]" for b in bans]
    return "\n".join(lines)
