"""The classifier architectures, one row each: adding one is a row here plus its test.

No torch here: config names the allowed `classify.archs` from this table, and the report its
display names, without loading torchvision (classifiers.build_classifier reads the rest).
"""
from __future__ import annotations

from typing import NamedTuple


class Arch(NamedTuple):
    weights: str  # torchvision's weights enum; its IMAGENET1K_V1 when classify.pretrained
    head: str  # the last layer (a torch submodule path) that the reference head replaces
    title: str  # how tables and figures name it
    sized: bool = False  # takes image_size (classify.crop_size) when not pretrained


ARCHITECTURES = {
    "vgg16": Arch("VGG16_Weights", "classifier.6", "VGG-16"),
    "resnet18": Arch("ResNet18_Weights", "fc", "ResNet-18"),
    "vit_b_16": Arch("ViT_B_16_Weights", "heads.head", "ViT-B-16", sized=True),
}
