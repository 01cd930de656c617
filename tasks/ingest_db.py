"""PostgreSQL side of the ingestion flow: tables, normalization contract, COPY-based upsert, checkpoints, runs, drift.

Tables (created idempotently by :func:`ensure_schema`):

* ``raw_api_data`` / ``raw_csv_data`` / ``raw_rss_data``: each record exactly as received (JSONB ``payload``) with
  ``source``, ``source_id``, ``content_hash`` (SHA-256 of the payload text), ``fetched_at`` and ``run_id``;
  unique on ``(source, content_hash)``, so re-ingesting the same record is a no-op.
* ``normalized_data``: one row per ``(source, source_id)`` (UPSERT), indexed on ``source_id``, ``created_at``,
  ``category``, ``(created_at, id)`` and ``(source, created_at, id)`` (the API's keyset order).
* ``etl_checkpoint`` (one row per source, advanced in the batch's own transaction), ``etl_runs``, ``etl_rejects``,
  ``etl_source_schema`` (observed fields per source and run), ``etl_schema_drift``, ``etl_meta`` (a data version
  bumped by every committed change to ``normalized_data``; the API keys its page-anchor cache on it).

Run liveness: a 'running' ``etl_runs`` row is alive while its process holds the session advisory lock of its
:class:`RunLease` (see :func:`start_run`); the next start marks rows whose lock is free as abandoned (failed).

Bulk path: Polars frame -> CSV bytes -> ``COPY`` into a temp table (psycopg ``cursor.copy`` on the SQLAlchemy
connection's DBAPI connection) -> ``INSERT ... SELECT ... ON CONFLICT``. No row-by-row inserts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Connection, Engine, text
from sqlalchemy import exc as sa_exc

from tasks.errors import DatabaseUnavailableError, TrackingError
from tasks.sql import is_unavailable, unavailable

SourceKind = Literal["api", "csv", "rss"]
RAW_TABLES: dict[str, str] = {"api": "raw_api_data", "csv": "raw_csv_data", "rss": "raw_rss_data"}
COPY_CHUNK_ROWS = 100_000

Log = logging.Logger | logging.LoggerAdapter


# --- the contract -----------------------------------------------------------------------------------------------


class NormalizedRecord(BaseModel):
    """One row of ``normalized_data``. The vectorized checks in :func:`normalize` enforce exactly these rules."""

    model_config = ConfigDict(frozen=True)

    source: str = Field(min_length=1, max_length=63, description="Source name (the source block's name).")
    source_id: str = Field(min_length=1, max_length=512, description="The record's id within its source.")
    name: str | None = Field(default=None, max_length=1_000, description="Display name / title.")
    value: float | None = Field(default=None, description="Numeric value (finite).")
    description: str | None = Field(default=None, max_length=100_000, description="Free text.")
    category: str | None = Field(default=None, max_length=200, description="Category / tag.")
    created_at: datetime = Field(description="Creation time (UTC); the fetch time when the source has none.")
    updated_at: datetime = Field(description="Last modification time (UTC); created_at when the source has none.")

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @field_validator("created_at", "updated_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("must carry a timezone")
        return value


def _max_len(name: str) -> int | None:
    for meta in NormalizedRecord.model_fields[name].metadata:
        if hasattr(meta, "max_length"):
            return meta.max_length
    return None


NORMALIZED_COLUMNS = ("source", "source_id", "name", "value", "description", "category", "created_at", "updated_at")
NORMALIZED_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.String(),
    "source_id": pl.String(),
    "name": pl.String(),
    "value": pl.Float64(),
    "description": pl.String(),
    "category": pl.String(),
    "created_at": pl.Datetime("us", "UTC"),
    "updated_at": pl.Datetime("us", "UTC"),
    "content_hash": pl.String(),
}
REJECT_SCHEMA: dict[str, pl.DataType] = {
    "ref": pl.Int64(),
    "field": pl.String(),
    "reason": pl.String(),
    "payload": pl.String(),
}

_TZ_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%z",
    "%Y-%m-%d %H:%M:%S%.f%z",
    "%Y-%m-%dT%H:%M%z",
    "%a, %d %b %Y %H:%M:%S%z",
    "%a, %d %b %Y %H:%M:%S %z",
    "%d %b %Y %H:%M:%S%z",
    "%d %b %Y %H:%M:%S %z",
    "%a, %d %b %Y %H:%M%z",
    "%a, %d %b %Y %H:%M %z",
)
_NAIVE_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M")


def parse_datetime_expr(expr: pl.Expr) -> pl.Expr:
    """Vectorized, non-raising datetime parse to UTC: ISO 8601 (offset, ``Z`` or naive = UTC), dates, RFC 822.

    Anything else (or an impossible date) becomes null; callers turn "non-null in, null out" into a reject.
    """
    s = expr.str.strip_chars().str.replace(r"(?i)\s*(GMT|UTC|UT|Z)$", "+0000")
    parts = [s.str.strptime(pl.Datetime("us", "UTC"), f, strict=False, exact=True) for f in _TZ_FORMATS]
    parts += [
        s.str.strptime(pl.Datetime("us"), f, strict=False, exact=True).dt.replace_time_zone("UTC")
        for f in _NAIVE_FORMATS
    ]
    parts.append(s.str.strptime(pl.Date(), "%Y-%m-%d", strict=False, exact=True).cast(pl.Datetime("us", "UTC")))
    return pl.coalesce(parts)


def _json_key_path(key: str) -> str:
    parts = key.split(".")
    if all(p.isidentifier() for p in parts):
        return "$." + key
    return "$" + "".join("['" + p.replace("'", "\\'") + "']" for p in parts)


def _mapped(payload: pl.Expr, spec: str | None) -> pl.Expr:
    if not spec:
        return pl.lit(None, dtype=pl.String())
    options = [payload.str.json_path_match(_json_key_path(k.strip())) for k in spec.split("|") if k.strip()]
    cleaned = [pl.when(o.str.strip_chars() == "").then(None).otherwise(o.str.strip_chars()) for o in options]
    return pl.coalesce(cleaned) if len(cleaned) > 1 else cleaned[0]


def content_hash(payload: str) -> str:
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


def raw_frame(payloads: list[str], refs: list[int] | None = None) -> pl.DataFrame:
    """The raw batch: ``ref`` (line number / item index / sequence), ``payload`` (JSON text), ``content_hash``."""
    return pl.DataFrame(
        {
            "ref": refs if refs is not None else list(range(1, len(payloads) + 1)),
            "payload": payloads,
            "content_hash": [content_hash(p) for p in payloads],
        },
        schema={"ref": pl.Int64(), "payload": pl.String(), "content_hash": pl.String()},
    )


def normalize(
    raw: pl.DataFrame, *, source: str, field_map: dict[str, str], fetched_at: datetime
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Raw batch (``ref``, ``payload``, ``content_hash``) -> (valid rows, rejects) in the module schemas.

    Vectorized: JSON path extraction, non-strict casts and one ``when`` chain naming the first failing field.
    Never raises on bad values: each bad row becomes a reject with ``field`` and ``reason``.
    """
    fetched = pl.lit(fetched_at.astimezone(UTC)).cast(pl.Datetime("us", "UTC"))
    p = pl.col("payload")
    frame = raw.with_columns(
        _sid=_mapped(p, field_map.get("source_id")),
        _name=_mapped(p, field_map.get("name")),
        _value=_mapped(p, field_map.get("value")),
        _desc=_mapped(p, field_map.get("description")),
        _cat=_mapped(p, field_map.get("category")),
        _cre=_mapped(p, field_map.get("created_at")),
        _upd=_mapped(p, field_map.get("updated_at")),
    ).with_columns(
        value=pl.col("_value").cast(pl.Float64, strict=False),
        created_at=parse_datetime_expr(pl.col("_cre")),
        updated_at=parse_datetime_expr(pl.col("_upd")),
    )
    limits = {name: _max_len(name) for name in ("source_id", "name", "description", "category")}
    checks: list[tuple[pl.Expr, str, pl.Expr]] = [
        (p.str.contains("\x00", literal=True) | p.str.contains("\\u0000", literal=True), "payload",
         pl.lit("contains a NUL character (PostgreSQL cannot store it)")),
        (pl.col("_sid").is_null(), "source_id", pl.lit(f"missing ({field_map.get('source_id')!r} is empty)")),
        (pl.col("_sid").str.len_chars() > limits["source_id"], "source_id",
         pl.lit(f"longer than {limits['source_id']} characters")),
        (pl.col("_value").is_not_null() & pl.col("value").is_null(), "value",
         pl.format("not a number: {}", pl.col("_value").str.slice(0, 80))),
        (pl.col("value").is_nan() | pl.col("value").is_infinite(), "value",
         pl.format("not a finite number: {}", pl.col("_value").str.slice(0, 80))),
        (pl.col("_cre").is_not_null() & pl.col("created_at").is_null(), "created_at",
         pl.format("not a datetime: {}", pl.col("_cre").str.slice(0, 80))),
        (pl.col("_upd").is_not_null() & pl.col("updated_at").is_null(), "updated_at",
         pl.format("not a datetime: {}", pl.col("_upd").str.slice(0, 80))),
        (pl.col("_name").str.len_chars() > limits["name"], "name", pl.lit(f"longer than {limits['name']} characters")),
        (pl.col("_desc").str.len_chars() > limits["description"], "description",
         pl.lit(f"longer than {limits['description']} characters")),
        (pl.col("_cat").str.len_chars() > limits["category"], "category",
         pl.lit(f"longer than {limits['category']} characters")),
    ]  # fmt: skip
    field_expr: Any = pl
    reason_expr: Any = pl
    for cond, name, reason in checks:
        cond = cond.fill_null(False)
        field_expr = field_expr.when(cond).then(pl.lit(name))
        reason_expr = reason_expr.when(cond).then(reason)
    frame = frame.with_columns(_field=field_expr.otherwise(None), _reason=reason_expr.otherwise(None))
    rejects = frame.filter(pl.col("_field").is_not_null()).select(
        pl.col("ref").cast(pl.Int64), field=pl.col("_field"), reason=pl.col("_reason"), payload=p
    )
    created = pl.col("created_at").fill_null(fetched)
    valid = frame.filter(pl.col("_field").is_null()).select(
        source=pl.lit(source, dtype=pl.String()),
        source_id=pl.col("_sid"),
        name=pl.col("_name"),
        value=pl.col("value"),
        description=pl.col("_desc"),
        category=pl.col("_cat"),
        created_at=created,
        updated_at=pl.col("updated_at").fill_null(created),
        content_hash=pl.col("content_hash"),
    )
    return valid.cast(NORMALIZED_SCHEMA), rejects.cast(REJECT_SCHEMA)


# --- DDL --------------------------------------------------------------------------------------------------------

_RAW_DDL = """
create table if not exists {t} (
    id bigserial primary key,
    source text not null,
    source_id text,
    content_hash text not null,
    payload jsonb not null,
    fetched_at timestamptz not null,
    run_id text not null,
    unique (source, content_hash)
);
create index if not exists {t}_source_id_idx on {t} (source, source_id);
"""

_DDL = """
create table if not exists normalized_data (
    id bigserial primary key,
    source text not null,
    source_id text not null,
    name text,
    value double precision,
    description text,
    category text,
    created_at timestamptz not null,
    updated_at timestamptz not null,
    content_hash text not null,
    run_id text not null,
    ingested_at timestamptz not null default now(),
    -- leading source_id: this unique index is also the "index on source_id" (ON CONFLICT ignores column order)
    constraint normalized_data_source_id_key unique (source_id, source)
);
create index if not exists normalized_data_category_idx on normalized_data (category);
create index if not exists normalized_data_created_at_idx on normalized_data (created_at, id);
create index if not exists normalized_data_source_created_idx on normalized_data (source, created_at, id);
create table if not exists etl_checkpoint (
    source text primary key,
    kind text not null,
    cursor jsonb not null default '{}'::jsonb,
    last_modified timestamptz,
    last_seen_id text,
    run_id text,
    updated_at timestamptz not null default now()
);
create table if not exists etl_runs (
    run_id text primary key,
    flow text not null,
    status text not null check (status in ('running', 'success', 'failed')),
    started_at timestamptz not null default now(),
    finished_at timestamptz,
    duration_seconds double precision,
    records_processed bigint not null default 0,
    counts jsonb not null default '{}'::jsonb,
    failure_reason text
);
create index if not exists etl_runs_started_idx on etl_runs (started_at);
create table if not exists etl_rejects (
    id bigserial primary key,
    run_id text not null,
    source text not null,
    ref bigint,
    field text not null,
    reason text not null,
    payload text,
    rejected_at timestamptz not null default now()
);
create index if not exists etl_rejects_run_idx on etl_rejects (run_id, source);
create table if not exists etl_source_schema (
    source text not null,
    run_id text not null,
    fields jsonb not null,
    observed_at timestamptz not null default now(),
    primary key (source, run_id)
);
create table if not exists etl_schema_drift (
    id bigserial primary key,
    run_id text not null,
    source text not null,
    added jsonb not null,
    removed jsonb not null,
    changed jsonb not null,
    policy text not null,
    detected_at timestamptz not null default now()
);
create table if not exists etl_meta (
    id int primary key check (id = 1),
    data_version bigint not null
);
insert into etl_meta (id, data_version) values (1, 0) on conflict (id) do nothing;
"""


_SEARCH_DDL = """
create extension if not exists pg_trgm;
create index if not exists normalized_data_name_trgm_idx on normalized_data using gin (name gin_trgm_ops);
create index if not exists normalized_data_description_trgm_idx on normalized_data using gin (description gin_trgm_ops);
"""


def ensure_schema(engine: Engine, *, search_indexes: bool = False) -> None:
    """Create every ingestion table and index if missing (safe to call concurrently: advisory lock).

    ``search_indexes=True`` also creates pg_trgm GIN indexes on ``name`` and ``description`` so the API's
    ``search`` (ILIKE '%term%') stops scanning the table; opt-in because they slow the bulk load down.
    """
    with engine.begin() as conn:
        conn.execute(text("select pg_advisory_xact_lock(hashtext('ingest-schema'))"))
        for table in RAW_TABLES.values():
            conn.exec_driver_sql(_RAW_DDL.format(t=table))
        conn.exec_driver_sql(_DDL)
        if search_indexes:
            conn.exec_driver_sql(_SEARCH_DDL)


# --- COPY + upsert ----------------------------------------------------------------------------------------------


def _dbapi_cursor(conn: Connection) -> Any:
    return conn.connection.driver_connection.cursor()


def copy_frame(conn: Connection, table: str, frame: pl.DataFrame) -> None:
    """COPY ``frame`` into ``table`` (columns by name) inside the connection's current transaction."""
    if frame.is_empty():
        return
    cols = ", ".join(f'"{c}"' for c in frame.columns)
    with _dbapi_cursor(conn) as cur, cur.copy(f"COPY {table} ({cols}) FROM STDIN (FORMAT csv)") as copy:
        for offset in range(0, frame.height, COPY_CHUNK_ROWS):
            copy.write(frame.slice(offset, COPY_CHUNK_ROWS).write_csv(include_header=False, null_value=""))


_UPSERT = """
insert into normalized_data as t
    (source, source_id, name, value, description, category, created_at, updated_at, content_hash, run_id)
select source, source_id, name, value, description, category, created_at, updated_at, content_hash, run_id
from _ingest_norm
on conflict (source, source_id) do update set
    name = excluded.name, value = excluded.value, description = excluded.description,
    category = excluded.category, created_at = excluded.created_at, updated_at = excluded.updated_at,
    content_hash = excluded.content_hash, run_id = excluded.run_id, ingested_at = now()
where t.content_hash is distinct from excluded.content_hash
"""


def upsert_normalized(conn: Connection, valid: pl.DataFrame, run_id: str) -> int:
    """COPY ``valid`` (NORMALIZED_SCHEMA) into a temp table and UPSERT on (source, source_id); returns rows written.

    Duplicate keys inside one frame keep the last occurrence (ON CONFLICT cannot touch a row twice).
    Rows whose content hash did not change are left alone. Bumps ``etl_meta.data_version`` when anything changed.
    """
    if valid.is_empty():
        return 0
    frame = (
        valid.unique(subset=["source", "source_id"], keep="last", maintain_order=True)
        .sort("source_id", "source")  # index-ordered: the unique-index probes and inserts walk the btree in order
        .select(*NORMALIZED_SCHEMA)
        .with_columns(run_id=pl.lit(run_id))
    )
    conn.exec_driver_sql(
        "create temp table if not exists _ingest_norm (source text, source_id text, name text, "
        "value double precision, description text, category text, created_at timestamptz, "
        "updated_at timestamptz, content_hash text, run_id text) on commit delete rows"
    )
    conn.exec_driver_sql("truncate _ingest_norm")
    copy_frame(conn, "_ingest_norm", frame)
    written = conn.exec_driver_sql(_UPSERT).rowcount
    if written:
        conn.exec_driver_sql("update etl_meta set data_version = data_version + 1 where id = 1")
    return written


def insert_raw(
    conn: Connection, kind: SourceKind, source: str, raw: pl.DataFrame, source_ids: pl.Series | None,
    run_id: str, fetched_at: datetime,
) -> set[str]:  # fmt: skip
    """COPY the raw batch in and insert what is new; returns the content hashes that were new."""
    if raw.is_empty():
        return set()
    table = RAW_TABLES[kind]
    frame = raw.select(
        source=pl.lit(source),
        source_id=source_ids if source_ids is not None else pl.lit(None, dtype=pl.String()),
        content_hash=pl.col("content_hash"),
        payload=pl.col("payload"),
        fetched_at=pl.lit(fetched_at.astimezone(UTC)).cast(pl.Datetime("us", "UTC")),
        run_id=pl.lit(run_id),
    ).unique(subset=["content_hash"], keep="first", maintain_order=True)
    conn.exec_driver_sql(
        "create temp table if not exists _ingest_raw (source text, source_id text, content_hash text, "
        "payload jsonb, fetched_at timestamptz, run_id text) on commit delete rows"
    )
    conn.exec_driver_sql("truncate _ingest_raw")
    copy_frame(conn, "_ingest_raw", frame)
    rows = conn.exec_driver_sql(
        f"insert into {table} (source, source_id, content_hash, payload, fetched_at, run_id) "  # noqa: S608
        "select source, source_id, content_hash, payload, fetched_at, run_id from _ingest_raw "
        "on conflict (source, content_hash) do nothing returning content_hash"
    ).fetchall()
    return {r[0] for r in rows}


def insert_rejects(conn: Connection, run_id: str, source: str, rejects: pl.DataFrame) -> None:
    if rejects.is_empty():
        return
    frame = rejects.select(
        run_id=pl.lit(run_id),
        source=pl.lit(source),
        ref="ref",
        field="field",
        reason=pl.col("reason").str.replace_all("\x00", "\\u0000", literal=True),
        payload=pl.col("payload").str.replace_all("\x00", "\\u0000", literal=True),
    )
    copy_frame(conn, "etl_rejects", frame)


# --- checkpoints ------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Where a source stopped: an opaque ``cursor`` plus the last modification time / id seen."""

    source: str
    kind: str
    cursor: dict[str, Any] = field(default_factory=dict)
    last_modified: datetime | None = None
    last_seen_id: str | None = None


def get_checkpoint(engine_or_conn: Engine | Connection, source: str) -> Checkpoint | None:
    sql = text("select source, kind, cursor, last_modified, last_seen_id from etl_checkpoint where source = :s")
    if isinstance(engine_or_conn, Engine):
        with engine_or_conn.connect() as conn:
            row = conn.execute(sql, {"s": source}).first()
    else:
        row = engine_or_conn.execute(sql, {"s": source}).first()
    if row is None:
        return None
    return Checkpoint(source=row[0], kind=row[1], cursor=dict(row[2] or {}), last_modified=row[3], last_seen_id=row[4])


def save_checkpoint(conn: Connection, checkpoint: Checkpoint, run_id: str) -> None:
    """Upsert the checkpoint inside the caller's transaction (commit it together with the batch)."""
    conn.execute(
        text(
            "insert into etl_checkpoint (source, kind, cursor, last_modified, last_seen_id, run_id, updated_at) "
            "values (:source, :kind, cast(:cursor as jsonb), :lm, :lsi, :run, now()) "
            "on conflict (source) do update set kind = excluded.kind, cursor = excluded.cursor, "
            "last_modified = excluded.last_modified, last_seen_id = excluded.last_seen_id, "
            "run_id = excluded.run_id, updated_at = now()"
        ),
        {
            "source": checkpoint.source,
            "kind": checkpoint.kind,
            "cursor": json.dumps(checkpoint.cursor, default=str),
            "lm": checkpoint.last_modified,
            "lsi": checkpoint.last_seen_id,
            "run": run_id,
        },
    )


# --- one batch, one transaction ---------------------------------------------------------------------------------


@dataclass
class BatchCounts:
    read: int = 0
    raw_new: int = 0
    duplicates: int = 0
    upserted: int = 0
    rejected: int = 0

    def add(self, other: BatchCounts) -> None:
        for name in ("read", "raw_new", "duplicates", "upserted", "rejected"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("read", "raw_new", "duplicates", "upserted", "rejected")}


def load_batch(
    engine: Engine,
    *,
    kind: SourceKind,
    source: str,
    field_map: dict[str, str],
    raw: pl.DataFrame,
    run_id: str,
    checkpoint: Checkpoint | None,
    extra_rejects: pl.DataFrame | None = None,
    fetched_at: datetime | None = None,
    valid_filter: pl.Expr | None = None,
) -> BatchCounts:
    """Raw insert + normalize + upsert + rejects + checkpoint, all in ONE transaction.

    Only records whose raw content hash is new are normalized/rejected, so re-ingesting is a no-op.
    ``extra_rejects`` (e.g. malformed CSV lines, REJECT_SCHEMA) are stored with the batch.
    ``valid_filter`` drops normalized rows (e.g. RSS items older than the checkpoint) without rejecting them.
    """
    fetched_at = fetched_at or datetime.now(UTC)
    counts = BatchCounts(read=raw.height + (extra_rejects.height if extra_rejects is not None else 0))
    valid, rejects = normalize(raw, source=source, field_map=field_map, fetched_at=fetched_at)
    sid = raw.select(_mapped(pl.col("payload"), field_map.get("source_id")).alias("sid")).to_series()
    # PostgreSQL cannot store NUL in text/jsonb: such records are rejected (reason "payload") and not kept raw
    storable = ~(
        pl.col("payload").str.contains("\x00", literal=True) | pl.col("payload").str.contains("\\u0000", literal=True)
    )
    with engine.begin() as conn:
        ok = raw.filter(storable)
        new_hashes = insert_raw(
            conn, kind, source, ok, sid.filter(raw.select(storable).to_series()), run_id, fetched_at
        )
        counts.raw_new = len(new_hashes)
        counts.duplicates = ok.height - counts.raw_new
        if len(new_hashes) < raw.height:
            keep = pl.Series(list(new_hashes), dtype=pl.String())
            valid = valid.filter(pl.col("content_hash").is_in(keep))
            refs = pl.concat([ok.filter(pl.col("content_hash").is_in(keep))["ref"], raw.filter(~storable)["ref"]])
            rejects = rejects.filter(pl.col("ref").is_in(refs))
        if valid_filter is not None:
            valid = valid.filter(valid_filter)
        if extra_rejects is not None and not extra_rejects.is_empty():
            rejects = pl.concat([extra_rejects.cast(REJECT_SCHEMA), rejects])
        counts.upserted = upsert_normalized(conn, valid, run_id)
        insert_rejects(conn, run_id, source, rejects)
        counts.rejected = rejects.height
        if checkpoint is not None:
            save_checkpoint(conn, checkpoint, run_id)
    return counts


# --- runs -------------------------------------------------------------------------------------------------------


RUN_LOCK_NAMESPACE = 0x494E4752  # "INGR": first key of every run-liveness lock (two-int advisory lock form)
ABANDONED_REASON = "abandoned: the process ended before finishing the run"


def run_lock_key(run_id: str) -> int:
    """Second key of the run's advisory lock: a stable signed 32-bit hash of ``run_id`` (same in every process)."""
    return int.from_bytes(hashlib.blake2b(run_id.encode("utf-8"), digest_size=4).digest(), "big", signed=True)


class RunLease:
    """Liveness of one ingest run: a DEDICATED session (not a pooled batch connection) holding the session-level
    ``pg_advisory_lock(RUN_LOCK_NAMESPACE, run_lock_key(run_id))`` for the whole run.

    PostgreSQL drops the lock when the session ends, also when the process is SIGKILLed (the server sees the socket
    close), so "its lock is free" means "its process is gone". ``release()`` (idempotent; also the context manager
    exit) closes the session. ``abandoned``: run ids this start marked failed because their owner was gone.
    """

    def __init__(self, run_id: str, conn: Connection, logger: Log) -> None:
        self.run_id = run_id
        self.abandoned: list[str] = []
        self._conn: Connection | None = conn
        self._log = logger

    @property
    def held(self) -> bool:
        return self._conn is not None

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.close()  # detached: really closes the session, which frees the lock
        except Exception as exc:  # noqa: BLE001 - a dead session holds no lock either; the run's outcome stands
            self._log.warning("run %s: closing the liveness session failed (%s)", self.run_id, type(exc).__name__)

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _liveness_session(engine: Engine) -> Connection:
    conn = engine.connect()
    try:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.detach()  # out of the pool's hands: closed (lock freed) on release, never handed to a batch
    except BaseException:
        conn.close()
        raise
    return conn


def _fail_abandoned(conn: Connection, run_id: str, log: Log) -> list[str]:
    """Mark failed every other 'running' run whose liveness lock is free (its process is gone). Never waits."""
    marked: list[str] = []
    others = conn.execute(
        text("select run_id from etl_runs where status = 'running' and run_id <> :r order by started_at"), {"r": run_id}
    ).scalars()
    for other in list(others):
        key = {"ns": RUN_LOCK_NAMESPACE, "k": run_lock_key(other)}
        if not conn.execute(text("select pg_try_advisory_lock(:ns, :k)"), key).scalar_one():
            continue  # its owner is alive
        try:  # hold the lock while marking: a re-run of the same id cannot start in between and be clobbered
            done = conn.execute(
                text(
                    "update etl_runs set status = 'failed', finished_at = clock_timestamp(), failure_reason = :why "
                    "where run_id = :r and status = 'running'"
                ),
                {"why": ABANDONED_REASON, "r": other},
            )
        finally:
            conn.execute(text("select pg_advisory_unlock(:ns, :k)"), key)
        if done.rowcount:
            marked.append(other)
            log.warning("ingest run %s was abandoned (its process is gone); marked failed", other)
    return marked


def start_run(
    engine: Engine,
    run_id: str,
    flow: str = "ingest",
    *,
    lock_wait_seconds: float = 10.0,
    logger: Log | None = None,
) -> RunLease:
    """Record the run as 'running' under its liveness lock, then fail the other 'running' runs whose process is gone.

    The lock is taken BEFORE the row is written, so a concurrent start never sees this run 'running' and unlocked.
    The caller MUST ``release()`` the returned lease when the run is over (success or failure): use ``finally``.
    Waits up to ``lock_wait_seconds`` for its own lock (held only for an instant by another run's check); still held
    after that means the same run id is live elsewhere -> TrackingError. Connection failures ->
    DatabaseUnavailableError (no URL or password in the message).
    """
    log = logger or logging.getLogger(__name__)
    lease: RunLease | None = None
    try:
        lease = RunLease(run_id, _liveness_session(engine), log)
        conn = lease._conn
        assert conn is not None
        conn.execute(
            text("select set_config('lock_timeout', :t, false)"), {"t": f"{max(int(lock_wait_seconds * 1000), 1)}ms"}
        )
        try:
            conn.execute(
                text("select pg_advisory_lock(:ns, :k)"), {"ns": RUN_LOCK_NAMESPACE, "k": run_lock_key(run_id)}
            )
        except sa_exc.DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
                raise
            raise TrackingError(
                f"run_id {run_id!r}: its liveness lock is held by another live session after {lock_wait_seconds} s "
                "(the same run is running twice)"
            ) from None
        conn.execute(
            text(
                "insert into etl_runs (run_id, flow, status, started_at) values (:r, :f, 'running', now()) "
                "on conflict (run_id) do update set status = 'running', finished_at = null, failure_reason = null"
            ),
            {"r": run_id, "f": flow},
        )
        lease.abandoned = _fail_abandoned(conn, run_id, log)
        return lease
    except BaseException as exc:
        if lease is not None:
            lease.release()
        if isinstance(exc, DatabaseUnavailableError) or not is_unavailable(exc, engine.dialect.name):
            raise
        raise unavailable(exc, engine, f"start ingest run {run_id}") from None


def finish_run(
    engine: Engine, run_id: str, *, status: Literal["success", "failed"], counts: dict[str, dict[str, int]],
    failure_reason: str | None = None,
) -> None:  # fmt: skip
    """Close the run: status, per-source counts, duration (server clock) and the failure reason (no secrets)."""
    processed = sum(int(c.get("read", 0)) for c in counts.values())
    with engine.begin() as conn:
        conn.execute(
            text(
                "update etl_runs set status = :s, finished_at = clock_timestamp(), "
                "duration_seconds = extract(epoch from clock_timestamp() - started_at), "
                "records_processed = :n, counts = cast(:c as jsonb), failure_reason = :fr where run_id = :r"
            ),
            {"s": status, "n": processed, "c": json.dumps(counts), "fr": failure_reason, "r": run_id},
        )


# --- schema drift -----------------------------------------------------------------------------------------------

_KINDS = {
    pl.Boolean: "boolean",
    pl.String: "string",
    pl.Struct: "object",
    pl.List: "array",
    pl.Array: "array",
}


def _kind(dtype: pl.DataType) -> str | None:
    if dtype == pl.Null:
        return None
    if dtype.is_numeric():
        return "number"
    for base, name in _KINDS.items():
        if isinstance(dtype, base) or dtype == base:
            return name
    return "string"


def observe_json_schema(raw: pl.DataFrame) -> dict[str, str]:
    """Top-level fields of the JSON payloads and their kind (number/string/boolean/object/array), vectorized.

    Fields that are only ever null are reported as ``null``. Mixed kinds come out as ``string``.
    """
    if raw.is_empty():
        return {}
    payloads = raw["payload"]
    try:
        data = ("\n".join(payloads.to_list()) + "\n").encode()
        schema = pl.read_ndjson(io.BytesIO(data), infer_schema_length=None).schema
    except (pl.exceptions.PolarsError, ValueError):  # kinds Polars cannot unify: fall back to per-record kinds
        return _observe_slow(payloads.to_list())
    return {name: _kind(dtype) or "null" for name, dtype in schema.items()}


def _observe_slow(payloads: list[str]) -> dict[str, str]:
    kinds: dict[str, set[str]] = {}
    names = {bool: "boolean", int: "number", float: "number", str: "string", dict: "object", list: "array"}
    for text_ in payloads:
        record = json.loads(text_)
        if isinstance(record, dict):
            for k, v in record.items():
                kinds.setdefault(k, set())
                if v is not None:
                    kinds[k].add(names.get(type(v), "string"))
    return {k: (next(iter(v)) if len(v) == 1 else ("null" if not v else "string")) for k, v in kinds.items()}


def merge_schema(seen: dict[str, str], batch: dict[str, str]) -> dict[str, str]:
    """Union of two observations; a field seen null in one and typed in the other keeps the type."""
    out = dict(seen)
    for name, kind in batch.items():
        old = out.get(name)
        if old is None or old == "null":
            out[name] = kind
        elif kind not in ("null", old):
            out[name] = "string"
    return out


@dataclass
class SchemaDiff:
    added: dict[str, str] = field(default_factory=dict)
    removed: dict[str, str] = field(default_factory=dict)
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def summary(self) -> str:
        bits = []
        if self.added:
            bits.append("added " + ", ".join(f"{k} ({v})" for k, v in sorted(self.added.items())))
        if self.removed:
            bits.append("removed " + ", ".join(f"{k} ({v})" for k, v in sorted(self.removed.items())))
        if self.changed:
            bits.append("changed " + ", ".join(f"{k} ({a} -> {b})" for k, (a, b) in sorted(self.changed.items())))
        return "; ".join(bits) or "no change"


def diff_schema(previous: dict[str, str], current: dict[str, str]) -> SchemaDiff:
    """Fields that appeared, disappeared or changed kind. ``null`` never counts as a change of kind."""
    diff = SchemaDiff()
    for name, kind in current.items():
        if name not in previous:
            diff.added[name] = kind
        elif "null" not in (kind, previous[name]) and kind != previous[name]:
            diff.changed[name] = (previous[name], kind)
    for name, kind in previous.items():
        if name not in current:
            diff.removed[name] = kind
    return diff


def previous_schema(engine: Engine, source: str, run_id: str) -> dict[str, str] | None:
    """The fields observed by the latest other run of ``source`` (None on its first run)."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "select fields from etl_source_schema where source = :s and run_id <> :r "
                "order by observed_at desc limit 1"
            ),
            {"s": source, "r": run_id},
        ).first()
    return dict(row[0]) if row else None


def record_schema(
    engine: Engine, *, source: str, run_id: str, fields: dict[str, str] | None, diff: SchemaDiff | None, policy: str
) -> None:
    """Store this run's observed fields (the next run's baseline) and, when there is drift, one drift row.

    ``fields=None`` records the drift only: a drift the policy refused must not become the next baseline.
    """
    with engine.begin() as conn:
        if fields is not None:
            conn.execute(
                text(
                    "insert into etl_source_schema (source, run_id, fields) values (:s, :r, cast(:f as jsonb)) "
                    "on conflict (source, run_id) do update set fields = excluded.fields, observed_at = now()"
                ),
                {"s": source, "r": run_id, "f": json.dumps(fields)},
            )
        if diff:
            conn.execute(
                text(
                    "insert into etl_schema_drift (run_id, source, added, removed, changed, policy) values "
                    "(:r, :s, cast(:a as jsonb), cast(:d as jsonb), cast(:c as jsonb), :p)"
                ),
                {
                    "r": run_id,
                    "s": source,
                    "a": json.dumps(diff.added),
                    "d": json.dumps(diff.removed),
                    "c": json.dumps({k: list(v) for k, v in diff.changed.items()}),
                    "p": policy,
                },
            )
