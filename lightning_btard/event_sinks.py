"""Where a Lightning run's BTARD events go: a JSON-lines file per peer in the run directory, and the loggers."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lightning_btard.protocol.events import Event, EventLog, JsonLinesSink

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["attach_run_sinks", "events_path", "run_dir"]


def events_path(root_dir: str, rank: int) -> str:
    """The JSON-lines file of peer ``rank``'s events in a run directory (``lightning_btard.protocol.events.read_events``)."""
    return os.path.join(root_dir, "btard_events", f"rank{rank}.jsonl")


def run_dir(trainer: "pl.Trainer", shared_filesystem: bool) -> str:
    """The run directory: the logger's (``lightning_logs/version_N``), else ``default_root_dir``. Ranks launched
    together share rank 0's (``trainer.log_dir`` broadcasts it, as Lightning assumes one filesystem); independent
    peers (hivemind) each keep their own."""
    if shared_filesystem:
        return trainer.log_dir or trainer.default_root_dir
    logger = trainer.loggers[0] if trainer.loggers else None
    return getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir


def attach_run_sinks(events: EventLog, trainer: "pl.Trainer", rank: int, shared_filesystem: bool = True) -> None:
    events.attach(JsonLinesSink(events_path(run_dir(trainer, shared_filesystem), rank)))

    def to_loggers(event: Event) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard
                experiment.add_text("btard/events", event.message(), event.step)
            elif hasattr(logger, "log_text"):  # wandb
                logger.log_text(key="btard/events", columns=["step", "kind", "peers", "reason"],
                                data=[[event.step, event.kind, str(list(event.peers)), event.reason]])

    events.attach(to_loggers)
