"""Run tracking and the DB-first checkpoint.

Tables (created idempotently by :func:`ensure_schema`, SQLAlchemy Core, portable across SQLite, PostgreSQL and
SQL Server / Azure SQL):

* ``pipeline_checkpoint``: one row per pipeline, the next batch week to process (source of truth): the first
  week not committed yet. :func:`checkpoint_after_week` moves it across committed weeks only, in order;
  :func:`advance_checkpoint` is the plain monotonic upsert underneath (and ``force`` for an operator).
* ``pipeline_run``: one row per attempt at a week. A filtered unique index on ``(pipeline, week_start)``
  ``WHERE status IN ('SUCCESS','SUCCESS_WITH_REJECTS')`` forbids a second successful run of the same week.
* ``pipeline_stage``: one row per (run, stage).

Every function takes a SQLAlchemy ``Engine`` (the flow builds it from the ``SqlAlchemyConnector`` block), runs one
short transaction through :func:`tasks.sql.run_in_transaction` (one retry on a stale pooled connection, connection
failures -> DatabaseUnavailableError without credentials) and is safe to call twice: the write functions are
idempotent, which is what lets :func:`tasks.pending.replay_pending` re-apply a queued write that may already have
landed (the pending-write queue in the lake lives in :mod:`tasks.pending`).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Dialect, Engine

from tasks.errors import DuplicateRunError, TrackingError
from tasks.models import RunStatus
from tasks.sql import run_in_transaction, safe_text

_LOG = logging.getLogger(__name__)
Logger = logging.Logger | logging.LoggerAdapter

FAILURE_REASON_LIMIT = 2000
DETAIL_LIMIT = 2000
CHECKPOINT_DOCUMENT_LIMIT = 5000
_PIPELINE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


SUCCESS_STATUSES = (RunStatus.SUCCESS.value, RunStatus.SUCCESS_WITH_REJECTS.value)
FINAL_STATUSES = (*SUCCESS_STATUSES, RunStatus.FAILED.value)
STAGE_STATUSES = (*(s.value for s in RunStatus), "SKIPPED")
COUNT_FIELDS = ("fetched", "valid", "rejected", "duplicates", "synced", "failed_rows")
RATE_FIELD = "reject_rate_pct"

# --- schema ---------------------------------------------------------------------------------------------------

metadata = sa.MetaData()
_TS = sa.DateTime(timezone=True)  # timestamptz / DATETIMEOFFSET; SQLite stores UTC text (we write UTC only)

pipeline_checkpoint = sa.Table(
    "pipeline_checkpoint",
    metadata,
    sa.Column("pipeline", sa.String(200), primary_key=True),
    sa.Column("next_week_start", sa.Date, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
    sa.Column("last_run_id", sa.String(36)),
)

pipeline_run = sa.Table(
    "pipeline_run",
    metadata,
    sa.Column("run_id", sa.String(36), primary_key=True),
    sa.Column("pipeline", sa.String(200), nullable=False),
    sa.Column("week_start", sa.Date, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("started_at", _TS, nullable=False),
    sa.Column("ended_at", _TS),
    *(sa.Column(name, sa.BigInteger) for name in COUNT_FIELDS),
    sa.Column(RATE_FIELD, sa.Float),
    sa.Column("failure_reason", sa.String(FAILURE_REASON_LIMIT)),
    sa.Column("flow_run_id", sa.String(64)),
    sa.CheckConstraint(
        "status IN (" + ", ".join(f"'{s.value}'" for s in RunStatus) + ")", name="ck_pipeline_run_status"
    ),
)
_success_only = pipeline_run.c.status.in_(SUCCESS_STATUSES)
sa.Index("ix_pipeline_run_pipeline_week", pipeline_run.c.pipeline, pipeline_run.c.week_start)
uq_pipeline_run_success = sa.Index(
    "uq_pipeline_run_success",
    pipeline_run.c.pipeline,
    pipeline_run.c.week_start,
    unique=True,
    postgresql_where=_success_only,
    sqlite_where=_success_only,
    mssql_where=_success_only,
)

pipeline_stage = sa.Table(
    "pipeline_stage",
    metadata,
    sa.Column("run_id", sa.String(36), sa.ForeignKey("pipeline_run.run_id"), primary_key=True),
    sa.Column("stage", sa.String(100), primary_key=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("started_at", _TS, nullable=False),
    sa.Column("ended_at", _TS),
    sa.Column("rows_in", sa.BigInteger),
    sa.Column("rows_out", sa.BigInteger),
    sa.Column("detail", sa.String(DETAIL_LIMIT)),
)


def ensure_schema(engine: Engine, *, logger: Logger | None = None) -> None:
    """Create the tracking tables and indexes when missing (safe to call on every run, and concurrently)."""

    def work(conn: Connection) -> None:
        metadata.create_all(conn, checkfirst=True)

    try:
        run_in_transaction(engine, "ensure_schema", work, logger=logger)
    except (sa_exc.ProgrammingError, sa_exc.IntegrityError, sa_exc.OperationalError):
        # Another process created a table between our check and our CREATE: check again.
        run_in_transaction(engine, "ensure_schema", work, logger=logger)


# --- records --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    pipeline: str
    week_start: date
    status: str
    started_at: datetime
    ended_at: datetime | None
    fetched: int | None
    valid: int | None
    rejected: int | None
    duplicates: int | None
    synced: int | None
    failed_rows: int | None
    reject_rate_pct: float | None
    failure_reason: str | None
    flow_run_id: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly (dates as ISO strings) for table artifacts and reports."""
        return {k: (v.isoformat() if isinstance(v, date | datetime) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class StageRecord:
    run_id: str
    stage: str
    status: str
    started_at: datetime
    ended_at: datetime | None
    rows_in: int | None
    rows_out: int | None
    detail: str | None


@dataclass(frozen=True)
class Checkpoint:
    pipeline: str
    next_week_start: date
    updated_at: datetime
    last_run_id: str | None


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back what we stored: naive UTC
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _as_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value))


def _run_record(row: Mapping[str, Any]) -> RunRecord:
    data = dict(row)
    data["week_start"] = _as_date(data["week_start"])
    data["started_at"] = _utc(data["started_at"])
    data["ended_at"] = _utc(data["ended_at"])
    return RunRecord(**data)


def _stage_record(row: Mapping[str, Any]) -> StageRecord:
    data = dict(row)
    data["started_at"] = _utc(data["started_at"])
    data["ended_at"] = _utc(data["ended_at"])
    return StageRecord(**data)


# --- validation -----------------------------------------------------------------------------------------------


def _check_pipeline(pipeline: str) -> str:
    if not isinstance(pipeline, str) or not _PIPELINE_RE.match(pipeline):
        raise TrackingError(
            f"pipeline: {pipeline!r} is not a valid name (letters, digits, '.', '_', '-'; at most 200 characters)"
        )
    return pipeline


def _check_week(value: Any, name: str) -> date:
    try:
        week = _as_date(value)
    except (TypeError, ValueError):
        raise TrackingError(f"{name}: {value!r} is not an ISO date") from None
    if week.weekday() != 0:
        raise TrackingError(f"{name}: {week.isoformat()} is a {week.strftime('%A')}, not a Monday")
    return week


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise TrackingError("now: must be timezone-aware")
    return now.astimezone(UTC)


def _counts(counts: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dict(counts or {}).items():
        if key == RATE_FIELD:
            if value is not None:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise TrackingError(f"counts.{key}: {value!r} is not a number") from None
                if not 0 <= value <= 100:
                    raise TrackingError(f"counts.{key}: {value} is outside 0..100")
            out[key] = value
        elif key in COUNT_FIELDS:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise TrackingError(f"counts.{key}: {value!r} is not a non-negative integer")
            out[key] = value
        else:
            raise TrackingError(f"counts.{key}: unknown count (known: {', '.join((*COUNT_FIELDS, RATE_FIELD))})")
    if out.get(RATE_FIELD) is None and out.get("fetched"):
        out[RATE_FIELD] = round(100.0 * (out.get("rejected") or 0) / out["fetched"], 4)
    return out


def clean_reason(text: object | None, limit: int = FAILURE_REASON_LIMIT) -> str | None:
    """A failure reason or stage detail fit for the table: secrets masked, cut to ``limit`` characters."""
    if text is None:
        return None
    if isinstance(text, BaseException):
        text = f"{type(text).__name__}: {text}"
    return safe_text(text, limit)


# --- runs and stages ------------------------------------------------------------------------------------------


def _successful_run_id(conn: Connection, pipeline: str, week: date, exclude: str | None = None) -> str | None:
    query = sa.select(pipeline_run.c.run_id).where(
        pipeline_run.c.pipeline == pipeline,
        pipeline_run.c.week_start == week,
        pipeline_run.c.status.in_(SUCCESS_STATUSES),
    )
    if exclude is not None:
        query = query.where(pipeline_run.c.run_id != exclude)
    return conn.execute(query.limit(1)).scalar()


def _duplicate(pipeline: str, week: date, existing: str | None) -> DuplicateRunError:
    return DuplicateRunError(
        f"pipeline {pipeline!r} already has a successful run for the week of {week.isoformat()} "
        f"(run_id={existing}); refusing a second one"
    )


def start_run(
    engine: Engine,
    pipeline: str,
    week_start: date,
    *,
    run_id: str | None = None,
    flow_run_id: str | None = None,
    now: datetime | None = None,
    check_duplicate: bool = True,
    logger: Logger | None = None,
) -> str:
    """Insert a RUNNING run and return its id.

    Raises DuplicateRunError when the week already has a successful run (unless ``check_duplicate=False``; the
    unique index still refuses the second success at :func:`finish_run`). Calling it again with the same
    ``run_id`` (a retry after an ambiguous commit) is a no-op.
    """
    _check_pipeline(pipeline)
    week = _check_week(week_start, "week_start")
    run_id = str(run_id or uuid.uuid4())
    started = _now(now)

    def work(conn: Connection) -> str:
        existing = conn.execute(
            sa.select(pipeline_run.c.pipeline, pipeline_run.c.week_start).where(pipeline_run.c.run_id == run_id)
        ).first()
        if existing is not None:
            if existing.pipeline != pipeline or _as_date(existing.week_start) != week:
                raise TrackingError(f"run_id: {run_id} already exists for another pipeline/week")
            return run_id
        if check_duplicate:
            done = _successful_run_id(conn, pipeline, week)
            if done is not None:
                raise _duplicate(pipeline, week, done)
        conn.execute(
            pipeline_run.insert().values(
                run_id=run_id,
                pipeline=pipeline,
                week_start=week,
                status=RunStatus.RUNNING.value,
                started_at=started,
                flow_run_id=flow_run_id,
            )
        )
        return run_id

    return run_in_transaction(engine, "start_run", work, logger=logger)


def finish_run(
    engine: Engine,
    run_id: str,
    status: str,
    counts: Mapping[str, Any] | None = None,
    failure_reason: object | None = None,
    *,
    now: datetime | None = None,
    supersede: bool = False,
    logger: Logger | None = None,
) -> bool:
    """Close a RUNNING run with a final status and its counts. Returns False when it was already finished (no-op).

    ``supersede=True`` (a full refresh): in the same transaction, earlier successful runs of the same week are
    marked SUPERSEDED, so the one-success-per-week index holds and the history stays.

    ``counts`` keys: fetched, valid, rejected, duplicates, synced, failed_rows, reject_rate_pct (computed from
    rejected/fetched when absent). ``failure_reason`` (text or exception) is scrubbed of secrets and truncated.
    A second successful run of the same week raises DuplicateRunError naming the run that already succeeded.
    """
    log = logger or _LOG
    status = str(status)
    if status not in FINAL_STATUSES:
        raise TrackingError(f"status: {status!r} is not a final run status ({', '.join(FINAL_STATUSES)})")
    values = _counts(counts)
    values.update(status=status, ended_at=_now(now), failure_reason=clean_reason(failure_reason))

    def work(conn: Connection) -> bool:
        if supersede and status in SUCCESS_STATUSES:
            row = conn.execute(
                sa.select(pipeline_run.c.pipeline, pipeline_run.c.week_start).where(
                    pipeline_run.c.run_id == run_id, pipeline_run.c.status == RunStatus.RUNNING.value
                )
            ).first()
            if row is not None:
                conn.execute(
                    pipeline_run.update()
                    .where(
                        pipeline_run.c.pipeline == row.pipeline,
                        pipeline_run.c.week_start == row.week_start,
                        pipeline_run.c.run_id != run_id,
                        pipeline_run.c.status.in_(SUCCESS_STATUSES),
                    )
                    .values(status=RunStatus.SUPERSEDED.value)
                )
        result = conn.execute(
            pipeline_run.update()
            .where(pipeline_run.c.run_id == run_id, pipeline_run.c.status == RunStatus.RUNNING.value)
            .values(**values)
        )
        if result.rowcount == 1:
            return True
        current = conn.execute(sa.select(pipeline_run.c.status).where(pipeline_run.c.run_id == run_id)).scalar()
        if current is None:
            raise TrackingError(f"run_id: no run {run_id} in pipeline_run (start_run was never recorded)")
        log.info("run %s is already finished (%s); finish_run(%s) is a no-op", run_id, current, status)
        return False

    try:
        return run_in_transaction(engine, "finish_run", work, logger=logger)
    except sa_exc.IntegrityError:
        if status not in SUCCESS_STATUSES:
            raise

        def who(conn: Connection) -> tuple[str, date, str | None]:
            row = conn.execute(
                sa.select(pipeline_run.c.pipeline, pipeline_run.c.week_start).where(pipeline_run.c.run_id == run_id)
            ).one()
            week = _as_date(row.week_start)
            return row.pipeline, week, _successful_run_id(conn, row.pipeline, week, exclude=run_id)

        pipeline, week, existing = run_in_transaction(engine, "finish_run", who, logger=logger)
        if existing is None:
            raise
        raise _duplicate(pipeline, week, existing) from None


def start_stage(
    engine: Engine,
    run_id: str,
    stage: str,
    *,
    rows_in: int | None = None,
    now: datetime | None = None,
    logger: Logger | None = None,
) -> None:
    """Mark a stage RUNNING (a retried stage is reset to RUNNING with a fresh start time)."""
    if not stage or len(stage) > 100:
        raise TrackingError(f"stage: {stage!r} must be 1..100 characters")
    started = _now(now)
    values = {"status": RunStatus.RUNNING.value, "started_at": started, "ended_at": None, "rows_in": rows_in}

    def work(conn: Connection) -> None:
        where = (pipeline_stage.c.run_id == run_id, pipeline_stage.c.stage == stage)
        if conn.execute(pipeline_stage.update().where(*where).values(rows_out=None, detail=None, **values)).rowcount:
            return
        conn.execute(pipeline_stage.insert().values(run_id=run_id, stage=stage, **values))

    run_in_transaction(engine, "start_stage", work, logger=logger)


def finish_stage(
    engine: Engine,
    run_id: str,
    stage: str,
    status: str,
    *,
    rows_in: int | None = None,
    rows_out: int | None = None,
    detail: object | None = None,
    now: datetime | None = None,
    logger: Logger | None = None,
) -> bool:
    """Close a RUNNING stage. Returns False when it was already closed (no-op). A stage never started is recorded
    as started and ended at ``now``."""
    status = str(status)
    if status not in STAGE_STATUSES or status == RunStatus.RUNNING.value:
        raise TrackingError(f"status: {status!r} is not a final stage status")
    ended = _now(now)
    values: dict[str, Any] = {"status": status, "ended_at": ended, "detail": clean_reason(detail, DETAIL_LIMIT)}
    if rows_in is not None:
        values["rows_in"] = rows_in
    if rows_out is not None:
        values["rows_out"] = rows_out

    def work(conn: Connection) -> bool:
        where = (pipeline_stage.c.run_id == run_id, pipeline_stage.c.stage == stage)
        running = pipeline_stage.c.status == RunStatus.RUNNING.value
        if conn.execute(pipeline_stage.update().where(*where, running).values(**values)).rowcount:
            return True
        if conn.execute(sa.select(pipeline_stage.c.status).where(*where)).first() is not None:
            return False
        conn.execute(pipeline_stage.insert().values(run_id=run_id, stage=stage, started_at=ended, **values))
        return True

    return run_in_transaction(engine, "finish_stage", work, logger=logger)


def fail_abandoned_runs(
    engine: Engine,
    pipeline: str,
    *,
    reason: str = "abandoned: the process ended before finishing the run",
    week_start: date | None = None,
    exclude: str | None = None,
    now: datetime | None = None,
    logger: Logger | None = None,
) -> int:
    """Mark this pipeline's RUNNING runs (other than ``exclude``; of ``week_start`` only, when given) FAILED, so a
    crashed run does not stay RUNNING forever. Returns the count.

    Scope it to the week about to be processed: a week is never processed by two live runs at once, so a RUNNING
    run of that week is provably left over, whereas runs of other weeks may be live (a backfill runs weeks
    concurrently) and must not be touched."""
    _check_pipeline(pipeline)
    ended = _now(now)

    def work(conn: Connection) -> int:
        query = pipeline_run.update().where(
            pipeline_run.c.pipeline == pipeline, pipeline_run.c.status == RunStatus.RUNNING.value
        )
        if week_start is not None:
            query = query.where(pipeline_run.c.week_start == _check_week(week_start, "week_start"))
        if exclude is not None:
            query = query.where(pipeline_run.c.run_id != exclude)
        return conn.execute(
            query.values(status=RunStatus.FAILED.value, ended_at=ended, failure_reason=clean_reason(reason))
        ).rowcount

    return run_in_transaction(engine, "fail_abandoned_runs", work, logger=logger)


def get_run(engine: Engine, run_id: str) -> RunRecord | None:
    def work(conn: Connection) -> RunRecord | None:
        row = conn.execute(sa.select(pipeline_run).where(pipeline_run.c.run_id == run_id)).mappings().first()
        return None if row is None else _run_record(row)

    return run_in_transaction(engine, "get_run", work)


def last_successful_run(engine: Engine, pipeline: str, week: date) -> RunRecord | None:
    """The successful run of ``pipeline`` for the week starting ``week``, if any."""
    _check_pipeline(pipeline)
    week = _as_date(week)

    def work(conn: Connection) -> RunRecord | None:
        row = (
            conn.execute(
                sa.select(pipeline_run)
                .where(
                    pipeline_run.c.pipeline == pipeline,
                    pipeline_run.c.week_start == week,
                    pipeline_run.c.status.in_(SUCCESS_STATUSES),
                )
                .order_by(pipeline_run.c.started_at.desc())
                .limit(1)
            )
            .mappings()
            .first()
        )
        return None if row is None else _run_record(row)

    return run_in_transaction(engine, "last_successful_run", work)


def runs(engine: Engine, pipeline: str, *, week: date | None = None, limit: int | None = 100) -> list[RunRecord]:
    """Runs of ``pipeline`` (optionally one week), newest week first, newest start first within a week."""
    _check_pipeline(pipeline)

    def work(conn: Connection) -> list[RunRecord]:
        query = sa.select(pipeline_run).where(pipeline_run.c.pipeline == pipeline)
        if week is not None:
            query = query.where(pipeline_run.c.week_start == _as_date(week))
        query = query.order_by(pipeline_run.c.week_start.desc(), pipeline_run.c.started_at.desc())
        if limit is not None:
            query = query.limit(limit)
        return [_run_record(row) for row in conn.execute(query).mappings()]

    return run_in_transaction(engine, "runs", work)


def stages(engine: Engine, run_id: str) -> list[StageRecord]:
    """Stages of one run, in start order."""

    def work(conn: Connection) -> list[StageRecord]:
        query = (
            sa.select(pipeline_stage)
            .where(pipeline_stage.c.run_id == run_id)
            .order_by(pipeline_stage.c.started_at, pipeline_stage.c.stage)
        )
        return [_stage_record(row) for row in conn.execute(query).mappings()]

    return run_in_transaction(engine, "stages", work)


# --- checkpoint -----------------------------------------------------------------------------------------------


def checkpoint_state(engine: Engine, pipeline: str) -> Checkpoint | None:
    """The checkpoint row (next week, when it was written, by which run), or None before the first run."""
    _check_pipeline(pipeline)

    def work(conn: Connection) -> Checkpoint | None:
        row = (
            conn.execute(sa.select(pipeline_checkpoint).where(pipeline_checkpoint.c.pipeline == pipeline))
            .mappings()
            .first()
        )
        if row is None:
            return None
        return Checkpoint(
            pipeline=row["pipeline"],
            next_week_start=_as_date(row["next_week_start"]),
            updated_at=_utc(row["updated_at"]),
            last_run_id=row["last_run_id"],
        )

    return run_in_transaction(engine, "get_checkpoint", work)


def get_checkpoint(engine: Engine, pipeline: str) -> date | None:
    """The next batch week to process according to the database (the source of truth), or None."""
    state = checkpoint_state(engine, pipeline)
    return None if state is None else state.next_week_start


# SQL Server type names spelled out: an engine that has not connected yet compiles Date as DATETIME.
_MSSQL_TYPES = {
    "pipeline": "VARCHAR(200)",
    "next_week_start": "DATE",
    "updated_at": "DATETIMEOFFSET",
    "last_run_id": "VARCHAR(36)",
}


def _type_sql(column: sa.Column, dialect: Dialect) -> str:
    if dialect.name == "mssql":
        return _MSSQL_TYPES[column.name]
    return column.type.compile(dialect=dialect)


def checkpoint_merge_sql(dialect: Dialect, *, force: bool = False) -> sa.TextClause:
    """The checkpoint upsert as one ``MERGE`` (SQL Server / Azure SQL; PostgreSQL 15+ runs it too).

    ``WITH (HOLDLOCK)`` (SQL Server only) keeps two concurrent first inserts from racing into a key violation.
    Unless ``force``, a matched row moves only forward. Bind names: pipeline, next_week_start, updated_at,
    last_run_id.
    """
    c = pipeline_checkpoint.c
    hint = " WITH (HOLDLOCK)" if dialect.name == "mssql" else ""
    guard = "" if force else " AND target.next_week_start < source.next_week_start"
    sql = (
        f"MERGE INTO pipeline_checkpoint{hint} AS target "
        f"USING (SELECT CAST(:pipeline AS {_type_sql(c.pipeline, dialect)}) AS pipeline, "
        f"CAST(:next_week_start AS {_type_sql(c.next_week_start, dialect)}) AS next_week_start, "
        f"CAST(:updated_at AS {_type_sql(c.updated_at, dialect)}) AS updated_at, "
        f"CAST(:last_run_id AS {_type_sql(c.last_run_id, dialect)}) AS last_run_id) AS source "
        "ON target.pipeline = source.pipeline "
        f"WHEN MATCHED{guard} THEN UPDATE SET next_week_start = source.next_week_start, "
        "updated_at = source.updated_at, last_run_id = source.last_run_id "
        "WHEN NOT MATCHED THEN INSERT (pipeline, next_week_start, updated_at, last_run_id) "
        "VALUES (source.pipeline, source.next_week_start, source.updated_at, source.last_run_id);"
    )
    return sa.text(sql).bindparams(
        sa.bindparam("pipeline", type_=c.pipeline.type),
        sa.bindparam("next_week_start", type_=c.next_week_start.type),
        sa.bindparam("updated_at", type_=c.updated_at.type),
        sa.bindparam("last_run_id", type_=c.last_run_id.type),
    )


def checkpoint_upsert(dialect: Dialect, values: Mapping[str, Any], *, force: bool = False) -> sa.Executable:
    """The one portable checkpoint upsert, chosen by dialect: ON CONFLICT (PostgreSQL, SQLite) or MERGE (others).

    ``values``: pipeline, next_week_start, updated_at, last_run_id. Unless ``force``, never moves backwards.
    """
    name = dialect.name
    if name in ("postgresql", "sqlite"):
        insert = pg_dialect.insert if name == "postgresql" else sqlite_dialect.insert
        stmt = insert(pipeline_checkpoint).values(**values)
        excluded = stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=[pipeline_checkpoint.c.pipeline],
            set_={
                "next_week_start": excluded.next_week_start,
                "updated_at": excluded.updated_at,
                "last_run_id": excluded.last_run_id,
            },
            where=None if force else pipeline_checkpoint.c.next_week_start < excluded.next_week_start,
        )
    return checkpoint_merge_sql(dialect, force=force).bindparams(**values)


def _stored_week(conn: Connection, pipeline: str) -> date | None:
    """The checkpoint row's next week, inside the caller's transaction; None when the pipeline has none."""
    c = pipeline_checkpoint.c
    value = conn.execute(sa.select(c.next_week_start).where(c.pipeline == pipeline)).scalar_one_or_none()
    return None if value is None else _as_date(value)


def advance_checkpoint(
    engine: Engine,
    pipeline: str,
    next_week_start: date,
    run_id: str | None = None,
    *,
    force: bool = False,
    now: datetime | None = None,
    logger: Logger | None = None,
) -> date:
    """Upsert the checkpoint to ``next_week_start`` (a Monday) and return the checkpoint now in the database.

    Monotonic: a value at or before the stored one changes nothing (the return value shows the stored week)
    unless ``force=True``. Idempotent, so safe to replay.
    """
    log = logger or _LOG
    _check_pipeline(pipeline)
    week = _check_week(next_week_start, "next_week_start")
    values = {"pipeline": pipeline, "next_week_start": week, "updated_at": _now(now), "last_run_id": run_id}

    def work(conn: Connection) -> date:
        conn.execute(checkpoint_upsert(conn.dialect, values, force=force))
        stored = _stored_week(conn, pipeline)
        assert stored is not None  # upserted above
        return stored

    stored = run_in_transaction(engine, "advance_checkpoint", work, logger=logger)
    if stored != week:
        log.info(
            "checkpoint of %s stays at %s (asked %s; it never moves backwards without force)",
            pipeline,
            stored.isoformat(),
            week.isoformat(),
        )
    return stored


def checkpoint_after_week(
    engine: Engine,
    pipeline: str,
    week_start: date,
    run_id: str | None = None,
    *,
    baseline: date | None = None,
    now: datetime | None = None,
    logger: Logger | None = None,
) -> date:
    """Move the checkpoint after the week starting ``week_start`` was committed; return the checkpoint now stored.

    The checkpoint is the first week not committed yet: every week before it has a successful run. So it moves
    only across committed weeks, in order. A week committed ahead of it (an explicit ``week`` run, or a backfill
    whose earlier week failed or is still running) leaves it where it is, with a warning; once the weeks before
    that week are committed, the checkpoint rolls over it in the same write. A week at or behind the checkpoint
    (a re-run) moves nothing, except across weeks committed meanwhile. The caller commits the week's run first
    (``finish_run``); this reads the committed weeks in the same transaction as the upsert.

    ``baseline``: where the checkpoint stands when the database has none yet (the Prefect Variable's value or the
    ``first_week`` setting), so that a first week run ahead of it does not skip the weeks in between; with no
    baseline either, the first committed week starts the checkpoint. Idempotent, so safe to replay.
    """
    log = logger or _LOG
    _check_pipeline(pipeline)
    week = _check_week(week_start, "week_start")
    floor = None if baseline is None else _check_week(baseline, "baseline")

    def work(conn: Connection) -> date:
        current = _stored_week(conn, pipeline)
        start = current if current is not None else floor
        target = week if start is None else start
        committed = set(
            map(
                _as_date,
                conn.execute(
                    sa.select(pipeline_run.c.week_start)
                    .where(pipeline_run.c.pipeline == pipeline, _success_only, pipeline_run.c.week_start >= target)
                    .distinct()
                ).scalars(),
            )
        )
        while target in committed:
            target += timedelta(days=7)
        if current is None or target > current:
            values = {"pipeline": pipeline, "next_week_start": target, "updated_at": _now(now), "last_run_id": run_id}
            conn.execute(checkpoint_upsert(conn.dialect, values))
        stored = _stored_week(conn, pipeline)
        assert stored is not None  # upserted above
        return stored

    stored = run_in_transaction(engine, "checkpoint_after_week", work, logger=logger)
    if stored <= week:
        log.warning(
            "week %s is committed, but the checkpoint of %s stays at %s: that week is not committed yet, and the "
            "checkpoint never moves past a week that is not (the next scheduled run processes it)",
            week.isoformat(),
            pipeline,
            stored.isoformat(),
        )
    return stored


def checkpoint_document(next_week_start: date, run_id: str | None, now: datetime) -> dict[str, Any]:
    """The Prefect Variable mirror of the checkpoint: ``{next_week_start, updated_at, last_run_id}`` (JSON, small)."""
    week = _check_week(next_week_start, "next_week_start")
    document = {
        "next_week_start": week.isoformat(),
        "updated_at": _now(now).isoformat(),
        "last_run_id": None if run_id is None else str(run_id),
    }
    size = len(json.dumps(document))
    if size >= CHECKPOINT_DOCUMENT_LIMIT:
        raise TrackingError(
            f"last_run_id: checkpoint document is {size} characters (limit {CHECKPOINT_DOCUMENT_LIMIT})"
        )
    return document


def parse_checkpoint_document(document: Any) -> date:
    """The next batch week from a checkpoint document (a dict, or its JSON text). TrackingError names the problem."""
    if isinstance(document, str | bytes):
        try:
            document = json.loads(document)
        except ValueError:
            raise TrackingError("checkpoint document: not valid JSON") from None
    if not isinstance(document, Mapping):
        raise TrackingError(f"checkpoint document: expected a JSON object, got {type(document).__name__}")
    if "next_week_start" not in document:
        raise TrackingError("checkpoint document.next_week_start: missing")
    value = document["next_week_start"]
    if not isinstance(value, str):
        raise TrackingError(f"checkpoint document.next_week_start: expected an ISO date string, got {value!r}")
    return _check_week(value, "checkpoint document.next_week_start")


def checkpoint_upsert_qmark(dialect_name: str, *, force: bool = False, merge: bool = False) -> tuple[str, list[str]]:
    """The checkpoint upsert as raw ``?``-placeholder SQL for a plain DB-API cursor (pyodbc), plus the order of its
    parameters (names from: pipeline, next_week_start, updated_at, last_run_id).

    ``dialect_name``: ``mssql`` (MERGE), ``postgresql`` or ``sqlite`` (ON CONFLICT; ``merge=True`` gives the MERGE
    form for PostgreSQL 15+).
    """
    names = ("pipeline", "next_week_start", "updated_at", "last_run_id")
    if dialect_name == "mssql":
        from sqlalchemy.dialects.mssql import pyodbc as mssql_pyodbc

        dialect: Dialect = mssql_pyodbc.dialect(paramstyle="qmark")
    elif dialect_name == "postgresql":
        dialect = pg_dialect.psycopg.dialect(paramstyle="qmark")
    elif dialect_name == "sqlite":
        dialect = sqlite_dialect.pysqlite.dialect(paramstyle="qmark")
    else:
        raise TrackingError(f"dialect_name: {dialect_name!r} is not one of mssql, postgresql, sqlite")
    if merge or dialect_name == "mssql":
        stmt: sa.Executable = checkpoint_merge_sql(dialect, force=force)
    else:
        stmt = checkpoint_upsert(dialect, {n: sa.bindparam(n, type_=pipeline_checkpoint.c[n].type) for n in names})
    compiled = stmt.compile(dialect=dialect)
    return str(compiled), list(compiled.positiontup or [])
