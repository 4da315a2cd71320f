"""Decoding an observation photo, once, into an upright RGB image at a useful size.

JPEG, PNG and WebP are accepted. Large JPEGs are decoded at a reduced scale
(Pillow's draft mode: 1/2, 1/4 or 1/8, done inside the JPEG decoder) whenever
that still gives at least the largest model input on each axis; a 12-megapixel
phone photo then never exists in memory at full size. The photo's own upright
size is kept, since the mask is drawn at it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from worker.errors import PhotoError

#: Formats Pillow may use to open a photo; everything else is refused unread.
FORMATS = ("JPEG", "PNG", "WEBP")

#: What transparent parts of a photo are laid on.
BACKGROUND_RGB = (255, 255, 255)

# decode_photo checks the pixel count itself, against MAX_IMAGE_PIXELS from
# the settings. Pillow's own check is process-wide and below twice its limit
# only warns, so it is switched off rather than left to disagree with ours.
Image.MAX_IMAGE_PIXELS = None

#: EXIF orientation -> the transpose that makes the picture upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

#: Orientations that turn the picture by a quarter, swapping width and height.
_SWAPS_AXES = frozenset({5, 6, 7, 8})

#: Errors Pillow raises on truncated or damaged image data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)


@dataclass(frozen=True)
class DecodedPhoto:
    """An upright RGB image (maybe reduced) and the photo's own upright size."""

    image: Image.Image
    width_px: int
    height_px: int
    format: str


def decode_photo(
    photo: bytes, *, min_size_px: tuple[int, int], max_pixels: int
) -> DecodedPhoto:
    """Decode `photo` upright in RGB, reduced while still >= min_size_px (h, w)."""
    try:
        image = Image.open(io.BytesIO(photo), formats=FORMATS)
    except UnidentifiedImageError:
        claimed = _claimed_format(photo)
        if claimed:
            raise PhotoError(
                f"corrupt or truncated image: starts like a {claimed} but its "
                "header cannot be read"
            ) from None
        raise PhotoError(f"not a JPEG, PNG or WebP image ({_sniff(photo)})") from None
    except _DECODE_ERRORS as exc:
        raise PhotoError(f"corrupt or truncated image header ({_short(exc)})") from None

    width_px, height_px = image.size
    if width_px * height_px > max_pixels:
        raise PhotoError(
            f"photo is {width_px}x{height_px} = {width_px * height_px} pixels, over "
            f"the limit of {max_pixels} (MAX_IMAGE_PIXELS); raise the setting if "
            "such photos are expected"
        )

    # A JPEG's EXIF is read from its header, before the draft scale is chosen;
    # other formats may keep EXIF after the pixels, so they are read first.
    is_jpeg = image.format in ("JPEG", "MPO")
    orientation = _orientation(image) if is_jpeg else 1
    if is_jpeg:
        min_height_px, min_width_px = min_size_px
        if orientation in _SWAPS_AXES:
            min_height_px, min_width_px = min_width_px, min_height_px
        image.draft("RGB", (min_width_px, min_height_px))

    try:
        image.load()
        rgb = to_rgb(image)
    except _DECODE_ERRORS as exc:
        raise PhotoError(f"corrupt or truncated image ({_short(exc)})") from None

    if not is_jpeg:
        orientation = _orientation(image)
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    if orientation in _SWAPS_AXES:
        width_px, height_px = height_px, width_px
    return DecodedPhoto(
        image=rgb, width_px=width_px, height_px=height_px, format=str(image.format)
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB: transparency laid on white, 16-bit scaled down to 8-bit."""
    mode = image.mode
    transparency = image.info.get("transparency")
    if mode == "RGB" and transparency is None:
        return image

    if mode.startswith("I"):
        # 16-bit grey (I;16, I;16B, or I holding 0..65535): keep the top 8 bits,
        # so the full range maps onto 0..255 instead of clipping at 255.
        levels = np.asarray(image).astype(np.int64).clip(0, 65535)
        grey = Image.fromarray((levels >> 8).astype(np.uint8), "L").convert("RGB")
        if not isinstance(transparency, int):
            return grey
        # A PNG tRNS key names one 16-bit level, which the shift would merge with
        # its neighbours: find its pixels before it.
        opaque = np.where(levels == transparency, 0, 255).astype(np.uint8)
        return _on_background(grey, Image.fromarray(opaque, "L"))

    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or transparency is not None:
        rgba = image.convert("RGBA")
        return _on_background(rgba, rgba.getchannel("A"))

    # P, L, 1, CMYK and YCbCr all have a direct conversion.
    return image.convert("RGB")


def _on_background(image: Image.Image, alpha: Image.Image) -> Image.Image:
    """`image` laid on the white background through `alpha`, in RGB."""
    background = Image.new("RGB", image.size, BACKGROUND_RGB)
    background.paste(image, mask=alpha)
    return background


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        # EXIF is optional metadata; a damaged block must not cost the photo.
        return 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def _claimed_format(photo: bytes) -> str:
    if photo.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if photo.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if photo[:4] == b"RIFF" and photo[8:12] == b"WEBP":
        return "WebP"
    return ""


def _sniff(photo: bytes) -> str:
    if not photo:
        return "the file is empty"
    if photo[:1] in (b"{", b"[") or photo[:5].lower() in (b"<!doc", b"<html"):
        return "it looks like text"
    return f"{len(photo)} bytes starting {photo[:8].hex()}"


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:160]
