"""Optional features and the extra that installs each: one clear message when an extra is missing.

    pip install lightning-btard              # the core: BTARDStrategy on torch.distributed, attacks, the CLI
    pip install "lightning-btard[hivemind]"  # backend="hivemind" (Linux x86-64: hivemind bundles a p2pd binary)
    pip install "lightning-btard[albert]"    # models.AlbertPretraining, datamodules.WikiText103DataModule
    pip install "lightning-btard[examples]"  # models.ResNet18/SmallCNN, datamodules.CIFAR10DataModule, the demo
    pip install "lightning-btard[wandb]"     # WandbLogger
    pip install "lightning-btard[all]"
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtra", "require"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "hivemind": ("hivemind",),
    "albert": ("transformers", "tokenizers", "datasets", "torch_optimizer", "nltk"),
    "examples": ("torchvision", "matplotlib", "tensorboard"),
    "wandb": ("wandb",),
}
"""Each extra and the top-level modules it provides (pyproject's ``[project.optional-dependencies]``)."""


class MissingExtra(ModuleNotFoundError):
    """A feature's optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtra` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top:
            raise  # the module is there but something it imports is not: not ours to rename
        extra = next((name for name, tops in EXTRAS.items() if top in tops), None)
        hint = f'pip install "lightning-btard[{extra}]"' if extra else f"pip install {top}"
        raise MissingExtra(f"{feature} needs {top}, which is not installed: {hint}", name=top) from e
