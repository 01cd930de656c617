"""Run tracking (runs and stages) and the tracking schema; the DB-first checkpoint's operations are in
:mod:`tasks.checkpoint`.

Tables (created idempotently by :func:`ensure_schema`, SQLAlchemy Core, portable across SQLite, PostgreSQL and
SQL Server / Azure SQL):

* ``pipeline_checkpoint``: one row per pipeline, the next batch week to process (source of truth): the first
  week not committed yet (its operations: :mod:`tasks.checkpoint`).
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

import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from tasks.errors import DuplicateRunError, TrackingError
from tasks.models import RunStatus
from tasks.sql import run_in_transaction, safe_text

_LOG = logging.getLogger(__name__)
Logger = logging.Logger | logging.LoggerAdapter

FAILURE_REASON_LIMIT = 2000
DETAIL_LIMIT = 2000
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
