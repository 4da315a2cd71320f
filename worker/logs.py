"""Logging setup: secrets kept out of log lines, the observation id put in them."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from urllib.parse import unquote, urlsplit

from worker.config import Settings
from worker.errors import ConfigError

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class RedactSecrets(logging.Filter):
    """Replaces the service role key wherever it would appear in a record."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self._secrets = [secret for secret in secrets if len(secret) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the message, and any traceback, without the secrets."""
        if not self._secrets:
            return True
        message = record.getMessage()
        redacted = redact(message, self._secrets)
        if redacted != message:
            record.msg, record.args = redacted, None

        # Formatters print exc_text when set, so the traceback is redacted too.
        if record.exc_info and not record.exc_text:
            traceback_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_text = redact(traceback_text, self._secrets)
        return True


_TRACEBACKS = logging.Formatter()


_OBSERVATION_ID: ContextVar[str | None] = ContextVar("observation_id", default=None)


@contextmanager
def observation_context(observation_id: str) -> Iterator[None]:
    """Records logged inside, by any module, name `observation_id`."""
    token = _OBSERVATION_ID.set(observation_id)
    try:
        yield
    finally:
        _OBSERVATION_ID.reset(token)


class TagObservation(logging.Filter):
    """Appends `observation_id=` to records made inside an observation_context.

    Storage retries, model loads and library warnings then say which observation
    they happened for; records that already name the id are left as they are.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the id of the observation being processed, if any and if missing."""
        observation_id = _OBSERVATION_ID.get()
        if observation_id is None:
            return True
        message = record.getMessage()
        if "observation_id=" not in message:
            record.msg, record.args = f"{message} observation_id={observation_id}", None
        return True


def install_filters(handler: logging.Handler, secrets: Sequence[str]) -> None:
    """Give `handler` the observation tag and then the secret redaction."""
    handler.addFilter(TagObservation())
    handler.addFilter(RedactSecrets(secrets))


def secrets_of(settings: Settings) -> list[str]:
    """What must never be written out: the service role key and URL passwords.

    Passwords come as written in the URL and percent-decoded, since libraries
    quote either form in their errors.
    """
    secrets = [settings.supabase_service_role_key]
    for url in (settings.database_url, settings.redis_url):
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            secrets += [password, unquote(password)]
    # Short values would blank out ordinary words; the log filter skips them too.
    # Longest first, so that no part of a longer secret is left after a shorter.
    kept = {secret for secret in secrets if len(secret) >= 8}
    return sorted(kept, key=len, reverse=True)


def redact(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret replaced by `[redacted]`."""
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return text


def check_log_level(level: str) -> str:
    """`level` in capitals, or ConfigError naming LOG_LEVEL."""
    name = level.upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ConfigError(
            f"LOG_LEVEL={level!r} is not a log level: use DEBUG, INFO, WARNING or ERROR"
        )
    return name


def configure_logging(settings: Settings) -> None:
    """One line per record on stderr, at LOG_LEVEL, with secrets redacted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    install_filters(handler, secrets_of(settings))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(check_log_level(settings.log_level))
    for noisy in ("httpx", "httpcore", "urllib3", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
