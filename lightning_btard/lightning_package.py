"""Which Lightning package lightning-btard builds on: ``lightning.pytorch`` or ``pytorch_lightning``.

Lightning ships one Trainer under two names (``pip install lightning`` gives ``lightning.pytorch``, ``pip install
pytorch-lightning`` gives ``pytorch_lightning``), and a Trainer of one accepts only strategies, callbacks, modules
and datamodules of the same one. So every Lightning name lightning-btard uses (and the bundled ``models`` and
``datamodules``) comes from here, and this module picks the package once per process:

1. ``BTARD_LIGHTNING=lightning`` or ``BTARD_LIGHTNING=pytorch_lightning``, if set;
2. else the one your program imported already (``import lightning.pytorch as L`` before ``import lightning_btard``);
3. else the one installed, if only one is;
4. else (both installed, neither imported yet) ``pytorch_lightning``, the package lightning-btard depends on.

The choice is written back to ``BTARD_LIGHTNING``, so that the processes Lightning's launcher starts (and the
peers a test starts) make the same one. ``PACKAGE`` names it. Private Lightning APIs are not here: they are in
:mod:`lightning_btard.compat`, built on this module.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

__all__ = ["ENV", "FABRIC", "PACKAGE", "PACKAGES", "choose", "pl", "pl_module", "fabric_module"]

ENV = "BTARD_LIGHTNING"
PACKAGES: dict[str, tuple[str, str]] = {
    "pytorch_lightning": ("pytorch_lightning", "lightning_fabric"),
    "lightning": ("lightning.pytorch", "lightning.fabric"),
}
"""Each choice: (its trainer package, its fabric package)."""


def _installed(top_level: str) -> bool:
    return importlib.util.find_spec(top_level) is not None


def choose(
    environ: Mapping[str, str] = os.environ,
    modules: Mapping[str, Any] = sys.modules,
    installed: Callable[[str], bool] = _installed,
) -> str:
    """The package to build on (a key of ``PACKAGES``), by the rules of this module's docstring."""
    asked = environ.get(ENV, "").strip()
    if asked:
        if asked not in PACKAGES:
            raise ValueError(f"{ENV}={asked!r}: expected one of {', '.join(sorted(PACKAGES))}")
        if not installed(asked):
            raise ModuleNotFoundError(f"{ENV}={asked} asks for the {asked!r} package, which is not installed "
                                      f"(pip install {asked.replace('_', '-')})", name=asked)
        return asked
    imported = [name for name, (trainer, _) in PACKAGES.items() if trainer in modules]
    if len(imported) == 1:
        return imported[0]
    present = [name for name in PACKAGES if installed(name)]
    if not present:
        raise ModuleNotFoundError("lightning-btard needs Lightning: pip install pytorch-lightning (or lightning)",
                                  name="pytorch_lightning")
    return present[0]  # pytorch_lightning first: the package lightning-btard depends on


PACKAGE = choose()
os.environ[ENV] = PACKAGE
TRAINER, FABRIC = PACKAGES[PACKAGE]


def pl_module(sub: str) -> Any:
    """``<trainer package>.<sub>``, e.g. ``pl_module("cli")``."""
    return importlib.import_module(f"{TRAINER}.{sub}")


def fabric_module(sub: str) -> Any:
    """``<fabric package>.<sub>``, e.g. ``fabric_module("plugins")``."""
    return importlib.import_module(f"{FABRIC}.{sub}")


if TYPE_CHECKING:  # what type checkers and editors see; at run time the names come from the chosen package
    import pytorch_lightning as pl
else:
    pl = importlib.import_module(TRAINER)
    _PUBLIC = {
        "CheckpointIO": fabric_module("plugins"),
        "ClusterEnvironment": fabric_module("plugins"),
        "reset_seed": fabric_module("utilities.seed"),
        "Callback": pl_module("callbacks"),
        "Precision": pl_module("plugins.precision"),
        "StrategyRegistry": pl_module("strategies"),
        "ParallelStrategy": pl_module("strategies.parallel"),
        "SingleDeviceStrategy": pl_module("strategies"),
        "TrainerFn": pl_module("trainer.states"),
        "MisconfigurationException": pl_module("utilities.exceptions"),
        "SIGTERMException": pl_module("utilities.exceptions"),
        "rank_zero_info": pl_module("utilities.rank_zero"),
        "rank_zero_only": pl_module("utilities.rank_zero"),
        "rank_zero_warn": pl_module("utilities.rank_zero"),
    }
    globals().update({name: getattr(module, name) for name, module in _PUBLIC.items()})
    __all__ += list(_PUBLIC)
