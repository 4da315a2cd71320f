"""`hyacinth models publish|list|verify` and `hyacinth predict`, on both backends."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.plugins.models import PublishedModels, make_photo
from tests.supabase_fake import FakeSupabaseStorage
from worker.cli import main
from worker.config import Settings
from worker.inference import forget_predictors
from worker.registry import forget_loaded_models
from worker.storage import open_storage

_SETTINGS_VARIABLES = (
    "SUPABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "LOCAL_STORAGE_DIR",
    "MODELS_BUCKET",
    "MODEL_CACHE_DIR",
    "PRESENCE_MODEL_VERSION",
    "SEGMENTATION_MODEL_VERSION",
    "TORCH_DEVICE",
)


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Own settings and a fresh model cache per test; root logging put back after."""
    for variable in _SETTINGS_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    forget_predictors()
    forget_loaded_models()

    yield

    forget_predictors()
    forget_loaded_models()
    root.handlers[:], root.level = handlers, level


@pytest.fixture(params=["local", "supabase"])
def backend(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    supabase_storage_server: FakeSupabaseStorage,
) -> str:
    """Point the settings at an empty models bucket on one backend."""
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    if request.param == "supabase":
        for variable, value in supabase_storage_server.env.items():
            monkeypatch.setenv(variable, value)
        monkeypatch.setenv("MODELS_BUCKET", f"models-{secrets.token_hex(4)}")
    else:
        monkeypatch.setenv("LOCAL_STORAGE_DIR", str(tmp_path / "storage"))
    return str(request.param)


@pytest.fixture
def published_env(
    published_models: PublishedModels, monkeypatch: pytest.MonkeyPatch
) -> PublishedModels:
    """The published test models, with their settings in this process's environment."""
    for variable, value in published_models.env.items():
        monkeypatch.setenv(variable, value)
    return published_models


def hyacinth(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def publish_both(
    capsys: pytest.CaptureFixture[str],
    published_models: PublishedModels,
    *extra: str,
) -> None:
    weights = published_models.weights_dir
    for task, version, file, architecture in (
        ("presence", "1.0.0", "presence_present.pt", "mobilenet_v2"),
        ("segmentation", "1.0.1", "segmentation_plant.pt", "unet_resnet34"),
    ):
        status, out, err = hyacinth(
            capsys,
            "models",
            "publish",
            task,
            version,
            str(weights / file),
            "--architecture",
            architecture,
            "--input-size",
            "64",
            "64",
            *extra,
        )
        assert status == 0, err
        assert f"published {task} {version}" in out


def test_publish_list_verify(
    backend: str,
    capsys: pytest.CaptureFixture[str],
    published_models: PublishedModels,
) -> None:
    publish_both(capsys, published_models)

    status, listing, _ = hyacinth(capsys, "models", "list")
    assert status == 0
    assert "presence (configured: 1.0.0)" in listing
    assert "segmentation (configured: 1.0.1)" in listing
    assert "presence_mobilenetv2" in listing
    assert "unet_aquavplant" in listing
    assert listing.count("*") == 2

    status, out, err = hyacinth(capsys, "models", "verify")
    assert status == 0, err
    assert out == f"presence_mobilenetv2 unet_aquavplant loaded from {backend}\n"


def test_publish_refuses_an_existing_version_without_force(
    backend: str,
    capsys: pytest.CaptureFixture[str],
    published_models: PublishedModels,
) -> None:
    publish_both(capsys, published_models)
    weights = str(published_models.weights_dir / "presence_absent.pt")
    command = ["models", "publish", "presence", "1.0.0", weights]
    command += ["--architecture", "mobilenet_v2", "--input-size", "64", "64"]

    refused, _, err = hyacinth(capsys, *command)
    forced, _, _ = hyacinth(capsys, *command, "--force")

    assert refused == 2
    assert "already published" in err and "--force" in err
    assert forced == 0


def test_publish_refuses_weights_of_the_wrong_architecture(
    backend: str,
    capsys: pytest.CaptureFixture[str],
    published_models: PublishedModels,
) -> None:
    weights = str(published_models.weights_dir / "presence_present.pt")

    status, _, err = hyacinth(
        capsys,
        "models",
        "publish",
        "segmentation",
        "1.0.1",
        weights,
        "--architecture",
        "unet_resnet34",
    )

    assert status == 2
    assert "missing keys: encoder.conv1.weight" in err
    assert "unexpected keys: features.0.0.weight" in err
    listing = hyacinth(capsys, "models", "list")[1]
    assert "(no versions)" in listing


def test_verify_fails_clearly_when_the_configured_version_is_missing(
    backend: str,
    capsys: pytest.CaptureFixture[str],
    published_models: PublishedModels,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish_both(capsys, published_models)
    monkeypatch.setenv("SEGMENTATION_MODEL_VERSION", "4.0.0")

    status, out, err = hyacinth(capsys, "models", "verify")

    assert status != 0
    assert out == ""
    assert "segmentation/4.0.0/model_meta.json not found" in err
    assert "SEGMENTATION_MODEL_VERSION" in err


def test_list_shows_latest_and_a_missing_configured_version(
    capsys: pytest.CaptureFixture[str],
    published_env: PublishedModels,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PRESENCE_MODEL_VERSION", "latest")
    monkeypatch.setenv("SEGMENTATION_MODEL_VERSION", "7.0.0")

    status, listing, _ = hyacinth(capsys, "models", "list")

    assert status == 1
    assert "presence (configured: latest = 2.0.0)" in listing
    assert "configured version 7.0.0 is not in bucket models" in listing
    presence_lines = listing.split("segmentation")[0].splitlines()
    assert [line.split()[0] for line in presence_lines if line.endswith("*")] == [
        "2.0.0"
    ]


def test_list_fails_when_the_configured_version_cannot_load(
    capsys: pytest.CaptureFixture[str],
    published_models: PublishedModels,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish_both(capsys, published_models)
    status, _, err = hyacinth(
        capsys,
        "models",
        "publish",
        "segmentation",
        "1.0.2",
        str(published_models.weights_dir / "segmentation_plant.pt"),
        "--architecture",
        "unet_resnet34",
    )
    assert status == 0, err
    settings = Settings.from_env()
    storage = open_storage(settings)
    meta_key = "segmentation/1.0.2/model_meta.json"
    if backend == "local":
        # A publish cut off before its meta.
        (Path(settings.local_storage_dir) / settings.models_bucket / meta_key).unlink()
    else:
        storage.upload(
            settings.models_bucket, meta_key, b"{", content_type="x", upsert=True
        )
    monkeypatch.setenv("SEGMENTATION_MODEL_VERSION", "1.0.2")

    status, listing, _ = hyacinth(capsys, "models", "list")

    assert status == 1
    assert "configured version 1.0.2 cannot be loaded" in listing


def test_predict_prints_a_line_per_photo_and_goes_on_after_a_bad_one(
    capsys: pytest.CaptureFixture[str],
    published_env: PublishedModels,
    tmp_path: Path,
) -> None:
    good = tmp_path / "lake.jpg"
    good.write_bytes(make_photo(120, 80, exif_orientation=6))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(make_photo(120, 80)[:300])
    missing = tmp_path / "missing.jpg"
    masks = tmp_path / "masks"

    status, out, _ = hyacinth(
        capsys, "predict", str(good), str(corrupt), str(missing), str(good),
        "--masks-dir", str(masks),
    )  # fmt: skip

    lines = [json.loads(line) for line in out.splitlines()]
    assert status == 1
    assert [line["photo"] for line in lines] == [
        str(good),
        str(corrupt),
        str(missing),
        str(good),
    ]
    assert lines[0]["presence"]["label"] == "present"
    assert lines[0]["presence"]["model_v"] == "1.0.0"
    assert lines[0]["seg"]["cover_pct"] == 100.0
    assert lines[0]["seg"]["model_v"] == "1.0.1"
    assert "corrupt or truncated" in lines[1]["error"]
    assert "cannot read" in lines[2]["error"]
    assert lines[0]["seg"]["mask_path"] != lines[3]["seg"]["mask_path"]
    with Image.open(lines[0]["seg"]["mask_path"]) as mask:
        assert mask.size == (80, 120)


def test_predict_on_an_absent_photo_has_no_seg(
    capsys: pytest.CaptureFixture[str],
    published_env: PublishedModels,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PRESENCE_MODEL_VERSION", "2.0.0")
    photo = tmp_path / "water.png"
    photo.write_bytes(make_photo(64, 64, "PNG", color=(20, 60, 160)))

    status, out, _ = hyacinth(capsys, "predict", str(photo))

    assert status == 0
    (line,) = [json.loads(text) for text in out.splitlines()]
    assert line["presence"]["label"] == "absent"
    assert line["seg"] is None


def test_predict_refuses_a_masks_dir_it_cannot_write_before_loading_models(
    capsys: pytest.CaptureFixture[str],
    published_env: PublishedModels,
    tmp_path: Path,
) -> None:
    photo = tmp_path / "lake.jpg"
    photo.write_bytes(make_photo(64, 64))
    not_a_folder = tmp_path / "masks"
    not_a_folder.write_text("a file where the folder should be")

    status, out, err = hyacinth(
        capsys, "predict", str(photo), "--masks-dir", str(not_a_folder)
    )

    assert status != 0
    assert out == ""
    assert "--masks-dir" in err and "Traceback" not in err
