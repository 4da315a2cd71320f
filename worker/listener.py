"""The listener: turns NOTIFYs on new observations into queued Dramatiq messages.

Notifications are only wake-ups. What is claimed is decided by the database: every
wake-up claims the oldest pending rows in batches, moving them `pending` -> `queued`
and enqueueing their ids before the claim commits. A slow safety sweep catches what
notifications cannot: rows whose worker died (heartbeat older than the lease), rows
queued so long ago that their message was lost, and pending rows whose notification
never came.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from contextlib import closing
from typing import Any

import psycopg
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.errors import BrokerConnectionError
from psycopg.conninfo import make_conninfo

from worker import queries
from worker.config import NOTIFY_CHANNEL, Settings
from worker.db import KEEPALIVE_ARGS, database_ports, psycopg_conninfo
from worker.errors import ConfigError
from worker.queue import (
    enqueue_observations,
    return_dead_workers_messages,
    waiting_messages,
)

log = logging.getLogger(__name__)

#: The port of Supabase's transaction pooler, which cannot LISTEN.
TRANSACTION_POOLER_PORT = 6543

#: Longest wait between two checks of the stop flag.
POLL_S = 1.0

#: How long the self-notification probe may take before LISTEN is declared broken.
PROBE_TIMEOUT_S = 5.0

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0

POOLER_MESSAGE = (
    "DATABASE_URL {what}; a transaction-mode pooler (Supabase's pooler on port 6543, "
    "pgbouncer with pool_mode=transaction) cannot LISTEN. Give the listener the "
    "direct connection (db.<project>.supabase.co:5432) or the session-mode pooler "
    "(port 5432 on the pooler host); workers may keep using the transaction pooler"
)

_POOLER_HINTS = ("pgbouncer", "supavisor", "pooler", "transaction mode")

#: Errors after which the listener reconnects instead of exiting.
RECOVERABLE_ERRORS = (psycopg.Error, redis.exceptions.RedisError, BrokerConnectionError)


def reject_transaction_pooler(database_url: str) -> None:
    """Refuse a DATABASE_URL on the transaction pooler's port before connecting."""
    if TRANSACTION_POOLER_PORT in database_ports(database_url):
        raise ConfigError(
            POOLER_MESSAGE.format(what="uses port 6543, the transaction pooler")
        )


def looks_like_pooler_error(error: BaseException) -> bool:
    """Whether a failed LISTEN was refused by a connection pooler."""
    text = str(error).lower()
    return any(hint in text for hint in _POOLER_HINTS)


def parse_observation_id(payload: str) -> str | None:
    """The payload as a canonical UUID string, or None when it is not one."""
    try:
        return str(uuid.UUID(payload))
    except ValueError:
        return None


def backoff_s(attempt: int) -> float:
    """Jittered exponential delay before reconnect number `attempt` (0-based)."""
    ceiling_s = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0**attempt)
    return random.uniform(ceiling_s / 2, ceiling_s)


class Listener:
    """Claims pending observations on notification and re-queues expired ones."""

    def __init__(
        self, settings: Settings, broker: RedisBroker, stop: threading.Event
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.stop = stop
        self._conninfo = psycopg_conninfo(settings.require_database_url())
        self._last_ok = time.monotonic()

    def run(self) -> int:
        """Listen until stopped (0) or until the database is gone too long (1)."""
        reject_transaction_pooler(self.settings.require_database_url())
        attempt = 0
        self._last_ok = time.monotonic()

        while not self.stop.is_set():
            try:
                with self._connect() as connection:
                    self._listen(connection)
                    # Only a sweep that went through proves the database and Redis
                    # work: a connection that listens but cannot claim (Redis down,
                    # the table missing) keeps backing off and in the end gives up.
                    self.sweep(connection)
                    attempt = 0
                    self._serve(connection)
            except RECOVERABLE_ERRORS as error:
                down_s = time.monotonic() - self._last_ok
                if down_s >= self.settings.listener_give_up_s:
                    log.error(
                        "listener.gave_up down_s=%.1f error=%s: exiting so the "
                        "platform restarts the listener",
                        down_s,
                        _one_line(error),
                    )
                    return 1

                delay_s = backoff_s(attempt)
                attempt += 1
                log.warning(
                    "listener.disconnected retry_in_s=%.2f down_s=%.1f error=%s%s",
                    delay_s,
                    down_s,
                    _one_line(error),
                    _hint(error),
                )
                self.stop.wait(delay_s)

        log.info("listener.stopped")
        return 0

    def _connect(self) -> psycopg.Connection[Any]:
        conninfo = make_conninfo(
            self._conninfo,
            application_name="hyacinth-listener",
            connect_timeout=10,
            **KEEPALIVE_ARGS,
        )
        return psycopg.connect(conninfo, autocommit=True)

    def _listen(self, connection: psycopg.Connection[Any]) -> None:
        """LISTEN, then prove with a self-notification that notifications arrive."""
        try:
            connection.execute(queries.LISTEN)
        except psycopg.Error as error:
            if looks_like_pooler_error(error):
                raise ConfigError(
                    POOLER_MESSAGE.format(what=f"refused LISTEN ({_one_line(error)})")
                ) from None
            raise

        # A transaction pooler may accept LISTEN and then hand the server connection
        # to another client, so notifications never reach us: check one arrives.
        # The probe goes out on a connection of its own: sent on this one, a pooler
        # could run it on the very server connection that listens and deliver it.
        token = uuid.uuid4().hex
        connection.execute(queries.LISTEN_PROBE)
        with self._connect() as sender:
            sender.execute(queries.SEND_PROBE, {"token": token})
        arrived = False
        with closing(connection.notifies(timeout=PROBE_TIMEOUT_S)) as notifies:
            for notify in notifies:
                # Observation notifications may come first; the sweep after this
                # claims their rows anyway.
                if notify.channel == queries.PROBE_CHANNEL and notify.payload == token:
                    arrived = True
                    break
        connection.execute(f"UNLISTEN {queries.PROBE_CHANNEL}")
        if not arrived:
            raise ConfigError(
                POOLER_MESSAGE.format(
                    what=f"accepted LISTEN but delivered no notification within "
                    f"{PROBE_TIMEOUT_S:.0f} s"
                )
            )

        log.info("listener.listening channel=%s", NOTIFY_CHANNEL)

    def _serve(self, connection: psycopg.Connection[Any]) -> None:
        """Claim on every wake-up and sweep every interval."""
        next_sweep_at = time.monotonic() + self.settings.sweep_interval_s

        while not self.stop.is_set():
            wait_s = min(POLL_S, max(0.0, next_sweep_at - time.monotonic()))
            if self._wait_for_notifications(connection, wait_s):
                self.claim_pending(connection)

            if time.monotonic() >= next_sweep_at:
                self.sweep(connection)
                next_sweep_at = time.monotonic() + self.settings.sweep_interval_s

    def _wait_for_notifications(
        self, connection: psycopg.Connection[Any], wait_s: float
    ) -> int:
        """Wait up to `wait_s` for a notification, then drain; returns valid ones."""
        valid = 0
        for notify in connection.notifies(timeout=wait_s, stop_after=1):
            valid += self._accept(notify)
        if valid:
            for notify in connection.notifies(timeout=0):
                valid += self._accept(notify)
        return valid

    def _accept(self, notify: psycopg.Notify) -> int:
        if notify.channel != NOTIFY_CHANNEL:
            return 0
        if parse_observation_id(notify.payload) is None:
            log.warning("listener.bad_payload payload=%r ignored", notify.payload[:80])
            return 0
        return 1

    def sweep(self, connection: psycopg.Connection[Any]) -> None:
        """The safety sweep: pending rows, dead workers' messages, expired leases."""
        self.claim_pending(connection)
        return_dead_workers_messages(self.broker)
        self.fail_abandoned(connection)
        self.claim_expired(connection)
        self._last_ok = time.monotonic()

    def fail_abandoned(self, connection: psycopg.Connection[Any]) -> int:
        """Fail rows whose worker died more than MAX_RETRIES times holding them."""
        params = {
            "limit": self.settings.claim_batch_size,
            "lease_s": self.settings.lease_s,
            "max_lost_leases": self.settings.max_retries,
        }
        rows = connection.execute(queries.FAIL_ABANDONED, params).fetchall()
        for observation_id, lost_leases in rows:
            log.warning(
                "observation.gave_up observation_id=%s lost_leases=%d: its worker "
                "died on every try",
                observation_id,
                lost_leases,
            )
        return len(rows)

    def claim_pending(self, connection: psycopg.Connection[Any]) -> int:
        """Move pending rows to queued and enqueue them, batch by batch."""
        batch = self.settings.claim_batch_size
        total = 0
        while True:
            # Enqueue inside the transaction: if Redis fails, the claim rolls back
            # and the rows stay pending; a worker that gets a message before the
            # commit waits on the row lock (see queries.CLAIM_OBSERVATION).
            with connection.transaction():
                rows = connection.execute(
                    queries.CLAIM_PENDING, {"limit": batch}
                ).fetchall()
                ids = [str(row[0]) for row in rows]
                enqueue_observations(self.broker, ids)

            for observation_id in ids:
                log.info("observation.queued observation_id=%s", observation_id)
            total += len(ids)
            if ids:
                # Enqueued: Redis works. A claim of nothing may not have asked it.
                self._last_ok = time.monotonic()
            if len(ids) < batch:
                return total

    def claim_expired(self, connection: psycopg.Connection[Any]) -> int:
        """Put rows whose worker died, or whose message was lost, back on the queue."""
        params = {
            "limit": self.settings.claim_batch_size,
            "lease_s": self.settings.lease_s,
            "queued_lease_s": self.settings.queued_lease_s,
            "include_queued": waiting_messages(self.broker) == 0,
        }
        total = 0
        while True:
            with connection.transaction():
                rows = connection.execute(queries.CLAIM_EXPIRED, params).fetchall()
                enqueue_observations(self.broker, [str(row[0]) for row in rows])

            for observation_id, was in rows:
                log.warning(
                    "observation.requeued observation_id=%s was=%s: lease expired",
                    observation_id,
                    was,
                )
            total += len(rows)
            if len(rows) < self.settings.claim_batch_size:
                return total


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:300]


def _hint(error: BaseException) -> str:
    if isinstance(error, psycopg.errors.UndefinedTable):
        return " (run `alembic upgrade head`)"
    return ""
