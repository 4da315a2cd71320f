"""Log lines: they name the observation being processed and never hold the key."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import pytest

from worker.config import Settings
from worker.logs import install_filters, observation_context, secrets_of

KEY = "service-role-key-0123456789"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """What a logger named `hyacinth.test` writes through the project's filters."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    install_filters(handler, [KEY])
    logger = logging.getLogger("hyacinth.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)


def written(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_records_inside_an_observation_name_it(lines: io.StringIO) -> None:
    logger = logging.getLogger("hyacinth.test")

    logger.info("before")
    with observation_context("5b0c7a3e-0000-4000-8000-000000000001"):
        logger.info("storage.retry bucket=%s attempt=%d", "photos", 1)
        logger.info("observation.done observation_id=%s", "already-named")
    logger.info("after")

    assert written(lines) == [
        "before",
        "storage.retry bucket=photos attempt=1 "
        "observation_id=5b0c7a3e-0000-4000-8000-000000000001",
        "observation.done observation_id=already-named",
        "after",
    ]


def test_each_thread_names_its_own_observation(lines: io.StringIO) -> None:
    logger = logging.getLogger("hyacinth.test")
    inside = threading.Event()
    release = threading.Event()

    def other_thread() -> None:
        with observation_context("second"):
            inside.set()
            release.wait(timeout=10)
            logger.info("from the second thread")

    with observation_context("first"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        inside.wait(timeout=10)
        logger.info("from the first thread")
        release.set()
        thread.join()

    assert written(lines) == [
        "from the first thread observation_id=first",
        "from the second thread observation_id=second",
    ]


def test_the_key_is_redacted_from_messages_and_tracebacks(lines: io.StringIO) -> None:
    logger = logging.getLogger("hyacinth.test")

    with observation_context("o1"):
        try:
            raise RuntimeError(f"request with apikey={KEY} refused")
        except RuntimeError:
            logger.exception("storage.failed key=%s", KEY)

    text = lines.getvalue()
    assert KEY not in text
    assert "storage.failed key=[redacted] observation_id=o1" in text
    assert "apikey=[redacted] refused" in text


def test_secrets_are_the_key_and_the_url_passwords_in_both_spellings() -> None:
    settings = Settings(
        database_url="postgresql://postgres:p%40ss-word-1@db.example.com/postgres",
        redis_url="rediss://default:redis-password-2@cache.example.com:6380/0",
        supabase_service_role_key=KEY,
    )

    secrets = secrets_of(settings)

    assert set(secrets) == {KEY, "p%40ss-word-1", "p@ss-word-1", "redis-password-2"}
    assert secrets_of(Settings(database_url="postgresql://u:short@h/db")) == []
