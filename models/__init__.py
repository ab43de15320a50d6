"""LightningModules for image classification; they know nothing of BTARD and run under any strategy."""

from models.classifier import ImageClassifier
from models.resnet import ResNet18
from models.small_cnn import SmallCNN

__all__ = ["ImageClassifier", "ResNet18", "SmallCNN"]
