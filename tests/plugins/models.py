"""Fixtures: tiny published models whose outputs are known constants, and photos.

The models have the real architectures at a 64x64 input. Their output layer
has zero weights and a chosen bias, so every output is that bias whatever the
photo: sigmoid(+3) ~ 0.953 (present, every pixel plant) and sigmoid(-3) ~ 0.047.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from worker.architectures import build, output_layer
from worker.config import Settings
from worker.publish import publish
from worker.storage import LocalStorage

#: The input size of every test model: small keeps the suite fast.
TEST_INPUT_SIZE_PX = (64, 64)

#: The bias of the output layer: +3 gives score ~0.953, -3 gives ~0.047.
PRESENT_LOGIT = 3.0
ABSENT_LOGIT = -3.0

PRESENCE_ARCHITECTURE = "mobilenet_v2"
SEGMENTATION_ARCHITECTURE = "unet_resnet34"

#: Published versions: presence always present / always absent; segmentation
#: every pixel plant, twice, so that a version switch shows in model_v.
PRESENCE_PRESENT_V = "1.0.0"
PRESENCE_ABSENT_V = "2.0.0"
SEGMENTATION_V = "1.0.1"
SEGMENTATION_NEXT_V = "1.0.2"


def constant_state_dict(
    architecture: str, task: str, logit: float
) -> dict[str, torch.Tensor]:
    """A state dict of `architecture` whose every output is `logit`."""
    model = build(architecture, task)
    layer = output_layer(model)
    with torch.no_grad():
        layer.weight.zero_()
        assert layer.bias is not None
        layer.bias.fill_(logit)
    return {key: value.contiguous() for key, value in model.state_dict().items()}


def save_weights(state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Write `state` as safetensors when the path says so, else with torch.save."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(dict(state), path)
    else:
        torch.save(dict(state), path)
    return path


def make_photo(
    width_px: int,
    height_px: int,
    fmt: str = "JPEG",
    color: tuple[int, int, int] = (30, 140, 40),
    exif_orientation: int | None = None,
) -> bytes:
    """A plain photo of one colour, encoded as `fmt`, with an EXIF orientation."""
    image = Image.new("RGB", (width_px, height_px), color)
    options: dict[str, object] = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        options["exif"] = exif.tobytes()
    if fmt == "JPEG":
        options["quality"] = 90

    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class PublishedModels:
    """A local models bucket holding the constant models, and the env to use it."""

    storage_dir: Path
    cache_dir: Path
    weights_dir: Path
    env: dict[str, str]

    def settings(self, **overrides: object) -> Settings:
        """Settings from `env`, with fields replaced by `overrides`."""
        settings = Settings.from_env(self.env)
        return dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def published_models(tmp_path_factory: pytest.TempPathFactory) -> PublishedModels:
    """Presence 1.0.0 present, 2.0.0 absent; segmentation 1.0.1, 1.0.2 all plant."""
    root = tmp_path_factory.mktemp("published_models")
    storage_dir = root / "storage"
    weights_dir = root / "weights"
    storage = LocalStorage(storage_dir)

    present = save_weights(
        constant_state_dict(PRESENCE_ARCHITECTURE, "presence", PRESENT_LOGIT),
        weights_dir / "presence_present.pt",
    )
    absent = save_weights(
        constant_state_dict(PRESENCE_ARCHITECTURE, "presence", ABSENT_LOGIT),
        weights_dir / "presence_absent.pt",
    )
    plant = save_weights(
        constant_state_dict(SEGMENTATION_ARCHITECTURE, "segmentation", PRESENT_LOGIT),
        weights_dir / "segmentation_plant.pt",
    )

    for task, version, weights, architecture in (
        ("presence", PRESENCE_PRESENT_V, present, PRESENCE_ARCHITECTURE),
        ("presence", PRESENCE_ABSENT_V, absent, PRESENCE_ARCHITECTURE),
        ("segmentation", SEGMENTATION_V, plant, SEGMENTATION_ARCHITECTURE),
        ("segmentation", SEGMENTATION_NEXT_V, plant, SEGMENTATION_ARCHITECTURE),
    ):
        publish(
            storage,
            "models",
            task,
            version,
            weights,
            architecture=architecture,
            input_size=TEST_INPUT_SIZE_PX,
        )

    cache_dir = root / "model_cache"
    env = {
        "LOCAL_STORAGE_DIR": str(storage_dir),
        "MODEL_CACHE_DIR": str(cache_dir),
        "PRESENCE_MODEL_VERSION": PRESENCE_PRESENT_V,
        "SEGMENTATION_MODEL_VERSION": SEGMENTATION_V,
    }
    return PublishedModels(
        storage_dir=storage_dir, cache_dir=cache_dir, weights_dir=weights_dir, env=env
    )
