"""Warehouse flow: OLTP -> raw (incremental) -> staging/intermediate/marts (Polars) -> data tests -> publish.

    python -m flows.warehouse --date 2024-01-20 --full-refresh --env dev

Configuration (blocks, per environment ``<env>``):

* ``warehouse-settings-<env>`` (:class:`blocks.WarehouseSettings`; defaults when not saved),
* ``warehouse-database-<env>`` (prefect-sqlalchemy ``SqlAlchemyConnector``; or the block the settings name).
  Dev fallback when it is not saved: the ``WAREHOUSE_DATABASE_URL`` environment variable.
* optional Slack (Prefect ``SlackWebhook``) and e-mail (:class:`blocks.SmtpAlertServer`) blocks named in the
  settings receive throttled alerts on failure and on warn-level data tests.

Order: extract/load each source table into ``raw`` (watermark + overlap, one transaction per table) -> build
marts (``fct_sales`` incremental from what raw received since the last publish; everything on
``--full-refresh``) -> run data tests (results to ``meta.data_test_history`` and a table artifact) -> raise on
an error-level failure with the marts untouched -> publish all marts in one transaction -> reconcile.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.blocks.notifications import SlackWebhook
from prefect.cache_policies import NONE
from prefect.context import get_run_context

from blocks import SmtpAlertServer, SqlAlchemyConnector, WarehouseSettings
from flows.runtime import load_block
from tasks.alerts import Alerter, SqlThrottleStore, email_sink, slack_sink
from tasks.data_tests import DataTestResult, raise_on_errors, record_history, results_table, run_data_tests
from tasks.errors import ConfigurationError, DataTestError, is_retryable
from tasks.warehouse_models import MartBuild, ModelSettings, build_marts, read_raw, warehouse_tests
from tasks.warehouse_publish import (
    PublishCounts,
    ReconCheck,
    marts_built_through,
    publish_marts,
    raise_on_mismatch,
    reconcile,
)
from tasks.warehouse_source import TABLES, RawLoadResult, SourceSize, generate_oltp, load_oltp, sync_table

SETTINGS_BLOCK = "warehouse-settings"
DATABASE_BLOCK = "warehouse-database"
ENV_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


def _engine(block_name: str, *, fallback_env: str | None = None) -> sa.Engine:
    connector = load_block(SqlAlchemyConnector, block_name)
    if connector is not None:
        return connector.get_engine()
    url = os.environ.get(fallback_env) if fallback_env else None
    if url:
        return sa.create_engine(url)
    raise ConfigurationError(block_name, "no SqlAlchemyConnector block saved under this name (and no fallback)")


def _secrets(engine: sa.Engine, *values: str | None) -> list[str]:
    password = engine.url.password
    return [v for v in (str(password) if password else None, *values) if v]


def _alerter(settings: WarehouseSettings, engine: sa.Engine) -> Alerter:
    sinks = []
    secrets: list[str | None] = []
    if settings.slack_block:
        slack = SlackWebhook.load(settings.slack_block)
        url = slack.url.get_secret_value()
        sinks.append(slack_sink(url))
        secrets.append(url)
    if settings.smtp_block:
        smtp = SmtpAlertServer.load(settings.smtp_block)
        sinks.append(email_sink(**smtp.email_kwargs()))
        secrets.append(smtp.password.get_secret_value() if smtp.password else None)
    return Alerter(
        sinks,
        window_seconds=settings.alert_window_minutes * 60,
        store=SqlThrottleStore(engine),
        secrets=_secrets(engine, *secrets),
        logger=get_run_logger(),
    )


# --- tasks ---------------------------------------------------------------------------------------------


@task(name="seed-sample-source", cache_policy=NONE)
def seed_source(engine: sa.Engine, order_items: int, as_of: datetime, schema: str) -> dict[str, int]:
    """Dev: create and fill the sample OLTP schema when it has no order items yet."""
    with engine.connect() as conn:
        exists = conn.execute(sa.text("select to_regclass(:t)"), {"t": f"{schema}.order_items"}).scalar()
        if exists and conn.execute(sa.text(f"select exists (select 1 from {schema}.order_items)")).scalar():
            return {}
    return load_oltp(engine, generate_oltp(SourceSize.for_items(order_items), as_of=as_of), schema=schema)


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what the errors module calls transient (a lost connection, not bad data)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - inspecting the failure
        return is_retryable(exc)
    return False


@task(name="extract-load-raw", cache_policy=NONE, retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_transient)
def extract_load(
    engine: sa.Engine, source_engine: sa.Engine, table: str, settings: WarehouseSettings, full_refresh: bool
) -> RawLoadResult:
    return sync_table(
        engine,
        TABLES[table],
        source_engine=source_engine,
        source_schema=settings.source_schema,
        raw_schema=settings.raw_schema,
        overlap=timedelta(minutes=settings.overlap_minutes),
        full_refresh=full_refresh,
        logger=get_run_logger(),
    )


@task(name="build-marts", cache_policy=NONE)
def build(engine: sa.Engine, settings: WarehouseSettings, as_of: datetime, full_refresh: bool) -> MartBuild:
    with engine.connect() as conn:
        since = None if full_refresh else marts_built_through(conn)
        raw = read_raw(conn, settings.raw_schema)
    return build_marts(
        raw,
        as_of=as_of,
        sales_since=since,
        settings=ModelSettings(budget_below=settings.budget_below, premium_from=settings.premium_from),
        logger=get_run_logger(),
    )


@task(name="data-tests", cache_policy=NONE)
def data_tests(
    engine: sa.Engine, mart_build: MartBuild, settings: WarehouseSettings, run_id: str, now: datetime, env: str
) -> list[DataTestResult]:
    tests = warehouse_tests(
        fresh_warn=timedelta(hours=settings.freshness_warn_hours),
        fresh_error=timedelta(hours=settings.freshness_error_hours),
    )
    results = run_data_tests(mart_build.frames, tests, run_id=run_id, now=now, logger=get_run_logger())
    with engine.begin() as conn:
        record_history(conn, results)
    counts = {s: sum(1 for r in results if r.status == s) for s in ("pass", "warn", "error")}
    create_table_artifact(
        key=f"warehouse-data-tests-{env}",
        table=results_table(results),
        description=f"Warehouse data tests, run {run_id}: {counts['pass']} pass, {counts['warn']} warn, "
        f"{counts['error']} error",
    )
    return results


@task(name="publish-marts", cache_policy=NONE)
def publish(
    engine: sa.Engine, mart_build: MartBuild, settings: WarehouseSettings, run_id: str
) -> dict[str, PublishCounts]:
    return publish_marts(
        engine,
        mart_build.frames,
        full=mart_build.full,
        run_id=run_id,
        built_through=mart_build.loaded_through,
        schema=settings.marts_schema,
        logger=get_run_logger(),
    )


@task(name="reconcile", cache_policy=NONE)
def reconcile_marts(engine: sa.Engine, settings: WarehouseSettings, same_database: bool) -> list[ReconCheck]:
    source = settings.source_schema if settings.reconcile_against == "source" and same_database else settings.raw_schema
    with engine.connect() as conn:
        return reconcile(
            conn,
            source_schema=source,
            marts_schema=settings.marts_schema,
            tolerance=settings.reconcile_tolerance,
            logger=get_run_logger(),
        )


# --- flow --------------------------------------------------------------------------------------------------


def _as_of(run_date: date | None) -> datetime:
    if run_date is None:
        return datetime.now(UTC)
    return datetime.combine(run_date, time.max, tzinfo=UTC).replace(microsecond=0)


def _run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # noqa: BLE001 - outside a flow run (never in practice)
        return uuid.uuid4().hex


@flow(
    name="warehouse",
    description="OLTP -> raw -> staging -> marts with data tests, reconciliation and alerts.",
    timeout_seconds=4 * 3600,
)
def warehouse(
    run_date: date | None = None,
    full_refresh: bool = False,
    env: str = "dev",
    settings_block: str | None = None,
) -> dict[str, Any]:
    """One warehouse run. ``run_date``: the logical date (RFM recency and freshness are measured at its end;
    default: now). ``full_refresh``: reload every raw table and rebuild every mart. ``env`` picks the blocks.
    """
    log = get_run_logger()
    if not ENV_RE.match(env):
        raise ConfigurationError("env", "lowercase letters, digits and dashes only (it is part of block names)")
    settings = load_block(WarehouseSettings, settings_block or f"{SETTINGS_BLOCK}-{env}") or WarehouseSettings()
    db_block = settings.database_block or f"{DATABASE_BLOCK}-{env}"
    engine = _engine(db_block, fallback_env="WAREHOUSE_DATABASE_URL")
    source_engine = _engine(settings.source_database_block) if settings.source_database_block else engine
    alerter = _alerter(settings, engine)
    run_id = _run_id()
    as_of = _as_of(run_date)
    key = f"warehouse-{env}"
    try:
        if settings.seed_order_items:
            seeded = seed_source(source_engine, settings.seed_order_items, as_of, settings.source_schema)
            if seeded:
                log.info("seeded sample source: %s", seeded)
        loads = [extract_load(engine, source_engine, t, settings, full_refresh) for t in TABLES]
        mart_build = build(engine, settings, as_of, full_refresh)
        results = data_tests(engine, mart_build, settings, run_id, as_of, env)
        warned = [r for r in results if r.status == "warn"]
        if settings.alert_on_warn:
            for r in warned:
                alerter.alert(
                    f"{key}:warn:{r.test_name}", f"[{env}] warehouse data test warning: {r.test_name}", r.message
                )
        raise_on_errors(results)
        counts = publish(engine, mart_build, settings, run_id)
        checks = reconcile_marts(engine, settings, source_engine is engine)
        create_markdown_artifact(
            key=f"warehouse-publish-{env}",
            markdown=_summary_markdown(run_id, loads, counts, checks),
            description="Warehouse publish counts and reconciliation",
        )
        raise_on_mismatch(checks)
    except Exception as exc:
        kind = "data-tests" if isinstance(exc, DataTestError) else type(exc).__name__.lower()
        alerter.alert(f"{key}:failed:{kind}", f"[{env}] warehouse run failed: {type(exc).__name__}", str(exc))
        raise
    finally:
        if source_engine is not engine:
            source_engine.dispose()
        engine.dispose()
    return {
        "run_id": run_id,
        "raw": {r.table: {"inserted": r.inserted, "updated": r.updated, "unchanged": r.unchanged} for r in loads},
        "marts": {m: vars(c) for m, c in counts.items()},
        "tests": {s: sum(1 for r in results if r.status == s) for s in ("pass", "warn", "error")},
        "reconciliation": {c.check: c.ok for c in checks},
    }


def _summary_markdown(
    run_id: str, loads: list[RawLoadResult], counts: dict[str, PublishCounts], checks: list[ReconCheck]
) -> str:
    lines = [f"# Warehouse run {run_id}", "", "| raw table | extracted | inserted | updated | unchanged | watermark |"]
    lines.append("|---|---|---|---|---|---|")
    for r in loads:
        wm = r.watermark_after.isoformat() if r.watermark_after else ""
        lines.append(f"| {r.table} | {r.extracted} | {r.inserted} | {r.updated} | {r.unchanged} | {wm} |")
    lines += [
        "",
        "| mart | rows | inserted | updated | unchanged | deleted | incremental |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in counts.values():
        lines.append(
            f"| {c.mart} | {c.rows} | {c.inserted} | {c.updated} | {c.unchanged} | {c.deleted} | {c.incremental} |"
        )
    lines += ["", "| reconciliation | source | marts | ok |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.check} | {c.source:g} | {c.marts:g} | {'yes' if c.ok else '**NO**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.warehouse",
        description="Warehouse flow: copy the OLTP source incrementally into raw, model staging/intermediate/marts "
        "in Polars, run data tests, publish the marts in one transaction and reconcile them with the source.",
        epilog="Blocks: warehouse-settings-<env> (WarehouseSettings), warehouse-database-<env> "
        "(SqlAlchemyConnector; dev fallback: WAREHOUSE_DATABASE_URL). Exit code 0 on success, 1 on failure.",
    )
    parser.add_argument(
        "--date",
        type=date.fromisoformat,
        default=None,
        help="logical run date YYYY-MM-DD: RFM recency and freshness are measured at its end (default: now)",
    )
    parser.add_argument(
        "--full-refresh", action="store_true", help="reload every raw table from scratch and rebuild every mart"
    )
    parser.add_argument("--env", default="dev", help="environment name used in block names (default: dev)")
    parser.add_argument("--settings-block", default=None, help="WarehouseSettings block name (default: per --env)")
    args = parser.parse_args(argv)
    if not ENV_RE.match(args.env):
        parser.error("--env: lowercase letters, digits and dashes only")
    try:
        summary = warehouse(
            run_date=args.date, full_refresh=args.full_refresh, env=args.env, settings_block=args.settings_block
        )
    except Exception as exc:  # noqa: BLE001 - the CLI reports and exits non-zero
        print(f"warehouse run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
