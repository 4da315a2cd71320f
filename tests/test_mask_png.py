"""Mask PNGs written from the model-size mask: the same pixels as a full-size scale."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from worker.mask_png import encode_mask_png, nearest_source


def scaled(mask: np.ndarray, width_px: int, height_px: int) -> np.ndarray:
    """The reference: the full-size mask built by indexing, as 0/255 bytes."""
    rows = nearest_source(height_px, mask.shape[0])
    cols = nearest_source(width_px, mask.shape[1])
    return np.where(mask[rows][:, cols], 255, 0).astype(np.uint8)


def idat_of(png: bytes) -> bytes:
    position, data = 8, b""
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        if kind == b"IDAT":
            data += png[position + 8 : position + 8 + length]
        position += 12 + length
    return data


def random_mask(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    mask[shape[0] // 4 : shape[0] // 2, shape[1] // 3 :] = True
    mask |= rng.random(shape) > 0.97
    return mask


@pytest.mark.parametrize(
    ("mask_shape", "size_px"),
    [
        ((64, 64), (1000, 750)),
        ((64, 64), (750, 1000)),
        ((64, 64), (64, 64)),
        ((64, 64), (40, 30)),
        ((64, 48), (1, 1)),
        ((512, 512), (4032, 3024)),
    ],
)
def test_the_png_holds_the_nearest_neighbour_scaled_mask(
    mask_shape: tuple[int, int], size_px: tuple[int, int]
) -> None:
    mask = random_mask(mask_shape, seed=sum(size_px))
    width_px, height_px = size_px

    png, plant_px = encode_mask_png(mask, width_px, height_px)

    expected = scaled(mask, width_px, height_px)
    with Image.open(io.BytesIO(png)) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "L", size_px)
        assert np.array_equal(np.asarray(image), expected)
    assert plant_px == np.count_nonzero(expected)


@pytest.mark.parametrize("value", [False, True])
def test_a_uniform_mask_is_a_valid_zlib_stream(value: bool) -> None:
    mask = np.full((64, 64), value)

    png, plant_px = encode_mask_png(mask, 4000, 3000)

    # zlib.decompress checks the Adler-32 combined from the pieces.
    raw = zlib.decompress(idat_of(png))
    assert len(raw) == 3000 * 4001
    assert plant_px == (4000 * 3000 if value else 0)


def test_nearest_source_takes_the_pixel_each_centre_falls_in() -> None:
    assert nearest_source(4, 2).tolist() == [0, 0, 1, 1]
    assert nearest_source(3, 2).tolist() == [0, 1, 1]
    assert nearest_source(2, 4).tolist() == [1, 3]
    assert nearest_source(5, 5).tolist() == [0, 1, 2, 3, 4]
