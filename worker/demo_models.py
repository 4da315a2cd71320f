"""Demo weights for the real architectures, made in seconds without a model hub.

No trained hyacinth weights ship with this repository, and a hub cannot be reached
from every machine. Untrained networks give every photo the same score, which shows
nothing. So the demo does the cheapest thing that makes the output follow the photo:
keep the random convolution filters, measure their batch-norm statistics on synthetic
photos, and fit only the last layer (a logistic regression) to tell green mats from
water. The result knows colour, not hyacinth: it is for seeing the pipeline work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from worker.architectures import build
from worker.sample_photos import water_scene

PRESENCE_INPUT_PX = 224
SEGMENTATION_INPUT_PX = 512
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _to_tensor(image: Image.Image, size_px: int) -> torch.Tensor:
    pixels = np.asarray(image.resize((size_px, size_px)), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None]
    mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_STD).view(1, 3, 1, 1)
    return (tensor - mean) / std


def _calibrate_batch_norm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Replace the batch-norm running statistics with those of `batches`."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None

    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()


def _fit_logistic(
    features: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a logistic regression on standardized `features`."""
    mean = features.mean(0)
    std = features.std(0) + 1e-6
    standardized = (features - mean) / std

    weight = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = (
            nn.functional.binary_cross_entropy_with_logits(
                standardized @ weight + bias, labels
            )
            + 1e-3 * (weight * weight).sum()
        )
        value.backward()  # type: ignore[no-untyped-call]
        return value

    optimizer.step(loss)  # type: ignore[no-untyped-call]

    # Fold the standardization into the layer: w·(x-m)/s + b = (w/s)·x + (b - w·m/s).
    folded_weight = weight.detach() / std
    folded_bias = bias.detach() - (folded_weight * mean).sum()
    return folded_weight, folded_bias


def fit_presence(seed: int = 7) -> nn.Module:
    """MobileNetV2 whose classifier tells green mats from open water."""
    torch.manual_seed(seed)
    model = build("mobilenet_v2", "presence")
    scenes = [
        water_scene(320, 240, mats=index % 3, seed=seed * 100 + index)
        for index in range(36)
    ]
    inputs = [_to_tensor(image, PRESENCE_INPUT_PX) for image, _ in scenes]

    _calibrate_batch_norm(model, inputs[:16])

    features_module: nn.Module = model.features  # type: ignore[assignment]
    with torch.no_grad():
        features = torch.cat([features_module(x).mean((2, 3)) for x in inputs])
    labels = torch.tensor([float(mask.any()) for _, mask in scenes])
    weight, bias = _fit_logistic(features, labels)

    classifier: nn.Linear = model.classifier[1]  # type: ignore[index, assignment]
    with torch.no_grad():
        classifier.weight.copy_(weight.view(1, -1))
        classifier.bias.copy_(bias)
    return model


def fit_segmentation(seed: int = 7) -> nn.Module:
    """U-Net whose head marks green mat pixels."""
    torch.manual_seed(seed)
    model = build("unet_resnet34", "segmentation")
    scenes = [
        water_scene(640, 480, mats=1 + index % 2, seed=seed * 100 + index)
        for index in range(8)
    ]
    inputs = [_to_tensor(image, SEGMENTATION_INPUT_PX) for image, _ in scenes]

    _calibrate_batch_norm(model, inputs[:4])

    encoder: nn.Module = model.encoder  # type: ignore[assignment]
    decoder: nn.Module = model.decoder  # type: ignore[assignment]
    generator = torch.Generator().manual_seed(seed)
    pixel_features, pixel_labels = [], []
    with torch.no_grad():
        for (_, mask), x in zip(scenes[4:], inputs[4:], strict=True):
            decoded = decoder(encoder(x))[0]
            channels = decoded.shape[0]
            flat = decoded.reshape(channels, -1).T
            size = (SEGMENTATION_INPUT_PX, SEGMENTATION_INPUT_PX)
            truth = np.asarray(Image.fromarray(mask).resize(size), dtype=np.float32)
            chosen = torch.randperm(flat.shape[0], generator=generator)[:20_000]
            pixel_features.append(flat[chosen])
            pixel_labels.append(torch.from_numpy(truth.reshape(-1))[chosen])
    weight, bias = _fit_logistic(torch.cat(pixel_features), torch.cat(pixel_labels))

    head: nn.Conv2d = model.segmentation_head[0]  # type: ignore[index, assignment]
    with torch.no_grad():
        head.weight.zero_()
        centre = head.kernel_size[0] // 2
        head.weight[0, :, centre, centre] = weight
        head.bias.copy_(bias)  # type: ignore[union-attr]
    return model


def write_demo_weights(out_dir: Path) -> tuple[Path, Path]:
    """Fit both demo models once and save their state dicts; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    presence_path = out_dir / "presence_mobilenetv2.pt"
    segmentation_path = out_dir / "unet_aquavplant.pt"

    # Seeded, so a later run would fit the same weights: keep the first run's.
    if not presence_path.exists():
        torch.save(fit_presence().state_dict(), presence_path)
    if not segmentation_path.exists():
        torch.save(fit_segmentation().state_dict(), segmentation_path)
    return presence_path, segmentation_path
