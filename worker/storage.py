"""Object storage behind one small interface: Supabase Storage or a local folder."""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

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
    StoragePathError,
    StorageRefusedError,
)
from worker.logs import redact

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Names starting with this are half-written local objects; they are never listed.
_TEMP_PREFIX = ".hyacinth-upload-"

#: The file Supabase's dashboard writes to keep an empty folder; it is not an object.
_FOLDER_PLACEHOLDER = ".emptyFolderPlaceholder"

_PERCENT_ESCAPE = re.compile("%[0-9A-Fa-f]{2}")

#: Entries asked for per list request; Supabase pages its answers.
_LIST_PAGE_SIZE = 100

#: The longest wait between two tries of one storage request.
_MAX_BACKOFF_MS = 5_000


class Storage(Protocol):
    """Buckets of objects addressed by relative paths like `presence/1.0.0/x.pt`."""

    backend: str

    def download(self, bucket: str, path: str) -> bytes:
        """The object's bytes; MissingObjectError when there is none."""
        ...

    def upload(
        self,
        bucket: str,
        path: str,
        data: bytes,
        *,
        content_type: str,
        upsert: bool = False,
    ) -> None:
        """Store `data`; without `upsert` an existing object is ObjectExistsError."""
        ...

    def list(self, bucket: str, prefix: str = "") -> builtins.list[str]:
        """Names of the files and folders directly under `prefix`, sorted."""
        ...

    def exists(self, bucket: str, path: str) -> bool:
        """Whether an object is stored at `path`."""
        ...


def open_storage(settings: Settings) -> Storage:
    """Supabase Storage when SUPABASE_URL is set, else the LOCAL_STORAGE_DIR folder."""
    if settings.supabase_url:
        return SupabaseStorage.from_settings(settings)
    return LocalStorage(Path(settings.local_storage_dir))


def check_bucket(bucket: str) -> str:
    """`bucket` if it is a plain bucket name, else StoragePathError."""
    if (
        not bucket
        or bucket in (".", "..")
        or "/" in bucket
        or "\\" in bucket
        or "\x00" in bucket
    ):
        raise StoragePathError(
            f"bucket name {bucket!r} is not allowed: give a plain name like 'models' "
            "(no slashes, not '.' or '..')"
        )
    return bucket


def object_parts(bucket: str, path: str) -> tuple[str, ...]:
    """The segments of an object path, refusing any path that would leave `bucket`."""
    problem = _path_problem(path)
    if problem is None and not path:
        problem = "it is empty"
    if problem is not None:
        raise StoragePathError(
            f"object path {path!r} in bucket {bucket!r} is not allowed: {problem}; "
            "give a relative path like 'presence/1.0.0/model_meta.json'"
        )
    return tuple(path.split("/"))


def prefix_parts(bucket: str, prefix: str) -> tuple[str, ...]:
    """The folder segments of a list prefix; '' and 'a/' are allowed."""
    folder = prefix.rstrip("/")
    if not folder:
        if prefix:
            raise StoragePathError(
                f"list prefix {prefix!r} in bucket {bucket!r} is not allowed: it is "
                "absolute; give '' for the top or a folder like 'presence'"
            )
        return ()
    problem = _path_problem(folder)
    if problem is not None:
        raise StoragePathError(
            f"list prefix {prefix!r} in bucket {bucket!r} is not allowed: {problem}; "
            "give '' for the top or a folder like 'presence/1.0.0'"
        )
    return tuple(folder.split("/"))


def _path_problem(path: str) -> str | None:
    if "\x00" in path:
        return "it contains a NUL character"
    if path.startswith("/"):
        return "it is absolute"
    if "\\" in path:
        return "it contains a backslash"
    if _PERCENT_ESCAPE.search(path):
        # storage3 percent-decodes paths, so Supabase would store another name.
        return "it contains a percent-escape like '%2F'"
    segments = path.split("/")
    if ".." in segments or "." in segments:
        return "it contains '.' or '..' segments"
    if path and "" in segments:
        return "it contains an empty segment ('//' or a trailing '/')"
    return None


class LocalStorage:
    """A folder holding one subfolder per bucket; writes are atomic.

    Content types are not kept: a local object is only its bytes.
    """

    backend = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def download(self, bucket: str, path: str) -> bytes:
        """The object's bytes; MissingObjectError when the file is not there."""
        target = self._object_file(bucket, path)

        try:
            return target.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise MissingObjectError(
                f"no object {path!r} in bucket {bucket!r}: {target} does not exist "
                "(check LOCAL_STORAGE_DIR and the path)"
            ) from None
        except OSError as exc:
            raise StorageError(
                f"cannot read {target}: {exc.strerror or exc}; check the disk and "
                "the folder's permissions"
            ) from None

    def upload(
        self,
        bucket: str,
        path: str,
        data: bytes,
        *,
        content_type: str,
        upsert: bool = False,
    ) -> None:
        """Write `data` through a temporary file so readers never see half of it."""
        target = self._object_file(bucket, path)
        folder = self._make_folder(bucket, path, target.parent)
        if target.is_dir():
            raise StoragePathError(
                f"object path {path!r} in bucket {bucket!r} names a folder: "
                "choose another name"
            )

        handle, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=folder)
        temp = Path(temp_name)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            temp.chmod(0o644)

            if upsert:
                os.replace(temp, target)
            else:
                self._link_new(temp, target, bucket, path)
        except OSError as exc:
            raise StorageError(
                f"cannot write {target}: {exc.strerror or exc}; check free space "
                "and the folder's permissions"
            ) from None
        finally:
            temp.unlink(missing_ok=True)

        _fsync_folder(folder)
        logger.debug(
            "storage.uploaded backend=local bucket=%s path=%s size_bytes=%d",
            bucket,
            path,
            len(data),
        )

    def list(self, bucket: str, prefix: str = "") -> builtins.list[str]:
        """Names directly under `prefix`, files and folders, without temporaries."""
        folder = self._bucket_dir(bucket).joinpath(*prefix_parts(bucket, prefix))

        try:
            with os.scandir(folder) as entries:
                names = [entry.name for entry in entries]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StorageError(
                f"cannot list {folder}: {exc.strerror or exc}; check the folder's "
                "permissions"
            ) from None

        return sorted(
            name
            for name in names
            if not name.startswith(_TEMP_PREFIX) and name != _FOLDER_PLACEHOLDER
        )

    def exists(self, bucket: str, path: str) -> bool:
        """Whether a file is stored at `path`."""
        return self._object_file(bucket, path).is_file()

    def _bucket_dir(self, bucket: str) -> Path:
        return self.root / check_bucket(bucket)

    def _object_file(self, bucket: str, path: str) -> Path:
        parts = object_parts(bucket, path)
        bucket_dir = self._bucket_dir(bucket)
        target = bucket_dir.joinpath(*parts)

        # A symlink inside the bucket could still point elsewhere; refuse that too.
        if not target.resolve().is_relative_to(bucket_dir.resolve()):
            raise StoragePathError(
                f"object path {path!r} in bucket {bucket!r} resolves outside "
                f"{bucket_dir} through a symbolic link: remove the link"
            )
        return target

    def _make_folder(self, bucket: str, path: str, folder: Path) -> Path:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoragePathError(
                f"object path {path!r} in bucket {bucket!r} goes through a file "
                "where a folder is needed: choose another name"
            ) from None
        except OSError as exc:
            raise StorageError(
                f"cannot create {folder}: {exc.strerror or exc}; check "
                "LOCAL_STORAGE_DIR and its permissions"
            ) from None
        return folder

    def _link_new(self, temp: Path, target: Path, bucket: str, path: str) -> None:
        # A hard link fails when the name is taken, so two writers cannot both win.
        try:
            os.link(temp, target)
        except FileExistsError:
            raise ObjectExistsError(
                f"object {path!r} already exists in bucket {bucket!r}: pass "
                "upsert (or --force) to overwrite it"
            ) from None


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


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
