"""Versioned models in the models bucket: find, verify, load, and keep in memory.

The bucket holds one folder per task and version: `{task}/{version}/` with the
weights and a model_meta.json (see `worker.model_meta`). The meta is written
last, so a version without one is half-published and never loaded.

Weights files come through `worker.model_cache`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from packaging.version import InvalidVersion, Version
from torch import nn

from worker.architectures import build, get_architecture
from worker.config import Settings
from worker.errors import ConfigError, MissingObjectError, ModelError
from worker.model_cache import fetch_weights
from worker.model_meta import META_FILENAME, ModelMeta, parse_meta
from worker.storage import Storage

log = logging.getLogger(__name__)

#: The version value that picks the highest published version.
LATEST = "latest"

#: The setting that chooses each task's version, named in error messages.
VERSION_VARIABLES = {
    "presence": "PRESENCE_MODEL_VERSION",
    "segmentation": "SEGMENTATION_MODEL_VERSION",
}

_MAX_KEYS_LISTED = 8


@dataclass(frozen=True)
class LoadedModel:
    """A model in memory, ready to run: its meta, module and device."""

    meta: ModelMeta
    module: nn.Module
    device: torch.device


def model_folder(task: str, version: str) -> str:
    """The folder of one model version inside the bucket."""
    return f"{task}/{version}"


def describe(bucket: str, task: str, version: str, filename: str) -> str:
    """How error messages name a file of a model: `models/presence/1.0.0/x`."""
    return f"{bucket}/{model_folder(task, version)}/{filename}"


def configured_version(settings: Settings, task: str) -> str:
    """The version setting for `task` (a version or `latest`)."""
    if task == "presence":
        return settings.presence_model_version
    return settings.segmentation_model_version


def list_versions(storage: Storage, bucket: str, task: str) -> list[str]:
    """Folders under `task` named like versions, lowest first (1.9.0 < 1.10.0)."""
    found = []
    for name in storage.list(bucket, task):
        try:
            found.append((Version(name), name))
        except InvalidVersion:
            continue
    return [name for _, name in sorted(found)]


def resolve_version(storage: Storage, bucket: str, task: str, requested: str) -> str:
    """`requested`, or for `latest` the highest version that has a model_meta.json."""
    if requested != LATEST:
        return requested

    for version in reversed(list_versions(storage, bucket, task)):
        if storage.exists(bucket, f"{model_folder(task, version)}/{META_FILENAME}"):
            return version
    raise ModelError(
        f"{VERSION_VARIABLES[task]}=latest but bucket {bucket!r} ({storage.backend} "
        f"storage) has no published {task} model: publish one with "
        "`hyacinth models publish`"
    )


def read_meta(storage: Storage, bucket: str, task: str, version: str) -> ModelMeta:
    """The validated model_meta.json of a version; ModelError names file and field."""
    where = describe(bucket, task, version, META_FILENAME)

    try:
        raw = storage.download(bucket, f"{model_folder(task, version)}/{META_FILENAME}")
    except MissingObjectError:
        published = ", ".join(list_versions(storage, bucket, task)) or "none"
        raise ModelError(
            f"{where} not found in {storage.backend} storage: publish {task} "
            f"{version}, or set {VERSION_VARIABLES[task]} to a published version "
            f"(folders found: {published})"
        ) from None

    meta = parse_meta(raw, where)
    for field, expected in (("task", task), ("version", version)):
        if getattr(meta, field) != expected:
            raise ModelError(
                f"{where}: field {field!r} is {getattr(meta, field)!r} but the file "
                f"is in the folder for {expected!r}; fix the file or move it"
            )
    try:
        get_architecture(meta.architecture, meta.task)
    except ModelError as exc:
        raise ModelError(f"{where}: field 'architecture': {exc}") from None
    return meta


def load_weights(model: nn.Module, weights: Path, fmt: str, where: str) -> None:
    """Load a state dict file into `model` strictly; ModelError listing any misfit."""
    try:
        if fmt == "safetensors":
            state: object = safetensors.torch.load_file(weights, device="cpu")
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        # The loaders raise many types (UnpicklingError, RuntimeError, their own
        # errors); any of them means the file is not usable weights.
        raise ModelError(
            f"{where} cannot be read as {fmt} weights ({type(exc).__name__}: "
            f"{_first_line(exc)}); publish a file saved with torch.save(model."
            "state_dict()) or safetensors"
        ) from None

    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        hint = ""
        if isinstance(state, Mapping) and "state_dict" in state:
            hint = " (it looks like a training checkpoint: save its 'state_dict')"
        raise ModelError(
            f"{where} holds a {type(state).__name__}, not a state dict of tensors"
            f"{hint}; publish torch.save(model.state_dict())"
        )

    check_state_dict(model, state, where)
    model.load_state_dict(state, strict=True)


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], where: str
) -> None:
    """ModelError listing missing, unexpected and mis-shaped keys, if there are any."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshaped = [
        f"{key} {tuple(state[key].shape)} != {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]

    problems = [
        f"{label}: {_few(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shapes differing (file != architecture)", misshaped),
        )
        if keys
    ]
    if problems:
        raise ModelError(
            f"{where} does not fit architecture {type(model).__name__}: "
            f"{'; '.join(problems)}; publish weights trained for this architecture"
        )


def check_forward(model: nn.Module, meta: ModelMeta, where: str) -> None:
    """Run `model` once on a blank input of meta's size; ModelError if it cannot."""
    height_px, width_px = meta.input_size
    blank = torch.zeros(1, 3, height_px, width_px)

    try:
        with torch.inference_mode():
            output = model(blank)
    except RuntimeError as exc:
        raise ModelError(
            f"{where}: the model cannot run on its input_size {height_px}x{width_px} "
            f"({_first_line(exc)}); choose another input size"
        ) from None

    expected = "(1, 1)" if meta.task == "presence" else "(1, 1, H, W)"
    fits = (
        output.shape == (1, 1)
        if meta.task == "presence"
        else (output.dim() == 4 and output.shape[:2] == (1, 1))
    )
    if not fits:
        raise ModelError(
            f"{where}: the model outputs shape {tuple(output.shape)}, not "
            f"{expected} as a {meta.task} model must"
        )


def load_version(
    storage: Storage,
    bucket: str,
    task: str,
    version: str,
    *,
    cache_dir: Path,
    device: torch.device,
) -> LoadedModel:
    """Read meta, fetch and verify weights, build and load the model (no caching)."""
    started_s = time.perf_counter()
    meta = read_meta(storage, bucket, task, version)
    weights = fetch_weights(
        storage,
        bucket,
        f"{model_folder(meta.task, meta.version)}/{meta.weights_filename}",
        sha256=meta.sha256,
        cache_dir=cache_dir,
        where=describe(bucket, meta.task, meta.version, meta.weights_filename),
    )

    model = build(meta.architecture, meta.task, meta.num_classes)
    load_weights(
        model,
        weights,
        meta.format,
        describe(bucket, task, version, meta.weights_filename),
    )
    model.eval().requires_grad_(False)
    model.to(device).to(memory_format=torch.channels_last)

    log.info(
        "model.loaded task=%s version=%s name=%s device=%s load_ms=%.0f",
        task,
        version,
        meta.name,
        device,
        (time.perf_counter() - started_s) * 1000,
    )
    return LoadedModel(meta=meta, module=model, device=device)


_loaded: dict[tuple[str, ...], LoadedModel] = {}
_key_locks: dict[tuple[str, ...], threading.Lock] = {}
_key_locks_guard = threading.Lock()


def load_model(storage: Storage, settings: Settings, task: str) -> LoadedModel:
    """The configured version of `task`, loaded once per process and then shared."""
    version = resolve_version(
        storage, settings.models_bucket, task, configured_version(settings, task)
    )
    device = resolve_device(settings)
    key = (
        storage_location(settings),
        settings.models_bucket,
        task,
        version,
        str(device),
    )

    loaded = _loaded.get(key)
    if loaded is not None:
        return loaded

    with _key_lock(key):
        loaded = _loaded.get(key)
        if loaded is None:
            # Only a complete load enters the cache: a failure leaves every
            # model loaded before it in place and usable.
            loaded = load_version(
                storage,
                settings.models_bucket,
                task,
                version,
                cache_dir=Path(settings.model_cache_dir),
                device=device,
            )
            _loaded[key] = loaded
    return loaded


def forget_loaded_models() -> None:
    """Empty this process's model cache (tests and tools; workers never need it)."""
    with _key_locks_guard:
        _loaded.clear()
        _key_locks.clear()


def _key_lock(key: tuple[str, ...]) -> threading.Lock:
    with _key_locks_guard:
        return _key_locks.setdefault(key, threading.Lock())


def storage_location(settings: Settings) -> str:
    """Which storage the settings point at: the Supabase URL or the local folder."""
    if settings.supabase_url:
        return f"supabase:{settings.supabase_url}"
    return f"local:{Path(settings.local_storage_dir).resolve()}"


def resolve_device(settings: Settings) -> torch.device:
    """TORCH_DEVICE if set, else CUDA when available, else the CPU."""
    if not settings.torch_device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    try:
        device = torch.device(settings.torch_device)
    except RuntimeError:
        raise ConfigError(
            f"TORCH_DEVICE={settings.torch_device!r} is not a torch device: use "
            "cpu, cuda or cuda:N, or unset it to choose automatically"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"TORCH_DEVICE={settings.torch_device!r} is a {device.type} device, "
            "which this worker does not run on: use cpu, cuda or cuda:N"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"TORCH_DEVICE={settings.torch_device!r} but this torch build sees no "
            "CUDA device: install the CUDA build of torch or set TORCH_DEVICE=cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"TORCH_DEVICE={settings.torch_device!r} but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s), numbered from 0: pick "
            "one of them, or set TORCH_DEVICE=cuda"
        )
    return device


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_LISTED])
    more = len(keys) - _MAX_KEYS_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no detail"
