"""Weekly reverse ETL: events API -> validate/transform -> Parquet lake -> quality gate -> Salesforce.

Run locally with ``python -m flows.weekly`` (embedded defaults: demo API, ./lake, Salesforce dry run,
SQLite tracking), or as the ``weekly-reverse-etl`` deployment from prefect.yaml.

Per batch week, in order: extract >> validate_and_transform >> load >> quality_gate >> salesforce_sync,
then the checkpoint: written to the tracking database first (the source of truth), mirrored into the
Prefect Variable, and queued in the lake for replay when the database write fails after the data landed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.variables import Variable

from flows import stages
from flows.locks import global_lock
from flows.notify import notify_failure
from flows.runtime import WeeklyRuntime, weekly_runtime
from flows.weekly_report import (
    WeeklySummary,
    WeekOutcome,
    print_summary,
    quality_artifact,
    run_counts,
    summary_artifact,
)
from tasks import checkpoint as checkpoints
from tasks import pending, tracking
from tasks.errors import ConfigurationError, DataQualityError, PipelineError, is_retryable, redact_text
from tasks.models import Window
from tasks.publish import read_manifest
from tasks.quality import RunStatus, enforce
from tasks.weeks import parse_week, plan_weeks, today_in

RAW_ZONE = "raw/events"
STAGING_ZONE = "staging/events"
CURATED_ZONE = "curated/events"
SALESFORCE_ZONE = "salesforce"
CHECKPOINT_LOCK = "weekly-etl-checkpoint"
# Week-level retries after the task retries are spent (process behaviour, hence environment switches).
FLOW_RETRIES = int(os.environ.get("WEEKLY_ETL_FLOW_RETRIES", "2"))
FLOW_RETRY_BASE_SECONDS = float(os.environ.get("WEEKLY_ETL_FLOW_RETRY_BASE_SECONDS", "60"))


def _flow_run_id() -> str | None:
    try:
        ctx = get_run_context()
    except Exception:  # noqa: BLE001 - outside a run there is simply no id
        return None
    run = getattr(ctx, "flow_run", None)
    return str(run.id) if run is not None else None


def _mirror_checkpoint(variable_name: str, next_week: date, run_id: str) -> None:
    """Mirror the database checkpoint into the Prefect Variable (JSON, well under 5,000 chars)."""
    document = checkpoints.checkpoint_document(next_week, run_id, datetime.now(UTC))
    Variable.set(variable_name, document, overwrite=True)


def _ensure_checkpoint_lock() -> None:
    """The global concurrency limit (1 slot) that serializes checkpoint writes; created when missing."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(CHECKPOINT_LOCK, 1)


def _read_checkpoint(rt: WeeklyRuntime, log: Any) -> date | None:
    """The database is the source of truth. The Variable is used only while the database has no checkpoint yet
    (e.g. seeded by ``python -m flows.setup --first-week``) and otherwise read to warn when it drifted."""
    state = checkpoints.checkpoint_state(rt.engine, rt.settings.pipeline_name)
    db_value = state.next_week_start if state is not None else None
    updated_at = state.updated_at if state is not None else None
    doc = Variable.get(rt.settings.checkpoint_variable, default=None)
    if doc:
        try:
            var_value = checkpoints.parse_checkpoint_document(doc)
        except (ValueError, PipelineError) as exc:
            log.warning(
                "checkpoint Variable %r is unreadable (%s); the database wins", rt.settings.checkpoint_variable, exc
            )
            var_value = None
        if db_value is None and var_value is not None:
            log.info("the database has no checkpoint yet; starting from the Variable's %s", var_value)
            db_value = var_value
            updated = doc.get("updated_at") if isinstance(doc, dict) else None
            updated_at = datetime.fromisoformat(updated) if updated else None
        elif var_value is not None and var_value != db_value:
            log.warning("checkpoint Variable says %s, database says %s; the database wins", var_value, db_value)
    if updated_at is not None:
        age = datetime.now(UTC) - updated_at
        if age > timedelta(days=rt.settings.stale_checkpoint_days):
            log.warning(
                "checkpoint was last updated %s days ago (threshold %s days): is the schedule running?",
                age.days,
                rt.settings.stale_checkpoint_days,
            )
    return db_value


def _advance_checkpoint(
    rt: WeeklyRuntime, window: Window, run_id: str, log: Any, baseline: date | None = None
) -> date | None:
    """DB first (the source of truth), then the Variable mirror, under a global lock (Variables have no
    compare-and-set). The checkpoint moves across committed weeks only (``checkpoints.checkpoint_after_week``): a week
    committed ahead of it leaves it where it is. ``baseline``: the checkpoint this run started from, for a database
    that has none yet. When the database is unavailable after the data landed, the write is queued in the lake and
    replayed at the start of the next run; the Variable is then left alone (never ahead of the DB)."""
    pipeline = rt.settings.pipeline_name
    args: dict[str, Any] = {"pipeline": pipeline, "week_start": window.start.isoformat(), "run_id": run_id}
    if baseline is not None:
        args["baseline"] = baseline.isoformat()
    with global_lock(CHECKPOINT_LOCK):
        applied = pending.apply_or_queue(rt.engine, rt.lake, pipeline, "checkpoint_after_week", args, logger=log)
        if not applied:
            log.error("checkpoint write failed: database unavailable; queued for replay at the next run")
            return None
        stored = checkpoints.get_checkpoint(rt.engine, pipeline) or window.end + timedelta(days=1)
        _mirror_checkpoint(rt.settings.checkpoint_variable, stored, run_id)
    return stored


# Where the last failure happened, per flow run, for the on_failure hook (same process).
FAILURES: dict[str, dict[str, str]] = {}


def _damaged_files(rt: WeeklyRuntime, window: Window) -> list[str]:
    """Names of the committed week's files that are missing or whose size/SHA-256 differ (all, without manifest)."""
    manifest = read_manifest(rt.lake, CURATED_ZONE, window.label)
    if manifest is None:
        return ["_manifest.json"]
    return [name for name, ref in sorted(manifest.files.items()) if not rt.lake.file_ok(ref.url, ref.sha256, ref.bytes)]


def _process_week(
    rt: WeeklyRuntime,
    window: Window,
    *,
    full_refresh: bool,
    refresh_cache: bool,
    dry_run: bool,
    log: Any,
    baseline: date | None = None,
) -> WeekOutcome:
    pipeline = rt.settings.pipeline_name
    flow_run_id = _flow_run_id()
    abandoned = tracking.fail_abandoned_runs(rt.engine, pipeline, week_start=window.start)
    if abandoned:
        log.warning("marked %d run(s) of week %s left RUNNING by a crashed process as FAILED", abandoned, window.label)
    existing = tracking.last_successful_run(rt.engine, pipeline, window.start)
    replace_existing = full_refresh
    if existing is not None and not full_refresh:
        damaged = _damaged_files(rt, window)
        if not damaged:
            log.info(
                "week %s already committed by run %s and intact in the lake; skipping", window.label, existing.run_id
            )
            # A crash between the run record and the checkpoint write leaves the checkpoint behind a committed
            # week; moving it now (across committed weeks only) keeps the schedule from stalling on that week.
            _advance_checkpoint(rt, window, existing.run_id, log, baseline)
            return WeekOutcome(
                week_start=window.start,
                run_id=existing.run_id,
                status="SKIPPED",
                skipped_reason=f"already committed by run {existing.run_id}",
            )
        # Committed, but the lake lost or changed files: run the week again. Cached stages make this cheap
        # and the load stage re-uploads exactly the damaged files; the new run supersedes the old one.
        log.warning("week %s is committed but %s missing or corrupt in the lake; repairing", window.label, damaged)
        replace_existing = True
    run_id = str(uuid.uuid4())
    tracking.start_run(
        rt.engine, pipeline, window.start, run_id=run_id, flow_run_id=flow_run_id, check_duplicate=not replace_existing
    )
    outcome = WeekOutcome(week_start=window.start, run_id=run_id, status=RunStatus.RUNNING.value, dry_run=dry_run)
    stage = "extract"
    started = time.monotonic()

    def stage_done(name: str, rows_in: int, rows_out: int, detail: str | None = None) -> None:
        nonlocal started
        outcome.stage_seconds[name] = round(time.monotonic() - started, 3)
        tracking.finish_stage(
            rt.engine, run_id, name, RunStatus.SUCCESS.value, rows_in=rows_in, rows_out=rows_out, detail=detail
        )
        started = time.monotonic()

    try:
        tracking.start_stage(rt.engine, run_id, stage)
        extracted = stages.extract.with_options(refresh_cache=refresh_cache)(
            rt.source,
            rt.lake_block,
            window,
            f"{RAW_ZONE}/week={window.label}",
            f"{STAGING_ZONE}/week={window.label}/parts" if rt.settings.check_during_extract else None,
        )
        stage_done(stage, 0, extracted.rows, f"{extracted.pages} pages, {len(extracted.files)} files")

        stage = "validate_and_transform"
        tracking.start_stage(rt.engine, run_id, stage)
        transformed = stages.validate_and_transform.with_options(refresh_cache=refresh_cache)(
            rt.lake_block, extracted, window, f"{STAGING_ZONE}/week={window.label}", rt.settings.timezone
        )
        outcome.fetched, outcome.rejected, outcome.duplicates = (
            transformed.fetched,
            transformed.rejected,
            transformed.duplicates,
        )
        outcome.valid = transformed.valid.rows
        stage_done(stage, transformed.fetched, transformed.valid.rows)

        stage = "load"
        tracking.start_stage(rt.engine, run_id, stage)
        published = stages.load(rt.lake_block, transformed, CURATED_ZONE, window)
        committed = published.manifest.files
        outcome.files = {name.removesuffix(".parquet"): ref.url for name, ref in committed.items()}
        stage_done(
            stage,
            transformed.fetched,
            published.manifest.total_rows,
            f"{published.status}: written {len(published.written)}, intact {len(published.skipped)}, "
            f"repaired {len(published.repaired)}",
        )

        stage = "quality_gate"
        tracking.start_stage(rt.engine, run_id, stage)
        report = stages.quality_gate(transformed, rt.settings.reject_threshold_pct)
        outcome.reject_rate_pct = report.rate_pct
        quality_artifact(window, report, outcome.files)
        enforce(report)
        stage_done(stage, transformed.fetched, transformed.valid.rows, report.status.value)

        stage = "salesforce_sync"
        tracking.start_stage(rt.engine, run_id, stage)
        sync = stages.salesforce_sync(
            rt.lake_block,
            committed[stages.PUBLISHED_NAMES["metrics"]].url,
            window,
            None if dry_run else rt.salesforce,
            rt.settings.salesforce_object,
            rt.settings.external_id_field,
            f"{SALESFORCE_ZONE}/week={window.label}/{run_id}",
            f"{SALESFORCE_ZONE}/snapshot/{rt.settings.salesforce_object}.parquet",
            rt.settings.sf_error_threshold_pct,
            rt.settings.salesforce_poll_seconds,
        )
        outcome.synced, outcome.sync_failed = sync.succeeded, sync.failed
        if sync.outbox is not None:
            outcome.files["salesforce_outbox"] = sync.outbox.url
        if sync.failed_rows is not None:
            outcome.files["salesforce_failed_rows"] = sync.failed_rows.url
        stage_done(stage, sync.considered, sync.sent, "dry run" if sync.dry_run else f"jobs {','.join(sync.job_ids)}")
        outcome.status = report.status.value
    except BaseException as exc:
        FAILURES[flow_run_id or "local"] = {
            "week": window.label,
            "stage": stage,
            "error": redact_text(f"{type(exc).__name__}: {exc}")[:500],
        }
        reason = redact_text(f"{stage}: {type(exc).__name__}: {exc}")
        try:
            tracking.finish_stage(rt.engine, run_id, stage, RunStatus.FAILED.value, detail=reason)
            tracking.finish_run(
                rt.engine, run_id, RunStatus.FAILED.value, counts=run_counts(outcome), failure_reason=reason
            )
        except PipelineError as track_exc:
            log.error("could not record the failure of run %s: %s", run_id, type(track_exc).__name__)
        raise

    # Data is committed in the lake (and Salesforce). From here on, a tracking write that fails because the
    # database is unavailable is queued in the lake and replayed by the next run; nothing is lost.
    finish = {"run_id": run_id, "status": outcome.status, "counts": run_counts(outcome), "supersede": replace_existing}
    if not pending.apply_or_queue(rt.engine, rt.lake, pipeline, "finish_run", finish):
        log.error("run record write failed: database unavailable; queued for replay")
    _advance_checkpoint(rt, window, run_id, log, baseline)
    return outcome


def _process_week_with_retries(
    rt: WeeklyRuntime, window: Window, *, full_refresh: bool, dry_run: bool, log: Any, baseline: date | None = None
) -> WeekOutcome:
    """Flow-level retries of one week: only for transient errors (the errors module decides), with exponential
    backoff. Stages whose results are cached are not redone: a retry resumes at the stage that failed."""
    for attempt in range(FLOW_RETRIES + 1):
        try:
            # Only the first attempt refreshes the caches: a retry resumes from what the first one finished.
            return _process_week(
                rt,
                window,
                full_refresh=full_refresh,
                refresh_cache=full_refresh and attempt == 0,
                dry_run=dry_run,
                log=log,
                baseline=baseline,
            )
        except Exception as exc:
            if attempt >= FLOW_RETRIES or not is_retryable(exc):
                raise
            delay = FLOW_RETRY_BASE_SECONDS * 4**attempt
            log.warning(
                "week %s failed with a transient %s; retrying the week in %.0f s (attempt %d of %d)",
                window.label,
                type(exc).__name__,
                delay,
                attempt + 2,
                FLOW_RETRIES + 1,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


@flow(
    name="weekly-reverse-etl",
    description="Events API -> validated Parquet lake -> quality gate -> Salesforce weekly customer metrics.",
    timeout_seconds=4 * 3600,
    # No Prefect flow retries: the server retries a flow whatever it raised (a DataQualityError would be
    # re-run for nothing) and takes one fixed delay. Weeks are retried in the flow instead, only for
    # transient errors, with exponential backoff (see _process_week_with_retries).
    on_failure=[notify_failure],
    log_prints=True,
)
def weekly_reverse_etl(
    week: date | None = None, full_refresh: bool = False, dry_run: bool | None = None
) -> WeeklySummary:
    """Process the due batch weeks (or exactly ``week``, a Monday).

    Args:
        week: Explicit week start (a Monday, ISO date). Runs instead of the checkpoint's weeks; the
            checkpoint moves past it only once every earlier week is committed.
        full_refresh: Re-fetch and re-transform even when cached results or a committed run exist.
        dry_run: Write the Salesforce CSV to the lake outbox instead of upserting. Default: dry run exactly
            when no Salesforce credentials block is saved.
    """
    log = get_run_logger()
    explicit = parse_week(week) if week is not None else None
    with weekly_runtime(log) as rt:
        tracking.ensure_schema(rt.engine)
        _ensure_checkpoint_lock()
        summary = WeeklySummary(lake=rt.lake_block.base_url, embedded_defaults=rt.embedded)
        summary.database = rt.describe()["database"]
        pipeline = rt.settings.pipeline_name
        replayed = pending.replay_pending(rt.engine, rt.lake, pipeline)
        replayed.raise_for_error()  # never process a week on a checkpoint that is still queued
        summary.replayed_pending = replayed.applied
        if replayed.applied:
            log.info("replayed %d pending tracking write(s)", replayed.applied)
            stored = checkpoints.checkpoint_state(rt.engine, pipeline)
            if stored is not None:
                _mirror_checkpoint(rt.settings.checkpoint_variable, stored.next_week_start, stored.last_run_id)
        checkpoint = _read_checkpoint(rt, log)
        effective_dry_run = rt.salesforce is None if dry_run is None else (dry_run or rt.salesforce is None)
        if dry_run is False and rt.salesforce is None:
            raise ConfigurationError("dry_run", "False needs a saved Salesforce credentials block 'weekly-salesforce'")
        windows = plan_weeks(
            explicit_week=explicit,
            checkpoint=checkpoint,
            first_week=rt.settings.first_week,
            today=today_in(rt.settings.timezone),
            max_weeks=rt.settings.max_weeks_per_run,
        )
        if not windows:
            log.info("nothing due: the next batch week %s has not ended yet", checkpoint)
        for window in windows:
            summary.weeks.append(
                _process_week_with_retries(
                    rt,
                    window,
                    full_refresh=full_refresh,
                    dry_run=effective_dry_run,
                    log=log,
                    baseline=checkpoint or rt.settings.first_week,
                )
            )
        try:
            summary.next_week_start = checkpoints.get_checkpoint(rt.engine, pipeline) or checkpoint
        except PipelineError as exc:  # the writes are queued; the summary just cannot show the value
            log.warning("could not read the checkpoint for the summary: %s", type(exc).__name__)
    summary_artifact(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.weekly", description=weekly_reverse_etl.description)
    parser.add_argument("--week", help="week start to process (a Monday, YYYY-MM-DD); default: from the checkpoint")
    parser.add_argument("--full-refresh", action="store_true", help="ignore cached stage results and committed runs")
    dry = parser.add_mutually_exclusive_group()
    dry.add_argument("--dry-run", dest="dry_run", action="store_true", default=None, help="never call Salesforce")
    dry.add_argument("--no-dry-run", dest="dry_run", action="store_false", help="require Salesforce credentials")
    args = parser.parse_args(argv)
    try:
        week = parse_week(args.week) if args.week is not None else None
    except ConfigurationError as exc:
        parser.error(str(exc))
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    # The ephemeral API server takes 8-12 s to start here and more on a loaded machine; Prefect gives up at
    # 20 s by default. (Settings are read at import, so this goes through temporary_settings, not os.environ.)
    startup = max(90, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    try:
        with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: startup}):
            summary = weekly_reverse_etl(week=week, full_refresh=args.full_refresh, dry_run=args.dry_run)
    except DataQualityError as exc:
        print(f"\nquality gate failed: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"\nweekly reverse ETL failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
