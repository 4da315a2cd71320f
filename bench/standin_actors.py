"""A stand-in for `worker.actors` that returns at once, to time dispatch alone.

It registers the same actor name on the same queue, so the real listener's messages
reach it. It stamps `started_at` with the database clock (the same clock that set
`created_at`), marks the row done and returns.
"""

from __future__ import annotations

import threading

import dramatiq
import psycopg

from worker.config import OBSERVATIONS_QUEUE, Settings
from worker.db import psycopg_conninfo
from worker.queue import ACTOR_NAME, open_broker

settings = Settings.from_env()
broker = open_broker(settings)
dramatiq.set_broker(broker)

_connections = threading.local()

STAMP_STARTED = """
UPDATE observations
SET status = 'done', started_at = clock_timestamp(), finished_at = clock_timestamp()
WHERE id = %(id)s
"""


def _connection() -> psycopg.Connection[tuple[object, ...]]:
    connection: psycopg.Connection[tuple[object, ...]] | None = getattr(
        _connections, "connection", None
    )
    if connection is None:
        connection = psycopg.connect(
            psycopg_conninfo(settings.require_database_url()), autocommit=True
        )
        _connections.connection = connection
    return connection


@dramatiq.actor(actor_name=ACTOR_NAME, queue_name=OBSERVATIONS_QUEUE, max_retries=0)
def process_observation(observation_id: str) -> None:
    """Record when the message reached an actor, and nothing else."""
    _connection().execute(STAMP_STARTED, {"id": observation_id})
