"""Photo decoding: formats, modes, EXIF orientation, reduced JPEG decode, bad files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.plugins.models import make_photo
from worker.errors import PhotoError
from worker.photo import decode_photo

LIMIT_PX = 100_000_000


def decode(photo: bytes, min_size_px: tuple[int, int] = (64, 64)) -> Image.Image:
    return decode_photo(photo, min_size_px=min_size_px, max_pixels=LIMIT_PX).image


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def halves(width_px: int, height_px: int) -> Image.Image:
    """Red on the left half, blue on the right."""
    image = Image.new("RGB", (width_px, height_px), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width_px // 2, height_px))
    return image


def near(
    pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12
) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_each_accepted_format_decodes_to_rgb(fmt: str) -> None:
    decoded = decode_photo(
        make_photo(120, 80, fmt), min_size_px=(64, 64), max_pixels=LIMIT_PX
    )

    assert decoded.image.mode == "RGB"
    assert (decoded.width_px, decoded.height_px) == (120, 80)
    assert near(decoded.image.getpixel((60, 40)), (30, 140, 40))


@pytest.mark.parametrize(
    ("orientation", "upright_size", "red_at"),
    [
        (1, (80, 40), (10, 20)),
        (3, (80, 40), (70, 20)),
        (6, (40, 80), (20, 10)),
        (8, (40, 80), (20, 70)),
    ],
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_makes_the_picture_upright(
    fmt: str,
    orientation: int,
    upright_size: tuple[int, int],
    red_at: tuple[int, int],
) -> None:
    # Stored 80x40 with red on the left. Orientation 6 means "turn 90 degrees
    # clockwise to view", which puts the left edge at the top.
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = encode(halves(80, 40), fmt, exif=exif.tobytes())

    width_px, height_px = upright_size
    decoded = decode_photo(
        photo, min_size_px=(height_px, width_px), max_pixels=LIMIT_PX
    )

    assert decoded.image.size == upright_size
    assert (decoded.width_px, decoded.height_px) == upright_size
    assert near(decoded.image.getpixel(red_at), (255, 0, 0), tolerance=40)


def test_a_large_jpeg_is_decoded_reduced_but_keeps_its_own_size() -> None:
    photo = make_photo(4032, 3024)

    decoded = decode_photo(photo, min_size_px=(512, 512), max_pixels=LIMIT_PX)

    # 3024 / 512 allows 1/4 at most (1/8 would give 378 rows, under 512).
    assert decoded.image.size == (1008, 756)
    assert (decoded.width_px, decoded.height_px) == (4032, 3024)


def test_the_reduction_minds_axes_swapped_by_exif() -> None:
    # Stored 4000x1000, shown 1000x4000. The model needs 2000 rows upright,
    # which are stored columns: only 1/2 keeps at least 2000 of them.
    photo = make_photo(4000, 1000, exif_orientation=6)

    decoded = decode_photo(photo, min_size_px=(2000, 128), max_pixels=LIMIT_PX)

    assert decoded.image.size == (500, 2000)
    assert (decoded.width_px, decoded.height_px) == (1000, 4000)


def test_a_phone_mpo_jpeg_is_decoded_reduced() -> None:
    first = Image.new("RGB", (2048, 1536), (30, 140, 40))
    second = Image.new("RGB", (2048, 1536), (0, 0, 0))
    photo = encode(first, "MPO", save_all=True, append_images=[second])

    decoded = decode_photo(photo, min_size_px=(224, 224), max_pixels=LIMIT_PX)

    # 1536 / 224 allows 1/4 at most.
    assert decoded.image.size == (512, 384)
    assert near(decoded.image.getpixel((100, 100)), (30, 140, 40))


def test_a_palette_photo_with_transparency_is_laid_on_white() -> None:
    image = Image.new("P", (20, 20), 0)
    image.putpalette([0, 128, 0] + [200, 0, 0] * 255)
    image.paste(1, (0, 0, 10, 20))
    photo = encode(image, "PNG", transparency=1)

    decoded = decode(photo)

    assert decoded.getpixel((2, 2)) == (255, 255, 255)
    assert decoded.getpixel((15, 2)) == (0, 128, 0)


def test_rgba_is_composited_on_white_not_dropped() -> None:
    image = Image.new("RGBA", (20, 20), (255, 0, 0, 128))
    image.paste((0, 0, 0, 0), (0, 0, 10, 20))

    decoded = decode(encode(image, "PNG"))

    assert decoded.getpixel((2, 2)) == (255, 255, 255)
    assert near(decoded.getpixel((15, 2)), (255, 127, 127), tolerance=2)


def test_grey_with_alpha_is_composited_on_white() -> None:
    image = Image.new("LA", (10, 10), (0, 0))

    assert decode(encode(image, "PNG")).getpixel((5, 5)) == (255, 255, 255)


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    levels = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(levels)
    assert image.mode.startswith("I;16")

    decoded = decode(encode(image, "PNG"))

    assert [decoded.getpixel((x, 0)) for x in range(4)] == [
        (0, 0, 0),
        (3, 3, 3),
        (128, 128, 128),
        (255, 255, 255),
    ]


def test_rgb_with_a_transparent_colour_key_is_laid_on_white() -> None:
    image = Image.new("RGB", (20, 20), (10, 20, 30))
    image.paste((0, 128, 0), (10, 0, 20, 20))

    decoded = decode(encode(image, "PNG", transparency=(10, 20, 30)))

    assert decoded.getpixel((2, 2)) == (255, 255, 255)
    assert decoded.getpixel((15, 2)) == (0, 128, 0)


def test_16_bit_grey_with_a_transparent_level_hides_only_that_level() -> None:
    # 1000 and 1001 both scale to 3: only the keyed level may turn white.
    levels = np.array([[1000, 1001, 40000]], dtype=np.uint16)
    photo = encode(Image.fromarray(levels), "PNG", transparency=1000)

    decoded = decode(photo)

    assert [decoded.getpixel((x, 0)) for x in range(3)] == [
        (255, 255, 255),
        (3, 3, 3),
        (156, 156, 156),
    ]


def test_grey_and_bilevel_become_rgb() -> None:
    grey = Image.new("L", (10, 10), 77)
    bilevel = Image.new("1", (10, 10), 1)

    assert decode(encode(grey, "PNG")).getpixel((1, 1)) == (77, 77, 77)
    assert decode(encode(bilevel, "PNG")).getpixel((1, 1)) == (255, 255, 255)


def test_a_cmyk_jpeg_becomes_rgb() -> None:
    image = Image.new("CMYK", (32, 32), (0, 255, 255, 0))

    decoded = decode(encode(image, "JPEG", quality=95))

    assert near(decoded.getpixel((16, 16)), (255, 0, 0), tolerance=20)


def test_a_photo_over_the_pixel_limit_is_refused_before_decoding() -> None:
    with pytest.raises(PhotoError, match="MAX_IMAGE_PIXELS") as caught:
        decode_photo(make_photo(200, 100), min_size_px=(64, 64), max_pixels=19_999)

    assert "200x100" in str(caught.value)


def test_a_decompression_bomb_header_is_refused_without_decoding() -> None:
    # A PNG that claims 100000 x 100000 pixels and holds none of them.
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    photo = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")

    with pytest.raises(PhotoError, match="MAX_IMAGE_PIXELS"):
        decode(photo)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_truncated_photo_is_a_photo_error(fmt: str) -> None:
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    photo = encode(noise, fmt)

    with pytest.raises(PhotoError, match="corrupt or truncated"):
        decode(photo[: len(photo) // 2])


def test_a_corrupt_jpeg_body_is_a_photo_error() -> None:
    photo = bytearray(make_photo(300, 200))
    photo[600:] = b"\xff\xd9" * ((len(photo) - 600) // 2) + b"\x00" * (len(photo) % 2)

    with pytest.raises(PhotoError):
        decode(bytes(photo))


@pytest.mark.parametrize(
    ("photo", "says"),
    [
        (b"", "empty"),
        (b'{"not": "a photo"}', "text"),
        (b"\x00\x01\x02\x03" * 50, "not a JPEG, PNG or WebP"),
    ],
)
def test_a_non_image_is_a_photo_error(photo: bytes, says: str) -> None:
    with pytest.raises(PhotoError, match=says):
        decode(photo)


def test_other_image_formats_are_refused() -> None:
    gif = encode(Image.new("RGB", (10, 10)), "GIF")

    with pytest.raises(PhotoError, match="not a JPEG, PNG or WebP"):
        decode(gif)
