"""LightningDataModules; they know nothing of BTARD and run under any strategy."""

from datamodules.cifar10 import CIFAR10DataModule
from datamodules.synthetic import write_synthetic_cifar10

__all__ = ["CIFAR10DataModule", "write_synthetic_cifar10"]
