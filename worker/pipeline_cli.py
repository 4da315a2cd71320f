"""Pipeline commands: `hyacinth listen`, `hyacinth reprocess` and `hyacinth status`."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from types import FrameType
from typing import Any

import psycopg

from worker import queries
from worker.config import Settings
from worker.db import STATUSES, psycopg_conninfo
from worker.errors import ConfigError, DatabaseError

REPROCESS_CHOICES = {
    "failed": ["failed"],
    "done": ["done"],
    "all": ["done", "failed"],
}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the pipeline subcommands to the `hyacinth` parser."""
    listen = commands.add_parser(
        "listen",
        help="claim new observations on NOTIFY and queue them for the workers",
        description="Runs until SIGTERM. Needs a direct or session-mode connection.",
    )
    listen.set_defaults(run=run_listen)

    reprocess = commands.add_parser(
        "reprocess",
        help="set finished observations back to pending so the workers redo them",
    )
    reprocess.add_argument(
        "--status",
        choices=sorted(REPROCESS_CHOICES),
        default="failed",
        help="which finished rows to redo: failed (default), done, or all of both",
    )
    reprocess.add_argument(
        "--since",
        type=_parse_since,
        default=None,
        metavar="DATE",
        help="only rows created at or after DATE (ISO 8601, e.g. 2025-06-01)",
    )
    reprocess.set_defaults(run=run_reprocess)

    status = commands.add_parser(
        "status", help="count observations per status and show the oldest waiting"
    )
    status.set_defaults(run=run_status)


def run_listen(args: argparse.Namespace, settings: Settings) -> int:
    """`hyacinth listen`: run the listener until SIGTERM or SIGINT."""
    from worker.listener import Listener
    from worker.queue import open_broker

    stop = threading.Event()
    broker = open_broker(settings)
    try:
        with _stop_on_signals(stop):
            return Listener(settings, broker, stop).run()
    finally:
        broker.close()


def run_reprocess(args: argparse.Namespace, settings: Settings) -> int:
    """`hyacinth reprocess`: matching rows back to pending; the trigger notifies."""
    statuses = REPROCESS_CHOICES[args.status]
    with _connect(settings) as connection:
        cursor = connection.execute(
            queries.REPROCESS, {"statuses": statuses, "since": args.since}
        )
        count = cursor.rowcount

    since = f" created since {args.since.isoformat()}" if args.since else ""
    print(f"{count} {' and '.join(statuses)} observations{since} set back to pending")
    return 0


def run_status(args: argparse.Namespace, settings: Settings) -> int:
    """`hyacinth status`: count per status, age of the oldest pending and queued."""
    with _connect(settings) as connection:
        counts = dict(connection.execute(queries.COUNT_BY_STATUS).fetchall())
        ages = connection.execute(queries.OLDEST_WAITING_AGES).fetchone()

    for status in STATUSES:
        print(f"{status:<12}{counts.get(status, 0):>10}")
    pending_s, queued_s = (
        None if age is None else float(age) for age in ages or (None, None)
    )
    print(f"oldest pending: {_age(pending_s)}")
    print(f"oldest queued:  {_age(queued_s)}")
    return 0


@contextmanager
def _connect(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    conninfo = psycopg_conninfo(settings.require_database_url())
    try:
        connection = psycopg.connect(
            conninfo, autocommit=True, connect_timeout=10, prepare_threshold=None
        )
    except psycopg.OperationalError as error:
        raise DatabaseError(
            f"cannot connect to DATABASE_URL: {' '.join(str(error).split())}"
        ) from None
    with connection:
        try:
            yield connection
        except psycopg.errors.UndefinedTable:
            raise ConfigError(
                "the observations table does not exist: run `alembic upgrade head`"
            ) from None


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set `stop` on SIGTERM and SIGINT while inside; restore the handlers after."""

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {
        sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _parse_since(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date, e.g. 2025-06-01 or 2025-06-01T12:00"
        ) from None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
