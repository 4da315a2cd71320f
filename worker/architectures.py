"""Model architectures by the name model_meta.json gives them; nothing is downloaded.

Adding one is a line in ARCHITECTURES: a torchvision classifier by its
`torchvision.models` name, or a segmentation_models_pytorch U-Net by its encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import segmentation_models_pytorch as smp
import torchvision
from torch import nn

from worker.errors import ModelError


def _torchvision_classifier(name: str, num_classes: int) -> nn.Module:
    # torchvision puts a Linear layer of `num_classes` outputs last (for
    # mobilenet_v2 that is classifier[1]); weights=None downloads nothing.
    model: nn.Module = torchvision.models.get_model(
        name, weights=None, num_classes=num_classes
    )
    return model


def _smp_unet(encoder: str, num_classes: int) -> nn.Module:
    model: nn.Module = smp.Unet(
        encoder_name=encoder, encoder_weights=None, classes=num_classes
    )
    return model


@dataclass(frozen=True)
class Architecture:
    """How to build one architecture, and which task its output serves."""

    task: str
    build: Callable[[int], nn.Module]


#: Architecture name (model_meta.json's `architecture`) -> how to build it.
ARCHITECTURES: dict[str, Architecture] = {
    "mobilenet_v2": Architecture(
        "presence", partial(_torchvision_classifier, "mobilenet_v2")
    ),
    "unet_resnet34": Architecture("segmentation", partial(_smp_unet, "resnet34")),
}


def get_architecture(name: str, task: str) -> Architecture:
    """The architecture called `name`, checked to serve `task`; else ModelError."""
    architecture = ARCHITECTURES.get(name)
    if architecture is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(
            f"unknown architecture {name!r}: use one of {known}, or add it to "
            "worker/architectures.py"
        )
    if architecture.task != task:
        suitable = ", ".join(
            sorted(key for key, value in ARCHITECTURES.items() if value.task == task)
        )
        raise ModelError(
            f"architecture {name!r} is for {architecture.task}, not {task}: "
            f"use one of {suitable}"
        )
    return architecture


def build(name: str, task: str, num_classes: int = 1) -> nn.Module:
    """A fresh model of architecture `name` with random weights."""
    return get_architecture(name, task).build(num_classes)


def output_layer(model: nn.Module) -> nn.Linear | nn.Conv2d:
    """The layer that produces the logits: the last Linear or Conv2d in the model."""
    layers = [
        module
        for module in model.modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
    ]
    if not layers:
        raise ModelError(f"{type(model).__name__} has no Linear or Conv2d layer")
    return layers[-1]
