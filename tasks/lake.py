"""The lake: one storage abstraction over fsspec URLs (file:// by default, abfs:// for Azure).

Minimal core (write/read Parquet with SHA-256 and row counts). Owner: the lake module; other stages
call only the methods below and never build fsspec filesystems themselves.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any
from urllib.parse import urlsplit

import fsspec
import polars as pl

from tasks.models import FileRef


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LakeFS:
    """A lake root URL plus the storage options to reach it. Paths are relative to the root."""

    def __init__(self, base_url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.scheme = urlsplit(self.base_url).scheme or "file"
        self._fs: fsspec.AbstractFileSystem | None = None

    def __repr__(self) -> str:  # never show storage options (they hold secrets)
        return f"LakeFS({self.base_url!r})"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs = fsspec.filesystem(self.scheme, **self.storage_options)
        return self._fs

    def url(self, *parts: str) -> str:
        """Full URL of a path under the root (no credentials: those live in storage_options)."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.base_url}/{rel}" if rel else self.base_url

    def _path(self, rel_or_url: str) -> str:
        url = rel_or_url if "://" in rel_or_url else self.url(rel_or_url)
        return self.fs._strip_protocol(url)

    def write_bytes(self, rel_or_url: str, data: bytes, *, rows: int = 0) -> FileRef:
        path = self._path(rel_or_url)
        parent = path.rsplit("/", 1)[0]
        if self.scheme == "file":
            self.fs.makedirs(parent, exist_ok=True)
        with self.fs.open(path, "wb") as fh:
            fh.write(data)
        url = rel_or_url if "://" in rel_or_url else self.url(rel_or_url)
        return FileRef(url=url, rows=rows, sha256=sha256_bytes(data), bytes=len(data))

    def read_bytes(self, rel_or_url: str) -> bytes:
        with self.fs.open(self._path(rel_or_url), "rb") as fh:
            return fh.read()

    def exists(self, rel_or_url: str) -> bool:
        return self.fs.exists(self._path(rel_or_url))

    def write_parquet(self, frame: pl.DataFrame, rel_or_url: str) -> FileRef:
        buf = io.BytesIO()
        frame.write_parquet(buf, compression="zstd")
        return self.write_bytes(rel_or_url, buf.getvalue(), rows=frame.height)

    def read_parquet(self, rel_or_url: str, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.read_parquet(io.BytesIO(self.read_bytes(rel_or_url)), columns=columns)
