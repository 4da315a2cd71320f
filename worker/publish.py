"""Publishing a model version: weights first, then a complete model_meta.json."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from worker.architectures import build
from worker.errors import HyacinthError, ModelError, ObjectExistsError
from worker.model_meta import META_FILENAME, TASKS, ModelMeta, parse_meta
from worker.registry import (
    check_forward,
    describe,
    load_weights,
    model_folder,
    read_meta,
)
from worker.storage import Storage

log = logging.getLogger(__name__)

#: What `publish` fills in when not told otherwise, per task.
PUBLISH_DEFAULTS: dict[str, dict[str, Any]] = {
    "presence": {"name": "presence_mobilenetv2", "input_size": (224, 224)},
    "segmentation": {"name": "unet_aquavplant", "input_size": (512, 512)},
}

_IMAGENET_NORMALIZE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def publish(
    storage: Storage,
    bucket: str,
    task: str,
    version: str,
    weights_path: Path,
    *,
    architecture: str,
    name: str | None = None,
    threshold: float | None = None,
    input_size: tuple[int, int] | None = None,
    force: bool = False,
    min_area_px: int = 0,
    morph: dict[str, Any] | None = None,
) -> ModelMeta:
    """Upload weights and a complete model_meta.json (last) for one new version."""
    _check_publishable(task, version)
    defaults = PUBLISH_DEFAULTS[task]
    name = name or defaults["name"]
    suffix = weights_path.suffix or ".pt"
    where = describe(bucket, task, version, META_FILENAME)

    try:
        data = weights_path.read_bytes()
    except OSError as exc:
        raise ModelError(
            f"cannot read weights file {weights_path}: {exc.strerror or exc}"
        ) from None

    meta_key = f"{model_folder(task, version)}/{META_FILENAME}"
    replacing = storage.exists(bucket, meta_key)
    if replacing and not force:
        raise ModelError(
            f"{task} {version} is already published ({where}): pass --force to "
            "replace it, or publish a new version"
        )

    sha256 = hashlib.sha256(data).hexdigest()
    # A replacement never overwrites the weights the live meta names: they go up
    # under a name of their own, so the meta write alone switches the version, and
    # a publish cut off before it leaves the old version whole.
    weights_filename = f"{name}{suffix}"
    if replacing:
        weights_filename = _replacement_filename(
            storage, bucket, task, version, sha256, f"{name}-{sha256[:12]}{suffix}"
        )
    fields: dict[str, Any] = {
        "task": task,
        "name": name,
        "version": version,
        "format": "safetensors" if suffix == ".safetensors" else "state_dict",
        "weights_filename": weights_filename,
        "architecture": architecture,
        "num_classes": 1,
        "input_size": list(input_size or defaults["input_size"]),
        "normalize": _IMAGENET_NORMALIZE,
        "activation": "sigmoid",
        "metrics": {},
        "sha256": sha256,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    cut_off = 0.5 if threshold is None else threshold
    if task == "presence":
        fields["threshold"] = cut_off
    else:
        fields["logit_threshold"] = cut_off
        fields["postprocess"] = {"min_area_px": min_area_px, "morph": morph}
    meta = parse_meta(json.dumps(fields).encode(), where)

    # Loading and running the model here refuses weights of the wrong
    # architecture, or an input size it cannot take, before any worker tries.
    model = build(architecture, task, meta.num_classes)
    load_weights(model, weights_path, meta.format, str(weights_path))
    check_forward(model.eval(), meta, where)

    # Weights first, meta last: until the meta lands the version is not loadable.
    weights_key = f"{model_folder(task, version)}/{meta.weights_filename}"
    try:
        storage.upload(
            bucket,
            weights_key,
            data,
            content_type="application/octet-stream",
            upsert=force,
        )
    except ObjectExistsError:
        # Left by a publish that was cut off, or one running now: the same bytes
        # can stay, but others would pair that publish's meta with these weights.
        found = hashlib.sha256(storage.download(bucket, weights_key)).hexdigest()
        if found != meta.sha256:
            raise ModelError(
                f"other weights already lie at {bucket}/{weights_key} (sha256 "
                f"{found}), from an unfinished or concurrent publish of {task} "
                f"{version}: pass --force to replace them"
            ) from None
    try:
        storage.upload(
            bucket,
            meta_key,
            meta.to_json().encode(),
            content_type="application/json",
            upsert=force,
        )
    except ObjectExistsError:
        raise ModelError(
            f"{task} {version} was published by someone else meanwhile ({where}): "
            "check it with `hyacinth models list`, or pass --force"
        ) from None

    log.info(
        "model.published task=%s version=%s name=%s bucket=%s backend=%s sha256=%s",
        task,
        version,
        name,
        bucket,
        storage.backend,
        meta.sha256,
    )
    return meta


def _replacement_filename(
    storage: Storage, bucket: str, task: str, version: str, sha256: str, fresh: str
) -> str:
    """The live weights' name when they are these very bytes, else `fresh`."""
    try:
        live = read_meta(storage, bucket, task, version)
    except HyacinthError:
        return fresh
    return live.weights_filename if live.sha256 == sha256 else fresh


def _check_publishable(task: str, version: str) -> None:
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    try:
        canonical = str(Version(version))
    except InvalidVersion:
        raise ModelError(
            f"version {version!r} is not a version number: use one like 1.2.0"
        ) from None
    if canonical != version:
        raise ModelError(f"write version {version!r} as {canonical!r}")
