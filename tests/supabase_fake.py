"""A small Supabase Storage server for tests, run in a thread.

It follows the Storage REST contract of Supabase's storage API as the official
`storage3` 2.34 sync client calls it (read from storage3/_sync/file_api.py):

- `GET /storage/v1/object/{bucket}/{path}` (also `object/authenticated/...`):
  the object's bytes.
- `HEAD` on the same path: 200 or 400 without a body.
- `GET /storage/v1/object/info/{bucket}/{path}`: the object's description.
- `POST /storage/v1/object/{bucket}/{path}`: create from the multipart `file`
  part; an existing object is refused unless the request has `x-upsert: true`.
- `PUT /storage/v1/object/{bucket}/{path}`: replace an existing object.
- `POST /storage/v1/object/list/{bucket}`: JSON body with `prefix`, `limit`,
  `offset`, `sortBy`, `search`; answers the files and folders directly under
  the prefix folder, shaped like Supabase's (folders have `id` null).
- `DELETE /storage/v1/object/{bucket}`: JSON body `{"prefixes": [paths]}`.

Errors are HTTP 400 with a JSON body such as
`{"statusCode": "404", "error": "not_found", "message": "Object not found"}`, as
Supabase sends them. Every request must carry `apikey: KEY` and
`Authorization: Bearer KEY`: a missing header gets 401, a wrong one 403.

A request to a bucket that does not exist gets Supabase's answer for it,
`{"statusCode": "404", "error": "Bucket not found", ...}`. One deviation: unless the
server is given its `buckets`, any bucket exists and comes into being with its first
upload, where Supabase needs it created beforehand. Objects are plain files under
`root/{bucket}/{path}` so that tests can look at them; content types are kept in
memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_API_PREFIX = ("storage", "v1", "object")
_TEMP_PREFIX = ".fake-upload-"


@dataclass(frozen=True)
class SeenRequest:
    """One request the server received: method and decoded path."""

    method: str
    path: str


@dataclass
class _Fault:
    remaining: int
    status: int | None
    body: bytes
    stall_s: float
    match: str | None
    after: bool = False


@dataclass
class _State:
    faults: list[_Fault] = field(default_factory=list)
    requests: list[SeenRequest] = field(default_factory=list)
    content_types: dict[tuple[str, str], str] = field(default_factory=dict)


class _StorageError(Exception):
    def __init__(
        self, status_code: str, error: str, message: str, http_status: int = 400
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.body = {"statusCode": status_code, "error": error, "message": message}


class FakeSupabaseStorage:
    """The server: start it, point the supabase client at `.url` with `.key`."""

    def __init__(
        self, root: Path, key: str, *, buckets: set[str] | None = None
    ) -> None:
        self.root = root
        self.key = key
        self.buckets = buckets
        self._state = _State()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-supabase", daemon=True
        )

    @property
    def url(self) -> str:
        """The base URL to give as SUPABASE_URL."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def env(self) -> dict[str, str]:
        """SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY for a subprocess."""
        return {"SUPABASE_URL": self.url, "SUPABASE_SERVICE_ROLE_KEY": self.key}

    def start(self) -> FakeSupabaseStorage:
        """Serve in a background thread."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def fail_next(
        self,
        count: int,
        status: int = 503,
        *,
        body: bytes | None = None,
        match: str | None = None,
    ) -> None:
        """Answer the next `count` requests (whose path holds `match`) with `status`."""
        if body is None:
            body = json.dumps(
                {
                    "statusCode": str(status),
                    "error": "ServiceUnavailable",
                    "message": "injected failure",
                }
            ).encode()
        self._add_fault(_Fault(count, status, body, 0.0, match))

    def drop_next(self, count: int, *, match: str | None = None) -> None:
        """Close the connection without an answer on the next `count` requests."""
        self._add_fault(_Fault(count, None, b"", 0.0, match))

    def stall_next(
        self,
        count: int,
        stall_s: float,
        *,
        match: str | None = None,
        after: bool = False,
    ) -> None:
        """Wait `stall_s` on the next `count` requests, before or `after` doing them."""
        self._add_fault(_Fault(count, 0, b"", stall_s, match, after))

    def requests(
        self, method: str | None = None, contains: str | None = None
    ) -> list[SeenRequest]:
        """The requests received so far, optionally only one method or path part."""
        with self._lock:
            seen = list(self._state.requests)
        return [
            request
            for request in seen
            if (method is None or request.method == method)
            and (contains is None or contains in request.path)
        ]

    def reset(self) -> None:
        """Forget pending faults and the request log (objects stay)."""
        with self._lock:
            self._state.faults.clear()
            self._state.requests.clear()

    def _add_fault(self, fault: _Fault) -> None:
        with self._lock:
            self._state.faults.append(fault)

    def _record(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            self._state.requests.append(SeenRequest(method, path))
            for fault in self._state.faults:
                if fault.match is None or fault.match in path:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._state.faults.remove(fault)
                    return fault
        return None

    def _check_bucket(self, bucket: str) -> None:
        if self.buckets is not None and bucket not in self.buckets:
            raise _StorageError("404", "Bucket not found", "Bucket not found")

    def _object_file(self, bucket: str, key: str) -> Path:
        self._check_bucket(bucket)
        parts = key.split("/")
        if not bucket or not key or {".", "..", ""} & set(parts) or "\x00" in key:
            raise _StorageError("400", "InvalidKey", f"Invalid key: {key}")
        return self.root.joinpath(bucket, *parts)

    def _content_type(self, bucket: str, key: str) -> str:
        with self._lock:
            return self._state.content_types.get(
                (bucket, key), "application/octet-stream"
            )

    def _store(
        self, bucket: str, key: str, data: bytes, content_type: str, *, create: bool
    ) -> None:
        target = self._object_file(bucket, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=target.parent)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)

        try:
            if create:
                try:
                    os.link(temp, target)
                except FileExistsError:
                    raise _StorageError(
                        "409", "Duplicate", "The resource already exists"
                    ) from None
            else:
                os.replace(temp, target)
        finally:
            Path(temp).unlink(missing_ok=True)

        with self._lock:
            self._state.content_types[(bucket, key)] = content_type

    def _describe(self, bucket: str, key: str, name: str) -> dict[str, Any]:
        target = self._object_file(bucket, key)
        stat = target.stat()
        data = target.read_bytes()
        stamp = datetime.fromtimestamp(stat.st_mtime, UTC).isoformat()
        return {
            "name": name,
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{bucket}/{key}")),
            "updated_at": stamp,
            "created_at": stamp,
            "last_accessed_at": stamp,
            "metadata": {
                "eTag": f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"',
                "size": stat.st_size,
                "mimetype": self._content_type(bucket, key),
                "cacheControl": "max-age=3600",
                "lastModified": stamp,
                "contentLength": stat.st_size,
                "httpStatusCode": 200,
            },
        }

    def _list(self, bucket: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        self._check_bucket(bucket)
        prefix = str(body.get("prefix") or "").strip("/")
        limit = int(body.get("limit") or 100)
        offset = int(body.get("offset") or 0)
        search = str(body.get("search") or "").lower()
        sort_by = body.get("sortBy") or {}
        descending = str(sort_by.get("order", "asc")).lower() == "desc"

        folder = self.root.joinpath(bucket, *(prefix.split("/") if prefix else []))
        if not folder.is_dir():
            return []
        names = sorted(
            (
                entry.name
                for entry in folder.iterdir()
                if not entry.name.startswith(_TEMP_PREFIX)
                and search in entry.name.lower()
            ),
            reverse=descending,
        )

        entries = []
        for name in names[offset : offset + limit]:
            key = f"{prefix}/{name}" if prefix else name
            if (folder / name).is_dir():
                entries.append(
                    {
                        "name": name,
                        "id": None,
                        "updated_at": None,
                        "created_at": None,
                        "last_accessed_at": None,
                        "metadata": None,
                    }
                )
            else:
                entries.append(self._describe(bucket, key, name))
        return entries


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this, Nagle's algorithm
        # and delayed acknowledgements add 40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def fake(self) -> FakeSupabaseStorage:
        return self.server.fake  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `requests()` instead."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        segments = [unquote(part) for part in urlsplit(self.path).path.split("/")[1:]]
        body = self._read_body()
        fault = self.fake._record(method, "/".join(segments))

        self._stall_before_answer_s = 0.0
        if fault is not None and fault.stall_s and fault.after:
            self._stall_before_answer_s = fault.stall_s
        elif fault is not None and fault.stall_s:
            time.sleep(fault.stall_s)
        elif fault is not None and fault.status is None:
            self.close_connection = True
            self.connection.close()
            return
        elif fault is not None and fault.status is not None:
            self._send(fault.status, fault.body, "application/json")
            return

        try:
            self._check_key()
            if tuple(segments[:3]) != _API_PREFIX or len(segments) < 4:
                raise _StorageError("404", "not_found", "Route not found", 404)
            self._route(method, segments[3:], body)
        except _StorageError as error:
            payload = b"" if method == "HEAD" else json.dumps(error.body).encode()
            self._send(error.http_status, payload, "application/json")

    def _route(self, method: str, rest: list[str], body: bytes) -> None:
        fake = self.fake
        if method == "POST" and rest[0] == "list" and len(rest) == 2:
            self._send_json(fake._list(rest[1], json.loads(body or b"{}")))
        elif method in ("GET", "HEAD") and rest[0] == "info" and len(rest) > 2:
            bucket, key = rest[1], "/".join(rest[2:])
            self._send_json(self._info(bucket, key))
        elif method in ("GET", "HEAD"):
            if rest[0] in ("authenticated", "public"):
                rest = rest[1:]
            self._download(rest[0], "/".join(rest[1:]), head=method == "HEAD")
        elif method in ("POST", "PUT") and len(rest) > 1:
            self._upload(method, rest[0], "/".join(rest[1:]), body)
        elif method == "DELETE" and len(rest) == 1:
            self._send_json(self._delete(rest[0], json.loads(body or b"{}")))
        else:
            raise _StorageError("404", "not_found", "Route not found", 404)

    def _info(self, bucket: str, key: str) -> dict[str, Any]:
        if not self.fake._object_file(bucket, key).is_file():
            raise _StorageError("404", "not_found", "Object not found")
        entry = self.fake._describe(bucket, key, key)
        return {
            "id": entry["id"],
            "name": key,
            "bucket_id": bucket,
            "size": entry["metadata"]["size"],
            "content_type": entry["metadata"]["mimetype"],
            "cache_control": entry["metadata"]["cacheControl"],
            "etag": entry["metadata"]["eTag"],
            "last_modified": entry["updated_at"],
            "created_at": entry["created_at"],
            "metadata": {},
        }

    def _download(self, bucket: str, key: str, *, head: bool) -> None:
        target = self.fake._object_file(bucket, key)
        if not target.is_file():
            raise _StorageError("404", "not_found", "Object not found")
        data = target.read_bytes()
        content_type = self.fake._content_type(bucket, key)
        if head:
            self._send(200, b"", content_type, length=len(data))
        else:
            self._send(200, data, content_type)

    def _upload(self, method: str, bucket: str, key: str, body: bytes) -> None:
        data, content_type = self._file_part(body)
        target = self.fake._object_file(bucket, key)
        upsert = self.headers.get("x-upsert", "").lower() == "true"

        if method == "PUT" and not target.is_file():
            raise _StorageError("404", "not_found", "Object not found")
        self.fake._store(
            bucket, key, data, content_type, create=method == "POST" and not upsert
        )

        self._send_json({"Id": str(uuid.uuid4()), "Key": f"{bucket}/{key}"})

    def _delete(self, bucket: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        removed = []
        for key in body.get("prefixes", []):
            target = self.fake._object_file(bucket, str(key))
            if target.is_file():
                target.unlink()
                removed.append({"name": key, "bucket_id": bucket})
        return removed

    def _check_key(self) -> None:
        authorization = self.headers.get("authorization")
        api_key = self.headers.get("apikey")
        if authorization is None or api_key is None:
            raise _StorageError(
                "401", "Unauthorized", "headers must have authorization and apikey", 401
            )
        if authorization != f"Bearer {self.fake.key}" or api_key != self.fake.key:
            raise _StorageError("403", "Unauthorized", "invalid signature", 403)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _file_part(self, body: bytes) -> tuple[bytes, str]:
        content_type = self.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise _StorageError("400", "InvalidRequest", "expected multipart form data")
        boundary = content_type.split("boundary=", 1)[1].strip('"').encode()

        for chunk in body.split(b"--" + boundary):
            head, separator, content = chunk.partition(b"\r\n\r\n")
            if not separator:
                continue
            headers = head.decode("latin-1").lower()
            if 'name="file"' not in headers:
                continue
            part_type = "application/octet-stream"
            for line in headers.splitlines():
                if line.startswith("content-type:"):
                    part_type = line.split(":", 1)[1].strip()
            return content.removesuffix(b"\r\n"), part_type
        raise _StorageError("400", "InvalidRequest", "no file part in the form")

    def _send_json(self, payload: object) -> None:
        self._send(200, json.dumps(payload).encode(), "application/json")

    def _send(
        self, status: int, body: bytes, content_type: str, length: int | None = None
    ) -> None:
        # A stall after the work: the object is stored but the answer comes late.
        time.sleep(getattr(self, "_stall_before_answer_s", 0.0))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(body)
