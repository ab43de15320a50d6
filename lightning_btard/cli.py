"""``btard``: the standard Lightning CLI, with the BTARD strategy, attacks, models and datamodules importable by name.

    btard fit --config configs/resnet18_cifar10.yaml
    btard fit --config configs/demo.yaml --trainer.callbacks+=SignFlipping --trainer.callbacks.byzantine=[1,2]
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import datamodules  # noqa: F401  (makes CIFAR10DataModule & co. resolvable by their short names)
import lightning_btard.attacks  # noqa: F401  (SignFlipping & co.)
import models  # noqa: F401  (ResNet18 & co.)
from lightning_btard.errors import UserError

__all__ = ["BTARDCLI", "main"]


class BTARDCLI(LightningCLI):
    """LightningCLI over any LightningModule and LightningDataModule (``model.class_path`` / ``data.class_path``)."""

    def __init__(self, args: Optional[list[str]] = None, run: bool = True) -> None:
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def instantiate_classes(self) -> None:
        """Building the configured objects: jsonargparse reports a bad value as ValueError; make it a user error."""
        try:
            super().instantiate_classes()
        except ValueError as e:
            raise UserError(f"invalid configuration: {e}") from e


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point. Errors a user can fix print one message and exit with status 2."""
    try:
        BTARDCLI(args=args)
    except (UserError, FileNotFoundError, MisconfigurationException) as e:
        print(f"btard: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as e:
        # A launched rank whose rank 0 stopped (e.g. on the error above) sees only a broken connection.
        if os.environ.get("LOCAL_RANK", "0") != "0" and any(s in str(e) for s in _PEER_GONE):
            print(f"btard: rank {os.environ['LOCAL_RANK']}: lost the connection to rank 0 (see its error above)", file=sys.stderr)
            raise SystemExit(1) from None
        raise


if __name__ == "__main__":
    main()
