"""`make demo`: the whole system on embedded services, from photo upload to the table.

Starts PostgreSQL and Redis inside `.demo/`, migrates, publishes demo models through
`hyacinth models publish`, uploads sample photos into a local storage folder, inserts
the observations with plain SQL as the app would, and runs the real listener and
worker processes until every row is final. Masks and overlays land in `demo-output/`.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from PIL import Image, ImageOps

from worker.config import Settings
from worker.db import psycopg_conninfo
from worker.embedded import background, child_environment, embedded_services
from worker.pipeline import STAGES
from worker.sample_photos import corrupt_jpeg, encode_jpeg, water_scene
from worker.storage import open_storage

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = REPO_ROOT / ".demo"
OUTPUT_DIR = REPO_ROOT / "demo-output"
PHOTOS_BUCKET = "photos"
DEMO_USER_ID = "5b0e7c1e-4a59-4a8e-9d0a-3c2f1e0d9b11"
FINAL_STATUSES = ("done", "failed")
DEADLINE_S = 300.0
WORKER_THREADS = max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SamplePhoto:
    """A photo the demo uploads, and what a person would expect of it."""

    name: str
    data: bytes
    expect: str


def sample_photos() -> list[SamplePhoto]:
    """Mats on water, open water, a photo turned by EXIF, and a corrupt upload."""
    mats_a, _ = water_scene(1600, 1200, mats=3, seed=11)
    mats_b, _ = water_scene(1200, 900, mats=2, seed=12)
    open_a, _ = water_scene(1600, 1200, mats=0, seed=13)
    open_b, _ = water_scene(1024, 768, mats=0, seed=14)
    # Stored sideways with orientation 6, as a phone held upright writes it.
    turned, _ = water_scene(1200, 900, mats=2, seed=15)
    sideways = turned.transpose(Image.Transpose.ROTATE_90)
    return [
        SamplePhoto("mats-lake.jpg", encode_jpeg(mats_a), "plants"),
        SamplePhoto("mats-river.jpg", encode_jpeg(mats_b), "plants"),
        SamplePhoto("open-water.jpg", encode_jpeg(open_a), "no plants"),
        SamplePhoto("open-dam.jpg", encode_jpeg(open_b), "no plants"),
        SamplePhoto(
            "mats-exif-rotated.jpg",
            encode_jpeg(sideways, exif_orientation=6),
            "plants, upright",
        ),
        SamplePhoto("corrupt.jpg", corrupt_jpeg(seed=16), "failed"),
    ]


def say(message: str) -> None:
    """One line of demo output, straight to the terminal."""
    print(message, flush=True)


def run_step(argv: list[str], env: Mapping[str, str], what: str) -> None:
    """Run a command to completion, or stop the demo with its output."""
    result = subprocess.run(
        argv, env=dict(env), cwd=REPO_ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(
            f"demo: {what} failed (exit {result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )


def insert_observations(
    database_url: str, settings: Settings, photos: list[SamplePhoto]
) -> dict[str, SamplePhoto]:
    """Upload each photo and insert its row, as the app does; returns id -> photo."""
    storage = open_storage(settings)
    by_id: dict[str, SamplePhoto] = {}
    with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as db:
        for photo in photos:
            path = f"{DEMO_USER_ID}/{uuid.uuid4()}-{photo.name}"
            storage.upload(
                PHOTOS_BUCKET, path, photo.data, content_type="image/jpeg", upsert=True
            )
            row = db.execute(
                "INSERT INTO observations (user_id, bucket, path) "
                "VALUES (%s, %s, %s) RETURNING id",
                (DEMO_USER_ID, PHOTOS_BUCKET, path),
            ).fetchone()
            assert row is not None
            by_id[str(row[0])] = photo
    return by_id


def wait_until_final(
    database_url: str, ids: list[str], processes: list[subprocess.Popen[bytes]]
) -> None:
    """Show progress until every observation is done or failed."""
    last_line = ""
    deadline = time.monotonic() + DEADLINE_S
    with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as db:
        while True:
            counts: dict[str, int] = dict(
                db.execute(
                    "SELECT status, count(*) FROM observations "
                    "WHERE id = ANY(%s::uuid[]) GROUP BY status",
                    (ids,),
                ).fetchall()
            )
            line = "  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            if line != last_line:
                say(line)
                last_line = line
            if sum(counts.get(status, 0) for status in FINAL_STATUSES) == len(ids):
                return
            for process in processes:
                if process.poll() is not None:
                    command = " ".join(str(part) for part in process.args)  # type: ignore[union-attr]
                    raise SystemExit(
                        f"demo: {command} exited with "
                        f"{process.returncode}; see the logs in {STATE_DIR / 'logs'}"
                    )
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"demo: not every observation was final after {DEADLINE_S:.0f} s; "
                    f"see the logs in {STATE_DIR / 'logs'}"
                )
            time.sleep(0.25)


def fetch_rows(database_url: str, ids: list[str]) -> list[dict[str, Any]]:
    """The final rows, oldest first."""
    with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as db:
        cursor = db.execute(
            "SELECT id::text, status, pred, error, timings_ms, path "
            "FROM observations WHERE id = ANY(%s::uuid[]) ORDER BY created_at",
            (ids,),
        )
        columns = [column.name for column in cursor.description or ()]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


#: Column heads of the stage times, short enough for their 8-wide columns.
_STAGE_HEADS = {
    "download": "download",
    "decode": "decode",
    "preprocess": "prep",
    "presence": "presence",
    "segmentation": "seg",
    "mask_encode": "mask_png",
    "upload": "upload",
    "row_update": "db",
}


def print_table(rows: list[dict[str, Any]], photos: dict[str, SamplePhoto]) -> None:
    """The closing table: one line per observation, stage times in milliseconds."""
    stage_heads = " ".join(f"{_STAGE_HEADS[stage]:>8}" for stage in STAGES)
    say(
        f"\n{'observation':<11} {'photo':<22} {'status':<7} {'score':>6} "
        f"{'label':<8} {'cover%':>7} {stage_heads}  error"
    )
    for row in rows:
        presence = row["pred"].get("presence", {})
        seg = row["pred"].get("seg", {})
        score = f"{presence['score']:.3f}" if presence else "-"
        cover = f"{seg['cover_pct']:.1f}" if seg else "-"
        timings = row["timings_ms"] or {}
        stage_cells = " ".join(
            f"{timings[stage]:>8.1f}" if stage in timings else f"{'-':>8}"
            for stage in STAGES
        )
        say(
            f"{row['id'][:8]:<11} {photos[row['id']].name:<22} {row['status']:<7} "
            f"{score:>6} {presence.get('label', '-'):<8} {cover:>7} {stage_cells}  "
            f"{row['error'] or ''}"
        )
    say(
        "(stage times in ms; prep = resizing for the models, mask_png = writing the "
        "mask, db = claim and final UPDATE)"
    )


def write_pictures(
    rows: list[dict[str, Any]], photos: dict[str, SamplePhoto], settings: Settings
) -> int:
    """Masks and overlays of every observation with plants; returns how many."""
    storage = open_storage(settings)
    written = 0
    for row in rows:
        seg = row["pred"].get("seg")
        if not seg:
            continue
        bucket, path = seg["mask_url"].removeprefix("supabase://").split("/", 1)
        mask = Image.open(io.BytesIO(storage.download(bucket, path))).convert("L")
        photo = ImageOps.exif_transpose(
            Image.open(io.BytesIO(photos[row["id"]].data))
        ).convert("RGB")

        stem = Path(photos[row["id"]].name).stem
        mask.save(OUTPUT_DIR / f"{stem}-mask.png")
        overlay_rgb = np.asarray(photo, dtype=np.float32)
        marked = np.asarray(mask) > 0
        overlay_rgb[marked] = (
            overlay_rgb[marked] * 0.45 + np.array([255, 0, 200]) * 0.55
        )
        Image.fromarray(overlay_rgb.astype(np.uint8)).save(
            OUTPUT_DIR / f"{stem}-overlay.jpg", quality=88
        )
        written += 1
    return written


def main() -> int:
    """Run the demo end to end; returns the exit status."""
    from worker.demo_models import write_demo_weights

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started_s = time.monotonic()
    storage_dir = STATE_DIR / "storage"
    log_dir = STATE_DIR / "logs"
    for folder in (storage_dir, OUTPUT_DIR, log_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    say("1. Starting embedded PostgreSQL and Redis under .demo/")
    with embedded_services(STATE_DIR / "services") as services:
        database_url = services.fresh_database("hyacinth_demo")
        env = child_environment(
            DATABASE_URL=database_url,
            REDIS_URL=services.redis_url,
            LOCAL_STORAGE_DIR=str(storage_dir),
            MODEL_CACHE_DIR=str(STATE_DIR / "model-cache"),
            PYTHONUNBUFFERED="1",
            # The Procfile's worker settings: a worker thread per core, one torch
            # thread each, and no prefetch beyond the threads.
            TORCH_NUM_THREADS="1",
            dramatiq_worker_timeout="20",
            dramatiq_queue_prefetch=str(WORKER_THREADS),
        )
        settings = Settings.from_env(env)
        python = sys.executable

        say("2. Migrating: alembic upgrade head")
        run_step([python, "-m", "alembic", "upgrade", "head"], env, "the migration")

        say("3. Making demo models and publishing them with `hyacinth models publish`")
        say(
            "   NOTE: these weights are NOT trained on hyacinth. They keep random "
            "filters and fit\n   only the last layer to the demo's synthetic photos, "
            "so they tell green from\n   blue. Publish real weights for real photos "
            "(README: 'A new model version')."
        )
        presence_path, segmentation_path = write_demo_weights(STATE_DIR / "weights")
        for task, version, weights, architecture, name in (
            (
                "presence",
                "1.0.0",
                presence_path,
                "mobilenet_v2",
                "presence_mobilenetv2",
            ),
            (
                "segmentation",
                "1.0.1",
                segmentation_path,
                "unet_resnet34",
                "unet_aquavplant",
            ),
        ):
            publish = [python, "-m", "worker.cli", "models", "publish", task, version]
            options = ["--architecture", architecture, "--name", name, "--force"]
            run_step([*publish, str(weights), *options], env, f"publishing {name}")

        say("4. Uploading sample photos and inserting observations with plain SQL")
        photos = insert_observations(database_url, settings, sample_photos())
        ids = list(photos)
        for observation_id, photo in photos.items():
            say(f"   {observation_id[:8]}  {photo.name:<22} expect: {photo.expect}")

        say(
            "5. Running `hyacinth listen` and `dramatiq worker.actors` (see .demo/logs)"
        )
        listener_argv = [python, "-m", "worker.cli", "listen"]
        worker_argv = [python, "-m", "dramatiq", "worker.actors"]
        worker_argv += ["--processes", "1", "--threads", str(WORKER_THREADS)]
        with (
            background(
                listener_argv, env, log_dir / "listener.log", cwd=REPO_ROOT
            ) as listener,
            background(
                worker_argv, env, log_dir / "worker.log", cwd=REPO_ROOT
            ) as worker,
        ):
            wait_until_final(database_url, ids, [listener, worker])

        rows = fetch_rows(database_url, ids)
        print_table(rows, photos)
        pictures = write_pictures(rows, photos, settings)
        say(f"\n{pictures} masks and overlays written to {OUTPUT_DIR}/")
        say(f"Every observation is final after {time.monotonic() - started_s:.0f} s.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("\ndemo: interrupted; everything it started is stopped.")
        sys.exit(130)
