"""Declarative, dbt-style data tests over Polars frames, run before publishing.

A :class:`DataTest` names a model (a frame), a kind and its arguments, and two thresholds::

    DataTest(model="fct_sales", kind="relationships", column="order_id",
             to_model="fct_orders", to_column="order_id", warn_if=">0", error_if=">5%")

Kinds: ``unique``, ``not_null``, ``relationships`` (every non-null value exists in ``to_model.to_column``),
``accepted_values`` (``values``), ``freshness`` (newest ``column`` is at most ``warn_after``/``error_after`` old
relative to ``now``). Thresholds compare the number of failing rows, as a count (``">0"``, ``">=10"``) or a
percentage of the model's rows (``">5%"``); ``None`` disables that level. Freshness uses its durations instead.

:func:`run_data_tests` returns one :class:`DataTestResult` per test (pass / warn / error);
:func:`record_history` appends them to ``meta.data_test_history``; :func:`raise_on_errors` raises
:class:`~tasks.errors.DataTestError` when any test failed at error level.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import Connection, text

from tasks.errors import ConfigurationError, DataTestError

Logger = logging.Logger | logging.LoggerAdapter
Kind = Literal["unique", "not_null", "relationships", "accepted_values", "freshness"]
Status = Literal["pass", "warn", "error"]
_THRESHOLD = re.compile(r"^\s*(>=|>)\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


class Threshold(BaseModel):
    """``>N``, ``>=N`` (failing rows) or ``>N%`` (failing share of rows)."""

    model_config = ConfigDict(frozen=True)
    op: Literal[">", ">="]
    value: float
    percent: bool

    @classmethod
    def parse(cls, spec: str) -> Threshold:
        match = _THRESHOLD.match(spec)
        if not match:
            raise ValueError(f"threshold {spec!r} must look like '>0', '>=10' or '>5%'")
        return cls(op=match.group(1), value=float(match.group(2)), percent=bool(match.group(3)))

    def breached(self, failures: int, rows: int) -> bool:
        measured = (100.0 * failures / rows if rows else 0.0) if self.percent else float(failures)
        return measured > self.value if self.op == ">" else measured >= self.value

    def __str__(self) -> str:
        number = f"{self.value:g}"
        return f"{self.op}{number}{'%' if self.percent else ''}"


class DataTest(BaseModel):
    """One declarative test. ``name`` defaults to ``<kind>_<model>_<column>``."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="Name of the frame (model) under test.")
    kind: Kind
    column: str = Field(description="Column under test (freshness: the timestamp column).")
    to_model: str | None = Field(default=None, description="relationships: the parent model.")
    to_column: str | None = Field(default=None, description="relationships: the parent key column.")
    values: tuple[str, ...] | None = Field(default=None, description="accepted_values: the allowed values.")
    warn_if: str | None = Field(default=">0", description="Threshold for a warning (None: never warn).")
    error_if: str | None = Field(default=">0", description="Threshold for an error (None: never error).")
    warn_after: timedelta | None = Field(default=None, description="freshness: warn when older than this.")
    error_after: timedelta | None = Field(default=None, description="freshness: error when older than this.")
    name: str = ""

    @field_validator("warn_if", "error_if")
    @classmethod
    def _valid_threshold(cls, value: str | None) -> str | None:
        if value is not None:
            Threshold.parse(value)
        return value

    @model_validator(mode="after")
    def _complete(self) -> DataTest:
        if self.kind == "relationships" and not (self.to_model and self.to_column):
            raise ValueError(f"{self.model}.{self.column}: relationships needs to_model and to_column")
        if self.kind == "accepted_values" and not self.values:
            raise ValueError(f"{self.model}.{self.column}: accepted_values needs values")
        if self.kind == "freshness" and self.warn_after is None and self.error_after is None:
            raise ValueError(f"{self.model}.{self.column}: freshness needs warn_after and/or error_after")
        if not self.name:
            object.__setattr__(self, "name", f"{self.kind}_{self.model}_{self.column}")
        return self


class DataTestResult(BaseModel):
    """The outcome of one test in one run."""

    run_id: str
    test_name: str
    model: str
    kind: str
    column: str
    status: Status
    failures: int
    rows: int
    failure_pct: float
    warn_if: str | None
    error_if: str | None
    message: str
    tested_at: datetime


def _failures(test: DataTest, frames: dict[str, pl.DataFrame], now: datetime) -> tuple[int, str]:
    frame = frames[test.model]
    col = pl.col(test.column)
    if test.kind == "unique":
        n = frame.select(col.is_duplicated() & col.is_not_null()).to_series().sum()
        return int(n), f"{n} row(s) share a {test.column} value"
    if test.kind == "not_null":
        n = frame.get_column(test.column).null_count()
        return int(n), f"{n} row(s) with null {test.column}"
    if test.kind == "accepted_values":
        allowed = pl.Series(list(test.values or ()), dtype=pl.String)
        bad = frame.filter(col.is_not_null() & ~col.cast(pl.String).is_in(allowed.implode()))
        sample = bad.get_column(test.column).unique().head(5).to_list()
        return bad.height, f"{bad.height} row(s) outside the accepted values" + (f", e.g. {sample}" if sample else "")
    if test.kind == "relationships":
        if test.to_model not in frames:
            raise ConfigurationError("to_model", f"{test.name}: model {test.to_model!r} is not among the frames")
        parent = frames[test.to_model].get_column(test.to_column).drop_nulls().unique()
        bad = frame.filter(col.is_not_null() & ~col.is_in(parent.implode()))
        return bad.height, f"{bad.height} row(s) whose {test.column} is not in {test.to_model}.{test.to_column}"
    # freshness
    newest = frame.get_column(test.column).max()
    if newest is None:
        return 1, f"{test.model} has no {test.column} value"
    if isinstance(newest, datetime) and newest.tzinfo is None:
        newest = newest.replace(tzinfo=UTC)
    age = now - newest
    return 0, f"newest {test.column} is {age.total_seconds() / 3600:.1f} h old"


def _freshness_status(test: DataTest, frames: dict[str, pl.DataFrame], now: datetime) -> Status:
    newest = frames[test.model].get_column(test.column).max()
    if newest is None:
        return "error" if test.error_after is not None else "warn"
    if newest.tzinfo is None:
        newest = newest.replace(tzinfo=UTC)
    age = now - newest
    if test.error_after is not None and age > test.error_after:
        return "error"
    if test.warn_after is not None and age > test.warn_after:
        return "warn"
    return "pass"


def run_data_tests(
    frames: dict[str, pl.DataFrame],
    tests: list[DataTest],
    *,
    run_id: str,
    now: datetime | None = None,
    logger: Logger | None = None,
) -> list[DataTestResult]:
    """Run every test on the frames; never raises for a failing test (see :func:`raise_on_errors`)."""
    log = logger or logging.getLogger(__name__)
    now = (now or datetime.now(UTC)).astimezone(UTC)
    results = []
    for test in tests:
        if test.model not in frames:
            raise ConfigurationError("model", f"{test.name}: model {test.model!r} is not among the frames")
        frame = frames[test.model]
        if test.column not in frame.columns:
            raise ConfigurationError("column", f"{test.name}: {test.model} has no column {test.column!r}")
        failures, message = _failures(test, frames, now)
        rows = frame.height
        if test.kind == "freshness":
            status = _freshness_status(test, frames, now)
            failures = 0 if status == "pass" else 1
        elif test.error_if is not None and Threshold.parse(test.error_if).breached(failures, rows):
            status = "error"
        elif test.warn_if is not None and Threshold.parse(test.warn_if).breached(failures, rows):
            status = "warn"
        else:
            status = "pass"
        result = DataTestResult(
            run_id=run_id,
            test_name=test.name,
            model=test.model,
            kind=test.kind,
            column=test.column,
            status=status,
            failures=failures,
            rows=rows,
            failure_pct=round(100.0 * failures / rows, 4) if rows else 0.0,
            warn_if=test.warn_if if test.kind != "freshness" else _fmt_td(test.warn_after),
            error_if=test.error_if if test.kind != "freshness" else _fmt_td(test.error_after),
            message=message,
            tested_at=now,
        )
        results.append(result)
        level = {"pass": logging.DEBUG, "warn": logging.WARNING, "error": logging.ERROR}[status]
        log.log(level, "data test %s: %s (%s)", test.name, status.upper(), message)
    counts = {s: sum(1 for r in results if r.status == s) for s in ("pass", "warn", "error")}
    log.info("data tests: %d passed, %d warned, %d errored", counts["pass"], counts["warn"], counts["error"])
    return results


def _fmt_td(value: timedelta | None) -> str | None:
    return None if value is None else f">{value.total_seconds() / 3600:g}h"


def raise_on_errors(results: list[DataTestResult]) -> None:
    failed = [f"{r.test_name} ({r.failures} of {r.rows})" for r in results if r.status == "error"]
    if failed:
        raise DataTestError(failed)


def warnings_of(results: list[DataTestResult]) -> list[DataTestResult]:
    return [r for r in results if r.status == "warn"]


def results_frame(results: list[DataTestResult]) -> pl.DataFrame:
    schema = {name: pl.String for name in DataTestResult.model_fields}
    schema |= {"failures": pl.Int64, "rows": pl.Int64, "failure_pct": pl.Float64, "tested_at": pl.Datetime("us", "UTC")}
    return pl.DataFrame([r.model_dump() for r in results], schema=schema)


def results_table(results: list[DataTestResult]) -> list[dict]:
    """Rows for a Prefect table artifact (timestamps as ISO strings)."""
    return [r.model_dump(mode="json") | {"tested_at": r.tested_at.isoformat()} for r in results]


HISTORY_DDL = """
create table if not exists meta.data_test_history (
  id bigserial primary key,
  run_id text not null,
  test_name text not null,
  model text not null,
  kind text not null,
  column_name text not null,
  status text not null check (status in ('pass', 'warn', 'error')),
  failures bigint not null,
  rows bigint not null,
  failure_pct double precision not null,
  warn_if text,
  error_if text,
  message text not null,
  tested_at timestamptz not null
)"""


def record_history(conn: Connection, results: list[DataTestResult]) -> int:
    """Append every result (passing ones too) to ``meta.data_test_history``. Returns rows written."""
    conn.execute(text("create schema if not exists meta"))
    conn.execute(text(HISTORY_DDL))
    if not results:
        return 0
    conn.execute(
        text(
            "insert into meta.data_test_history (run_id, test_name, model, kind, column_name, status, failures, "
            "rows, failure_pct, warn_if, error_if, message, tested_at) values (:run_id, :test_name, :model, :kind, "
            ":column, :status, :failures, :rows, :failure_pct, :warn_if, :error_if, :message, :tested_at)"
        ),
        [r.model_dump() for r in results],
    )
    return len(results)
