"""Running both models on one photo: presence, then segmentation and its mask.

The photo is decoded once (see `worker.photo`) at the smallest scale that still
covers both models' inputs, and each model gets its own bilinear resize of
that image. The mask is thresholded and cleaned up at the model's input size,
then scaled to the photo's own upright size with nearest neighbour (it keeps
the values 0 and 255) while it is written as an 8-bit greyscale PNG (see
`worker.mask_png`).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from worker.config import Settings
from worker.errors import ModelError
from worker.mask_png import encode_mask_png
from worker.model_meta import ModelMeta, Postprocess
from worker.photo import decode_photo
from worker.registry import (
    LoadedModel,
    load_model,
    storage_location,
)
from worker.storage import open_storage

#: Pillow's reducing_gap for the resize to a model's input: fast, and
#: indistinguishable from an exact resize at this gap.
_RESIZE_REDUCING_GAP = 3.0


@dataclass(frozen=True)
class Presence:
    """Whether the plants are in the photo: sigmoid score, label and model version."""

    score: float
    label: str
    model_v: str

    def as_pred(self) -> dict[str, object]:
        """The `pred.presence` object: score, label and model_v."""
        return {"score": self.score, "label": self.label, "model_v": self.model_v}


@dataclass(frozen=True)
class Segmentation:
    """The plant mask as PNG (0/255, upright, photo size) and the share it covers."""

    mask_png: bytes
    cover_pct: float
    model_v: str


@dataclass(frozen=True)
class Prediction:
    """Both results for one photo and the time each stage took.

    `timings_ms` holds `decode`, `preprocess` (resizing and tensors for both
    models), `presence` and, when segmentation ran, `segmentation` (forward
    pass and threshold) and `mask_encode` (clean-up, scaling and PNG).
    """

    presence: Presence
    segmentation: Segmentation | None
    timings_ms: dict[str, float]


class ModelRunner:
    """One loaded model with its input transform, ready for batch-of-one calls."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.meta = loaded.meta
        self.module = loaded.module
        self.device = loaded.device

        # (x / 255 - mean) / std as one multiply (uint8 in, float32 out) and one
        # subtract, on pixels in HWC order, where these run fastest.
        mean = torch.tensor(self.meta.normalize.mean, dtype=torch.float32)
        std = torch.tensor(self.meta.normalize.std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (mean / std).to(self.device)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """The model's input: resized, normalized, float32 NCHW in channels_last."""
        size = (self.meta.input_width_px, self.meta.input_height_px)
        if image.size != size:
            image = image.resize(
                size, Image.Resampling.BILINEAR, reducing_gap=_RESIZE_REDUCING_GAP
            )

        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
        pixels = pixels.to(self.device, non_blocking=True)
        normalized = torch.mul(pixels, self._scale).sub_(self._shift)
        # HWC viewed as NCHW is channels_last already: no copy, no reorder.
        return normalized.permute(2, 0, 1).unsqueeze(0)

    def warm_up(self) -> None:
        """One pass on a blank input, so the first photo does not pay torch's setup."""
        blank = Image.new(
            "RGB", (self.meta.input_width_px, self.meta.input_height_px), (0, 0, 0)
        )
        self.forward(self.prepare(blank))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw logits for one batch; ModelError if the model cannot run on it."""
        try:
            with torch.inference_mode():
                logits: torch.Tensor = self.module(batch)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            height_px, width_px = self.meta.input_size
            detail = str(exc).strip().splitlines()[0][:200] if str(exc) else "no detail"
            raise ModelError(
                f"{self.meta.task} model {self.meta.name} {self.meta.version} failed "
                f"on a {height_px}x{width_px} input ({detail}); check input_size "
                "and architecture in its model_meta.json"
            ) from None
        return logits


class Predictor:
    """Both configured models, loaded; `predict` runs them on the bytes of a photo."""

    def __init__(
        self,
        presence: LoadedModel,
        segmentation: LoadedModel,
        *,
        source: str,
        max_image_pixels: int,
    ) -> None:
        self._presence = ModelRunner(presence)
        self._segmentation = ModelRunner(segmentation)
        self.source = source
        self.max_image_pixels = max_image_pixels
        self._decode_min_px = (
            max(presence.meta.input_height_px, segmentation.meta.input_height_px),
            max(presence.meta.input_width_px, segmentation.meta.input_width_px),
        )

    @property
    def presence_meta(self) -> ModelMeta:
        """The presence model's meta."""
        return self._presence.meta

    @property
    def segmentation_meta(self) -> ModelMeta:
        """The segmentation model's meta."""
        return self._segmentation.meta

    @property
    def presence_runner(self) -> ModelRunner:
        """The presence model and its input transform (for benchmarks and tools)."""
        return self._presence

    @property
    def segmentation_runner(self) -> ModelRunner:
        """The segmentation model and its input transform."""
        return self._segmentation

    def warm_up(self) -> None:
        """Run each model once on a blank input (done by `get_predictor`)."""
        self._presence.warm_up()
        self._segmentation.warm_up()

    def predict(self, photo: bytes, *, always_segment: bool = False) -> Prediction:
        """Presence, then segmentation when present (or always); PhotoError if bad."""
        timings_ms: dict[str, float] = {}
        clock = _Clock()

        decoded = decode_photo(
            photo, min_size_px=self._decode_min_px, max_pixels=self.max_image_pixels
        )
        timings_ms["decode"] = clock.lap_ms()

        presence_input = self._presence.prepare(decoded.image)
        timings_ms["preprocess"] = clock.lap_ms()

        presence = self._score(presence_input)
        timings_ms["presence"] = clock.lap_ms()
        if presence.label != "present" and not always_segment:
            return Prediction(
                presence=presence, segmentation=None, timings_ms=timings_ms
            )

        segmentation_input = self._segmentation.prepare(decoded.image)
        timings_ms["preprocess"] += clock.lap_ms()

        small_mask = self._mask_at_input_size(segmentation_input)
        timings_ms["segmentation"] = clock.lap_ms()

        meta = self._segmentation.meta
        assert meta.postprocess is not None
        cleaned = postprocess(small_mask, meta.postprocess)
        mask_png, cover_pct = encode_mask(cleaned, decoded.width_px, decoded.height_px)
        timings_ms["mask_encode"] = clock.lap_ms()

        segmentation = Segmentation(
            mask_png=mask_png, cover_pct=cover_pct, model_v=meta.version
        )
        return Prediction(
            presence=presence, segmentation=segmentation, timings_ms=timings_ms
        )

    def _score(self, batch: torch.Tensor) -> Presence:
        logits = self._presence.forward(batch)
        score = float(torch.sigmoid(logits.reshape(-1)[0]).item())
        meta = self._presence.meta
        if not math.isfinite(score):
            raise ModelError(
                f"presence model {meta.name} {meta.version} gave a score of {score}; "
                "its weights are broken: publish a fixed version"
            )
        label = "present" if score >= meta.cut_off else "absent"
        return Presence(score=score, label=label, model_v=meta.version)

    def _mask_at_input_size(self, batch: torch.Tensor) -> np.ndarray:
        logits = self._segmentation.forward(batch)
        # In float64, as presence compares its score: a float32 comparison would cast
        # the threshold down and count a probability just below it as plant.
        probability = torch.sigmoid(logits[0, 0]).double()
        plant = probability >= self._segmentation.meta.cut_off
        mask: np.ndarray = plant.cpu().numpy()
        return mask


def postprocess(mask: np.ndarray, settings: Postprocess) -> np.ndarray:
    """Apply the meta's morph, then drop regions under min_area_px (bool in, out)."""
    if settings.morph is not None:
        square = np.ones((settings.morph.kernel_px,) * 2, dtype=bool)
        # Outside the picture counts as plant for erosion and as water for
        # dilation, so the photo's edge never eats into a mask that reaches it.
        if settings.morph.op == "open":
            mask = ndimage.binary_erosion(mask, square, border_value=1)
            mask = ndimage.binary_dilation(mask, square, border_value=0)
        else:
            mask = ndimage.binary_dilation(mask, square, border_value=0)
            mask = ndimage.binary_erosion(mask, square, border_value=1)

    if settings.min_area_px > 0 and mask.any():
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        areas_px = np.bincount(labels.ravel())
        keep = areas_px >= settings.min_area_px
        keep[0] = False
        mask = keep[labels]
    return mask


def encode_mask(mask: np.ndarray, width_px: int, height_px: int) -> tuple[bytes, float]:
    """The mask scaled to width_px x height_px as a 0/255 PNG, and its cover in %."""
    png, plant_px = encode_mask_png(mask, width_px, height_px)
    return png, plant_px / (width_px * height_px) * 100.0


class _Clock:
    def __init__(self) -> None:
        self._last_s = time.perf_counter()

    def lap_ms(self) -> float:
        now_s = time.perf_counter()
        lap_ms = (now_s - self._last_s) * 1000.0
        self._last_s = now_s
        return lap_ms


_predictors: dict[tuple[object, ...], Predictor] = {}
_predictors_lock = threading.Lock()


def get_predictor(settings: Settings) -> Predictor:
    """The Predictor for the configured versions, loaded once per process."""
    key = (
        storage_location(settings),
        settings.models_bucket,
        settings.presence_model_version,
        settings.segmentation_model_version,
        settings.torch_device,
        settings.max_image_pixels,
    )
    predictor = _predictors.get(key)
    if predictor is not None:
        return predictor

    with _predictors_lock:
        predictor = _predictors.get(key)
        if predictor is None:
            predictor = _load_predictor(settings)
            _predictors[key] = predictor
    return predictor


def forget_predictors() -> None:
    """Empty this process's Predictor cache (tests and tools)."""
    with _predictors_lock:
        _predictors.clear()


def _load_predictor(settings: Settings) -> Predictor:
    if settings.torch_num_threads > 0:
        torch.set_num_threads(settings.torch_num_threads)

    storage = open_storage(settings)
    try:
        presence = load_model(storage, settings, "presence")
        segmentation = load_model(storage, settings, "segmentation")
    finally:
        close = getattr(storage, "close", None)
        if callable(close):
            close()
    predictor = Predictor(
        presence,
        segmentation,
        source=storage.backend,
        max_image_pixels=settings.max_image_pixels,
    )
    predictor.warm_up()
    return predictor
