"""Acceptance: rows inserted by plain SQL go through `hyacinth listen` and
`dramatiq worker.actors`, against Supabase Storage (the test server), to done or failed.

One listener and one worker serve every test of this module, on a database and a
Redis database of their own; each test looks only at the rows it inserted.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import redis
from PIL import Image

from tests.observations import (
    fetch_rows,
    insert_observation,
    new_user_id,
    wait_final,
)
from tests.plugins.models import PublishedModels, make_photo
from tests.plugins.services import (
    PostgresService,
    ProcessGroup,
    wait_for,
    with_redis_db,
)
from tests.supabase_fake import FakeSupabaseStorage
from worker.config import Settings
from worker.db import psycopg_conninfo
from worker.queue import observation_message, open_broker

PHOTOS = "photos"
MAX_RETRIES = 2

#: sigmoid(3), the score of the always-present test model.
PRESENT_SCORE = 0.9526


@dataclass
class Pipeline:
    """A listener and a worker running on their own database and Redis."""

    db: psycopg.Connection[Any]
    env: dict[str, str]
    storage: FakeSupabaseStorage
    processes: ProcessGroup
    worker: Any

    def upload_photo(self, user_id: str, name: str, data: bytes) -> str:
        """Put `data` in the photos bucket as the app would; returns its path."""
        path = f"{user_id}/{name}"
        target = self.storage.root / PHOTOS / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return path

    def observe(self, name: str, data: bytes | None) -> tuple[str, str, str]:
        """Upload a photo (None: upload nothing) and insert its row."""
        user_id = new_user_id()
        path = f"{user_id}/{name}"
        if data is not None:
            self.upload_photo(user_id, name, data)
        return insert_observation(self.db, user_id, PHOTOS, path), user_id, path


@pytest.fixture(scope="module")
def pipeline(
    postgres_service: PostgresService,
    redis_service: str,
    supabase_storage_server: FakeSupabaseStorage,
    published_models: PublishedModels,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipeline]:
    """`hyacinth listen` and `dramatiq worker.actors` on Supabase Storage."""
    database_url = postgres_service.create_database(template=postgres_service.template)
    redis_url = with_redis_db(redis_service, 3)
    redis.Redis.from_url(redis_url).flushdb()
    shutil.copytree(
        published_models.storage_dir / "models",
        supabase_storage_server.root / "models",
        dirs_exist_ok=True,
    )
    env = {
        **published_models.env,
        **supabase_storage_server.env,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "STORAGE_RETRIES": "0",
        "MAX_RETRIES": str(MAX_RETRIES),
        "RETRY_MIN_BACKOFF_MS": "50",
        "RETRY_MAX_BACKOFF_MS": "200",
        "PYTHONUNBUFFERED": "1",
        "TORCH_NUM_THREADS": "1",
        "dramatiq_worker_timeout": "20",
        "dramatiq_queue_prefetch": "1",
    }
    env = {**_inherited_env(), **env}
    processes = ProcessGroup(tmp_path_factory.mktemp("pipeline-logs"))

    try:
        with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as db:
            processes.hyacinth(["listen"], env)
            worker = processes.dramatiq(env)
            yield Pipeline(db, env, supabase_storage_server, processes, worker)
    finally:
        processes.stop_all()
        postgres_service.drop_database(database_url)
        redis.Redis.from_url(redis_url).flushdb()


def _inherited_env() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SUPABASE_", "DATABASE_", "REDIS_", "LOCAL_STORAGE"))
    }


def test_present_photo_is_done_with_pred_and_mask(pipeline: Pipeline) -> None:
    observation_id, user_id, _ = pipeline.observe("mat.jpg", make_photo(96, 64))

    rows = wait_final(pipeline.db, [observation_id], logs=pipeline.processes.logs)

    row = rows[observation_id]
    assert (row["status"], row["error"], row["attempts"]) == ("done", None, 1)
    assert row["pred"] == {
        "presence": {
            "score": pytest.approx(PRESENT_SCORE, abs=1e-3),
            "label": "present",
            "model_v": "1.0.0",
        },
        "seg": {
            "mask_url": f"supabase://masks/{user_id}/{observation_id}.png",
            "cover_pct": pytest.approx(100.0),
            "model_v": "1.0.1",
        },
    }
    assert {"download", "presence", "segmentation", "upload", "row_update"} <= set(
        row["timings_ms"]
    )
    mask_file = pipeline.storage.root / "masks" / user_id / f"{observation_id}.png"
    mask = Image.open(io.BytesIO(mask_file.read_bytes()))
    assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (96, 64))
    assert mask.getextrema() == (255, 255)


def test_bad_photos_fail_and_the_next_good_one_is_done(pipeline: Pipeline) -> None:
    good_jpeg = make_photo(64, 64)
    missing, _, _ = pipeline.observe("missing.jpg", None)
    corrupt, _, _ = pipeline.observe("corrupt.jpg", good_jpeg[: len(good_jpeg) // 3])
    not_image, _, _ = pipeline.observe("notes.jpg", b"these are my field notes\n")
    good, _, _ = pipeline.observe("good.jpg", good_jpeg)

    rows = wait_final(
        pipeline.db, [missing, corrupt, not_image, good], logs=pipeline.processes.logs
    )

    assert {key: row["status"] for key, row in rows.items()} == {
        missing: "failed",
        corrupt: "failed",
        not_image: "failed",
        good: "done",
    }
    assert rows[missing]["error"].startswith("photo not found")
    assert rows[corrupt]["error"].startswith("bad photo")
    assert rows[not_image]["error"].startswith("bad photo")
    for failed in (missing, corrupt, not_image):
        assert rows[failed]["pred"] == {}
        assert rows[failed]["attempts"] == 1
        assert pipeline.storage.key not in rows[failed]["error"]
    assert pipeline.worker.poll() is None


def test_transient_storage_failures_are_retried_until_done(
    pipeline: Pipeline,
) -> None:
    user_id = new_user_id()
    path = pipeline.upload_photo(user_id, "flaky.jpg", make_photo(64, 64))
    pipeline.storage.fail_next(2, 503, match=path)

    observation_id = insert_observation(pipeline.db, user_id, PHOTOS, path)
    rows = wait_final(pipeline.db, [observation_id], logs=pipeline.processes.logs)

    row = rows[observation_id]
    assert (row["status"], row["error"], row["attempts"]) == ("done", None, 3)
    assert f"observation.retrying observation_id={observation_id}" in (
        pipeline.processes.output()
    )


def test_storage_down_past_the_retries_ends_failed(pipeline: Pipeline) -> None:
    user_id = new_user_id()
    path = pipeline.upload_photo(user_id, "down.jpg", make_photo(64, 64))
    pipeline.storage.fail_next(MAX_RETRIES + 5, 503, match=path)

    observation_id = insert_observation(pipeline.db, user_id, PHOTOS, path)
    rows = wait_final(pipeline.db, [observation_id], logs=pipeline.processes.logs)

    row = rows[observation_id]
    assert row["status"] == "failed"
    assert row["attempts"] == MAX_RETRIES + 1
    assert row["error"].startswith(f"gave up after {MAX_RETRIES + 1} tries: ")
    assert pipeline.storage.key not in row["error"]
    pipeline.storage.reset()


# Fails the first four UPDATEs that finish this one photo with SQLSTATE 08006, the
# code of a connection lost mid-statement: more than a worker's tries in place.
FAIL_FOUR_FINISHES = """
CREATE SEQUENCE outage_finishes;
CREATE FUNCTION fail_four_finishes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('outage_finishes') <= 4 THEN
        RAISE EXCEPTION 'connection lost' USING ERRCODE = '08006';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER fail_four_finishes BEFORE UPDATE ON observations
FOR EACH ROW WHEN (NEW.status = 'done' AND NEW.path LIKE '%/outage.jpg')
EXECUTE FUNCTION fail_four_finishes();
"""


def test_a_row_whose_final_write_failed_is_taken_back_by_its_retry(
    pipeline: Pipeline,
) -> None:
    pipeline.db.execute(FAIL_FOUR_FINISHES)
    try:
        observation_id, _, _ = pipeline.observe("outage.jpg", make_photo(64, 64))
        rows = wait_final(pipeline.db, [observation_id], logs=pipeline.processes.logs)
    finally:
        pipeline.db.execute(
            "DROP TRIGGER fail_four_finishes ON observations; "
            "DROP FUNCTION fail_four_finishes(); DROP SEQUENCE outage_finishes"
        )

    row = rows[observation_id]
    # Not through the lease sweep: that would count a lost lease.
    assert (row["status"], row["attempts"], row["lost_leases"]) == ("done", 2, 0)


def test_redelivered_message_leaves_the_row_as_it_is(pipeline: Pipeline) -> None:
    observation_id, _, _ = pipeline.observe("twice.jpg", make_photo(64, 64))
    before = wait_final(pipeline.db, [observation_id], logs=pipeline.processes.logs)

    broker = open_broker(Settings.from_env(pipeline.env))
    broker.enqueue(observation_message(observation_id))
    broker.close()
    wait_for(
        lambda: (
            f"observation.skipped observation_id={observation_id}"
            in pipeline.processes.output()
        ),
        timeout_s=30,
        what="the duplicate message to be skipped",
        on_timeout=pipeline.processes.logs,
    )

    assert fetch_rows(pipeline.db, [observation_id]) == before
