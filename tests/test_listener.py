"""The listener: claim before enqueue, once per row, and nothing lost on reconnect.

Most tests run the real Listener in a thread of the test process, on a real
PostgreSQL and Redis; the command's own behaviour (exit statuses, signals) is tested
on `hyacinth listen` subprocesses.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis

from tests.observations import all_in, enqueued_ids, insert_observations, statuses
from tests.plugins.services import ProcessGroup, wait_for
from worker.config import NOTIFY_CHANNEL, OBSERVATIONS_QUEUE, Settings
from worker.db import psycopg_conninfo
from worker.errors import ConfigError
from worker.listener import (
    Listener,
    backoff_s,
    looks_like_pooler_error,
    parse_observation_id,
)
from worker.queue import enqueue_observations, open_broker


@dataclasses.dataclass
class ListenerThread:
    """A Listener running in a thread until the test ends."""

    listener: Listener
    thread: threading.Thread
    stop: threading.Event
    exit_status: list[int]


StartListener = Callable[..., ListenerThread]


@pytest.fixture
def start_listener(
    database_url: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> Iterator[StartListener]:
    """Starts Listeners in threads (settings overridable); returns once each listens."""
    caplog.set_level(logging.INFO, logger="worker")
    started: list[ListenerThread] = []

    def start(**overrides: Any) -> ListenerThread:
        settings = Settings(database_url=database_url, redis_url=redis_url)
        settings = dataclasses.replace(settings, **overrides)
        stop = threading.Event()
        listener = Listener(settings, open_broker(settings), stop)
        exit_status: list[int] = []
        thread = threading.Thread(
            target=lambda: exit_status.append(listener.run()), daemon=True
        )
        running = ListenerThread(listener, thread, stop, exit_status)
        started.append(running)
        thread.start()
        wait_for(
            lambda: caplog.text.count("listener.listening") >= len(started),
            timeout_s=20,
            what="the listener to listen",
            on_timeout=lambda: caplog.text[-3000:],
        )
        return running

    yield start

    for running in started:
        running.stop.set()
        running.thread.join(timeout=15)
        running.listener.broker.close()
    assert all(running.exit_status == [0] for running in started)


def queued(db: psycopg.Connection[Any], ids: list[str], what: str, **wait: Any) -> None:
    """Wait until every row of `ids` is queued."""
    wait_for(lambda: all_in(db, ids, "queued"), timeout_s=30, what=what, **wait)


def test_insert_is_queued_with_one_message(
    start_listener: StartListener,
    db: psycopg.Connection[Any],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    start_listener()

    (observation_id,) = insert_observations(db, 1)

    queued(db, [observation_id], "the row to be queued")
    assert enqueued_ids(redis_url) == [observation_id]
    assert f"observation.queued observation_id={observation_id}" in caplog.text


def test_rows_inserted_while_stopped_are_queued_at_start(
    start_listener: StartListener, db: psycopg.Connection[Any], redis_url: str
) -> None:
    ids = insert_observations(db, 5)

    start_listener()

    queued(db, ids, "the rows inserted before start to be queued")
    assert sorted(enqueued_ids(redis_url)) == sorted(ids)


def test_two_listeners_enqueue_every_row_exactly_once(
    start_listener: StartListener, db: psycopg.Connection[Any], redis_url: str
) -> None:
    start_listener(claim_batch_size=25)
    start_listener(claim_batch_size=25)

    ids = insert_observations(db, 200)
    for _ in range(100):
        ids += insert_observations(db, 1)

    queued(db, ids, "300 rows to be queued")
    enqueued = enqueued_ids(redis_url)
    assert len(enqueued) == len(ids)
    assert sorted(enqueued) == sorted(ids)


def test_notifications_ahead_of_the_probe_do_not_fail_the_start(
    database_url: str, db: psycopg.Connection[Any], redis_url: str
) -> None:
    settings = Settings(database_url=database_url, redis_url=redis_url)
    listener = Listener(settings, open_broker(settings), threading.Event())

    with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as connection:
        connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
        insert_observations(db, 3)
        # Three notifications now wait on the connection, ahead of the probe's.
        listener._listen(connection)


def test_terminated_connection_reconnects_and_loses_nothing(
    start_listener: StartListener,
    db: psycopg.Connection[Any],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    start_listener()
    before = insert_observations(db, 3)
    queued(db, before, "the first rows")

    terminated = db.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'hyacinth-listener'"
    ).fetchone()
    during = insert_observations(db, 3)

    queued(db, during, "rows inserted while the listener was cut off")
    assert terminated == (1,)
    assert "listener.disconnected" in caplog.text
    wait_for(
        lambda: caplog.text.count("listener.listening") == 2,
        timeout_s=20,
        what="the listener to listen again",
    )
    after = insert_observations(db, 2)
    queued(db, after, "rows inserted after the reconnect")
    assert sorted(enqueued_ids(redis_url)) == sorted(before + during + after)


def test_payload_that_is_not_an_id_is_ignored(
    start_listener: StartListener,
    db: psycopg.Connection[Any],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    start_listener()

    db.execute(f"NOTIFY {NOTIFY_CHANNEL}, 'x''); DROP TABLE observations; --'")
    (observation_id,) = insert_observations(db, 1)

    queued(db, [observation_id], "the row after a bad payload to be queued")
    assert "listener.bad_payload" in caplog.text
    assert enqueued_ids(redis_url) == [observation_id]


def test_expired_rows_go_back_on_the_queue(
    start_listener: StartListener,
    db: psycopg.Connection[Any],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead_worker, lost_message, alive = insert_observations(db, 3)
    db.execute(
        "UPDATE observations SET status = 'processing', attempts = 1, "
        "heartbeat_at = now() - interval '1 minute' WHERE id = %s",
        (dead_worker,),
    )
    db.execute(
        "UPDATE observations SET status = 'queued', "
        "queued_at = now() - interval '1 hour' WHERE id = %s",
        (lost_message,),
    )
    db.execute(
        "UPDATE observations SET status = 'processing', attempts = 1, "
        "heartbeat_at = now() + interval '1 hour' WHERE id = %s",
        (alive,),
    )

    start_listener(lease_s=2.0, heartbeat_s=0.5, sweep_interval_s=0.2)

    wait_for(
        lambda: sorted(enqueued_ids(redis_url)) == sorted([dead_worker, lost_message]),
        timeout_s=20,
        what="expired rows to be enqueued again",
    )
    assert all_in(db, [dead_worker, lost_message], "queued")
    assert statuses(db, [alive]) == {alive: "processing"}
    assert f"observation.requeued observation_id={dead_worker} was=processing" in (
        caplog.text
    )


def test_a_photo_that_kills_every_worker_fails_instead_of_looping(
    database_url: str, db: psycopg.Connection[Any], redis_url: str
) -> None:
    settings = Settings(database_url=database_url, redis_url=redis_url, max_retries=2)
    retried_often, died_every_time = insert_observations(db, 2)
    # Many tries, but its workers died only once: an ordinary restart.
    db.execute(
        "UPDATE observations SET status = 'processing', attempts = 9, "
        "lost_leases = 0, heartbeat_at = now() - interval '1 hour' WHERE id = %s",
        (retried_often,),
    )
    db.execute(
        "UPDATE observations SET status = 'processing', attempts = 3, "
        "lost_leases = 2, heartbeat_at = now() - interval '1 hour' WHERE id = %s",
        (died_every_time,),
    )
    listener = Listener(settings, open_broker(settings), threading.Event())

    with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as connection:
        listener.sweep(connection)

    assert statuses(db, [retried_often, died_every_time]) == {
        retried_often: "queued",
        died_every_time: "failed",
    }
    assert enqueued_ids(redis_url) == [retried_often]
    rows = dict(
        db.execute(
            "SELECT id::text, lost_leases FROM observations WHERE id = ANY(%s::uuid[])",
            ([retried_often, died_every_time],),
        ).fetchall()
    )
    assert rows == {retried_often: 1, died_every_time: 3}
    error = db.execute(
        "SELECT error FROM observations WHERE id = %s", (died_every_time,)
    ).fetchone()
    assert error is not None
    assert error[0] == (
        "gave up: the worker died 3 times while processing this photo "
        "(killed, or out of memory)"
    )


def test_old_queued_rows_are_left_alone_while_messages_wait(
    database_url: str, db: psycopg.Connection[Any], redis_url: str
) -> None:
    settings = Settings(database_url=database_url, redis_url=redis_url)
    waiting, stale = insert_observations(db, 2)
    db.execute(
        "UPDATE observations SET status = 'queued', "
        "queued_at = now() - interval '1 hour' WHERE id = %s",
        (stale,),
    )
    broker = open_broker(settings)
    enqueue_observations(broker, [waiting])
    listener = Listener(settings, broker, threading.Event())

    with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as connection:
        during_backlog = listener.claim_expired(connection)
        broker.flush(OBSERVATIONS_QUEUE)
        after_backlog = listener.claim_expired(connection)

    assert (during_backlog, after_backlog) == (0, 1)
    assert enqueued_ids(redis_url) == [stale]


def test_pending_row_whose_notification_was_missed_is_swept(
    start_listener: StartListener, db: psycopg.Connection[Any]
) -> None:
    start_listener(sweep_interval_s=0.2)

    # A row inserted with no NOTIFY, as when a notification is lost.
    with db.transaction():
        db.execute(
            "ALTER TABLE observations DISABLE TRIGGER observations_notify_insert"
        )
        (silent,) = insert_observations(db, 1)
        db.execute("ALTER TABLE observations ENABLE TRIGGER observations_notify_insert")

    queued(db, [silent], "the row inserted without a notification")


def test_claim_rolls_back_when_redis_is_down(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Any
) -> None:
    settings = Settings(
        database_url=database_url, redis_url=f"unix://{tmp_path}/no-redis.sock"
    )
    ids = insert_observations(db, 3)
    listener = Listener(settings, open_broker(settings), threading.Event())

    with (
        psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as connection,
        pytest.raises(redis.exceptions.ConnectionError),
    ):
        listener.claim_pending(connection)

    assert all_in(db, ids, "pending")


def test_bulk_insert_is_claimed_in_batches(
    database_url: str, db: psycopg.Connection[Any], redis_url: str
) -> None:
    settings = Settings(
        database_url=database_url, redis_url=redis_url, claim_batch_size=100
    )
    ids = insert_observations(db, 1050)
    listener = Listener(settings, open_broker(settings), threading.Event())

    with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as connection:
        claimed = listener.claim_pending(connection)

    assert claimed == 1050
    assert all_in(db, ids, "queued")
    assert sorted(enqueued_ids(redis_url)) == sorted(ids)


def test_listener_gives_up_when_the_database_stays_away(redis_url: str) -> None:
    settings = Settings(
        database_url="postgresql://postgres@127.0.0.1:9/postgres",
        redis_url=redis_url,
        listener_give_up_s=1.0,
    )
    listener = Listener(settings, open_broker(settings), threading.Event())

    assert listener.run() == 1


def test_listener_gives_up_when_redis_stays_away_though_listen_works(
    database_url: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Connecting and LISTEN succeed every time; the sweep after them fails on Redis.
    caplog.set_level(logging.INFO, logger="worker")
    settings = Settings(
        database_url=database_url,
        redis_url=f"unix://{tmp_path}/no-redis.sock",
        listener_give_up_s=2.0,
    )
    listener = Listener(settings, open_broker(settings), threading.Event())

    assert listener.run() == 1
    assert caplog.text.count("listener.listening") >= 2
    assert "listener.gave_up" in caplog.text


def test_transaction_pooler_port_is_refused_before_connecting(redis_url: str) -> None:
    settings = Settings(
        database_url="postgres://postgres.ref:pw@aws-0-eu.pooler.supabase.com:6543/db",
        redis_url=redis_url,
    )
    listener = Listener(settings, open_broker(settings), threading.Event())

    with pytest.raises(ConfigError, match="6543") as caught:
        listener.run()

    assert "direct connection" in str(caught.value)
    assert "session-mode pooler" in str(caught.value)


def test_hyacinth_listen_queues_and_stops_cleanly_on_sigterm(
    processes: ProcessGroup,
    service_env: dict[str, str],
    db: psycopg.Connection[Any],
    redis_url: str,
) -> None:
    listener = processes.hyacinth(["listen"], service_env)
    wait_for(
        lambda: "listener.listening" in processes.output(),
        timeout_s=60,
        what="hyacinth listen to listen",
        on_timeout=processes.logs,
    )
    (observation_id,) = insert_observations(db, 1)
    queued(db, [observation_id], "the row", on_timeout=processes.logs)

    listener.send_signal(signal.SIGTERM)

    assert listener.wait(timeout=30) == 0
    assert "listener.stopped" in processes.output()
    assert enqueued_ids(redis_url) == [observation_id]


def test_hyacinth_listen_exit_statuses(
    processes: ProcessGroup, service_env: dict[str, str]
) -> None:
    pooler = {
        **service_env,
        "DATABASE_URL": "postgresql://postgres.ref:pw@aws-0-eu.pooler.supabase.com"
        ":6543/postgres",
    }
    no_database = {
        **service_env,
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/postgres",
        "LISTENER_GIVE_UP_S": "1",
    }

    unreadable = {
        **service_env,
        "DATABASE_URL": "postgresql://postgres:not encoded secret@127.0.0.1/postgres",
    }

    refused = processes.hyacinth(["listen"], pooler, name="pooler")
    gave_up = processes.hyacinth(["listen"], no_database, name="no-database")
    misread = processes.hyacinth(["listen"], unreadable, name="unreadable")

    assert refused.wait(timeout=60) == 2
    assert gave_up.wait(timeout=60) == 1
    assert misread.wait(timeout=60) == 2
    output = processes.output()
    assert "session-mode pooler" in output
    assert ":pw@" not in output
    assert "listener.gave_up" in output
    assert "DATABASE_URL cannot be read" in output
    assert "not encoded secret" not in output


def test_payload_parsing() -> None:
    observation_id = uuid.uuid4()

    assert parse_observation_id(str(observation_id)) == str(observation_id)
    assert parse_observation_id(str(observation_id).upper()) == str(observation_id)
    assert parse_observation_id("") is None
    assert parse_observation_id("1; DROP TABLE observations") is None


def test_pooler_errors_and_backoff() -> None:
    refused = RuntimeError("ERROR: LISTEN is not supported in transaction mode")

    assert looks_like_pooler_error(refused)
    assert not looks_like_pooler_error(RuntimeError("permission denied"))
    assert all(0.25 <= backoff_s(0) <= 0.5 for _ in range(20))
    assert all(5.0 <= backoff_s(30) <= 10.0 for _ in range(20))
