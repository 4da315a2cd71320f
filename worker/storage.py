"""Object storage behind one small interface: Supabase Storage or a local folder."""

from __future__ import annotations

import builtins
import logging
import os
import re
from pathlib import Path
from typing import Protocol

from worker.config import Settings
from worker.errors import (
    MissingObjectError,
    ObjectExistsError,
    StorageError,
    StoragePathError,
)
from worker.files import write_synced_temp

logger = logging.getLogger(__name__)

#: Names starting with this are half-written local objects; they are never listed.
_TEMP_PREFIX = ".hyacinth-upload-"

#: The file Supabase's dashboard writes to keep an empty folder; it is not an object.
_FOLDER_PLACEHOLDER = ".emptyFolderPlaceholder"

_PERCENT_ESCAPE = re.compile("%[0-9A-Fa-f]{2}")


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

    def fingerprint(self, bucket: str, path: str) -> str:
        """A string that changes whenever the object at `path` is written again.

        Asked without downloading; MissingObjectError when there is no object.
        """
        ...


def open_storage(settings: Settings) -> Storage:
    """Supabase Storage when SUPABASE_URL is set, else the LOCAL_STORAGE_DIR folder."""
    if settings.supabase_url:
        # Imported here: the Supabase client is only loaded when it is used,
        # and worker.supabase_storage imports this module's path checks.
        from worker.supabase_storage import SupabaseStorage

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

        try:
            temp = write_synced_temp(folder, data, prefix=_TEMP_PREFIX)
            try:
                if upsert:
                    os.replace(temp, target)
                else:
                    self._link_new(temp, target, bucket, path)
            finally:
                temp.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot write {target}: {exc.strerror or exc}; check free space "
                "and the folder's permissions"
            ) from None

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

    def fingerprint(self, bucket: str, path: str) -> str:
        """The file's identity: every upload renames a new file into place."""
        target = self._object_file(bucket, path)
        if not target.is_file():
            raise MissingObjectError(
                f"no object {path!r} in bucket {bucket!r}: {target} does not exist "
                "(check LOCAL_STORAGE_DIR and the path)"
            )
        try:
            stat = target.stat()
        except OSError as exc:
            raise StorageError(
                f"cannot read {target}: {exc.strerror or exc}; check the disk and "
                "the folder's permissions"
            ) from None
        return f"local:{target}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"

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
