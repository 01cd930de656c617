"""Ingestion flow: HTTP API / CSV / RSS-Atom sources -> raw JSONB tables -> ``normalized_data`` in PostgreSQL.

Run with ``python -m flows.ingest --help``. Each source is one Prefect task; inside it every batch commits its raw
rows, normalized upserts, rejects and the source's checkpoint in ONE transaction, so a failure resumes from the
last committed batch. Every run is recorded in ``etl_runs`` (status, per-source counts, duration, failure
reason). Schema drift is recorded, published as a Prefect artifact and a Prefect event; per source it fails the
source or is accepted. Sources are independent: one failing source does not stop the others, but fails the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.blocks.core import Block
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.events import emit_event
from prefect_sqlalchemy import SqlAlchemyConnector
from pydantic import BaseModel, Field
from sqlalchemy import Engine

from blocks.ingest import ApiIngestSource, CsvIngestSource, IngestSettings, RssIngestSource
from tasks.errors import ConfigurationError, is_retryable, redact_text, redact_url
from tasks.ingest_db import SchemaDiff, ensure_schema, finish_run, start_run
from tasks.ingest_sources import (
    SourceOutcome,
    ingest_batches,
    next_api_window,
    read_api_batches,
    read_csv_batches,
    read_feed_batches,
)
from tasks.lake import LakeFS

DATABASE_BLOCK = "ingest-database"
SETTINGS_BLOCK = "ingest-settings"
IngestSource = CsvIngestSource | RssIngestSource | ApiIngestSource


class SourceResult(BaseModel):
    source: str
    kind: str
    status: str
    counts: dict[str, int] = Field(default_factory=dict)
    batches: int = 0
    drift: str | None = None
    error: str | None = None


class IngestSummary(BaseModel):
    run_id: str
    status: str
    sources: list[SourceResult] = Field(default_factory=list)
    duration_seconds: float = 0.0


def _artifact_key(*parts: str) -> str:
    key = "-".join(parts).lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in key)[:100]


def publish_drift(source: str, diff: SchemaDiff, policy: str, run_id: str) -> None:
    """Markdown + table artifact and a Prefect event describing one source's schema drift."""
    rows = [{"field": k, "change": "added", "before": "", "after": v} for k, v in sorted(diff.added.items())]
    rows += [{"field": k, "change": "removed", "before": v, "after": ""} for k, v in sorted(diff.removed.items())]
    rows += [{"field": k, "change": "changed", "before": a, "after": b} for k, (a, b) in sorted(diff.changed.items())]
    action = "the source FAILS (drift_policy=fail)" if policy == "fail" else "accepted (drift_policy=accept)"
    table = "\n".join(f"| `{r['field']}` | {r['change']} | {r['before']} | {r['after']} |" for r in rows)
    create_markdown_artifact(
        key=_artifact_key("ingest-drift", source),
        markdown=f"## Schema drift in `{source}`\n\nRun `{run_id}`: {action}.\n\n"
        f"| field | change | before | after |\n|---|---|---|---|\n{table}\n",
        description=f"Schema drift in {source}",
    )
    create_table_artifact(key=_artifact_key("ingest-drift-table", source), table=rows, description=diff.summary())
    emit_event(
        event="ingest.schema.drift",
        resource={"prefect.resource.id": f"ingest.source.{source}", "prefect.resource.name": source},
        payload={
            "run_id": run_id,
            "policy": policy,
            "added": diff.added,
            "removed": diff.removed,
            "changed": {k: list(v) for k, v in diff.changed.items()},
        },
    )


def _retry_retryable(task_: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - deciding on the failure's type
        return is_retryable(exc)
    return False


@task(
    name="ingest-source",
    task_run_name="ingest-{source.name}",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_retryable,
    cache_policy=NO_CACHE,
)
def ingest_source(
    source: IngestSource, engine: Engine, run_id: str, settings: IngestSettings, today: date
) -> SourceOutcome:
    """One source, batch by batch (checkpointed); retried only on RetryableError, resuming from the checkpoint."""
    logger = get_run_logger()

    def on_drift(name: str, diff: SchemaDiff, policy: str) -> None:
        publish_drift(name, diff, policy, run_id)

    common: dict[str, Any] = {
        "source": source.name,
        "field_map": source.field_map,
        "run_id": run_id,
        "drift_policy": source.drift_policy,
        "reject_threshold_pct": settings.reject_threshold_pct,
        "on_drift": on_drift,
        "logger": logger,
    }
    if isinstance(source, CsvIngestSource):
        token = source.secret.get_secret_value() if source.secret else None

        def csv_batches(cp: Any):
            line, fingerprint = 0, None
            if cp is not None and cp.cursor.get("location") == redact_url(source.location):
                line, fingerprint = int(cp.cursor.get("line", 0)), cp.cursor.get("fingerprint")
            return read_csv_batches(
                source.location,
                fingerprint=fingerprint,
                batch_size=source.batch_size,
                encoding=source.encoding,
                delimiter=source.delimiter,
                start_after_line=line,
                timeout=source.timeout_seconds,
                token=token,
                logger=logger,
            )

        return ingest_batches(engine, kind="csv", make_batches=csv_batches, **common)
    if isinstance(source, RssIngestSource):
        token = source.secret.get_secret_value() if source.secret else None

        def feed_batches(cp: Any):
            return read_feed_batches(
                source.location,
                batch_size=source.batch_size,
                since=cp.last_modified if cp else None,
                etag=cp.cursor.get("etag") if cp else None,
                max_bytes=source.max_bytes,
                timeout=source.timeout_seconds,
                token=token,
                logger=logger,
            )

        return ingest_batches(engine, kind="rss", make_batches=feed_batches, **common)
    if isinstance(source, ApiIngestSource):
        lake = _lake(settings)

        def api_batches(cp: Any):
            cursor = cp.cursor if cp else None
            window = next_api_window(cursor, source.first_date, today)
            if window is None:
                return iter(())
            resume = cursor and not cursor.get("complete", True) and cursor.get("window_start") == window.label
            prefix = f"{settings.staging_prefix}/{source.name}/{window.start}_{window.end}"
            return read_api_batches(
                source.api, window, lake, prefix, parts_done=int(cursor["parts_done"]) if resume else 0, logger=logger
            )

        return ingest_batches(engine, kind="api", make_batches=api_batches, **common)
    raise ConfigurationError("sources", f"unsupported source block {type(source).__name__}")


def _lake(settings: IngestSettings) -> LakeFS:
    if settings.lake is not None:
        return LakeFS(settings.lake.base_url, settings.lake.storage_options())
    return LakeFS(Path(tempfile.gettempdir(), "ingest-lake").resolve().as_uri())


def _run_id() -> str:
    try:
        ctx = get_run_context()
        return str(ctx.flow_run.id)  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - outside a flow run there is no id
        return uuid.uuid4().hex


def _load(value: Any, cls: type[Block], what: str) -> Any:
    if isinstance(value, str):
        loaded = Block.load(value) if "/" in value else cls.load(value)
        if cls is not Block and not isinstance(loaded, cls):
            raise ConfigurationError(what, f"block {value!r} is a {type(loaded).__name__}, not a {cls.__name__}")
        return loaded
    return value


@flow(name="ingest", validate_parameters=False)
def ingest_flow(
    sources: list[Any],
    database: Any = DATABASE_BLOCK,
    settings: Any = None,
    today: date | None = None,
) -> IngestSummary:
    """Ingest every source into PostgreSQL.

    ``sources``: source blocks, or block document references ``"ingest-csv-source/orders"``.
    ``database``: a prefect-sqlalchemy ``SqlAlchemyConnector`` (or its block name).
    ``settings``: an ``IngestSettings`` block (or its name); defaults apply when omitted.
    """
    logger = get_run_logger()
    blocks = [_load(s, Block, "sources") for s in sources]
    for block in blocks:
        if not isinstance(block, CsvIngestSource | RssIngestSource | ApiIngestSource):
            raise ConfigurationError("sources", f"{type(block).__name__} is not an ingest source block")
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise ConfigurationError("sources", f"source names must be unique, got {names}")
    connector: SqlAlchemyConnector = _load(database, SqlAlchemyConnector, "database")
    cfg: IngestSettings = _load(settings, IngestSettings, "settings") if settings else IngestSettings()
    engine = connector.get_engine()
    ensure_schema(engine, search_indexes=cfg.search_indexes)
    run_id = _run_id()
    started = datetime.now(UTC)
    results: list[SourceResult] = []
    counts: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    day = today or datetime.now(UTC).date()
    # the lease (a dedicated session holding the run's advisory lock) marks this run alive until released; a
    # killed process loses it and the next start marks the run failed instead of leaving it 'running' forever
    lease = start_run(engine, run_id, logger=logger)
    try:
        try:
            for block in blocks:
                try:
                    outcome = ingest_source(block, engine, run_id, cfg, day)
                except Exception as exc:  # noqa: BLE001 - recorded per source; the run fails below
                    reason = redact_text(f"{block.name}: {type(exc).__name__}: {exc}")[:2000]
                    logger.error("source %s failed: %s", block.name, reason)
                    failures.append(reason)
                    results.append(SourceResult(source=block.name, kind=_kind(block), status="failed", error=reason))
                    counts[block.name] = {}
                    continue
                counts[block.name] = outcome.counts
                results.append(
                    SourceResult(
                        source=block.name,
                        kind=outcome.kind,
                        status="success",
                        counts=outcome.counts,
                        batches=outcome.batches,
                        drift=outcome.drift.summary() if outcome.drift else None,
                    )
                )
        except BaseException as exc:  # interrupted (KeyboardInterrupt, cancellation): still close the run record
            finish_run(engine, run_id, status="failed", counts=counts, failure_reason=redact_text(repr(exc))[:2000])
            raise
        status = "failed" if failures else "success"
        finish_run(engine, run_id, status=status, counts=counts, failure_reason="; ".join(failures)[:4000] or None)
    finally:
        lease.release()
    summary = IngestSummary(
        run_id=run_id,
        status=status,
        sources=results,
        duration_seconds=(datetime.now(UTC) - started).total_seconds(),
    )
    create_table_artifact(
        key="ingest-run-summary",
        table=[
            {"source": r.source, "kind": r.kind, "status": r.status, **r.counts, "drift": r.drift or ""}
            for r in results
        ],  # fmt: skip
        description=f"Ingest run {run_id}: {status}",
    )
    if failures:
        raise RuntimeError(f"ingest run {run_id} failed: " + "; ".join(failures))
    return summary


def _kind(block: Any) -> str:
    return {"CsvIngestSource": "csv", "RssIngestSource": "rss", "ApiIngestSource": "api"}.get(type(block).__name__, "?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.ingest",
        description="Ingest API / CSV / RSS sources into PostgreSQL (raw JSONB + normalized_data).",
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="SLUG/NAME",
        help="Source block document, e.g. ingest-csv-source/orders (repeatable).",
    )
    parser.add_argument("--csv", action="append", default=[], metavar="PATH_OR_URL", help="Ad-hoc CSV source.")
    parser.add_argument("--rss", action="append", default=[], metavar="PATH_OR_URL", help="Ad-hoc RSS/Atom source.")
    parser.add_argument("--database-block", default=DATABASE_BLOCK, help="SqlAlchemyConnector block name.")
    parser.add_argument("--database-url", default=None, help="SQLAlchemy URL instead of a block (no secrets in logs).")
    parser.add_argument("--settings-block", default=None, help="IngestSettings block name (default: defaults).")
    args = parser.parse_args(argv)
    sources: list[Any] = list(args.source)
    for i, loc in enumerate(args.csv, start=1):
        sources.append(CsvIngestSource(name=f"csv-{i}", location=loc))
    for i, loc in enumerate(args.rss, start=1):
        sources.append(RssIngestSource(name=f"rss-{i}", location=loc))
    if not sources:
        parser.error("give at least one --source, --csv or --rss")
    database: Any = SqlAlchemyConnector(connection_info=args.database_url) if args.database_url else args.database_block
    summary = ingest_flow(sources=sources, database=database, settings=args.settings_block)
    print(summary.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
