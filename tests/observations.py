"""Helpers for tests that put observations through the pipeline: rows and photos."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import redis
from psycopg.rows import dict_row

from tests.plugins.services import wait_for
from worker.config import OBSERVATIONS_QUEUE
from worker.queue import ACTOR_NAME

FINAL = ("done", "failed")

#: The Redis hash where Dramatiq keeps the messages of the observations queue.
MESSAGES_KEY = f"dramatiq:{OBSERVATIONS_QUEUE}.msgs"


def insert_observation(
    db: psycopg.Connection[Any], user_id: str, bucket: str, path: str
) -> str:
    """One row inserted with plain SQL, as the app does; returns its id."""
    row = db.execute(
        "INSERT INTO observations (user_id, bucket, path) VALUES (%s, %s, %s) "
        "RETURNING id::text",
        (user_id, bucket, path),
    ).fetchone()
    assert row is not None
    return str(row[0])


def insert_observations(
    db: psycopg.Connection[Any],
    count: int,
    *,
    user_id: str | None = None,
    path: str | None = None,
) -> list[str]:
    """`count` rows inserted in one statement, as a bulk upload would."""
    rows = db.execute(
        "INSERT INTO observations (user_id, bucket, path) "
        "SELECT coalesce(%(user_id)s::uuid, gen_random_uuid()), 'photos', "
        "coalesce(%(path)s, 'bulk/' || n || '.jpg') "
        "FROM generate_series(1, %(count)s) AS n RETURNING id::text",
        {"count": count, "user_id": user_id, "path": path},
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


def fetch_rows(
    db: psycopg.Connection[Any], ids: list[str]
) -> dict[str, dict[str, Any]]:
    """The rows of `ids`, as dicts keyed by id."""
    with db.cursor(row_factory=dict_row) as cursor:
        found = cursor.execute(
            "SELECT id::text AS id, user_id::text AS user_id, status, pred, error, "
            "attempts, lost_leases, timings_ms, finished_at FROM observations "
            "WHERE id = ANY(%s::uuid[])",
            (ids,),
        ).fetchall()
    return {row["id"]: row for row in found}


def wait_final(
    db: psycopg.Connection[Any],
    ids: list[str],
    *,
    timeout_s: float = 60,
    logs: Callable[[], str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Wait until every row of `ids` is done or failed; returns the rows."""

    def final() -> dict[str, dict[str, Any]] | None:
        rows = fetch_rows(db, ids)
        if len(rows) == len(ids) and all(r["status"] in FINAL for r in rows.values()):
            return rows
        return None

    def describe() -> str:
        statuses = {key: row["status"] for key, row in fetch_rows(db, ids).items()}
        return f"statuses: {statuses}\n{logs() if logs else ''}"

    return wait_for(
        final,
        timeout_s=timeout_s,
        what=f"{len(ids)} observations to be final",
        on_timeout=describe,
    )


def new_user_id() -> str:
    """A user id no other test uses, so object paths never collide."""
    return str(uuid.uuid4())
