"""Every private Lightning or torch API lightning-btard reaches into, in one place.

A Lightning or torch release that moves one of these breaks only this module; each function says what it
relies on. Nothing else in the package touches a private name of either library. The Lightning package
(``lightning.pytorch`` or ``pytorch_lightning``) is the one :mod:`.lightning_package` chose.

Tested against Lightning 2.5 (the oldest release claimed, ``LIGHTNING_TESTED``) and 2.6 (the pinned one).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

from lightning_btard.lightning_package import fabric_module, pl, pl_module, rank_zero_only

_init_dist_connection = fabric_module("utilities.distributed")._init_dist_connection
_optimizers_to_device = fabric_module("utilities.optimizer")._optimizers_to_device
MultiProcessingLauncher = pl_module("strategies.launchers")._MultiProcessingLauncher
"""Lightning's ``spawn``/``fork`` launcher (its DDP strategy's)."""
SubprocessScriptLauncher = pl_module("strategies.launchers")._SubprocessScriptLauncher
"""Lightning's ``popen`` launcher: re-runs the script once per local process (its ``ddp``)."""

LIGHTNING_TESTED = ("2.5", "2.6")
"""The Lightning minor releases CI runs against (README: Requirements)."""

__all__ = [
    "LIGHTNING_TESTED",
    "MultiProcessingLauncher",
    "SubprocessScriptLauncher",
    "apply_batch_transfer_handler",
    "bind_metrics_process_group",
    "current_fx_name",
    "default_store",
    "dump_checkpoint",
    "init_process_group",
    "load_checkpoint",
    "optimizers_to_device",
    "route_sigterm_broadcast",
    "set_loaded_checkpoint",
    "set_rank_zero",
]


def init_process_group(cluster_environment: Any, backend: str, timeout: timedelta, device: Optional[torch.device]) -> None:
    """Lightning's own torch.distributed initialisation (env vars, store, timeout), as its DDP strategy does."""
    kwargs: dict[str, Any] = {"timeout": timeout}
    if device is not None and device.type != "cpu":
        kwargs["device_id"] = device
    _init_dist_connection(cluster_environment, backend, **kwargs)


def load_checkpoint(load: Callable[..., dict[str, Any]], path: Any, weights_only: Optional[bool]) -> dict[str, Any]:
    """``Strategy.load_checkpoint`` of the base class: Lightning 2.6 added its ``weights_only`` argument, 2.5 has none."""
    if "weights_only" in inspect.signature(load).parameters:
        return load(path, weights_only=weights_only)
    return load(path)


def optimizers_to_device(optimizers: Any, device: torch.device) -> None:
    _optimizers_to_device(optimizers, device)


def set_rank_zero(rank: int) -> None:
    """Which process Lightning's rank-zero-only helpers treat as rank zero."""
    rank_zero_only.rank = utils_rank_zero_only.rank = rank  # type: ignore[attr-defined]


def default_store() -> Any:
    """torch.distributed's default TCPStore (its host is global rank 0)."""
    return dist.distributed_c10d._get_default_store()


def route_sigterm_broadcast(trainer: "pl.Trainer", broadcast: Callable[[], None]) -> None:
    """Lightning broadcasts rank 0's SIGTERM flag over the default process group before every batch
    (``_TrainingEpochLoop._broadcast_sigterm_tensor``); replace that broadcast with ``broadcast``."""
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = broadcast  # type: ignore[method-assign]


def current_fx_name(module: "pl.LightningModule") -> Optional[str]:
    """The hook Lightning is running on the module (``self.log`` is only allowed inside one)."""
    return module._current_fx_name


def apply_batch_transfer_handler(module: "pl.LightningModule", batch: Any) -> Any:
    """The module's batch-transfer hooks and device move, as Lightning applies them to a fetched batch."""
    return module._apply_batch_transfer_handler(batch)


def dump_checkpoint(trainer: "pl.Trainer") -> dict[str, Any]:
    """The checkpoint dict Lightning would save now."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def set_loaded_checkpoint(trainer: "pl.Trainer", checkpoint: dict[str, Any]) -> None:
    """Have Lightning restore ``checkpoint`` after setup, as if loaded from ``ckpt_path``."""
    trainer._checkpoint_connector._loaded_checkpoint = checkpoint


def bind_metrics_process_group(module: Optional[torch.nn.Module], group: Any) -> None:
    """torchmetrics metrics sync over the default process group unless told otherwise; after a ban that group holds a
    departed peer, so point every metric of ``module`` at ``group``."""
    import torchmetrics

    for sub in module.modules() if module is not None else []:
        if isinstance(sub, torchmetrics.Metric):
            sub.process_group = group
