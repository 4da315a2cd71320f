"""model_meta.json validation: today's files pass, each broken field is named."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.errors import ModelError
from worker.model_meta import ModelMeta, parse_meta

WHERE = "models/presence/1.0.0/model_meta.json"

PRESENCE_META: dict[str, Any] = {
    "task": "presence",
    "name": "presence_mobilenetv2",
    "version": "1.0.0",
    "format": "state_dict",
    "weights_filename": "presence_mobilenetv2.pt",
    "architecture": "mobilenet_v2",
    "num_classes": 1,
    "input_size": [224, 224],
    "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "activation": "sigmoid",
    "threshold": 0.50,
    "metrics": {"youden_j": 0.3520047962665558, "f1": 0.9},
    "sha256": "",
    "exported_at": "",
}

SEGMENTATION_META: dict[str, Any] = {
    "task": "segmentation",
    "name": "unet_aquavplant",
    "version": "1.0.1",
    "format": "state_dict",
    "weights_filename": "unet_aquavplant.pt",
    "architecture": "unet_resnet34",
    "num_classes": 1,
    "input_size": [512, 512],
    "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "activation": "sigmoid",
    "logit_threshold": 0.50,
    "postprocess": {"min_area_px": 0, "morph": None},
    "metrics": {},
    "sha256": "",
    "exported_at": "",
}


def parse(fields: dict[str, Any]) -> ModelMeta:
    return parse_meta(json.dumps(fields).encode(), WHERE)


def changed(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    fields = json.loads(json.dumps(base))
    for name, value in changes.items():
        if value is _DROP:
            del fields[name]
        else:
            fields[name] = value
    return fields


_DROP = object()


def test_the_files_in_use_today_are_valid() -> None:
    presence = parse(PRESENCE_META)
    segmentation = parse(SEGMENTATION_META)

    assert presence.input_size == (224, 224)
    assert presence.cut_off == 0.5
    assert presence.metrics["f1"] == 0.9
    assert segmentation.cut_off == 0.5
    assert segmentation.postprocess is not None
    assert segmentation.postprocess.morph is None
    assert segmentation.input_height_px == 512


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"threshold": _DROP}, "threshold"),
        ({"sha256": _DROP}, "sha256"),
        ({"input_size": [224]}, "input_size"),
        ({"input_size": "224x224"}, "input_size"),
        ({"input_size": [0, 224]}, "input_size"),
        ({"threshold": "0.5"}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"num_classes": 2}, "num_classes"),
        ({"format": "onnx"}, "format"),
        ({"activation": "softmax"}, "activation"),
        ({"normalize": {"mean": [0, 0, 0], "std": [1, 0, 1]}}, "normalize.std"),
        ({"normalize": {"mean": [0, 0], "std": [1, 1, 1]}}, "normalize.mean"),
        ({"weights_filename": "../elsewhere.pt"}, "weights_filename"),
        ({"sha256": "ABC"}, "sha256"),
        ({"treshold": 0.5}, "treshold"),
        ({"logit_threshold": 0.5}, "logit_threshold"),
        ({"task": "counting"}, "task"),
    ],
)
def test_a_broken_field_is_named_with_the_file(
    changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ModelError) as caught:
        parse(changed(PRESENCE_META, **changes))

    assert WHERE in str(caught.value)
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"postprocess": _DROP}, "postprocess"),
        ({"logit_threshold": _DROP}, "logit_threshold"),
        ({"threshold": 0.5}, "threshold"),
        ({"postprocess": {"min_area_px": -1, "morph": None}}, "min_area_px"),
        ({"postprocess": {"min_area_px": 0}}, "morph"),
    ],
)
def test_segmentation_fields_are_checked(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ModelError, match=field):
        parse(changed(SEGMENTATION_META, **changes))


@pytest.mark.parametrize(
    "morph",
    [
        {"op": "open", "kernel_px": 4},
        {"op": "open", "kernel_px": 1},
        {"op": "dilate", "kernel_px": 3},
        {"op": "close"},
    ],
)
def test_only_documented_morph_values_are_accepted(morph: dict[str, Any]) -> None:
    postprocess = {"min_area_px": 0, "morph": morph}

    with pytest.raises(ModelError, match=r"postprocess\.morph"):
        parse(changed(SEGMENTATION_META, postprocess=postprocess))


@pytest.mark.parametrize("op", ["open", "close"])
def test_an_odd_kernel_morph_is_accepted(op: str) -> None:
    postprocess = {"min_area_px": 12, "morph": {"op": op, "kernel_px": 5}}

    meta = parse(changed(SEGMENTATION_META, postprocess=postprocess))

    assert meta.postprocess is not None
    assert meta.postprocess.morph is not None
    assert (meta.postprocess.morph.op, meta.postprocess.morph.kernel_px) == (op, 5)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"not json"])
def test_a_file_that_is_not_a_json_object_is_refused(raw: bytes) -> None:
    with pytest.raises(ModelError, match=WHERE):
        parse_meta(raw, WHERE)


def test_to_json_round_trips_and_leaves_out_the_other_task() -> None:
    meta = parse(SEGMENTATION_META)

    text = meta.to_json()

    assert "threshold" not in json.loads(text)
    assert parse_meta(text.encode(), WHERE) == meta


def test_an_upper_case_digest_is_read_as_the_same_digest() -> None:
    digest = "ab12" * 16

    meta = parse(changed(PRESENCE_META, sha256=digest.upper()))

    assert meta.sha256 == digest
