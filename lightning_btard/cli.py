"""``btard``: the standard Lightning CLI, with the BTARD strategy, attacks, models and datamodules importable by name.

    btard fit --config configs/resnet18_cifar10.yaml
    btard fit --config configs/demo.yaml --trainer.callbacks+=SignFlipping --trainer.callbacks.byzantine=[1,2]
    btard sweep --config configs/sweeps/paper_resnet18_small.yaml     # a grid of fit runs, a table, figures
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import datamodules  # noqa: F401  (makes CIFAR10DataModule & co. resolvable by their short names)
import lightning_btard.attacks  # noqa: F401  (SignFlipping & co.)
import models  # noqa: F401  (ResNet18 & co.)
from lightning_btard.errors import UserError
from lightning_btard.lightning_package import MisconfigurationException, pl, pl_module

__all__ = ["BTARDCLI", "CONFIGS", "main", "packaged_configs"]

if TYPE_CHECKING:
    from pytorch_lightning.cli import LightningCLI
else:
    LightningCLI = pl_module("cli").LightningCLI  # of the Lightning package in use (lightning_package.py)


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


CONFIGS = Path(__file__).resolve().parent / "configs"
"""The configs shipped with the package (``configs/`` in the clone is a link to them)."""


def packaged_configs(args: list[str]) -> list[str]:
    """``--config configs/demo.yaml`` (or ``--config demo.yaml``) names the shipped config when no such file is
    here, so the README's commands work from an installed package as from the clone."""

    def resolve(value: str) -> str:
        if os.path.exists(value):
            return value
        shipped = CONFIGS / value.removeprefix("configs/")
        return str(shipped) if shipped.is_file() else value

    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg.split("=", 1)[1])
        elif arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point. Errors a user can fix print one message and exit with status 2."""
    args = sys.argv[1:] if args is None else args
    try:
        if args[:1] == ["sweep"]:  # btard sweep --config configs/sweeps/...: a grid of fit runs (sweep.py)
            from lightning_btard.sweep import main as sweep

            return sweep(args[1:])
        BTARDCLI(args=packaged_configs(args))
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
