"""Where a Lightning run's BTARD events go: a JSON-lines file per peer in the run directory, and the loggers."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lightning_btard.protocol.events import Event, EventLog, JsonLinesSink

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["attach_run_sinks", "events_path"]


def events_path(root_dir: str, rank: int) -> str:
    """The JSON-lines file of peer ``rank``'s events in a run directory (``lightning_btard.protocol.events.read_events``)."""
    return os.path.join(root_dir, "btard_events", f"rank{rank}.jsonl")


def attach_run_sinks(events: EventLog, trainer: "pl.Trainer", rank: int) -> None:
    """The run directory is the logger's (``trainer.log_dir``: ``lightning_logs/version_N``), else ``default_root_dir``."""
    events.attach(JsonLinesSink(events_path(trainer.log_dir or trainer.default_root_dir, rank)))

    def to_loggers(event: Event) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard
                experiment.add_text("btard/events", event.message(), event.step)
            elif hasattr(logger, "log_text"):  # wandb
                logger.log_text(key="btard/events", columns=["step", "kind", "peers", "reason"],
                                data=[[event.step, event.kind, str(list(event.peers)), event.reason]])

    events.attach(to_loggers)
