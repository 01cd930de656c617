"""The lake: one storage abstraction over fsspec URLs (``file://`` by default, ``abfs://`` for Azure Blob / ADLS).

Other stages call only :class:`LakeFS` and the module functions below; they never build fsspec filesystems.
Week publishing (attempt folders committed by one atomic manifest) is built on it in :mod:`tasks.publish`.

Integrity
    Every write returns a :class:`~tasks.models.FileRef` (URL, rows, SHA-256, bytes) and is verified right after:
    on blob stores the size and the ``sha256`` blob metadata are re-read (we store ``sha256`` and ``rows`` as blob
    metadata on every write, because Content-MD5 only exists for single-shot uploads); on local disk the file is
    re-read and hashed. A mismatch raises :class:`~tasks.errors.IntegrityError`.
    :meth:`LakeFS.remote_sha256` answers from blob metadata (``None`` when a blob has none, e.g. it was overwritten
    behind the lake's back) and, for local files, *computes* the hash from the bytes: no sidecar files, so
    nothing can drift out of step with the data (local reads are cheap).

Atomic single files
    Local writes go to a hidden temp file in the same folder (``.tmp-*``, ignored by :meth:`LakeFS.list`), are
    fsynced and then ``os.replace``-d into place (``os.link`` for :meth:`LakeFS.put_if_absent`, which fails if the
    name exists). A blob write is one block-list commit, which Azure makes visible all at once; ``put_if_absent``
    sends ``If-None-Match: *``. Readers therefore never see half a file.

Errors (wrapped at this boundary; messages never carry connection strings, keys or SAS tokens):
connection refused / timeouts / 5xx / 408 / 429 -> :class:`~tasks.errors.LakeUnavailableError` (retryable);
missing container, refused credentials, other 4xx -> :class:`~tasks.errors.LakeConfigurationError` (fatal); a bad
container name or a path-like name (``..``) -> :class:`~tasks.errors.ConfigurationError` naming the field.
The Azure SDK's own retries are bounded (``retries``/``retry_backoff``, default 3 x ~1 s) instead of its default
~85 s per call, so that Prefect's task retries stay in charge of long outages.

Polars reads/writes go through in-memory buffers filled via fsspec; Polars' own ``storage_options`` (a different
object store client) is never used.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import IO, Any
from urllib.parse import urlsplit

import fsspec
import fsspec.asyn
import polars as pl
from pydantic import BaseModel

from tasks.errors import (
    ConfigurationError,
    IntegrityError,
    LakeConfigurationError,
    LakeUnavailableError,
    PipelineError,
    redact_url,
)
from tasks.models import FileRef

BLOB_SCHEMES = frozenset({"abfs", "abfss", "az"})
TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20

# Azure container names: 3-63 chars, lowercase letters, digits and single dashes, starting/ending alphanumeric.
_CONTAINER_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")
# One path segment given by a caller as a name (file name, attempt id, zone segment).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")
_WEEK_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_UNAVAILABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- validation --------------------------------------------------------------------------------------------------


def validate_container_name(name: str, field: str = "base_url") -> str:
    """Azure's container naming rule, checked here because adlfs ``mkdir`` swallows the service's error."""
    if not _CONTAINER_RE.match(name or ""):
        raise ConfigurationError(
            field,
            f"container name {name!r} is invalid: use 3-63 characters, lowercase letters, digits and single dashes, "
            "starting and ending with a letter or digit",
        )
    return name


def validate_name(value: str, field: str) -> str:
    """One path segment from a caller (file name, attempt id): no separators, no ``..``, no leading dot/underscore."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".." in value:
        raise ConfigurationError(
            field, f"{value!r} is not a safe name (letters, digits, '._=+-', no '/', no '..', no leading '.' or '_')"
        )
    return value


def validate_prefix(value: str, field: str = "zone_prefix") -> str:
    """A relative folder (``a/b/c``): every segment must be a safe name."""
    if not isinstance(value, str) or not value.strip("/"):
        raise ConfigurationError(field, "must be a non-empty relative path")
    for segment in value.strip("/").split("/"):
        validate_name(segment, field)
    return value.strip("/")


def validate_week_label(value: str | date, field: str = "week_label") -> str:
    """``YYYY-MM-DD`` (a real date); a ``date`` is accepted and formatted."""
    if isinstance(value, date):
        return value.isoformat()
    if not isinstance(value, str) or not _WEEK_RE.match(value):
        raise ConfigurationError(field, f"{value!r} is not a YYYY-MM-DD date")
    try:
        date.fromisoformat(value)
    except ValueError as exc:
        raise ConfigurationError(field, f"{value!r} is not a valid date") from exc
    return value


def _check_rel(rel: str) -> str:
    """A relative path inside the lake: refuse ``..``/``.`` segments, backslashes and control characters."""
    if not isinstance(rel, str):
        raise ConfigurationError("path", f"expected a string, got {type(rel).__name__}")
    if "\\" in rel or any(ord(c) < 32 for c in rel):
        raise ConfigurationError("path", f"{rel!r} contains a backslash or a control character")
    segments = [s for s in rel.split("/") if s]
    if any(s in ("..", ".") for s in segments):
        raise ConfigurationError("path", f"{rel!r} must not contain '.' or '..' segments")
    return "/".join(segments)


# --- error translation -------------------------------------------------------------------------------------------


def _translate(exc: BaseException, op: str, target: str) -> PipelineError | None:
    """Map an fsspec/adlfs/azure/OS exception (or one it was raised from) to the library's errors.

    Messages are built from the exception *type*, status and error code only, never from the SDK's text.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 12:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    az = None
    if any(type(e).__module__.startswith("azure.") for e in chain):
        # imported only for an Azure SDK error: a local lake's FileNotFoundError must not pay for loading the
        # SDK (~50 ms, the first time in a process)
        try:
            from azure.core import exceptions as az
        except ImportError:  # pragma: no cover - azure is a dependency, but keep the local lake usable without it
            az = None
    where = f"lake {op} {redact_url(target)}"
    for cur in chain:
        if isinstance(cur, PipelineError):
            return cur
        if az is not None:
            if isinstance(cur, az.ClientAuthenticationError):
                return LakeConfigurationError("azure_credentials", f"{where}: the blob store refused the credentials")
            if isinstance(cur, az.HttpResponseError) and cur.status_code is not None:
                status, code = cur.status_code, getattr(cur, "error_code", None) or ""
                if code == "ContainerNotFound":
                    return LakeConfigurationError("base_url", f"{where}: the container does not exist")
                if status in (401, 403):
                    return LakeConfigurationError(
                        "azure_credentials", f"{where}: access denied (HTTP {status} {code})".rstrip()
                    )
                if status in _UNAVAILABLE_STATUS or status >= 500:
                    return LakeUnavailableError(f"{where}: blob store unavailable (HTTP {status} {code})".rstrip())
                if status >= 400 and status != 404:
                    return LakeConfigurationError("base_url", f"{where}: rejected (HTTP {status} {code})".rstrip())
            if isinstance(cur, az.ServiceRequestError | az.ServiceResponseError):
                return LakeUnavailableError(f"{where}: blob store unreachable ({type(cur).__name__})")
        if isinstance(cur, TimeoutError | asyncio.TimeoutError | ConnectionError):
            return LakeUnavailableError(f"{where}: {type(cur).__name__}")
        if type(cur).__module__.startswith("aiohttp"):
            return LakeUnavailableError(f"{where}: blob store unreachable ({type(cur).__name__})")
        if isinstance(cur, PermissionError):
            return LakeConfigurationError("base_url", f"{where}: permission denied")
        if isinstance(cur, OSError) and not isinstance(
            cur, FileNotFoundError | FileExistsError | IsADirectoryError | NotADirectoryError
        ):
            return LakeUnavailableError(f"{where}: {type(cur).__name__} errno={cur.errno}")
        if isinstance(cur, ValueError) and str(cur).startswith("unable to connect to account"):
            return LakeConfigurationError("azure_credentials", f"{where}: cannot build a blob client from them")
    return None


# --- the lake ----------------------------------------------------------------------------------------------------


class LakeFS:
    """A lake root URL plus the storage options to reach it. Paths are relative to the root.

    ``retries``/``retry_backoff`` bound the Azure SDK's own retries per call (linear back-off in seconds);
    ``connect_timeout``/``read_timeout`` are per request. They do not apply to local lakes.
    """

    def __init__(
        self,
        base_url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retries: int = 3,
        retry_backoff: float = 1.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        parts = urlsplit(self.base_url)
        self.scheme = parts.scheme or "file"
        self.is_blob = self.scheme in BLOB_SCHEMES
        self.is_local = self.scheme == "file"
        if self.is_blob:
            validate_container_name(parts.netloc, "base_url")
            if "@" in parts.netloc:
                raise ConfigurationError("base_url", "must not embed credentials; use azure_credentials")
        _check_rel(parts.path)
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._fs: fsspec.AbstractFileSystem | None = None

    @classmethod
    def from_block(cls, block: Any, **kwargs: Any) -> LakeFS:
        """Build from a ``blocks.Lake`` (duck-typed: ``base_url`` and ``storage_options()``)."""
        return cls(block.base_url, block.storage_options(), **kwargs)

    def __repr__(self) -> str:  # never show storage options (they hold secrets)
        return f"LakeFS({self.base_url!r})"

    # -- plumbing ------------------------------------------------------------------------------------------------

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            with self._guard("connect", self.base_url):
                self._fs = self._make_fs()
        return self._fs

    def _make_fs(self) -> fsspec.AbstractFileSystem:
        if not self.is_blob:
            return fsspec.filesystem(self.scheme, **self.storage_options)
        options = {"use_listings_cache": False, **self.storage_options}
        # Own instance: we swap in a service client with bounded retries and must not leak that to other users.
        fs = fsspec.filesystem(self.scheme, skip_instance_cache=True, **options)
        from azure.storage.blob.aio import BlobServiceClient, LinearRetry

        old = fs.service_client
        fs.service_client = BlobServiceClient(
            old.url,
            credential=old.credential,
            retry_policy=LinearRetry(
                backoff=self.retry_backoff,
                retry_total=self.retries,
                random_jitter_range=min(self.retry_backoff / 2, 1.0),
            ),
            connection_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )
        return fs

    @property
    def container(self) -> str | None:
        return urlsplit(self.base_url).netloc if self.is_blob else None

    @property
    def _root(self) -> str:
        return self.fs._strip_protocol(self.base_url).rstrip("/")

    def url(self, *parts: str) -> str:
        """Full URL of a path under the root (no credentials: those live in storage_options)."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.base_url}/{rel}" if rel else self.base_url

    def _url(self, rel_or_url: str) -> str:
        if "://" in rel_or_url:
            _check_rel(urlsplit(rel_or_url).path)
            return rel_or_url
        return self.url(_check_rel(rel_or_url))

    def _path(self, rel_or_url: str) -> str:
        return self.fs._strip_protocol(self._url(rel_or_url))

    def rel(self, url_or_path: str) -> str:
        """The path of ``url_or_path`` relative to the root (raises ConfigurationError if it is outside)."""
        path = self.fs._strip_protocol(url_or_path) if "://" in url_or_path else url_or_path
        root = self._root
        if path == root or not path.startswith(root + "/"):
            raise ConfigurationError("path", f"{redact_url(url_or_path)} is not under the lake root")
        return path[len(root) + 1 :]

    @contextmanager
    def _guard(self, op: str, target: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, FileExistsError, PipelineError):
            raise
        except Exception as exc:
            mapped = _translate(exc, op, target)
            if mapped is None:
                raise
            if mapped is exc:
                raise
            raise mapped from exc

    def _not_found(self, url: str, exc: BaseException | None = None) -> Exception:
        """A FileNotFoundError for ``url``, or LakeConfigurationError when the whole container is missing."""
        mapped = _translate(exc, "read", url) if exc is not None else None
        if isinstance(mapped, LakeConfigurationError):
            return mapped
        if self.is_blob and not self.container_exists():
            return LakeConfigurationError("base_url", f"lake container {self.container!r} does not exist")
        return FileNotFoundError(2, "lake file not found", redact_url(url))

    def container_exists(self) -> bool:
        """Blob lakes: does the container exist? Local lakes: always True (folders are created on write)."""
        if not self.is_blob:
            return True
        from azure.core.exceptions import ResourceNotFoundError

        async def _props() -> bool:
            try:
                async with self.fs.service_client.get_container_client(self.container) as cc:
                    await cc.get_container_properties()
            except ResourceNotFoundError:
                return False
            return True

        with self._guard("check container", self.base_url):
            return fsspec.asyn.sync(self.fs.loop, _props)

    def create_container(self) -> None:
        """Create the blob container if missing (validated name; adlfs ``mkdir`` would swallow errors)."""
        if not self.is_blob:
            return
        from azure.core.exceptions import ResourceExistsError

        async def _create() -> None:
            try:
                await self.fs.service_client.create_container(self.container)
            except ResourceExistsError:
                pass

        with self._guard("create container", self.base_url):
            fsspec.asyn.sync(self.fs.loop, _create)

    # -- bytes -----------------------------------------------------------------------------------------------------

    def write_bytes(self, rel_or_url: str, data: bytes, *, rows: int = 0) -> FileRef:
        """Write ``data`` atomically, verify it, and return its FileRef."""
        return self._write(rel_or_url, data, rows=rows, exclusive=False)

    def _write(self, rel_or_url: str, data: bytes, *, rows: int, exclusive: bool) -> FileRef:
        return self._write_stream(rel_or_url, lambda: io.BytesIO(data), rows=rows, exclusive=exclusive)

    def write_file(self, rel_or_url: str, local_path: str | os.PathLike[str], *, rows: int = 0) -> FileRef:
        """:meth:`write_bytes` of a local file's content, streamed: memory does not grow with the file."""
        return self.write_stream(rel_or_url, lambda: open(local_path, "rb"), rows=rows)  # noqa: SIM115

    def write_stream(
        self,
        rel_or_url: str,
        open_source: Callable[[], IO[bytes]],
        *,
        rows: int = 0,
        sha256: str | None = None,
        size: int | None = None,
        source_name: str = "source",
    ) -> FileRef:
        """Write what ``open_source()`` reads, in chunks of 1 MiB, atomically, and verify it like :meth:`write_bytes`.

        With ``sha256``/``size`` (the source's FileRef) a source that does not match is an IntegrityError naming
        ``source_name``, and nothing is written: a local lake checks while it writes its temporary file; other
        stores (a blob's metadata carries the SHA-256, needed before the upload) read the source twice, once to
        hash and check it and once to upload it, and check that the upload read the same bytes.
        """
        return self._write_stream(
            rel_or_url, open_source, rows=rows, sha256=sha256, size=size, source_name=source_name, exclusive=False
        )

    def _write_stream(
        self,
        rel_or_url: str,
        open_source: Callable[[], IO[bytes]],
        *,
        rows: int,
        exclusive: bool,
        sha256: str | None = None,
        size: int | None = None,
        source_name: str = "source",
    ) -> FileRef:
        """:meth:`write_stream`; ``exclusive``: fail with FileExistsError when the target exists (atomic locally and
        on blobs, ``If-None-Match: *``; checked before the write on other fsspec stores)."""
        url = self._url(rel_or_url)
        path = self.fs._strip_protocol(url)

        def mismatch(digest: str, length: int) -> IntegrityError:
            return IntegrityError(
                f"{source_name} does not match its FileRef (bytes {length} vs {size}, sha256 {digest} vs {sha256})"
            )

        def read_hashed(fh: IO[bytes], h: Any, seen: list[int]) -> Iterator[bytes]:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
                seen[0] += len(chunk)
                yield chunk

        def hash_source() -> tuple[str, int]:
            h, seen = hashlib.sha256(), [0]
            with open_source() as fh:
                for _ in read_hashed(fh, h, seen):
                    pass
            return h.hexdigest(), seen[0]

        if not self.is_local:  # the blob metadata carries the SHA-256: known before the upload
            digest, length = hash_source()
            if sha256 is not None and (digest != sha256 or (size is not None and length != size)):
                raise mismatch(digest, length)
        h, seen = hashlib.sha256(), [0]
        with self._guard("write", url), open_source() as src:
            if self.is_local:

                def checked() -> Iterator[bytes]:
                    yield from read_hashed(src, h, seen)
                    if sha256 is not None and (h.hexdigest() != sha256 or (size is not None and seen[0] != size)):
                        raise mismatch(h.hexdigest(), seen[0])  # before the rename: nothing is written

                _local_write(path, checked(), exclusive=exclusive)
                digest, length = h.hexdigest(), seen[0]
            else:
                kwargs = {"metadata": {"sha256": digest, "rows": str(rows)}} if self.is_blob else {}
                if exclusive and not self.is_blob and self.fs.exists(path):  # generic fsspec: not atomic
                    raise FileExistsError(path)
                with self.fs.open(path, "xb" if exclusive and self.is_blob else "wb", **kwargs) as fh:
                    for chunk in read_hashed(src, h, seen):
                        fh.write(chunk)
                if (h.hexdigest(), seen[0]) != (digest, length):
                    raise IntegrityError(f"{source_name} changed while it was written to {redact_url(url)}")
        self._verify(url, path, digest, length)
        return FileRef(url=url, rows=rows, sha256=digest, bytes=length)

    def _verify(self, url: str, path: str, digest: str, size: int) -> None:
        remote_size, remote_sha = self._remote_state(path, url)
        if remote_size != size or remote_sha != digest:
            raise IntegrityError(
                f"lake file {redact_url(url)} does not match what was written "
                f"(bytes {remote_size} vs {size}, sha256 {remote_sha} vs {digest})"
            )

    def _remote_state(self, path: str, url: str, *, deep: bool = False) -> tuple[int, str | None]:
        """(size, sha256) of a stored file; sha256 from blob metadata (or computed when local/``deep``)."""
        with self._guard("stat", url):
            try:
                if self.is_blob and not deep:
                    info = self.fs.info(path, refresh=True)
                    if info.get("type") != "file":
                        raise FileNotFoundError(path)
                    return int(info["size"]), (info.get("metadata") or {}).get("sha256")
                h = hashlib.sha256()
                size = 0
                with self.fs.open(path, "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        h.update(chunk)
                        size += len(chunk)
                return size, h.hexdigest()
            except FileNotFoundError as exc:
                raise self._not_found(url, exc) from None

    def remote_sha256(self, rel_or_url: str, *, deep: bool = False) -> str | None:
        """Stored SHA-256: blob metadata (``None`` if absent), or computed from the bytes (local lakes, ``deep``)."""
        url = self._url(rel_or_url)
        return self._remote_state(self.fs._strip_protocol(url), url, deep=deep)[1]

    def file_ok(self, rel_or_url: str, sha256: str, size: int | None = None, *, deep: bool = False) -> bool:
        """True when the file exists with this hash (and size); False when missing or different."""
        url = self._url(rel_or_url)
        try:
            remote_size, remote_sha = self._remote_state(self.fs._strip_protocol(url), url, deep=deep)
        except FileNotFoundError:
            return False
        return remote_sha == sha256 and (size is None or remote_size == size)

    def read_bytes(self, rel_or_url: str) -> bytes:
        url = self._url(rel_or_url)
        with self._guard("read", url):
            try:
                with self.fs.open(self.fs._strip_protocol(url), "rb") as fh:
                    return fh.read()
            except FileNotFoundError as exc:
                raise self._not_found(url, exc) from None

    def open_read(self, rel_or_url: str) -> IO[bytes]:
        """The file opened for reading (a context manager; the caller closes it); missing -> FileNotFoundError."""
        url = self._url(rel_or_url)
        with self._guard("read", url):
            try:
                return self.fs.open(self.fs._strip_protocol(url), "rb")
            except FileNotFoundError as exc:
                raise self._not_found(url, exc) from None

    def exists(self, rel_or_url: str) -> bool:
        url = self._url(rel_or_url)
        with self._guard("exists", url):
            return self.fs.exists(self.fs._strip_protocol(url))

    def put_if_absent(self, rel: str, data: bytes | Any) -> bool:
        """Create ``rel`` only if it does not exist (O_EXCL-style locally, ``If-None-Match: *`` on blobs).

        ``data`` is bytes, or any JSON-able object. Returns True if this call created it, False if it existed.
        """
        payload = data if isinstance(data, bytes | bytearray) else _json_bytes(data)
        try:
            self._write(rel, bytes(payload), rows=0, exclusive=True)
        except FileExistsError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        """Relative paths of the files under ``prefix`` (recursive, sorted; temp files skipped)."""
        url = self._url(prefix) if prefix else self.base_url
        path = self.fs._strip_protocol(url)
        root = self._root
        with self._guard("list", url):
            try:
                found = self.fs.find(path)
            except FileNotFoundError:
                found = []
        if not found and self.is_blob and not self.container_exists():
            raise LakeConfigurationError("base_url", f"lake container {self.container!r} does not exist")
        out = []
        for p in found:
            if not p.startswith(root + "/"):
                continue
            rel = p[len(root) + 1 :]
            if any(seg.startswith(TMP_PREFIX) for seg in rel.split("/")):
                continue
            out.append(rel)
        return sorted(out)

    def delete(self, rel_or_url: str) -> bool:
        """Delete one file; True if it existed."""
        url = self._url(rel_or_url)
        path = self.fs._strip_protocol(url)
        with self._guard("delete", url):
            if not self.fs.exists(path):
                return False
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                return False
        return True

    # -- JSON ------------------------------------------------------------------------------------------------------

    def write_json_atomic(self, rel: str, obj: Any) -> FileRef:
        """Write a small JSON document in one atomic step (readers see the old or the new one)."""
        return self.write_bytes(rel, _json_bytes(obj))

    def read_json(self, rel: str, default: Any = None) -> Any:
        """Parsed JSON of ``rel``, or ``default`` when it does not exist (a missing container still raises)."""
        try:
            data = self.read_bytes(rel)
        except FileNotFoundError:
            return default
        try:
            return json.loads(data)
        except ValueError as exc:
            raise IntegrityError(f"lake file {redact_url(self._url(rel))} is not valid JSON") from exc

    # -- Parquet ---------------------------------------------------------------------------------------------------

    def write_parquet(
        self,
        frame: pl.DataFrame,
        rel_or_url: str,
        *,
        compression: str = "zstd",
        compression_level: int | None = None,
        statistics: bool = True,
    ) -> FileRef:
        """Write ``frame`` as Parquet (zstd at Polars' default level unless told otherwise; ``lz4`` for short-lived
        intermediate files) and return its verified FileRef. ``statistics=False`` leaves out the column min/max
        (intermediate files read whole: the min/max of long text columns costs ~30% of an lz4 write)."""
        buf = io.BytesIO()
        frame.write_parquet(buf, compression=compression, compression_level=compression_level, statistics=statistics)
        return self.write_bytes(rel_or_url, buf.getvalue(), rows=frame.height)

    def read_parquet(self, rel_or_url: str, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.read_parquet(io.BytesIO(self.read_bytes(rel_or_url)), columns=columns)


def _local_write(path: str, chunks: Iterable[bytes], *, exclusive: bool) -> None:
    """Write ``chunks`` to a temporary file beside ``path``, fsync it, then rename it into place (atomic). An
    exception raised while ``chunks`` is consumed leaves ``path`` untouched."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        if exclusive:
            os.link(tmp, path)  # atomic, fails with FileExistsError if the name is taken
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:  # make the rename durable; best effort (not every platform can fsync a folder)
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_bytes(obj: Any) -> bytes:
    if isinstance(obj, BaseModel):
        return obj.model_dump_json(indent=2).encode()
    return json.dumps(obj, default=_json_default, sort_keys=True, indent=2).encode()
