"""The schema of model_meta.json, the description published beside each model's weights.

Every field is required unless noted; an unknown field is refused, so a misspelt
one is caught at load time rather than silently ignored.

- `task`: `presence` or `segmentation`; must match the folder the file is in.
- `name`: the model's name, e.g. `presence_mobilenetv2`.
- `version`: must match the folder, e.g. `1.0.0` (PEP 440 / semantic version).
- `format`: `state_dict` (a torch file holding a state dict, loaded with
  `weights_only=True`) or `safetensors`.
- `weights_filename`: a plain file name in the same folder.
- `architecture`: a name known to `worker.architectures`, for the same task.
- `num_classes`: 1 (both tasks are binary, with a sigmoid).
- `input_size`: `[height, width]` in pixels the model runs at.
- `normalize`: `{"mean": [r, g, b], "std": [r, g, b]}` on 0..1 pixel values.
- `activation`: `sigmoid`.
- `threshold` (presence only): a score at or above it means `present`.
- `logit_threshold` (segmentation only): despite the name, compared with the
  sigmoid probability of each pixel; at or above it the pixel is plant.
- `postprocess` (segmentation only), applied in this order to the mask at the
  model's input size, before it is scaled to the photo:
    - `morph`: `null`, or `{"op": "open" | "close", "kernel_px": K}` with K an odd
      integer >= 3: a binary opening (removes specks and thin bridges narrower
      than K) or closing (fills holes and gaps narrower than K) with a K x K
      square; the photo's edge never erodes the mask.
    - `min_area_px`: connected regions (8-connected) smaller than this many
      pixels are dropped; 0 keeps everything.
- `metrics`: free-form numbers from training, e.g. `{"f1": 0.9}`; may be `{}`.
- `sha256`: hex digest of the weights file, or `""` in older files (then the
  download is not checked and cannot be found in the cache before downloading).
- `exported_at`: ISO 8601 time of publishing, or `""` in older files.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.errors import ModelError

#: The tasks a model can serve.
TASKS = ("presence", "segmentation")

#: The file describing a model, beside its weights in `{task}/{version}/`.
META_FILENAME = "model_meta.json"

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Normalize(_Strict):
    """Per-channel mean and standard deviation, on pixel values scaled to 0..1."""

    mean: tuple[float, float, float]
    std: tuple[
        Annotated[float, Field(gt=0.0)],
        Annotated[float, Field(gt=0.0)],
        Annotated[float, Field(gt=0.0)],
    ]


class Morph(_Strict):
    """A binary opening or closing with a square kernel of odd size."""

    op: Literal["open", "close"]
    kernel_px: Annotated[int, Field(ge=3)]

    @field_validator("kernel_px")
    @classmethod
    def _odd(cls, kernel_px: int) -> int:
        if kernel_px % 2 == 0:
            raise ValueError("must be odd, so the kernel has a centre pixel")
        return kernel_px


class Postprocess(_Strict):
    """Clean-up of the segmentation mask at the model's input size."""

    min_area_px: Annotated[int, Field(ge=0)]
    morph: Morph | None


class ModelMeta(_Strict):
    """One model_meta.json, validated; see the module docstring for each field."""

    task: Literal["presence", "segmentation"]
    name: Annotated[str, Field(min_length=1)]
    version: Annotated[str, Field(min_length=1)]
    format: Literal["state_dict", "safetensors"]
    weights_filename: Annotated[str, Field(min_length=1)]
    architecture: Annotated[str, Field(min_length=1)]
    num_classes: Literal[1]
    input_size: tuple[Positive, Positive]
    normalize: Normalize
    activation: Literal["sigmoid"]
    threshold: Probability | None = None
    logit_threshold: Probability | None = None
    postprocess: Postprocess | None = None
    metrics: dict[str, Any]
    sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")]
    exported_at: str

    @field_validator("sha256", mode="before")
    @classmethod
    def _lower_case_digest(cls, sha256: object) -> object:
        # A digest pasted from a tool that prints upper case is the same digest.
        return sha256.strip().lower() if isinstance(sha256, str) else sha256

    @field_validator("weights_filename")
    @classmethod
    def _plain_filename(cls, weights_filename: str) -> str:
        if "/" in weights_filename or "\\" in weights_filename:
            raise ValueError("must be a file name in the model's folder, not a path")
        if weights_filename in (".", "..", META_FILENAME):
            raise ValueError(f"cannot be {weights_filename!r}")
        return weights_filename

    @model_validator(mode="after")
    def _task_fields(self) -> ModelMeta:
        if self.task == "presence":
            _require(self, "threshold")
            _forbid(self, "logit_threshold", "postprocess")
        else:
            _require(self, "logit_threshold", "postprocess")
            _forbid(self, "threshold")
        return self

    @property
    def input_height_px(self) -> int:
        """Height of the model's input."""
        return self.input_size[0]

    @property
    def input_width_px(self) -> int:
        """Width of the model's input."""
        return self.input_size[1]

    @property
    def cut_off(self) -> float:
        """The probability at or above which a photo or pixel counts as plant."""
        value = self.threshold if self.task == "presence" else self.logit_threshold
        assert value is not None
        return value

    def to_json(self) -> str:
        """The file's text: indented JSON, without the other task's fields."""
        fields = self.model_dump(mode="json")
        for name in ("threshold", "logit_threshold", "postprocess"):
            if fields[name] is None:
                del fields[name]
        return json.dumps(fields, indent=2) + "\n"


def _require(meta: ModelMeta, *fields: str) -> None:
    for name in fields:
        if getattr(meta, name) is None:
            raise ValueError(f"{meta.task} models need the field {name!r}")


def _forbid(meta: ModelMeta, *fields: str) -> None:
    for name in fields:
        if getattr(meta, name) is not None:
            raise ValueError(f"{name!r} is only for the other task, not {meta.task}")


def parse_meta(raw: bytes, where: str) -> ModelMeta:
    """Validate the bytes of a model_meta.json; ModelError names `where` and fields."""
    try:
        return ModelMeta.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise ModelError(
            f"{where} is not a valid model description: {problems}"
        ) from None


def _describe(error: Any) -> str:
    location = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "json_invalid":
        return f"not JSON ({error['ctx']['error']})" if "ctx" in error else message
    if not location:
        return message
    return f"field {location!r}: {message}"
