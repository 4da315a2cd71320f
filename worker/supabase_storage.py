"""Supabase Storage through the official client, behind the Storage interface."""

from __future__ import annotations

import builtins
import contextlib
import logging
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import httpx
from storage3.exceptions import StorageApiError
from storage3.utils import StorageException
from supabase import ClientOptions, SupabaseException, create_client

from worker.config import Settings
from worker.errors import (
    ConfigError,
    HyacinthError,
    MissingObjectError,
    ObjectExistsError,
    StorageError,
    StorageRefusedError,
)
from worker.logs import redact
from worker.storage import _FOLDER_PLACEHOLDER, check_bucket, object_parts, prefix_parts

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Entries asked for per list request; Supabase pages its answers.
_LIST_PAGE_SIZE = 100

#: The longest wait between two tries of one storage request.
_MAX_BACKOFF_MS = 5_000


class SupabaseStorage:
    """Supabase Storage through the official client, with retries and clean errors."""

    backend = "supabase"

    def __init__(
        self,
        url: str,
        key: str,
        *,
        timeout_s: float = 20.0,
        retries: int = 3,
        retry_backoff_ms: int = 200,
    ) -> None:
        self._key = key
        self._url = url
        self._retries = retries
        self._retry_backoff_ms = retry_backoff_ms

        # One HTTP client per Storage object: its connection pool serves every
        # photo the worker downloads. The client's own timeout knob only takes
        # whole seconds and warns, so the timeout is set here instead. Redirects
        # are not followed: one would carry the `apikey` header to another host.
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=False)
        try:
            client = create_client(
                url, key, options=ClientOptions(httpx_client=self._http)
            )
        except SupabaseException as exc:
            self._http.close()
            raise ConfigError(
                f"SUPABASE_URL={url!r} cannot be used ({self._clean(exc.message)}): "
                "give the project URL, like https://<project-ref>.supabase.co"
            ) from None
        self._files = client.storage

    @classmethod
    def from_settings(cls, settings: Settings) -> SupabaseStorage:
        """A client for SUPABASE_URL with the STORAGE_* timeout and retry settings."""
        return cls(
            settings.supabase_url,
            settings.supabase_service_role_key,
            timeout_s=settings.storage_timeout_s,
            retries=settings.storage_retries,
            retry_backoff_ms=settings.storage_retry_backoff_ms,
        )

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def download(self, bucket: str, path: str) -> bytes:
        """The object's bytes; MissingObjectError when Supabase has none."""
        object_parts(check_bucket(bucket), path)
        files = self._files.from_(bucket)

        return self._call("download", bucket, path, lambda: files.download(path))

    def upload(
        self,
        bucket: str,
        path: str,
        data: bytes,
        *,
        content_type: str,
        upsert: bool = False,
    ) -> None:
        """Upload with `x-upsert: true` when `upsert`; else an existing object fails."""
        object_parts(check_bucket(bucket), path)
        files = self._files.from_(bucket)
        options: Any = {
            "content-type": content_type,
            "upsert": "true" if upsert else "false",
        }
        tries = 0

        def send() -> None:
            nonlocal tries
            tries += 1
            files.upload(path, data, options)

        try:
            self._call("upload", bucket, path, send)
        except ObjectExistsError:
            # A try that timed out may have landed before its retry: that is
            # our own object, not someone else's.
            if tries > 1 and self.download(bucket, path) == data:
                return
            raise

    def list(self, bucket: str, prefix: str = "") -> builtins.list[str]:
        """Names directly under `prefix`, files and folders, reading every page."""
        folder = "/".join(prefix_parts(check_bucket(bucket), prefix))
        files = self._files.from_(bucket)
        names: builtins.list[str] = []

        offset = 0
        while True:
            options: Any = {"limit": _LIST_PAGE_SIZE, "offset": offset}
            page = self._call(
                "list", bucket, prefix, partial(files.list, folder, options)
            )
            names.extend(
                str(entry["name"])
                for entry in page
                if entry.get("name") and entry["name"] != _FOLDER_PLACEHOLDER
            )
            if len(page) < _LIST_PAGE_SIZE:
                break
            offset += _LIST_PAGE_SIZE

        return sorted(names)

    def exists(self, bucket: str, path: str) -> bool:
        """Whether Supabase holds an object at `path` (asks for its info)."""
        object_parts(check_bucket(bucket), path)
        files = self._files.from_(bucket)

        try:
            self._call("info", bucket, path, lambda: files.info(path))
        except MissingObjectError:
            return False
        return True

    def fingerprint(self, bucket: str, path: str) -> str:
        """The object's etag, size and time of its last write, as Supabase has them."""
        object_parts(check_bucket(bucket), path)
        files = self._files.from_(bucket)

        info = self._call("info", bucket, path, lambda: files.info(path))
        fields = ("version", "etag", "size", "last_modified", "updated_at")
        described = ":".join(str(info.get(field, "")) for field in fields)
        return f"supabase:{self._url}:{bucket}/{path}:{described}"

    def _call(
        self, action: str, bucket: str, path: str, request: Callable[[], _T]
    ) -> _T:
        attempt = 1
        while True:
            try:
                return request()
            except (StorageException, httpx.HTTPError, ValueError, KeyError) as exc:
                error = self._translate(exc, action, bucket, path)

            if not error.transient:
                raise error
            if attempt > self._retries:
                logger.warning(
                    "storage.gave_up action=%s bucket=%s path=%s attempts=%d error=%s",
                    action,
                    bucket,
                    path,
                    attempt,
                    error,
                )
                raise error

            delay_ms = self._backoff_ms(attempt)
            logger.info(
                "storage.retry action=%s bucket=%s path=%s attempt=%d delay_ms=%d "
                "error=%s",
                action,
                bucket,
                path,
                attempt,
                delay_ms,
                error,
            )
            time.sleep(delay_ms / 1000)
            attempt += 1

    def _backoff_ms(self, attempt: int) -> int:
        # Half fixed, half random: tries spread out yet never come back at once.
        ceiling_ms = min(_MAX_BACKOFF_MS, self._retry_backoff_ms * 2 ** (attempt - 1))
        return int(ceiling_ms / 2 + random.uniform(0, ceiling_ms / 2))

    def _translate(
        self, exc: Exception, action: str, bucket: str, path: str
    ) -> HyacinthError:
        where = f"{action} of {path!r} in Supabase bucket {bucket!r}"

        if isinstance(exc, httpx.TimeoutException):
            return StorageError(
                f"{where} timed out ({type(exc).__name__}); raise STORAGE_TIMEOUT_S "
                "if the network is slow"
            )
        if isinstance(exc, httpx.HTTPError):
            return StorageError(
                f"{where} failed on the network ({type(exc).__name__}: "
                f"{self._clean(str(exc))}); check SUPABASE_URL and the network"
            )
        if not isinstance(exc, StorageApiError):
            return StorageError(
                f"{where} got an answer it cannot read ({type(exc).__name__}: "
                f"{self._clean(str(exc))})"
            )

        statuses = _statuses(exc)
        detail = self._clean(f"{exc.code}: {exc.message}")
        # Supabase answers a missing bucket with statusCode 404 too; only its
        # `error` text tells it from a missing object.
        if str(exc.code).lower() == "bucket not found":
            return StorageRefusedError(
                f"{where} failed: the project at SUPABASE_URL has no bucket "
                f"{bucket!r}; create it in the dashboard (Storage), or correct the "
                "setting or row that names it (MODELS_BUCKET, STORAGE_BUCKET_MASKS, "
                "an observation's `bucket`)"
            )
        if 413 in statuses or str(exc.code).lower() == "payload too large":
            return StorageRefusedError(
                f"{where} was refused as too large ({detail}): raise the file size "
                f"limit of bucket {bucket!r} and the project's upload limit "
                "(dashboard, Storage settings)"
            )
        if 404 in statuses or exc.code == "not_found":
            return MissingObjectError(
                f"no object {path!r} in Supabase bucket {bucket!r} ({detail})"
            )
        if 409 in statuses or exc.code == "Duplicate":
            return ObjectExistsError(
                f"object {path!r} already exists in Supabase bucket {bucket!r}: pass "
                "upsert (or --force) to overwrite it"
            )
        if 429 in statuses or any(status >= 500 for status in statuses):
            return StorageError(f"{where} failed on the server ({detail}); retry later")
        if statuses & {401, 403}:
            return StorageRefusedError(
                f"{where} was refused ({detail}): check that SUPABASE_SERVICE_ROLE_KEY "
                "is the service role key of the project at SUPABASE_URL"
            )
        return StorageRefusedError(f"{where} was refused ({detail})")

    def _clean(self, text: str) -> str:
        # A key too short to be real would blank out ordinary words instead.
        return redact(text, [self._key]) if len(self._key) >= 8 else text


def _statuses(exc: StorageApiError) -> set[int]:
    # The JSON body carries its own statusCode (a string; "404" for a missing
    # object) while the wire status is often 400; keep both.
    statuses: set[int] = set()
    with contextlib.suppress(TypeError, ValueError):
        statuses.add(int(exc.status))

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, httpx.HTTPStatusError):
            statuses.add(seen.response.status_code)
        seen = seen.__cause__ or seen.__context__
    return statuses
