"""The processor in this process: fencing against a worker that lost its row, and
the classification of errors into retry, fail and skip."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from dramatiq.middleware import TimeLimitExceeded
from dramatiq.threading import Interrupt, raise_thread_exception
from sqlalchemy import Engine

from tests.observations import fetch_rows, insert_observation, new_user_id
from tests.plugins.models import PublishedModels, make_photo
from tests.plugins.services import wait_for
from tests.supabase_fake import FakeSupabaseStorage
from worker import queries
from worker.db import make_engine, psycopg_conninfo
from worker.errors import MissingObjectError, PhotoError, StorageError
from worker.inference import get_predictor
from worker.pipeline import (
    DONE,
    LEASE_LOST,
    SKIPPED,
    ObservationProcessor,
    RetryLater,
    describe,
    is_transient,
)
from worker.storage import open_storage


@pytest.fixture
def engine(database_url: str, published_models: PublishedModels) -> Iterator[Engine]:
    """A worker's engine on the test database."""
    settings = published_models.settings(database_url=database_url)
    engine = make_engine(settings, application_name="hyacinth-test")
    yield engine
    engine.dispose()


def processor_on_supabase(
    published_models: PublishedModels,
    server: FakeSupabaseStorage,
    engine: Engine,
    **overrides: Any,
) -> ObservationProcessor:
    """A processor reading photos from the Supabase test server."""
    settings = published_models.settings(
        supabase_url=server.url,
        supabase_service_role_key=server.key,
        storage_retries=0,
        **overrides,
    )
    predictor = get_predictor(published_models.settings())
    return ObservationProcessor(settings, engine, open_storage(settings), predictor)


def photo_row(
    db: psycopg.Connection[Any],
    server: FakeSupabaseStorage,
    name: str,
    *,
    queued: bool,
) -> tuple[str, str, str]:
    """Upload a small photo to the photos bucket and insert its row, pending or
    already `queued` as the listener leaves it; returns id, user id and path."""
    user_id = new_user_id()
    path = f"{user_id}/{name}"
    photo_file = server.root / "photos" / path
    photo_file.parent.mkdir(parents=True)
    photo_file.write_bytes(make_photo(64, 64))
    observation_id = insert_observation(db, user_id, "photos", path)
    if queued:
        db.execute(
            "UPDATE observations SET status = 'queued' WHERE id = %s",
            (observation_id,),
        )
    return observation_id, user_id, path


def test_worker_that_lost_its_row_cannot_overwrite_the_result(
    published_models: PublishedModels,
    supabase_storage_server: FakeSupabaseStorage,
    engine: Engine,
    db: psycopg.Connection[Any],
) -> None:
    observation_id, user_id, path = photo_row(
        db, supabase_storage_server, "zombie.jpg", queued=True
    )
    # The first worker stalls inside the download and sends no heartbeat meanwhile.
    supabase_storage_server.stall_next(1, 3.0, match=path)
    zombie = processor_on_supabase(
        published_models,
        supabase_storage_server,
        engine,
        lease_s=60.0,
        heartbeat_s=30.0,
    )
    outcome: list[str] = []
    stalled = threading.Thread(
        target=lambda: outcome.append(zombie.process(observation_id)), daemon=True
    )
    stalled.start()
    wait_for(
        lambda: (
            fetch_rows(db, [observation_id])[observation_id]["status"] == "processing"
        ),
        timeout_s=20,
        what="the first worker to claim the row",
    )

    db.execute(
        "UPDATE observations SET heartbeat_at = now() - interval '1 hour' "
        "WHERE id = %s",
        (observation_id,),
    )
    successor = processor_on_supabase(
        published_models, supabase_storage_server, engine, lease_s=1.0
    )
    taken_over = successor.process(observation_id)
    after_successor = fetch_rows(db, [observation_id])[observation_id]
    stalled.join(timeout=30)

    assert taken_over == DONE
    assert outcome == [LEASE_LOST]
    assert fetch_rows(db, [observation_id])[observation_id] == after_successor
    assert (after_successor["status"], after_successor["attempts"]) == ("done", 2)
    assert after_successor["lost_leases"] == 1
    mask_path = f"{user_id}/{observation_id}.png"
    uploads = [
        request
        for request in supabase_storage_server.requests(contains=mask_path)
        if request.method in ("POST", "PUT")
    ]
    assert len(uploads) == 1


def test_message_that_arrives_before_the_listeners_commit_waits_for_it(
    published_models: PublishedModels,
    supabase_storage_server: FakeSupabaseStorage,
    engine: Engine,
    database_url: str,
    db: psycopg.Connection[Any],
) -> None:
    observation_id, _, _ = photo_row(
        db, supabase_storage_server, "early.jpg", queued=False
    )
    processor = processor_on_supabase(published_models, supabase_storage_server, engine)
    outcome: list[str] = []

    # The listener has claimed the row and pushed its message, not yet committed.
    with psycopg.connect(psycopg_conninfo(database_url)) as listener:
        claimed = listener.execute(queries.CLAIM_PENDING, {"limit": 10}).fetchall()
        worker = threading.Thread(
            target=lambda: outcome.append(processor.process(observation_id)),
            daemon=True,
        )
        worker.start()
        wait_for(
            lambda: not worker.is_alive() or waiting_on_a_lock(db),
            timeout_s=20,
            what="the worker to finish or to wait for the listener's row lock",
        )
        listener.commit()
    worker.join(timeout=30)

    assert [str(row[0]) for row in claimed] == [observation_id]
    assert outcome == [DONE]
    row = fetch_rows(db, [observation_id])[observation_id]
    assert (row["status"], row["attempts"]) == ("done", 1)


# Fails the first UPDATE that sets status = 'done' with SQLSTATE 08006, the code
# libpq reports for a connection lost mid-statement (psycopg's ConnectionFailure).
# A sequence counts the tries: unlike a table, it is not rolled back with them.
FAIL_FIRST_FINISH = """
CREATE SEQUENCE finish_tries;
CREATE FUNCTION fail_first_finish() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('finish_tries') = 1 THEN
        RAISE EXCEPTION 'connection lost' USING ERRCODE = '08006';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER fail_first_finish BEFORE UPDATE ON observations
FOR EACH ROW WHEN (NEW.status = 'done') EXECUTE FUNCTION fail_first_finish();
"""


def test_a_final_write_that_loses_its_connection_is_tried_again(
    published_models: PublishedModels,
    supabase_storage_server: FakeSupabaseStorage,
    engine: Engine,
    db: psycopg.Connection[Any],
) -> None:
    observation_id, _, _ = photo_row(
        db, supabase_storage_server, "blip.jpg", queued=True
    )
    db.execute(FAIL_FIRST_FINISH)
    processor = processor_on_supabase(published_models, supabase_storage_server, engine)

    outcome = processor.process(observation_id)

    row = fetch_rows(db, [observation_id])[observation_id]
    assert outcome == DONE
    assert (row["status"], row["attempts"], row["lost_leases"]) == ("done", 1, 0)
    assert db.execute("SELECT last_value FROM finish_tries").fetchone() == (2,)


def test_a_final_write_lost_past_its_tries_is_taken_back_by_the_retry(
    published_models: PublishedModels,
    supabase_storage_server: FakeSupabaseStorage,
    engine: Engine,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    observation_id, _, _ = photo_row(
        db, supabase_storage_server, "outage.jpg", queued=True
    )
    # Every try in place fails: the first try ends with the row still its own.
    monkeypatch.setattr("worker.pipeline.DATABASE_RETRY_DELAYS_S", (0.01, 0.01))
    db.execute(FAIL_FIRST_FINISH.replace("= 1 THEN", "<= 3 THEN"))
    processor = processor_on_supabase(published_models, supabase_storage_server, engine)

    with pytest.raises(RetryLater) as first:
        processor.process(observation_id)
    held = fetch_rows(db, [observation_id])[observation_id]
    stranger = processor.process(observation_id, retries=1, held_token=99)
    retried = processor.process(
        observation_id, retries=1, held_token=first.value.held_token
    )

    row = fetch_rows(db, [observation_id])[observation_id]
    assert first.value.held_token == 1
    assert (held["status"], held["attempts"]) == ("processing", 1)
    assert (stranger, retried) == (SKIPPED, DONE)
    assert (row["status"], row["attempts"], row["lost_leases"]) == ("done", 2, 0)


# Every UPDATE that would record an interrupt loses its connection.
FAIL_INTERRUPT_WRITES = """
CREATE FUNCTION fail_interrupt_writes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'connection lost' USING ERRCODE = '08006';
END;
$$;
CREATE TRIGGER fail_interrupt_writes BEFORE UPDATE ON observations
FOR EACH ROW WHEN (NEW.status IN ('failed', 'queued') AND OLD.status = 'processing')
EXECUTE FUNCTION fail_interrupt_writes();
"""


@pytest.mark.parametrize(
    ("interrupt", "status", "error"),
    [
        (TimeLimitExceeded, "failed", "took longer than the worker's time limit"),
        (Interrupt, "queued", "interrupted"),
        (TimeLimitExceeded, "processing", None),
        (Interrupt, "processing", None),
    ],
    ids=["time-limit", "interrupt", "time-limit-unrecorded", "interrupt-unrecorded"],
)
def test_an_interrupted_photo_does_not_wait_for_its_lease(
    published_models: PublishedModels,
    supabase_storage_server: FakeSupabaseStorage,
    engine: Engine,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
    interrupt: type[BaseException],
    status: str,
    error: str | None,
) -> None:
    # Unrecorded: the write fails on the database, and the interrupt still goes on
    # rather than turning into a retry of the photo.
    if status == "processing":
        monkeypatch.setattr("worker.pipeline.DATABASE_RETRY_DELAYS_S", (0.01,))
        db.execute(FAIL_INTERRUPT_WRITES)
    observation_id, _, path = photo_row(
        db, supabase_storage_server, "slow.jpg", queued=True
    )
    supabase_storage_server.stall_next(1, 2.0, match=path)
    processor = processor_on_supabase(published_models, supabase_storage_server, engine)
    raised: list[BaseException] = []

    def work() -> None:
        try:
            processor.process(observation_id)
        except BaseException as caught:
            raised.append(caught)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    wait_for(
        lambda: (
            fetch_rows(db, [observation_id])[observation_id]["status"] == "processing"
        ),
        timeout_s=20,
        what="the worker to claim the row",
    )
    # What Dramatiq's TimeLimit middleware does to a thread past its limit.
    assert thread.ident is not None
    raise_thread_exception(thread.ident, interrupt)
    thread.join(timeout=30)

    row = fetch_rows(db, [observation_id])[observation_id]
    assert [type(caught) for caught in raised] == [interrupt]
    assert (row["status"], row["error"], row["attempts"]) == (status, error, 1)


def waiting_on_a_lock(db: psycopg.Connection[Any]) -> bool:
    """Whether another session of this database waits for a row lock."""
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    return row is not None and row[0] > 0


def test_message_that_is_not_an_id_is_skipped(
    published_models: PublishedModels,
    supabase_storage_server: FakeSupabaseStorage,
    engine: Engine,
) -> None:
    processor = processor_on_supabase(published_models, supabase_storage_server, engine)

    assert processor.process("'; DROP TABLE observations; --") == SKIPPED


def test_errors_are_sorted_into_transient_and_permanent() -> None:
    assert is_transient(StorageError("timeout"))
    assert is_transient(psycopg.OperationalError("server closed the connection"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(PhotoError("truncated"))
    assert not is_transient(MissingObjectError("no object"))
    assert not is_transient(ValueError("bug"))


def test_error_descriptions_say_what_went_wrong() -> None:
    assert describe(PhotoError("image file is\ntruncated")) == (
        "bad photo: image file is truncated"
    )
    assert describe(MissingObjectError("no object 'a.jpg'")).startswith(
        "photo not found: "
    )
    assert describe(KeyError("x")) == "unexpected KeyError: 'x'"
