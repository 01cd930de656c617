"""Publish marts with change detection, in one transaction, then reconcile them against the source.

:func:`publish_marts` writes every mart frame in ONE transaction: each frame is COPY'd into a temp table, a
row hash (``md5`` of the row's text form, computed by PostgreSQL so it is stable across library versions) decides
insert / update / unchanged through one ``INSERT .. ON CONFLICT .. DO UPDATE WHERE row_hash IS DISTINCT FROM``,
and full (non-incremental) marts delete rows that are gone from the frame. Any error rolls the whole publish
back: the previous marts stay exactly as they were. The marts build watermark (raw ``_loaded_at``) is written in
the same transaction.

:func:`reconcile` compares row counts and revenue totals in the marts with the source tables (``raw`` by default:
the snapshot that was modelled; ``oltp`` when the source is quiet) and :func:`raise_on_mismatch` raises
:class:`~tasks.errors.ReconciliationError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import polars as pl
from sqlalchemy import Connection, Engine, text

from tasks.data_tests import DataTest, DataTestResult, raise_on_errors, record_history, run_data_tests
from tasks.errors import ConfigurationError, DataTestError, ReconciliationError
from tasks.warehouse_models import MARTS, MartBuild, MartSpec
from tasks.warehouse_source import copy_in

Logger = logging.Logger | logging.LoggerAdapter
MARTS_BUILD_SOURCE = "marts"


@dataclass
class PublishCounts:
    mart: str
    rows: int
    inserted: int
    updated: int
    unchanged: int
    deleted: int
    incremental: bool


def ensure_marts(conn: Connection, schema: str = "marts") -> None:
    """Create the marts schema and tables (columns per :data:`MARTS` + ``row_hash`` + ``_published_at``)."""
    conn.execute(text(f"create schema if not exists {schema}"))
    conn.execute(text("create schema if not exists meta"))
    for spec in MARTS.values():
        cols = ",\n  ".join(f"{c} {t}{' not null' if c == spec.pk else ''}" for c, t in spec.columns.items())
        conn.execute(
            text(
                f"create table if not exists {schema}.{spec.name} (\n  {cols},\n"
                "  row_hash text not null,\n  _published_at timestamptz not null default now(),\n"
                f"  primary key ({spec.pk})\n)"
            )
        )
    conn.execute(
        text(
            "create table if not exists meta.publish_log (\n"
            "  id bigserial primary key, run_id text not null, mart text not null, rows bigint not null,\n"
            "  inserted bigint not null, updated bigint not null, unchanged bigint not null, deleted bigint not null,\n"
            "  incremental boolean not null, published_at timestamptz not null default now())"
        )
    )
    conn.execute(
        text(
            "create table if not exists meta.watermarks (\n"
            "  source_name text not null, table_name text not null, watermark timestamptz,\n"
            "  rows_last_run bigint not null default 0, last_run_at timestamptz not null default now(),\n"
            "  primary key (source_name, table_name))"
        )
    )


def marts_built_through(conn: Connection) -> datetime | None:
    """The raw ``_loaded_at`` the last successful publish had modelled (None: never published)."""
    ensure_marts(conn)
    row = conn.execute(
        text("select watermark from meta.watermarks where source_name = :s and table_name = 'fct_sales'"),
        {"s": MARTS_BUILD_SOURCE},
    ).first()
    return row[0] if row else None


def _publish_one(conn: Connection, spec: MartSpec, frame: pl.DataFrame, *, full: bool, schema: str) -> PublishCounts:
    cols = list(spec.columns)
    if list(frame.columns) != cols:
        missing = sorted(set(cols) - set(frame.columns))
        extra = sorted(set(frame.columns) - set(cols))
        from tasks.errors import ConfigurationError

        raise ConfigurationError(
            f"{spec.name} columns", f"frame does not match the mart (missing {missing}, extra {extra})"
        )
    duplicated = frame.height - frame.get_column(spec.pk).n_unique()
    if duplicated:
        raise DataTestError([f"{spec.name}.{spec.pk} has {duplicated} duplicated key(s) at publish"])
    tmp = f"_pub_{spec.name}"
    target = f"{schema}.{spec.name}"
    conn.execute(text(f"drop table if exists {tmp}"))
    conn.execute(text(f"create temp table {tmp} as select {', '.join(cols)} from {target} with no data"))
    if frame.height:
        copy_in(conn, tmp, frame)
    non_pk = [c for c in cols if c != spec.pk]
    row = ", ".join(f"s.{c}" for c in cols)
    upsert = (
        f"insert into {target} as t ({', '.join(cols)}, row_hash, _published_at) "
        f"select {row}, md5(row({row})::text), now() from {tmp} s "
        f"on conflict ({spec.pk}) do update set "
        + ", ".join(f"{c} = excluded.{c}" for c in non_pk)
        + ", row_hash = excluded.row_hash, _published_at = excluded._published_at "
        "where t.row_hash is distinct from excluded.row_hash returning (xmax = 0) as inserted"
    )
    inserted, changed = conn.execute(
        text(f"with w as ({upsert}) select count(*) filter (where inserted), count(*) from w")
    ).one()
    deleted = 0
    if full:
        deleted = conn.execute(
            text(f"delete from {target} t where not exists (select 1 from {tmp} s where s.{spec.pk} = t.{spec.pk})")
        ).rowcount
    conn.execute(text(f"drop table {tmp}"))
    inserted, updated = int(inserted), int(changed) - int(inserted)
    return PublishCounts(
        mart=spec.name,
        rows=frame.height,
        inserted=inserted,
        updated=updated,
        unchanged=frame.height - inserted - updated,
        deleted=deleted,
        incremental=not full,
    )


def publish_marts(
    engine: Engine,
    frames: dict[str, pl.DataFrame],
    *,
    full: dict[str, bool] | None = None,
    run_id: str = "manual",
    built_through: datetime | None = None,
    schema: str = "marts",
    logger: Logger | None = None,
) -> dict[str, PublishCounts]:
    """Write all mart frames in ONE transaction with row-hash change detection; all or nothing."""
    log = logger or logging.getLogger(__name__)
    full = full or {}
    results: dict[str, PublishCounts] = {}
    with engine.begin() as conn:
        ensure_marts(conn, schema)
        for name, frame in frames.items():
            if name not in MARTS:
                raise ConfigurationError("mart", f"unknown mart {name!r}")
            results[name] = _publish_one(conn, MARTS[name], frame, full=full.get(name, True), schema=schema)
        conn.execute(
            text(
                "insert into meta.publish_log (run_id, mart, rows, inserted, updated, unchanged, deleted, incremental)"
                " values (:run_id, :mart, :rows, :inserted, :updated, :unchanged, :deleted, :incremental)"
            ),
            [{"run_id": run_id, **vars(c)} for c in results.values()],
        )
        if built_through is not None:
            conn.execute(
                text(
                    "insert into meta.watermarks (source_name, table_name, watermark, rows_last_run, last_run_at) "
                    "values (:s, 'fct_sales', :w, :n, now()) on conflict (source_name, table_name) do update set "
                    "watermark = greatest(meta.watermarks.watermark, excluded.watermark), "
                    "rows_last_run = excluded.rows_last_run, last_run_at = now()"
                ),
                {"s": MARTS_BUILD_SOURCE, "w": built_through, "n": frames.get("fct_sales", pl.DataFrame()).height},
            )
    for c in results.values():
        log.info(
            "published %s.%s: rows=%d inserted=%d updated=%d unchanged=%d deleted=%d%s",
            schema,
            c.mart,
            c.rows,
            c.inserted,
            c.updated,
            c.unchanged,
            c.deleted,
            " (incremental)" if c.incremental else "",
        )
    return results


# --- reconciliation -----------------------------------------------------------------------------------


@dataclass
class ReconCheck:
    check: str
    source: float
    marts: float
    ok: bool

    @property
    def difference(self) -> float:
        return round(self.marts - self.source, 2)


def reconcile(
    conn: Connection,
    *,
    source_schema: str = "raw",
    marts_schema: str = "marts",
    tolerance: float = 0.0,
    logger: Logger | None = None,
) -> list[ReconCheck]:
    """Row counts of every mart and revenue totals of both facts vs the source tables (set-based SQL)."""
    log = logger or logging.getLogger(__name__)
    s, m = source_schema, marts_schema
    pairs = {
        "rows dim_customers": (f"select count(*) from {s}.customers", f"select count(*) from {m}.dim_customers"),
        "rows dim_products": (f"select count(*) from {s}.products", f"select count(*) from {m}.dim_products"),
        "rows fct_orders": (f"select count(*) from {s}.orders", f"select count(*) from {m}.fct_orders"),
        "rows fct_sales": (f"select count(*) from {s}.order_items", f"select count(*) from {m}.fct_sales"),
        "revenue fct_sales": (
            f"select coalesce(sum(round(quantity * unit_price, 2)), 0) from {s}.order_items",
            f"select coalesce(sum(amount), 0) from {m}.fct_sales",
        ),
        "revenue fct_orders": (
            f"select coalesce(sum(round(i.quantity * i.unit_price, 2)), 0) from {s}.order_items i "
            f"join {s}.orders o using (order_id)",
            f"select coalesce(sum(order_total), 0) from {m}.fct_orders",
        ),
    }
    select = ", ".join(f"({src}), ({mart})" for src, mart in pairs.values())
    values = conn.execute(text(f"select {select}")).one()
    checks = []
    for i, name in enumerate(pairs):
        src, mart = float(values[2 * i]), float(values[2 * i + 1])
        checks.append(ReconCheck(check=name, source=src, marts=mart, ok=abs(src - mart) <= tolerance))
    for c in checks:
        (log.info if c.ok else log.error)(
            "reconcile %s: source=%s marts=%s%s", c.check, c.source, c.marts, "" if c.ok else " MISMATCH"
        )
    return checks


def raise_on_mismatch(checks: list[ReconCheck]) -> None:
    bad = [f"{c.check}: source {c.source:g} vs marts {c.marts:g}" for c in checks if not c.ok]
    if bad:
        raise ReconciliationError(bad)


def check_and_publish(
    engine: Engine,
    build: MartBuild,
    tests: list[DataTest],
    *,
    run_id: str,
    now: datetime | None = None,
    schema: str = "marts",
    logger: Logger | None = None,
) -> tuple[list[DataTestResult], dict[str, PublishCounts]]:
    """Run the data tests on the frames, append ALL results to the history (committed on its own), then publish.

    Raises :class:`~tasks.errors.DataTestError` before touching the marts when any test fails at error level.
    """
    results = run_data_tests(build.frames, tests, run_id=run_id, now=now, logger=logger)
    with engine.begin() as conn:
        record_history(conn, results)
    raise_on_errors(results)
    counts = publish_marts(
        engine,
        build.frames,
        full=build.full,
        run_id=run_id,
        built_through=build.loaded_through,
        schema=schema,
        logger=logger,
    )
    return results, counts
