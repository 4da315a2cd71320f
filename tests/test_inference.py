"""Both models on photos: labels, thresholds, masks, cover and post-processing."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.plugins.models import (
    PRESENCE_ABSENT_V,
    PRESENT_LOGIT,
    SEGMENTATION_NEXT_V,
    PublishedModels,
    make_photo,
)
from worker.errors import PhotoError
from worker.inference import (
    ModelRunner,
    Predictor,
    encode_mask,
    get_predictor,
)
from worker.inference import (
    postprocess as clean_mask,
)
from worker.model_meta import Morph, Postprocess
from worker.registry import load_version
from worker.storage import LocalStorage

#: What the constant +3 models score, computed the way torch does it.
PRESENT_SCORE = float(torch.sigmoid(torch.tensor(PRESENT_LOGIT)).item())


def mask_of(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


@pytest.fixture
def predictor(published_models: PublishedModels) -> Predictor:
    return get_predictor(published_models.settings())


def test_a_present_photo_gets_presence_and_a_full_mask(predictor: Predictor) -> None:
    prediction = predictor.predict(make_photo(200, 120))

    assert prediction.presence.as_pred() == {
        "score": pytest.approx(PRESENT_SCORE),
        "label": "present",
        "model_v": "1.0.0",
    }
    assert prediction.segmentation is not None
    assert prediction.segmentation.model_v == "1.0.1"
    assert prediction.segmentation.cover_pct == 100.0
    mask = mask_of(prediction.segmentation.mask_png)
    assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (200, 120))
    assert mask.getextrema() == (255, 255)
    assert set(prediction.timings_ms) == {
        "decode",
        "preprocess",
        "presence",
        "segmentation",
        "mask_encode",
    }
    assert all(value >= 0 for value in prediction.timings_ms.values())


def test_an_absent_photo_skips_segmentation(published_models: PublishedModels) -> None:
    settings = published_models.settings(presence_model_version=PRESENCE_ABSENT_V)
    predictor = get_predictor(settings)

    prediction = predictor.predict(make_photo(64, 64, "PNG"))

    assert prediction.presence.label == "absent"
    assert prediction.presence.score == pytest.approx(1 - PRESENT_SCORE)
    assert prediction.presence.model_v == PRESENCE_ABSENT_V
    assert prediction.segmentation is None
    assert set(prediction.timings_ms) == {"decode", "preprocess", "presence"}


def test_always_segment_runs_segmentation_on_an_absent_photo(
    published_models: PublishedModels,
) -> None:
    settings = published_models.settings(presence_model_version=PRESENCE_ABSENT_V)

    prediction = get_predictor(settings).predict(
        make_photo(64, 64), always_segment=True
    )

    assert prediction.segmentation is not None
    assert prediction.segmentation.cover_pct == 100.0


def test_latest_and_a_version_switch_show_in_model_v(
    published_models: PublishedModels,
) -> None:
    settings = published_models.settings(
        presence_model_version="latest", segmentation_model_version="latest"
    )

    predictor = get_predictor(settings)
    prediction = predictor.predict(make_photo(64, 64))

    assert predictor.presence_meta.version == PRESENCE_ABSENT_V
    assert predictor.segmentation_meta.version == SEGMENTATION_NEXT_V
    assert prediction.presence.model_v == PRESENCE_ABSENT_V


def test_the_predictor_is_cached_per_process(
    published_models: PublishedModels, predictor: Predictor
) -> None:
    assert get_predictor(published_models.settings()) is predictor
    assert predictor.source == "local"
    assert predictor.presence_meta.name == "presence_mobilenetv2"
    assert predictor.segmentation_meta.name == "unet_aquavplant"
    assert predictor.presence_runner.meta is predictor.presence_meta
    assert not predictor.segmentation_runner.module.training


def red_finder() -> torch.nn.Module:
    """A real 1x1 convolution that calls red pixels plant and blue ones water."""
    conv = torch.nn.Conv2d(3, 1, kernel_size=1)
    with torch.no_grad():
        # On normalized input: red scores R - G - 1 = +3.3, blue -1.1.
        conv.weight.copy_(torch.tensor([1.0, -1.0, 0.0]).reshape(1, 3, 1, 1))
        conv.bias.fill_(-1.0)
    return conv.eval()


@pytest.mark.parametrize(
    ("orientation", "upright_px", "plant_at", "water_at"),
    [
        (1, (160, 90), (20, 45), (140, 45)),
        (3, (160, 90), (140, 45), (20, 45)),
        (6, (90, 160), (45, 20), (45, 140)),
        (8, (90, 160), (45, 140), (45, 20)),
    ],
)
def test_an_exif_rotated_photo_gets_an_upright_mask(
    predictor: Predictor,
    monkeypatch: pytest.MonkeyPatch,
    orientation: int,
    upright_px: tuple[int, int],
    plant_at: tuple[int, int],
    water_at: tuple[int, int],
) -> None:
    # Stored 160x90, red (plant to the stand-in model) on the left, blue on the
    # right; orientation 6 turns the left edge to the top when viewed.
    stored = Image.new("RGB", (160, 90), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 80, 90))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif.tobytes())
    monkeypatch.setattr(predictor.segmentation_runner, "module", red_finder())

    prediction = predictor.predict(buffer.getvalue())

    assert prediction.segmentation is not None
    mask = mask_of(prediction.segmentation.mask_png)
    assert mask.size == upright_px
    assert mask.getpixel(plant_at) == 255
    assert mask.getpixel(water_at) == 0
    assert prediction.segmentation.cover_pct == pytest.approx(50.0, abs=2.0)


def test_a_bad_photo_is_a_photo_error(predictor: Predictor) -> None:
    with pytest.raises(PhotoError):
        predictor.predict(b"GIF89a not really")


def publish_thresholds(
    published_models: PublishedModels,
    storage_dir: Path,
    *,
    presence_threshold: float,
    segmentation_threshold: float,
) -> None:
    """A copy of the published bucket whose 1.0.0 and 1.0.1 have other thresholds."""
    shutil.copytree(published_models.storage_dir, storage_dir, copy_function=os.link)
    for task, field, value in (
        ("presence/1.0.0", "threshold", presence_threshold),
        ("segmentation/1.0.1", "logit_threshold", segmentation_threshold),
    ):
        meta = storage_dir / "models" / task / "model_meta.json"
        fields = json.loads(meta.read_text())
        fields[field] = value
        meta.unlink()
        meta.write_text(json.dumps(fields))


def test_a_score_equal_to_the_threshold_counts_as_present(
    published_models: PublishedModels, tmp_path: Path
) -> None:
    publish_thresholds(
        published_models,
        tmp_path / "storage",
        presence_threshold=PRESENT_SCORE,
        segmentation_threshold=PRESENT_SCORE,
    )
    settings = published_models.settings(local_storage_dir=str(tmp_path / "storage"))

    prediction = get_predictor(settings).predict(make_photo(64, 64))

    assert prediction.presence.label == "present"
    assert prediction.segmentation is not None
    assert prediction.segmentation.cover_pct == 100.0


def test_a_score_just_under_the_threshold_is_absent(
    published_models: PublishedModels, tmp_path: Path
) -> None:
    # The smallest float64 step: both models must compare in full precision, or
    # the threshold rounded to float32 would equal the score.
    above = math.nextafter(PRESENT_SCORE, 1.0)
    publish_thresholds(
        published_models,
        tmp_path / "storage",
        presence_threshold=above,
        segmentation_threshold=above,
    )
    settings = published_models.settings(local_storage_dir=str(tmp_path / "storage"))
    predictor = get_predictor(settings)

    prediction = predictor.predict(make_photo(64, 64), always_segment=True)

    assert prediction.presence.label == "absent"
    assert prediction.segmentation is not None
    assert prediction.segmentation.cover_pct == 0.0
    assert mask_of(prediction.segmentation.mask_png).getextrema() == (0, 0)


def test_the_input_is_normalized_in_channels_last(
    published_models: PublishedModels, tmp_path: Path
) -> None:
    loaded = load_version(
        LocalStorage(published_models.storage_dir),
        "models",
        "presence",
        "1.0.0",
        cache_dir=tmp_path / "cache",
        device=torch.device("cpu"),
    )
    image = Image.new("RGB", (300, 200), (255, 0, 128))

    batch = ModelRunner(loaded).prepare(image)

    assert batch.shape == (1, 3, 64, 64)
    assert batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)
    expected = [
        (1.0 - 0.485) / 0.229,
        (0.0 - 0.456) / 0.224,
        (128 / 255 - 0.406) / 0.225,
    ]
    assert batch[0, :, 10, 10].tolist() == pytest.approx(expected, abs=1e-5)


def square_mask(size_px: int, *boxes: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((size_px, size_px), dtype=bool)
    for top, left, bottom, right in boxes:
        mask[top:bottom, left:right] = True
    return mask


def test_opening_removes_specks_and_keeps_large_regions() -> None:
    mask = square_mask(32, (2, 2, 4, 4), (10, 10, 30, 30))
    settings = Postprocess(min_area_px=0, morph=Morph(op="open", kernel_px=3))

    cleaned = clean_mask(mask, settings)

    assert not cleaned[2:4, 2:4].any()
    assert np.array_equal(cleaned[10:30, 10:30], mask[10:30, 10:30])


def test_closing_fills_small_holes() -> None:
    mask = square_mask(32, (4, 4, 28, 28))
    mask[15, 15] = False
    settings = Postprocess(min_area_px=0, morph=Morph(op="close", kernel_px=3))

    assert clean_mask(mask, settings)[15, 15]


@pytest.mark.parametrize("op", ["open", "close"])
def test_the_photo_edge_does_not_eat_into_a_full_mask(op: str) -> None:
    full = np.ones((16, 16), dtype=bool)
    settings = Postprocess(min_area_px=0, morph=Morph(op=op, kernel_px=5))  # type: ignore[arg-type]

    assert clean_mask(full, settings).all()


def test_min_area_drops_small_regions_counted_8_connected() -> None:
    mask = square_mask(32, (20, 20, 30, 30))
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # one diagonal region of 3 px
    mask[1, 10] = True  # one region of 1 px

    kept = clean_mask(mask, Postprocess(min_area_px=3, morph=None))

    assert kept[1, 1] and kept[3, 3]
    assert not kept[1, 10]
    assert kept[20:30, 20:30].all()


def test_the_mask_is_scaled_to_the_photo_and_cover_counts_its_pixels() -> None:
    mask = np.array([[True, False], [False, False]])

    png, cover_pct = encode_mask(mask, 40, 30)

    image = mask_of(png)
    assert (image.mode, image.size) == ("L", (40, 30))
    pixels = np.asarray(image)
    assert set(np.unique(pixels)) == {0, 255}
    assert pixels[:15, :20].all() and not pixels[15:, :].any()
    assert cover_pct == 25.0
