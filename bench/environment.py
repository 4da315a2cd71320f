"""What every benchmark part shares: services, a migrated database, storage, models."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from worker.config import Settings
from worker.db import psycopg_conninfo
from worker.demo_models import write_demo_weights
from worker.embedded import child_environment
from worker.publish import publish
from worker.storage import open_storage

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTOS_BUCKET = "photos"
BENCH_USER_ID = "0d6f3c52-9a61-4f7e-8a65-2b1d4c7e9f30"


@dataclass
class BenchEnvironment:
    """Settings and environment variables of the benchmark's processes."""

    work_dir: Path
    database_url: str
    redis_url: str
    worker_threads: int
    torch_threads: int
    env: dict[str, str] = field(default_factory=dict)

    def settings(self, **overrides: str) -> Settings:
        """Settings as the worker processes see them, with `overrides` applied."""
        return Settings.from_env({**self.env, **overrides})

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        """An autocommit connection to the benchmark's database."""
        return psycopg.connect(psycopg_conninfo(self.database_url), autocommit=True)

    def status_counts(self, ids: list[str] | None = None) -> dict[str, int]:
        """How many observations are in each status: all of them, or those of `ids`."""
        with self.connect() as db:
            rows = db.execute(
                "SELECT status, count(*) FROM observations "
                "WHERE %(ids)s::uuid[] IS NULL OR id = ANY(%(ids)s::uuid[]) "
                "GROUP BY status",
                {"ids": ids},
            ).fetchall()
        return {status: int(count) for status, count in rows}

    def finished(self, ids: list[str]) -> int:
        """How many of `ids` are done or failed."""
        counts = self.status_counts(ids)
        return counts.get("done", 0) + counts.get("failed", 0)

    def upload_photo(self, name: str, data: bytes) -> str:
        """Put a photo in the photos bucket; returns its path."""
        path = f"{BENCH_USER_ID}/{uuid.uuid4()}-{name}"
        open_storage(self.settings()).upload(
            PHOTOS_BUCKET, path, data, content_type="image/jpeg", upsert=True
        )
        return path

    def insert_rows(self, paths: list[str], *, status: str = "pending") -> list[str]:
        """Insert one observation per path, as the app would; returns the ids."""
        with self.connect() as db:
            rows = db.execute(
                "INSERT INTO observations (user_id, bucket, path, status) "
                "SELECT %s, %s, path, %s FROM unnest(%s::text[]) AS path "
                "RETURNING id::text",
                (BENCH_USER_ID, PHOTOS_BUCKET, status, paths),
            ).fetchall()
        return [row[0] for row in rows]


def prepare(work_dir: Path, database_url: str, redis_url: str) -> BenchEnvironment:
    """Migrate the database and publish full-size models into local storage.

    The worker runs as the README advises: one process, a worker thread per core,
    one torch thread each.
    """
    worker_threads = os.cpu_count() or 1
    torch_threads = 1
    env = child_environment(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        LOCAL_STORAGE_DIR=str(work_dir / "storage"),
        MODEL_CACHE_DIR=str(work_dir / "model-cache"),
        TORCH_DEVICE="cpu",
        TORCH_NUM_THREADS=str(torch_threads),
        WORKER_THREADS=str(worker_threads),
        PYTHONUNBUFFERED="1",
        LOG_LEVEL="WARNING",
        dramatiq_worker_timeout="20",
        dramatiq_queue_prefetch=str(worker_threads),
    )
    bench = BenchEnvironment(
        work_dir, database_url, redis_url, worker_threads, torch_threads, env
    )

    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        env=env,
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )

    presence_path, segmentation_path = write_demo_weights(work_dir / "weights")
    storage = open_storage(bench.settings())
    settings = bench.settings()
    publish(
        storage,
        settings.models_bucket,
        "presence",
        settings.presence_model_version,
        presence_path,
        architecture="mobilenet_v2",
        force=True,
    )
    publish(
        storage,
        settings.models_bucket,
        "segmentation",
        settings.segmentation_model_version,
        segmentation_path,
        architecture="unet_resnet34",
        force=True,
    )
    return bench


def wait_until(check: Any, *, timeout_s: float, what: str) -> float:
    """Poll `check` every 2 ms until truthy; returns the seconds it took."""
    started_s = time.perf_counter()
    while not check():
        if time.perf_counter() - started_s > timeout_s:
            raise RuntimeError(f"bench: timed out after {timeout_s} s waiting {what}")
        time.sleep(0.002)
    return time.perf_counter() - started_s
