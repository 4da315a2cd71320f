"""The registry on a real local bucket: versions, latest, cache, digests, loading."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from tests.plugins.models import (
    PRESENCE_ARCHITECTURE,
    PRESENT_LOGIT,
    PublishedModels,
    constant_state_dict,
    make_photo,
    save_weights,
)
from worker.architectures import build
from worker.config import Settings
from worker.errors import ConfigError, ModelError, StorageError
from worker.inference import forget_predictors, get_predictor
from worker.model_meta import ModelMeta, parse_meta
from worker.publish import publish
from worker.registry import (
    check_forward,
    forget_loaded_models,
    list_versions,
    load_model,
    load_version,
    resolve_device,
    resolve_version,
)
from worker.storage import LocalStorage

BUCKET = "models"
CPU = torch.device("cpu")


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture
def present_weights(published_models: PublishedModels) -> Path:
    return published_models.weights_dir / "presence_present.pt"


@pytest.fixture
def other_weights(tmp_path: Path) -> Path:
    """Presence weights of the right architecture that differ from the published."""
    return save_weights(
        constant_state_dict(PRESENCE_ARCHITECTURE, "presence", -1.0),
        tmp_path / "other.pt",
    )


def publish_presence(
    storage: LocalStorage, version: str, weights: Path, **options: object
) -> None:
    publish(
        storage,
        BUCKET,
        "presence",
        version,
        weights,
        architecture=PRESENCE_ARCHITECTURE,
        input_size=(64, 64),
        **options,  # type: ignore[arg-type]
    )


def meta_file(storage: LocalStorage, task: str, version: str) -> Path:
    return storage.root / BUCKET / task / version / "model_meta.json"


def rewrite_meta(storage: LocalStorage, folder: str, **changes: object) -> None:
    path = meta_file(storage, "presence", folder)
    fields = json.loads(path.read_text())
    fields.update(changes)
    path.write_text(json.dumps(fields))


def load(storage: LocalStorage, version: str, cache_dir: Path) -> torch.nn.Module:
    loaded = load_version(
        storage, BUCKET, "presence", version, cache_dir=cache_dir, device=CPU
    )
    return loaded.module


def test_versions_sort_semantically_and_skip_other_folders(
    storage: LocalStorage,
) -> None:
    for name in ("1.9.0", "1.10.0", "1.2.0", "notes", "2.0.0rc1"):
        (storage.root / BUCKET / "presence" / name).mkdir(parents=True)

    assert list_versions(storage, BUCKET, "presence") == [
        "1.2.0",
        "1.9.0",
        "1.10.0",
        "2.0.0rc1",
    ]


def test_latest_is_the_highest_fully_published_version(
    storage: LocalStorage, present_weights: Path
) -> None:
    for version in ("1.9.0", "1.10.0"):
        publish_presence(storage, version, present_weights)
    # A half-published version: weights without model_meta.json.
    half = storage.root / BUCKET / "presence" / "1.11.0"
    half.mkdir(parents=True)
    shutil.copy(present_weights, half / "presence_mobilenetv2.pt")

    assert resolve_version(storage, BUCKET, "presence", "latest") == "1.10.0"
    assert resolve_version(storage, BUCKET, "presence", "1.9.0") == "1.9.0"


def test_latest_with_nothing_published_names_the_setting(
    storage: LocalStorage,
) -> None:
    with pytest.raises(ModelError, match="PRESENCE_MODEL_VERSION=latest"):
        resolve_version(storage, BUCKET, "presence", "latest")


def test_a_missing_version_names_the_file_and_the_setting(
    storage: LocalStorage, present_weights: Path, tmp_path: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)

    with pytest.raises(ModelError) as caught:
        load(storage, "1.5.0", tmp_path / "cache")

    message = str(caught.value)
    assert "models/presence/1.5.0/model_meta.json" in message
    assert "PRESENCE_MODEL_VERSION" in message
    assert "1.0.0" in message


def test_a_loaded_model_gives_the_constant_it_was_built_for(
    storage: LocalStorage, present_weights: Path, tmp_path: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)

    model = load(storage, "1.0.0", tmp_path / "cache")

    with torch.inference_mode():
        logits = model(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, 1)
    assert logits.item() == pytest.approx(PRESENT_LOGIT)
    assert not model.training


def test_safetensors_weights_load(storage: LocalStorage, tmp_path: Path) -> None:
    state = constant_state_dict(PRESENCE_ARCHITECTURE, "presence", -2.0)
    weights = save_weights(state, tmp_path / "presence.safetensors")
    publish_presence(storage, "1.0.0", weights)

    model = load(storage, "1.0.0", tmp_path / "cache")

    with torch.inference_mode():
        assert model(torch.rand(1, 3, 64, 64)).item() == pytest.approx(-2.0)


def test_weights_are_cached_under_their_digest_and_reused_without_download(
    storage: LocalStorage, present_weights: Path, tmp_path: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)
    cache_dir = tmp_path / "cache"
    digest = hashlib.sha256(present_weights.read_bytes()).hexdigest()

    load(storage, "1.0.0", cache_dir)
    # With the weights gone from storage, only the cache can serve them.
    (storage.root / BUCKET / "presence" / "1.0.0" / "presence_mobilenetv2.pt").unlink()
    load(storage, "1.0.0", cache_dir)

    assert [path.name for path in cache_dir.iterdir()] == [f"{digest}.pt"]


def test_a_damaged_cache_file_is_downloaded_again(
    storage: LocalStorage, present_weights: Path, tmp_path: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)
    cache_dir = tmp_path / "cache"
    load(storage, "1.0.0", cache_dir)
    (cached,) = cache_dir.iterdir()
    cached.write_bytes(cached.read_bytes()[:1000])

    load(storage, "1.0.0", cache_dir)

    assert cached.read_bytes() == present_weights.read_bytes()


def test_an_older_meta_without_sha256_is_downloaded_once_per_upload(
    tmp_path: Path, present_weights: Path, other_weights: Path
) -> None:
    storage = CountingStorage(tmp_path / "storage")
    publish_presence(storage, "1.0.0", present_weights)
    rewrite_meta(storage, "1.0.0", sha256="", exported_at="")
    cache_dir = tmp_path / "cache"
    weights_key = "presence/1.0.0/presence_mobilenetv2.pt"

    load(storage, "1.0.0", cache_dir)
    load(storage, "1.0.0", cache_dir)
    downloads_before_rewrite = storage.downloads.count(weights_key)
    storage.upload(
        BUCKET, weights_key, other_weights.read_bytes(), content_type="x", upsert=True
    )
    model = load(storage, "1.0.0", cache_dir)

    digest = hashlib.sha256(present_weights.read_bytes()).hexdigest()
    assert (cache_dir / f"{digest}.pt").is_file()
    assert downloads_before_rewrite == 1
    assert storage.downloads.count(weights_key) == 2
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 64, 64)).item() == pytest.approx(-1.0)


class CountingStorage(LocalStorage):
    """A real local storage that also notes every download."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.downloads: list[str] = []

    def download(self, bucket: str, path: str) -> bytes:
        self.downloads.append(path)
        return super().download(bucket, path)


def test_a_sha256_mismatch_is_refused_with_both_digests(
    storage: LocalStorage, present_weights: Path, tmp_path: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)
    published = hashlib.sha256(present_weights.read_bytes()).hexdigest()
    other = save_weights(
        constant_state_dict(PRESENCE_ARCHITECTURE, "presence", 1.0),
        tmp_path / "other.pt",
    )
    actual = hashlib.sha256(other.read_bytes()).hexdigest()
    storage.upload(
        BUCKET,
        "presence/1.0.0/presence_mobilenetv2.pt",
        other.read_bytes(),
        content_type="application/octet-stream",
        upsert=True,
    )

    with pytest.raises(ModelError) as caught:
        load(storage, "1.0.0", tmp_path / "cache")

    assert published in str(caught.value)
    assert actual in str(caught.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_meta_naming_an_architecture_of_the_other_task_is_refused(
    storage: LocalStorage, present_weights: Path, tmp_path: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)
    rewrite_meta(storage, "1.0.0", architecture="unet_resnet34")

    with pytest.raises(ModelError, match="field 'architecture'"):
        load(storage, "1.0.0", tmp_path / "cache")


def test_weights_of_another_architecture_are_refused_at_load_with_the_keys(
    storage: LocalStorage, present_weights: Path, tmp_path: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)
    resnet = torch.nn.Sequential(torch.nn.Linear(4, 2))
    wrong = save_weights(resnet.state_dict(), tmp_path / "wrong.pt").read_bytes()
    storage.upload(
        BUCKET,
        "presence/1.0.0/presence_mobilenetv2.pt",
        wrong,
        content_type="application/octet-stream",
        upsert=True,
    )
    rewrite_meta(storage, "1.0.0", sha256=hashlib.sha256(wrong).hexdigest())

    with pytest.raises(ModelError) as caught:
        load(storage, "1.0.0", tmp_path / "cache")

    message = str(caught.value)
    assert "models/presence/1.0.0/presence_mobilenetv2.pt" in message
    assert "missing keys: features.0.0.weight" in message
    assert "unexpected keys: 0.weight, 0.bias" in message


def test_a_state_dict_that_does_not_fit_lists_missing_and_unexpected_keys(
    storage: LocalStorage, tmp_path: Path
) -> None:
    state = constant_state_dict(PRESENCE_ARCHITECTURE, "presence", 3.0)
    state["extra.weight"] = torch.zeros(2)
    del state["features.0.0.weight"]
    weights = save_weights(state, tmp_path / "broken.pt")

    with pytest.raises(ModelError) as caught:
        publish_presence(storage, "1.0.0", weights)

    message = str(caught.value)
    assert "missing keys: features.0.0.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert not meta_file(storage, "presence", "1.0.0").exists()


def test_a_state_dict_of_other_shapes_is_refused(
    storage: LocalStorage, tmp_path: Path
) -> None:
    two_classes = build(PRESENCE_ARCHITECTURE, "presence", num_classes=2)
    weights = save_weights(two_classes.state_dict(), tmp_path / "two.pt")

    with pytest.raises(ModelError, match=r"classifier\.1\.weight \(2, 1280\)"):
        publish_presence(storage, "1.0.0", weights)


def test_a_checkpoint_or_pickled_module_is_not_unpickled(
    storage: LocalStorage, tmp_path: Path, present_weights: Path
) -> None:
    state = torch.load(present_weights, weights_only=True)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": state, "epoch": 3}, checkpoint)
    pickled = tmp_path / "module.pt"
    torch.save(build(PRESENCE_ARCHITECTURE, "presence"), pickled)

    with pytest.raises(ModelError, match="training checkpoint"):
        publish_presence(storage, "1.0.0", checkpoint)
    with pytest.raises(ModelError, match="cannot be read as state_dict"):
        publish_presence(storage, "1.0.0", pickled)


def test_a_bad_meta_in_storage_names_the_file_and_field(
    storage: LocalStorage, present_weights: Path, tmp_path: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)
    path = meta_file(storage, "presence", "1.0.0")
    fields = json.loads(path.read_text())
    del fields["normalize"]
    path.write_text(json.dumps(fields))

    with pytest.raises(ModelError) as caught:
        load(storage, "1.0.0", tmp_path / "cache")

    assert "models/presence/1.0.0/model_meta.json" in str(caught.value)
    assert "'normalize'" in str(caught.value)


def test_a_meta_in_the_wrong_folder_is_refused(
    storage: LocalStorage, present_weights: Path, tmp_path: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)
    rewrite_meta(storage, "1.0.0", version="1.0.1")

    with pytest.raises(ModelError, match=r"field 'version' is '1\.0\.1'"):
        load(storage, "1.0.0", tmp_path / "cache")


def test_publish_refuses_an_existing_version_unless_forced(
    storage: LocalStorage, present_weights: Path, other_weights: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)

    with pytest.raises(ModelError, match="--force"):
        publish_presence(storage, "1.0.0", other_weights)
    publish_presence(storage, "1.0.0", other_weights, force=True)

    fields = json.loads(meta_file(storage, "presence", "1.0.0").read_text())
    assert fields["sha256"] == hashlib.sha256(other_weights.read_bytes()).hexdigest()
    assert fields["exported_at"]


class RecordingStorage(LocalStorage):
    """A real local storage that notes the order of its uploads, and can fail the
    meta uploads as a publish cut off before its meta would."""

    def __init__(self, root: Path, *, refuse_meta: bool = False) -> None:
        super().__init__(root)
        self.uploaded: list[str] = []
        self._refuse_meta = refuse_meta

    def upload(
        self,
        bucket: str,
        path: str,
        data: bytes,
        *,
        content_type: str,
        upsert: bool = False,
    ) -> None:
        if self._refuse_meta and path.endswith("model_meta.json"):
            raise StorageError("connection reset while uploading the meta")
        self.uploaded.append(path)
        super().upload(bucket, path, data, content_type=content_type, upsert=upsert)


def test_a_forced_publish_cut_off_before_its_meta_leaves_the_old_version_whole(
    storage: LocalStorage, present_weights: Path, tmp_path: Path, other_weights: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)

    with pytest.raises(StorageError):
        publish_presence(
            RecordingStorage(storage.root, refuse_meta=True),
            "1.0.0",
            other_weights,
            force=True,
        )
    loaded = load_version(
        storage, BUCKET, "presence", "1.0.0", cache_dir=tmp_path / "cache", device=CPU
    )
    publish_presence(storage, "1.0.0", other_weights, force=True)
    fields = json.loads(meta_file(storage, "presence", "1.0.0").read_text())

    assert (
        loaded.meta.sha256 == hashlib.sha256(present_weights.read_bytes()).hexdigest()
    )
    assert fields["weights_filename"] != "presence_mobilenetv2.pt"
    assert storage.exists("models", "presence/1.0.0/presence_mobilenetv2.pt")


def test_a_forced_publish_of_the_same_weights_keeps_their_name(
    storage: LocalStorage, present_weights: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)
    publish_presence(storage, "1.0.0", present_weights, force=True, threshold=0.6)

    fields = json.loads(meta_file(storage, "presence", "1.0.0").read_text())
    folder = storage.root / BUCKET / "presence" / "1.0.0"
    assert fields["weights_filename"] == "presence_mobilenetv2.pt"
    assert fields["threshold"] == 0.6
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_meta.json",
        "presence_mobilenetv2.pt",
    ]


def test_publish_after_a_cut_off_publish_keeps_or_refuses_its_weights(
    storage: LocalStorage, present_weights: Path, other_weights: Path
) -> None:
    # Weights uploaded, meta never: what a publish cut off halfway leaves.
    weights_key = "presence/1.0.0/presence_mobilenetv2.pt"
    storage.upload("models", weights_key, other_weights.read_bytes(), content_type="x")

    with pytest.raises(ModelError, match="unfinished or concurrent publish"):
        publish_presence(storage, "1.0.0", present_weights)
    refused_meta = storage.exists("models", "presence/1.0.0/model_meta.json")
    publish_presence(storage, "1.0.0", other_weights)

    fields = json.loads(meta_file(storage, "presence", "1.0.0").read_text())
    assert not refused_meta
    assert fields["sha256"] == hashlib.sha256(other_weights.read_bytes()).hexdigest()


def test_publish_uploads_the_meta_last_with_every_field(
    tmp_path: Path, present_weights: Path
) -> None:
    storage = RecordingStorage(tmp_path / "storage")

    publish_presence(storage, "1.0.0", present_weights, threshold=0.7)

    assert storage.uploaded == [
        "presence/1.0.0/presence_mobilenetv2.pt",
        "presence/1.0.0/model_meta.json",
    ]
    fields = json.loads(meta_file(storage, "presence", "1.0.0").read_text())
    assert fields["threshold"] == 0.7
    assert fields["input_size"] == [64, 64]
    assert fields["format"] == "state_dict"
    assert fields["normalize"]["std"] == [0.229, 0.224, 0.225]


@pytest.mark.parametrize(
    ("task", "version", "options", "says"),
    [
        ("counting", "1.0.0", {}, "unknown task"),
        ("presence", "latest", {}, "not a version number"),
        ("presence", "v1.0.0", {}, "as '1.0.0'"),
        ("presence", "1.0.0", {"threshold": 1.5}, "'threshold'"),
        ("presence", "1.0.0", {"architecture": "unet_resnet34"}, "is for segmentation"),
        ("presence", "1.0.0", {"architecture": "vgg99"}, "unknown architecture"),
    ],
)
def test_publish_refuses_bad_arguments(
    storage: LocalStorage,
    present_weights: Path,
    task: str,
    version: str,
    options: dict[str, object],
    says: str,
) -> None:
    arguments: dict[str, object] = {"architecture": PRESENCE_ARCHITECTURE}
    arguments.update(options)

    with pytest.raises(ModelError, match=says):
        publish(storage, BUCKET, task, version, present_weights, **arguments)  # type: ignore[arg-type]

    assert list_versions(storage, BUCKET, "presence") == []


def test_concurrent_first_loads_load_once(
    published_models: PublishedModels, caplog: pytest.LogCaptureFixture
) -> None:
    forget_loaded_models()
    settings = published_models.settings()
    storage = LocalStorage(published_models.storage_dir)
    start = threading.Barrier(6)
    results: list[object] = []

    def first_call() -> None:
        start.wait()
        results.append(load_model(storage, settings, "segmentation"))

    with caplog.at_level(logging.INFO, logger="worker.registry"):
        threads = [threading.Thread(target=first_call) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert len(results) == 6
    assert all(result is results[0] for result in results)
    loads = [r for r in caplog.records if r.getMessage().startswith("model.loaded")]
    assert len(loads) == 1


def test_a_failed_new_version_leaves_the_loaded_one_usable(
    published_models: PublishedModels,
) -> None:
    forget_predictors()
    good = published_models.settings()
    predictor = get_predictor(good)

    with pytest.raises(ModelError, match=r"9\.9\.9"):
        get_predictor(published_models.settings(presence_model_version="9.9.9"))

    assert get_predictor(good) is predictor
    prediction = predictor.predict(make_photo(64, 64))
    assert prediction.presence.label == "present"


def test_device_comes_from_torch_device_or_is_chosen() -> None:
    assert resolve_device(Settings(torch_device="cpu")) == CPU
    automatic = resolve_device(Settings())
    assert automatic.type == ("cuda" if torch.cuda.is_available() else "cpu")

    with pytest.raises(ConfigError, match="TORCH_DEVICE"):
        resolve_device(Settings(torch_device="abacus"))
    with pytest.raises(ConfigError, match="meta device"):
        resolve_device(Settings(torch_device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_device_number_past_the_last_is_refused() -> None:
    count = torch.cuda.device_count()

    assert resolve_device(Settings(torch_device=f"cuda:{count - 1}")).type == "cuda"
    with pytest.raises(ConfigError, match=f"has {count} CUDA device"):
        resolve_device(Settings(torch_device=f"cuda:{count}"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_asking_for_cuda_without_it_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match="TORCH_DEVICE=cpu"):
        resolve_device(Settings(torch_device="cuda"))


def test_a_stale_partial_file_in_the_cache_is_removed_and_never_used(
    storage: LocalStorage, present_weights: Path, tmp_path: Path
) -> None:
    publish_presence(storage, "1.0.0", present_weights)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    stale = cache_dir / ".partial-killed"
    stale.write_bytes(present_weights.read_bytes()[:100])
    os.utime(stale, (0, 0))
    young = cache_dir / ".partial-writing-now"
    young.write_bytes(b"")

    load(storage, "1.0.0", cache_dir)

    assert not stale.exists()
    assert young.exists()


class NeedsSquareInput(torch.nn.Module):
    """A model that refuses non-square inputs and outputs two values."""

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[2] != batch.shape[3]:
            raise RuntimeError("Wrong input shape: height must equal width")
        return torch.zeros(1, 2)


def test_check_forward_names_an_input_size_or_output_that_does_not_work() -> None:
    meta = load_meta_for_check([64, 32])

    with pytest.raises(ModelError, match="cannot run on its input_size 64x32"):
        check_forward(NeedsSquareInput(), meta, "where")
    with pytest.raises(ModelError, match=r"outputs shape \(1, 2\)"):
        check_forward(NeedsSquareInput(), load_meta_for_check([64, 64]), "where")


def load_meta_for_check(input_size: list[int]) -> ModelMeta:
    fields = {
        "task": "presence",
        "name": "p",
        "version": "1.0.0",
        "format": "state_dict",
        "weights_filename": "p.pt",
        "architecture": "mobilenet_v2",
        "num_classes": 1,
        "input_size": input_size,
        "normalize": {"mean": [0, 0, 0], "std": [1, 1, 1]},
        "activation": "sigmoid",
        "threshold": 0.5,
        "metrics": {},
        "sha256": "",
        "exported_at": "",
    }
    return parse_meta(json.dumps(fields).encode(), "where")
