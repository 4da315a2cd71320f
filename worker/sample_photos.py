"""Synthetic observation photos for the demo and the benchmark: water and mats."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: EXIF tag number of the orientation field.
EXIF_ORIENTATION_TAG = 0x0112

_WATER_RGB = (38, 84, 112)
_PLANT_RGB = (52, 128, 44)


def water_scene(
    width_px: int,
    height_px: int,
    *,
    mats: int = 0,
    seed: int = 0,
) -> tuple[Image.Image, np.ndarray]:
    """A water surface with `mats` floating green patches, and the true plant mask."""
    rng = np.random.default_rng(seed)

    rows = np.arange(height_px, dtype=np.float32)[:, None]
    cols = np.arange(width_px, dtype=np.float32)[None, :]
    ripple = np.sin(rows / 9.0 + np.cos(cols / 23.0) * 2.0) * 10.0

    pixels = np.empty((height_px, width_px, 3), dtype=np.float32)
    for channel, level in enumerate(_WATER_RGB):
        pixels[..., channel] = level + ripple
    plant_mask = np.zeros((height_px, width_px), dtype=bool)

    short_side_px = min(width_px, height_px)
    for _ in range(mats):
        centre_row = rng.uniform(0.15, 0.85) * height_px
        centre_col = rng.uniform(0.15, 0.85) * width_px
        radius_row = rng.uniform(0.08, 0.22) * short_side_px
        radius_col = rng.uniform(0.08, 0.30) * short_side_px
        inside = ((rows - centre_row) / radius_row) ** 2 + (
            (cols - centre_col) / radius_col
        ) ** 2 <= 1.0
        plant_mask |= inside

    leaf_texture = rng.normal(0.0, 14.0, size=(height_px, width_px)).astype(np.float32)
    for channel, level in enumerate(_PLANT_RGB):
        plant = level + leaf_texture * (1.3 if channel == 1 else 0.8)
        pixels[..., channel] = np.where(plant_mask, plant, pixels[..., channel])

    pixels += rng.normal(0.0, 6.0, size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image, plant_mask


def encode_jpeg(
    image: Image.Image, *, quality: int = 90, exif_orientation: int | None = None
) -> bytes:
    """JPEG bytes of `image`, with an EXIF orientation tag when one is given."""
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[EXIF_ORIENTATION_TAG] = exif_orientation

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def phone_jpeg(*, plants: bool, seed: int = 0) -> bytes:
    """A 4032x3024 (12 MP) phone-sized JPEG of about 5 MB, with or without mats."""
    image, _ = water_scene(4032, 3024, mats=3 if plants else 0, seed=seed)
    return encode_jpeg(image, quality=95)


def corrupt_jpeg(seed: int = 0) -> bytes:
    """Bytes that start like a JPEG and then break off: a truncated upload."""
    image, _ = water_scene(320, 240, mats=1, seed=seed)
    whole = encode_jpeg(image)
    return whole[: len(whole) // 3]
