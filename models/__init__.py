"""LightningModules (image classification, ALBERT pre-training); they know nothing of BTARD and run under any strategy."""

from models.albert import AlbertPretraining
from models.classifier import ImageClassifier
from models.resnet import ResNet18
from models.small_cnn import SmallCNN

__all__ = ["AlbertPretraining", "ImageClassifier", "ResNet18", "SmallCNN"]
