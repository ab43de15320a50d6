"""LightningDataModules; they know nothing of BTARD and run under any strategy."""

from datamodules.cifar10 import CIFAR10DataModule
from datamodules.synthetic import write_synthetic_cifar10
from datamodules.synthetic_text import write_synthetic_wikitext
from datamodules.wikitext103 import WikiText103DataModule

__all__ = ["CIFAR10DataModule", "WikiText103DataModule", "write_synthetic_cifar10", "write_synthetic_wikitext"]
