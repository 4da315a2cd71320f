"""The model commands: `hyacinth models publish|list|verify` and `hyacinth predict`."""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from worker.config import Settings
from worker.errors import ConfigError, HyacinthError, ModelError, PhotoError
from worker.model_meta import META_FILENAME, TASKS

if TYPE_CHECKING:
    from worker.storage import Storage

# torch, the registry and storage are imported inside the commands: `hyacinth
# listen` builds this parser too, and must start in a second without torch.

log = logging.getLogger(__name__)

#: The photo `models verify` runs both models on: a plain green square.
_VERIFY_PHOTO_PX = 64


def register(commands: Any) -> None:
    """Add `models` (publish, list, verify) and `predict` to the `hyacinth` parser."""
    models = commands.add_parser(
        "models", help="publish, list and verify the models in the models bucket"
    )
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")

    publish_parser = actions.add_parser(
        "publish", help="upload weights and a complete model_meta.json as a version"
    )
    publish_parser.add_argument("task", choices=TASKS)
    publish_parser.add_argument("version", help="e.g. 1.2.0")
    publish_parser.add_argument(
        "weights", type=Path, help="a state_dict .pt file or a .safetensors file"
    )
    publish_parser.add_argument(
        "--architecture", required=True, help="e.g. mobilenet_v2 or unet_resnet34"
    )
    publish_parser.add_argument("--name", help="model name (default per task)")
    publish_parser.add_argument(
        "--threshold",
        type=float,
        help="probability at or above which it counts as plant (default 0.5)",
    )
    publish_parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="input height and width in pixels (default 224 224 / 512 512)",
    )
    publish_parser.add_argument(
        "--min-area-px",
        type=int,
        default=0,
        help="segmentation: drop mask regions smaller than this (default 0)",
    )
    publish_parser.add_argument(
        "--morph",
        metavar="OP:K",
        help="segmentation: open:K or close:K with an odd kernel K >= 3",
    )
    publish_parser.add_argument(
        "--force", action="store_true", help="replace an already published version"
    )
    publish_parser.set_defaults(run=run_publish)

    list_parser = actions.add_parser(
        "list", help="tasks, versions and names, and which versions are configured"
    )
    list_parser.set_defaults(run=run_list)

    verify_parser = actions.add_parser(
        "verify", help="load and run the configured version of both models"
    )
    verify_parser.set_defaults(run=run_verify)

    predict_parser = commands.add_parser(
        "predict", help="run both models on local photos, one JSON line per photo"
    )
    predict_parser.add_argument("photos", nargs="+", type=Path, metavar="PHOTO")
    predict_parser.add_argument(
        "--masks-dir", type=Path, help="write each mask PNG into this folder"
    )
    predict_parser.set_defaults(run=run_predict)


def run_publish(args: argparse.Namespace, settings: Settings) -> int:
    """Publish one version of one task's model."""
    from worker.publish import publish
    from worker.storage import open_storage

    storage = open_storage(settings)

    meta = publish(
        storage,
        settings.models_bucket,
        args.task,
        args.version,
        args.weights,
        architecture=args.architecture,
        name=args.name,
        threshold=args.threshold,
        input_size=tuple(args.input_size) if args.input_size else None,
        force=args.force,
        min_area_px=args.min_area_px,
        morph=_parse_morph(args.morph),
    )

    print(
        f"published {meta.task} {meta.version} ({meta.name}, sha256 {meta.sha256}) "
        f"to bucket {settings.models_bucket} in {storage.backend} storage"
    )
    return 0


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    """Print every version of each task; non-zero if a configured one is missing."""
    from worker.registry import (
        LATEST,
        configured_version,
        list_versions,
        resolve_version,
    )
    from worker.storage import open_storage

    storage = open_storage(settings)
    bucket = settings.models_bucket
    status = 0

    for task in TASKS:
        requested = configured_version(settings, task)
        try:
            chosen = resolve_version(storage, bucket, task, requested)
        except ModelError:
            chosen = ""
        shown = f"{LATEST} = {chosen or 'none'}" if requested == LATEST else requested
        print(f"{task} (configured: {shown})")

        versions = list_versions(storage, bucket, task)
        chosen_loadable = False
        for version in versions:
            details, loadable = _describe_version(storage, bucket, task, version)
            marker = "  *" if version == chosen else ""
            print(f"  {version:<10} {details}{marker}")
            chosen_loadable |= loadable and version == chosen
        if not versions:
            print("  (no versions)")
        if chosen not in versions:
            print(f"  configured version {requested} is not in bucket {bucket}")
            status = 1
        elif not chosen_loadable:
            print(f"  configured version {chosen} cannot be loaded (see above)")
            status = 1
    return status


def run_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Load both configured models, run each once, and say where they came from."""
    from worker.inference import get_predictor

    predictor = get_predictor(settings)

    prediction = predictor.predict(_verify_photo(), always_segment=True)
    assert prediction.segmentation is not None
    log.info(
        "model.verified presence=%s segmentation=%s presence_ms=%.0f "
        "segmentation_ms=%.0f",
        predictor.presence_meta.version,
        predictor.segmentation_meta.version,
        prediction.timings_ms["presence"],
        prediction.timings_ms["segmentation"],
    )

    print(
        f"{predictor.presence_meta.name} {predictor.segmentation_meta.name} "
        f"loaded from {predictor.source}"
    )
    return 0


def run_predict(args: argparse.Namespace, settings: Settings) -> int:
    """Run both models on each photo; one JSON line each; non-zero if any failed."""
    from worker.inference import get_predictor

    if args.masks_dir is not None:
        try:
            args.masks_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot use --masks-dir {args.masks_dir}: {exc.strerror or exc}; "
                "give a folder that can be written"
            ) from None
    predictor = get_predictor(settings)
    used_names: set[str] = set()
    failed = 0

    for path in args.photos:
        line: dict[str, object] = {"photo": str(path)}
        try:
            prediction = predictor.predict(_read_photo(path))
        except (PhotoError, ModelError) as exc:
            line["error"] = str(exc)
            failed += 1
        except Exception as exc:
            # One photo that breaks the model (out of memory, say) does not stop
            # the check of the others.
            log.error("predict.crashed photo=%s", path, exc_info=True)
            line["error"] = f"unexpected {type(exc).__name__}: {exc}"
            failed += 1
        else:
            line["presence"] = prediction.presence.as_pred()
            line["seg"] = None
            if prediction.segmentation is not None:
                mask_path = None
                if args.masks_dir is not None:
                    mask_path = _mask_file(args.masks_dir, path, used_names)
                    try:
                        mask_path.write_bytes(prediction.segmentation.mask_png)
                    except OSError as exc:
                        line["error"] = (
                            f"cannot write the mask to {mask_path}: "
                            f"{exc.strerror or exc}; check --masks-dir"
                        )
                        failed += 1
                        mask_path = None
                line["seg"] = {
                    "cover_pct": prediction.segmentation.cover_pct,
                    "model_v": prediction.segmentation.model_v,
                    "mask_path": None if mask_path is None else str(mask_path),
                }
        print(json.dumps(line), flush=True)

    return 1 if failed else 0


def _describe_version(
    storage: Storage, bucket: str, task: str, version: str
) -> tuple[str, bool]:
    """One line about a version, and whether its meta can be loaded."""
    from worker.registry import model_folder, read_meta

    if not storage.exists(bucket, f"{model_folder(task, version)}/{META_FILENAME}"):
        return f"incomplete: no {META_FILENAME}, never loaded", False
    try:
        meta = read_meta(storage, bucket, task, version)
    except HyacinthError as exc:
        return f"invalid: {exc}", False
    height_px, width_px = meta.input_size
    details = (
        f"{meta.name:<24} {meta.architecture:<14} {height_px}x{width_px}  "
        f"threshold {meta.cut_off}  exported {meta.exported_at or 'unknown'}"
    )
    return details, True


def _verify_photo() -> bytes:
    image = Image.new("RGB", (_VERIFY_PHOTO_PX, _VERIFY_PHOTO_PX), (30, 140, 40))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _read_photo(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PhotoError(f"cannot read {path}: {exc.strerror or exc}") from None


def _mask_file(masks_dir: Path, photo: Path, used_names: set[str]) -> Path:
    name = f"{photo.stem}.png"
    number = 1
    while name in used_names:
        number += 1
        name = f"{photo.stem}-{number}.png"
    used_names.add(name)
    return masks_dir / name


def _parse_morph(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    op, _, kernel = text.partition(":")
    try:
        kernel_px = int(kernel)
    except ValueError:
        raise ModelError(
            f"--morph {text!r} is not OP:K: write open:5 or close:3"
        ) from None
    return {"op": op, "kernel_px": kernel_px}
