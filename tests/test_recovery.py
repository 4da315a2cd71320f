"""Acceptance: nothing is lost or done twice when processes stop, die or change models.

Each test runs `hyacinth listen` and `dramatiq worker.actors` as real processes on a
fresh database and Redis, and waits on the database with a deadline.
"""

from __future__ import annotations

import argparse
import io
import shutil
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from PIL import Image

from tests.observations import (
    all_in,
    enqueued_ids,
    fetch_rows,
    insert_observation,
    insert_observations,
    new_user_id,
    wait_final,
)
from tests.plugins.models import PublishedModels, make_photo
from tests.plugins.services import ProcessGroup, wait_for
from tests.supabase_fake import FakeSupabaseStorage
from worker.cli import build_parser
from worker.config import Settings
from worker.storage import LocalStorage

PHOTOS = "photos"
ABSENT_SCORE = 0.0474


def wait_ready(processes: ProcessGroup, marker: str, count: int = 1) -> None:
    """Wait until `marker` has appeared `count` times in the processes' output."""
    wait_for(
        lambda: processes.output().count(marker) >= count,
        timeout_s=90,
        what=f"{marker!r} x{count} in the output",
        on_timeout=processes.logs,
    )


def reprocess(env: dict[str, str], *argv: str) -> None:
    """`hyacinth reprocess ARGV...` through the real parser, in this process."""
    args: argparse.Namespace = build_parser().parse_args(["reprocess", *argv])
    assert args.run(args, Settings.from_env(env)) == 0


@pytest.fixture
def local_env(
    service_env: dict[str, str], published_models: PublishedModels
) -> dict[str, str]:
    """Listener and worker environment on the published models' local storage."""
    return {**service_env, **published_models.env}


def test_reprocess_after_switching_models_redoes_rows_with_the_new_versions(
    processes: ProcessGroup,
    local_env: dict[str, str],
    db: psycopg.Connection[Any],
    published_models: PublishedModels,
    capsys: pytest.CaptureFixture[str],
) -> None:
    storage = LocalStorage(published_models.storage_dir)
    user_id = new_user_id()
    storage.upload(
        PHOTOS, f"{user_id}/a.jpg", make_photo(80, 60), content_type="image/jpeg"
    )
    observation_id = insert_observation(db, user_id, PHOTOS, f"{user_id}/a.jpg")
    processes.hyacinth(["listen"], local_env)
    first_worker = processes.dramatiq(local_env, name="worker-1.0.1")

    first = wait_final(db, [observation_id], logs=processes.logs)[observation_id]
    first_worker.send_signal(signal.SIGTERM)
    assert first_worker.wait(timeout=60) == 0

    switched = {**local_env, "SEGMENTATION_MODEL_VERSION": "1.0.2"}
    processes.dramatiq(switched, name="worker-1.0.2")
    reprocess(switched, "--status", "done")
    second = wait_final(db, [observation_id], logs=processes.logs)[observation_id]

    assert first["pred"]["seg"]["model_v"] == "1.0.1"
    assert (second["status"], second["attempts"]) == ("done", 2)
    assert second["pred"]["seg"] == {**first["pred"]["seg"], "model_v": "1.0.2"}
    assert "1 done observations set back to pending" in capsys.readouterr().out
    mask_path = published_models.storage_dir / "masks" / user_id
    assert [path.name for path in mask_path.iterdir()] == [f"{observation_id}.png"]


def test_absent_photo_is_done_and_a_rerun_finding_no_plants_drops_seg(
    processes: ProcessGroup,
    local_env: dict[str, str],
    db: psycopg.Connection[Any],
    published_models: PublishedModels,
) -> None:
    storage = LocalStorage(published_models.storage_dir)
    user_id = new_user_id()
    storage.upload(
        PHOTOS, f"{user_id}/b.jpg", make_photo(64, 64), content_type="image/jpeg"
    )
    was_present = insert_observation(db, user_id, PHOTOS, f"{user_id}/b.jpg")
    db.execute(
        "UPDATE observations SET status = 'done', attempts = 1, pred = %s "
        "WHERE id = %s",
        (
            '{"presence": {"score": 0.9, "label": "present", "model_v": "1.0.0"}, '
            '"seg": {"mask_url": "supabase://masks/x.png", "cover_pct": 50.0, '
            '"model_v": "1.0.1"}}',
            was_present,
        ),
    )
    absent_env = {**local_env, "PRESENCE_MODEL_VERSION": "2.0.0"}
    processes.hyacinth(["listen"], absent_env)
    processes.dramatiq(absent_env)

    reprocess(absent_env, "--status", "all")
    fresh = insert_observation(db, user_id, PHOTOS, f"{user_id}/b.jpg")
    rows = wait_final(db, [was_present, fresh], logs=processes.logs)

    for row in rows.values():
        assert row["status"] == "done"
        assert row["pred"] == {
            "presence": {
                "score": pytest.approx(ABSENT_SCORE, abs=1e-3),
                "label": "absent",
                "model_v": "2.0.0",
            }
        }
    assert rows[was_present]["attempts"] == 2
    assert rows[fresh]["attempts"] == 1


def test_two_listeners_and_hundreds_of_rows_each_processed_once(
    processes: ProcessGroup,
    local_env: dict[str, str],
    db: psycopg.Connection[Any],
    redis_url: str,
    published_models: PublishedModels,
) -> None:
    storage = LocalStorage(published_models.storage_dir)
    user_id = new_user_id()
    storage.upload(
        PHOTOS, f"{user_id}/c.jpg", make_photo(64, 64), content_type="image/jpeg"
    )
    env = {**local_env, "CLAIM_BATCH_SIZE": "25", "PRESENCE_MODEL_VERSION": "2.0.0"}
    photo = {"user_id": user_id, "path": f"{user_id}/c.jpg"}
    ids = insert_observations(db, 100, **photo)

    processes.hyacinth(["listen"], env, name="listener-a")
    processes.hyacinth(["listen"], env, name="listener-b")
    wait_ready(processes, "listener.listening", count=2)
    ids += insert_observations(db, 150, **photo)
    for _ in range(50):
        ids += insert_observations(db, 1, **photo)

    wait_for(
        lambda: all_in(db, ids, "queued"),
        timeout_s=60,
        what="300 rows to be queued",
        on_timeout=processes.logs,
    )
    assert sorted(enqueued_ids(redis_url)) == sorted(ids)

    processes.dramatiq(env)
    rows = wait_final(db, ids, timeout_s=120, logs=processes.logs)

    assert {row["status"] for row in rows.values()} == {"done"}
    assert {row["attempts"] for row in rows.values()} == {1}


def test_worker_killed_mid_photo_leaves_a_row_that_still_reaches_done(
    processes: ProcessGroup,
    service_env: dict[str, str],
    db: psycopg.Connection[Any],
    published_models: PublishedModels,
    supabase_storage_server: FakeSupabaseStorage,
) -> None:
    copy_models(published_models, supabase_storage_server.root)
    env = {
        **service_env,
        **published_models.env,
        **supabase_storage_server.env,
        "LEASE_S": "2",
        "HEARTBEAT_S": "0.5",
        "SWEEP_INTERVAL_S": "0.5",
    }
    processes.hyacinth(["listen"], env)
    doomed = processes.dramatiq(env, name="worker-killed")
    wait_ready(processes, "worker.ready")

    user_id = new_user_id()
    path = f"{user_id}/slow.jpg"
    photo_file = supabase_storage_server.root / PHOTOS / path
    photo_file.parent.mkdir(parents=True)
    photo_file.write_bytes(make_photo(120, 90))
    # The download hangs, so the worker is inside the photo when it is killed.
    supabase_storage_server.stall_next(1, 15.0, match=path)
    observation_id = insert_observation(db, user_id, PHOTOS, path)

    def held_past_the_lease() -> bool:
        row = db.execute(
            "SELECT status = 'processing' AND heartbeat_at - started_at "
            ">= interval '2 seconds' FROM observations WHERE id = %s",
            (observation_id,),
        ).fetchone()
        return bool(row and row[0])

    wait_for(
        held_past_the_lease,
        timeout_s=60,
        what="the heartbeat to keep the row past its lease",
        on_timeout=processes.logs,
    )
    assert fetch_rows(db, [observation_id])[observation_id]["attempts"] == 1
    processes.kill(doomed)

    processes.dramatiq(env, name="worker-after")
    row = wait_final(db, [observation_id], logs=processes.logs)[observation_id]

    assert (row["status"], row["attempts"], row["error"]) == ("done", 2, None)
    assert f"observation.requeued observation_id={observation_id} was=processing" in (
        processes.output()
    )
    mask_file = supabase_storage_server.root / "masks" / user_id
    mask = Image.open(io.BytesIO((mask_file / f"{observation_id}.png").read_bytes()))
    assert mask.size == (120, 90)


def copy_models(published_models: PublishedModels, root: Path) -> None:
    """Put the published test models in the Supabase test server's models bucket."""
    shutil.copytree(
        published_models.storage_dir / "models", root / "models", dirs_exist_ok=True
    )


def test_worker_whose_models_cannot_load_exits_instead_of_serving(
    processes: ProcessGroup, local_env: dict[str, str]
) -> None:
    env = {**local_env, "SEGMENTATION_MODEL_VERSION": "9.9.9"}

    worker = processes.dramatiq(env, name="worker-no-model")
    exit_status = wait_for(
        lambda: worker.poll(),
        timeout_s=120,
        what="the worker to give up its boot",
        on_timeout=processes.logs,
    )

    assert exit_status != 0
    output = processes.output()
    assert "worker.boot_failed" in output
    assert "9.9.9" in output
    assert "ready for action" not in output
