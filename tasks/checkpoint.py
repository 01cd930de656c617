"""The DB-first checkpoint of a pipeline: the next batch week to process, in ``pipeline_checkpoint``.

The database row is the source of truth; the weekly flow mirrors it into a Prefect Variable
(:func:`checkpoint_document` / :func:`parse_checkpoint_document`). :func:`checkpoint_after_week` moves it across
committed weeks only, in order (it reads the successful runs of :mod:`tasks.tracking` in the same transaction);
:func:`advance_checkpoint` is the plain monotonic upsert underneath (``force`` for an operator). The upsert is
compiled per dialect: ``INSERT ... ON CONFLICT`` on PostgreSQL and SQLite, ``MERGE`` on SQL Server / Azure SQL,
and as qmark text for pyodbc. Like the run-tracking writes, every write is idempotent, so a queued write
(:mod:`tasks.pending`) can be replayed. The tables are created by :func:`tasks.tracking.ensure_schema`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Dialect, Engine

from tasks.errors import TrackingError
from tasks.sql import run_in_transaction
from tasks.tracking import (
    _as_date,
    _check_pipeline,
    _check_week,
    _now,
    _success_only,
    _utc,
    pipeline_checkpoint,
    pipeline_run,
)

_LOG = logging.getLogger(__name__)
Logger = logging.Logger | logging.LoggerAdapter

CHECKPOINT_DOCUMENT_LIMIT = 5000


@dataclass(frozen=True)
class Checkpoint:
    pipeline: str
    next_week_start: date
    updated_at: datetime
    last_run_id: str | None


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
