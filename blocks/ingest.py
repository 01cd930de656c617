"""Ingestion sources (HTTP API, CSV, RSS/Atom) and the settings of the ingestion flow."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, field_validator

from blocks.lake import Lake
from blocks.source import SourceApi

DriftPolicy = Literal["accept", "fail"]
NORMALIZED_FIELDS = ("source_id", "name", "value", "description", "category", "created_at", "updated_at")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

DEFAULT_FIELD_MAP = {
    "source_id": "id",
    "name": "name",
    "value": "value",
    "description": "description",
    "category": "category",
    "created_at": "created_at",
    "updated_at": "updated_at",
}
RSS_FIELD_MAP = {
    "source_id": "guid|id|link",
    "name": "title",
    "description": "description|summary|content",
    "category": "category",
    "created_at": "pubDate|published|updated|date",
    "updated_at": "updated|pubDate|published",
}


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError("must be 1-63 chars of lowercase letters, digits, '-' or '_' (it keys checkpoints)")
    return value


def _check_field_map(value: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(value) - set(NORMALIZED_FIELDS))
    if unknown:
        raise ValueError(f"unknown normalized field(s) {unknown}; known: {', '.join(NORMALIZED_FIELDS)}")
    if not value.get("source_id"):
        raise ValueError("must map source_id to a record field")
    return value


def _check_location(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError("URL has no host")
        if parts.username or parts.password:
            raise ValueError("must not embed credentials; use the secret field")
        return value
    if parts.scheme in ("", "file") or (len(parts.scheme) == 1 and value[1:3] in (":\\", ":/")):
        return str(Path(parts.path if parts.scheme == "file" else value).expanduser())
    raise ValueError(f"scheme {parts.scheme!r} is not supported; use a local path or an http(s) URL")


class _IngestSourceBase(Block):
    model_config = ConfigDict(hide_input_in_errors=True)  # a bad URL may hold credentials: never echo inputs

    name: str = Field(description="Source name: keys its checkpoint, raw rows and normalized rows (e.g. 'orders').")
    field_map: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_FIELD_MAP),
        description="Normalized field -> record field (dotted path for nested JSON; 'a|b' tries a, then b). "
        "source_id is required; unmapped fields stay null (created_at falls back to the fetch time).",
    )
    drift_policy: DriftPolicy = Field(
        default="accept", description="On schema drift versus the previous run: accept (record + warn) or fail."
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        return _check_name(value)

    @field_validator("field_map")
    @classmethod
    def _map_ok(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_field_map(value)


class CsvIngestSource(_IngestSourceBase):
    """CSV file(s) read in streamed batches; a malformed line is rejected with its line number."""

    _block_type_name = "Ingest CSV Source"
    _block_type_slug = "ingest-csv-source"
    _description = "A CSV file (local path or http(s) URL) ingested into PostgreSQL in streamed batches."

    location: str = Field(description="Local path or http(s) URL of the CSV file.")
    encoding: str = Field(default="utf-8", description="Text encoding; a UTF-8 byte order mark is always accepted.")
    delimiter: str = Field(default=",", min_length=1, max_length=1, description="Field delimiter (one character).")
    batch_size: int = Field(default=1000, ge=1, le=1_000_000, description="Rows per committed batch.")
    secret: SecretStr | None = Field(default=None, description="Bearer token sent when location is a URL.")
    timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="HTTP timeout when location is a URL.")

    @field_validator("location")
    @classmethod
    def _loc_ok(cls, value: str) -> str:
        return _check_location(value)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError as exc:
            raise ValueError(f"unknown encoding {value!r}") from exc
        return value


class RssIngestSource(_IngestSourceBase):
    """An RSS 2.0 or Atom feed, parsed without DTDs, entities or external references."""

    _block_type_name = "Ingest RSS Source"
    _block_type_slug = "ingest-rss-source"
    _description = "An RSS 2.0 / Atom feed (local path or http(s) URL) ingested into PostgreSQL."

    location: str = Field(description="Local path or http(s) URL of the feed.")
    field_map: dict[str, str] = Field(
        default_factory=lambda: dict(RSS_FIELD_MAP),
        description="Normalized field -> item element ('a|b' tries a, then b). Defaults cover RSS 2.0 and Atom.",
    )
    batch_size: int = Field(default=1000, ge=1, le=1_000_000, description="Items per committed batch.")
    max_bytes: int = Field(default=50_000_000, ge=1024, description="Refuse feeds larger than this many bytes.")
    secret: SecretStr | None = Field(default=None, description="Bearer token sent when location is a URL.")
    timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="HTTP timeout when location is a URL.")

    @field_validator("location")
    @classmethod
    def _loc_ok(cls, value: str) -> str:
        return _check_location(value)


class ApiIngestSource(_IngestSourceBase):
    """A paginated JSON API read with the weekly flow's extractor, one window per run since the checkpoint."""

    _block_type_name = "Ingest API Source"
    _block_type_slug = "ingest-api-source"
    _description = "A paginated JSON HTTP API (the weekly flow's Source API block) ingested into PostgreSQL."

    api: SourceApi = Field(description="The Source API block: URL, pagination, auth, rate limit.")
    first_date: date | None = Field(
        default=None, description="Window start when no checkpoint exists (default: 7 days before today)."
    )


class IngestSettings(Block):
    """Where the API extractor stages raw pages, and the quality gate of the ingestion flow."""

    _block_type_name = "Ingest Settings"
    _block_type_slug = "ingest-settings"
    _description = "Staging lake for API pages and the reject-rate gate of the ingestion flow."
    model_config = ConfigDict(hide_input_in_errors=True)

    lake: Lake | None = Field(
        default=None, description="Lake where API pages are staged as raw Parquet (default: a local temp folder)."
    )
    reject_threshold_pct: float = Field(
        default=100.0, ge=0, le=100, description="Fail a source when rejected/read exceeds this percentage."
    )
    staging_prefix: str = Field(default="ingest/raw", description="Lake prefix for staged API pages.")
    search_indexes: bool = Field(
        default=False,
        description="Create pg_trgm GIN indexes on name and description (fast /data search; slower bulk loads).",
    )


__all__ = ["ApiIngestSource", "CsvIngestSource", "IngestSettings", "RssIngestSource"]
