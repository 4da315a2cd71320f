"""The listener: claim before enqueue, once per row, and nothing lost on reconnect."""

from __future__ import annotations

import json
import signal
import threading
import uuid
from typing import Any

import psycopg
import pytest
import redis

from tests.plugins.services import ProcessGroup, wait_for
from worker.config import NOTIFY_CHANNEL, OBSERVATIONS_QUEUE, Settings
from worker.db import psycopg_conninfo
from worker.listener import (
    Listener,
    backoff_s,
    looks_like_pooler_error,
    parse_observation_id,
)
from worker.queue import ACTOR_NAME, open_broker

MESSAGES_KEY = f"dramatiq:{OBSERVATIONS_QUEUE}.msgs"


def insert_observations(db: psycopg.Connection[Any], count: int) -> list[str]:
    """`count` rows inserted in one statement, as an app's bulk upload would."""
    rows = db.execute(
        "INSERT INTO observations (user_id, bucket, path) "
        "SELECT gen_random_uuid(), 'photos', 'bulk/' || n || '.jpg' "
        "FROM generate_series(1, %s) AS n RETURNING id",
        (count,),
    ).fetchall()
    return [str(row[0]) for row in rows]


def statuses(db: psycopg.Connection[Any], ids: list[str]) -> dict[str, str]:
    """Status per id."""
    rows = db.execute(
        "SELECT id::text, status FROM observations WHERE id = ANY(%s::uuid[])", (ids,)
    ).fetchall()
    return dict(rows)


def all_in(db: psycopg.Connection[Any], ids: list[str], status: str) -> bool:
    """Whether every row of `ids` has `status`."""
    found = statuses(db, ids)
    return len(found) == len(ids) and set(found.values()) == {status}


def enqueued_ids(redis_url: str) -> list[str]:
    """The observation id of every message waiting on the observations queue."""
    client = redis.Redis.from_url(redis_url)
    ids = []
    for raw in client.hvals(MESSAGES_KEY):
        message = json.loads(raw)
        assert message["actor_name"] == ACTOR_NAME
        assert message["queue_name"] == OBSERVATIONS_QUEUE
        ids.append(message["args"][0])
    client.close()
    return ids


def start_listener(
    processes: ProcessGroup, env: dict[str, str], name: str = "listener"
) -> Any:
    """`hyacinth listen`, returned once it listens."""
    process = processes.hyacinth(["listen"], env, name=name)
    log_path = processes.started[-1][2]
    wait_for(
        lambda: "listener.listening" in log_path.read_text(),
        timeout_s=30,
        what="the listener to listen",
        on_timeout=processes.logs,
    )
    return process


def test_insert_is_queued_with_one_message(
    processes: ProcessGroup,
    service_env: dict[str, str],
    db: psycopg.Connection[Any],
    redis_url: str,
) -> None:
    start_listener(processes, service_env)

    (observation_id,) = insert_observations(db, 1)

    wait_for(
        lambda: all_in(db, [observation_id], "queued"),
        timeout_s=20,
        what="the row to be queued",
        on_timeout=processes.logs,
    )
    assert enqueued_ids(redis_url) == [observation_id]
    assert f"observation.queued observation_id={observation_id}" in processes.logs()


def test_rows_inserted_while_stopped_are_queued_at_start(
    processes: ProcessGroup,
    service_env: dict[str, str],
    db: psycopg.Connection[Any],
    redis_url: str,
) -> None:
    ids = insert_observations(db, 5)

    start_listener(processes, service_env)

    wait_for(
        lambda: all_in(db, ids, "queued"),
        timeout_s=20,
        what="the rows inserted before start to be queued",
        on_timeout=processes.logs,
    )
    assert sorted(enqueued_ids(redis_url)) == sorted(ids)


def test_two_listeners_enqueue_every_row_exactly_once(
    processes: ProcessGroup,
    service_env: dict[str, str],
    db: psycopg.Connection[Any],
    redis_url: str,
) -> None:
    env = {**service_env, "CLAIM_BATCH_SIZE": "25"}
    start_listener(processes, env, name="listener-a")
    start_listener(processes, env, name="listener-b")

    ids = insert_observations(db, 200)
    for _ in range(100):
        ids += insert_observations(db, 1)

    wait_for(
        lambda: all_in(db, ids, "queued"),
        timeout_s=60,
        what="300 rows to be queued",
        on_timeout=processes.logs,
    )
    enqueued = enqueued_ids(redis_url)
    assert len(enqueued) == len(ids)
    assert sorted(enqueued) == sorted(ids)


def test_terminated_connection_reconnects_and_loses_nothing(
    processes: ProcessGroup,
    service_env: dict[str, str],
    db: psycopg.Connection[Any],
    redis_url: str,
) -> None:
    start_listener(processes, service_env)
    before = insert_observations(db, 3)
    wait_for(lambda: all_in(db, before, "queued"), timeout_s=20, what="first rows")

    terminated = db.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'hyacinth-listener'"
    ).fetchone()
    during = insert_observations(db, 3)

    wait_for(
        lambda: all_in(db, during, "queued"),
        timeout_s=30,
        what="rows inserted while the listener was cut off",
        on_timeout=processes.logs,
    )
    assert terminated == (1,)
    assert "listener.disconnected" in processes.logs()
    after = insert_observations(db, 2)
    wait_for(
        lambda: all_in(db, after, "queued"),
        timeout_s=20,
        what="rows inserted after the reconnect",
        on_timeout=processes.logs,
    )
    assert sorted(enqueued_ids(redis_url)) == sorted(before + during + after)


def test_payload_that_is_not_an_id_is_ignored(
    processes: ProcessGroup,
    service_env: dict[str, str],
    db: psycopg.Connection[Any],
    redis_url: str,
) -> None:
    start_listener(processes, service_env)

    db.execute(f"NOTIFY {NOTIFY_CHANNEL}, 'x''); DROP TABLE observations; --'")
    (observation_id,) = insert_observations(db, 1)

    wait_for(
        lambda: all_in(db, [observation_id], "queued"),
        timeout_s=20,
        what="the row after a bad payload to be queued",
        on_timeout=processes.logs,
    )
    assert "listener.bad_payload" in processes.logs()
    assert enqueued_ids(redis_url) == [observation_id]


def test_expired_rows_go_back_on_the_queue(
    processes: ProcessGroup,
    service_env: dict[str, str],
    db: psycopg.Connection[Any],
    redis_url: str,
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
    env = {**service_env, "LEASE_S": "2", "HEARTBEAT_S": "0.5"}
    env["SWEEP_INTERVAL_S"] = "0.2"

    start_listener(processes, env)

    wait_for(
        lambda: all_in(db, [dead_worker, lost_message], "queued"),
        timeout_s=20,
        what="expired rows to be queued again",
        on_timeout=processes.logs,
    )
    assert sorted(enqueued_ids(redis_url)) == sorted([dead_worker, lost_message])
    assert statuses(db, [alive]) == {alive: "processing"}
    assert f"observation.requeued observation_id={dead_worker} was=processing" in (
        processes.logs()
    )


def test_sigterm_stops_the_listener_cleanly(
    processes: ProcessGroup, service_env: dict[str, str]
) -> None:
    listener = start_listener(processes, service_env)

    listener.send_signal(signal.SIGTERM)

    assert listener.wait(timeout=15) == 0
    assert "listener.stopped" in processes.logs()


def test_transaction_pooler_port_is_refused_with_what_to_use(
    processes: ProcessGroup, service_env: dict[str, str]
) -> None:
    env = {
        **service_env,
        "DATABASE_URL": "postgresql://postgres.ref:pw@aws-0-eu.pooler.supabase.com"
        ":6543/postgres",
    }

    listener = processes.hyacinth(["listen"], env)

    assert listener.wait(timeout=30) == 2
    output = processes.logs()
    assert "6543" in output
    assert "direct connection" in output
    assert "session-mode pooler" in output
    assert ":pw@" not in output


def test_listener_exits_non_zero_when_the_database_stays_away(
    processes: ProcessGroup, service_env: dict[str, str]
) -> None:
    env = {
        **service_env,
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/postgres",
        "LISTENER_GIVE_UP_S": "1",
    }

    listener = processes.hyacinth(["listen"], env)

    assert listener.wait(timeout=30) == 1
    assert "listener.gave_up" in processes.logs()


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
