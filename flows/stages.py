"""Prefect task wrappers of the weekly stages: retries, caching and logging only.

The logic lives in tasks/ as plain functions. Stages hand each other small models (lake URLs, row counts,
SHA-256), never frames, so cache keys are cheap and persisted results are tiny.

Caching: extract and transform persist their results under a key made of the task's inputs (the source
or lake block, the batch window, the upstream FileRefs with their SHA-256) and the task's source code, so
re-running a week that failed at the sync does not fetch or transform again, while a changed source, window
or upstream file gives a new key. ``full_refresh`` sets ``refresh_cache``. Load, quality gate and sync are
never cached: they check the remote state every time (and are idempotent).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from blocks import Lake, SalesforceCredentials, SourceApi
from tasks import part_checks, quality
from tasks import salesforce as salesforce_mod
from tasks import transform as transform_mod
from tasks.errors import is_retryable
from tasks.lake import LakeFS
from tasks.models import ExtractResult, TransformResult, Window
from tasks.publish import PublishResult, publish_week

# Base of the exponential task-retry backoff (seconds). Process behaviour, so an environment switch.
RETRY_BASE_SECONDS = float(os.environ.get("WEEKLY_ETL_RETRY_BASE_SECONDS", "10"))
TASK_RETRIES = int(os.environ.get("WEEKLY_ETL_TASK_RETRIES", "3"))
RETRY_DELAYS = [RETRY_BASE_SECONDS * 2**i for i in range(max(TASK_RETRIES, 1))]
CACHED = INPUTS + TASK_SOURCE
CACHE_EXPIRATION = timedelta(days=30)


def retry_on_transient(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Retry only what the errors module calls transient (RetryableError and what it wraps)."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - we classify, not handle
        return is_retryable(exc)
    return False


def lake_of(block: Lake) -> LakeFS:
    return LakeFS(block.base_url, block.storage_options())


def _log(window: Window, stage: str):
    logger = get_run_logger()
    return _StageLogger(logger, window.label, stage)


class _StageLogger:
    """Prefixes every line with the week and the stage; the run logger adds the flow run id."""

    def __init__(self, logger: Any, week: str, stage: str) -> None:
        self._logger = logger
        self._prefix = f"[week={week} stage={stage}] "
        self._extra = {"week": week, "stage": stage}

    def _emit(self, level: str, msg: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("extra", {}).update(self._extra)
        getattr(self._logger, level)(self._prefix + str(msg), *args, **kwargs)

    def debug(self, msg: str, *a: Any, **k: Any) -> None:
        self._emit("debug", msg, *a, **k)

    def info(self, msg: str, *a: Any, **k: Any) -> None:
        self._emit("info", msg, *a, **k)

    def warning(self, msg: str, *a: Any, **k: Any) -> None:
        self._emit("warning", msg, *a, **k)

    def error(self, msg: str, *a: Any, **k: Any) -> None:
        self._emit("error", msg, *a, **k)

    def exception(self, msg: str, *a: Any, **k: Any) -> None:
        self._emit("exception", msg, *a, **k)

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging API
        return self._logger.isEnabledFor(level)


@task(
    name="extract",
    retries=TASK_RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_transient,
    cache_policy=CACHED,
    cache_expiration=CACHE_EXPIRATION,
    persist_result=True,
)
def extract(
    source: SourceApi, lake_block: Lake, window: Window, prefix: str, validated_prefix: str | None = None
) -> ExtractResult:
    """Raw parts under ``prefix``. With ``validated_prefix``, each part's contract check runs while the next
    pages are fetched and is stored there (``ExtractResult.validated``), so the transform does not redo it."""
    log = _log(window, "extract")
    artifact_id = create_progress_artifact(
        0.0, key=f"extract-progress-{window.label}", description=f"Pages fetched for week {window.label}"
    )

    def on_progress(pages: int, rows: int) -> None:
        # The total page count is unknown up front: the bar approaches 100 and the description counts.
        update_progress_artifact(
            artifact_id, min(99.0, 100.0 * pages / (pages + 5)), description=f"{pages} pages, {rows} rows fetched"
        )

    result = part_checks.extract_and_check(
        source, window, lake_of(lake_block), prefix, validated_prefix, logger=log, on_progress=on_progress
    )
    update_progress_artifact(artifact_id, 100.0, description=f"{result.pages} pages, {result.rows} rows fetched")
    return result


@task(
    name="validate_and_transform",
    retries=TASK_RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_on_transient,
    cache_policy=CACHED,
    cache_expiration=CACHE_EXPIRATION,
    persist_result=True,
)
def validate_and_transform(
    lake_block: Lake, extracted: ExtractResult, window: Window, out_prefix: str, timezone: str
) -> TransformResult:
    log = _log(window, "validate_and_transform")
    return transform_mod.transform_week(
        lake_of(lake_block),
        extracted.files,
        window,
        out_prefix,
        timezone=timezone,
        validated=extracted.validated,
        logger=log,
    )


PUBLISHED_NAMES = {"valid": "valid.parquet", "rejects": "rejects.parquet", "metrics": "metrics.parquet"}


@task(
    name="load",
    retries=TASK_RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_on_transient,
    cache_policy=NO_CACHE,
)
def load(lake_block: Lake, transformed: TransformResult, zone: str, window: Window) -> PublishResult:
    """Publish the week's files under one manifest (the commit). Never cached: it re-checks the remote copies
    every time, skips intact ones and re-uploads missing or corrupted ones."""
    log = _log(window, "load")
    files = {
        PUBLISHED_NAMES["valid"]: transformed.valid,
        PUBLISHED_NAMES["rejects"]: transformed.rejects,
        PUBLISHED_NAMES["metrics"]: transformed.metrics,
    }
    extra = {
        "fetched": transformed.fetched,
        "valid": transformed.valid.rows,
        "rejected": transformed.rejected,
        "duplicates": transformed.duplicates,
        "window_start": window.start.isoformat(),
        "window_end": window.end.isoformat(),
    }
    result = publish_week(lake_of(lake_block), zone, window.label, files, extra, logger=log)
    log.info(
        "%s: %d written, %d intact, %d repaired",
        result.status,
        len(result.written),
        len(result.skipped),
        len(result.repaired),
    )
    return result


@task(name="quality_gate", cache_policy=NO_CACHE)
def quality_gate(transformed: TransformResult, threshold_pct: float) -> quality.QualityReport:
    log = _log(transformed.window, "quality_gate")
    report = quality.evaluate(
        transformed.fetched,
        transformed.rejected,
        threshold_pct,
        duplicates=transformed.duplicates,
        top_reject_reasons=transformed.top_reject_reasons,
    )
    log.info("reject rate %.2f%% (threshold %.2f%%): %s", report.rate_pct, threshold_pct, report.status.value)
    return report


@task(
    name="salesforce_sync",
    retries=TASK_RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_on_transient,
    cache_policy=NO_CACHE,
)
def salesforce_sync(
    lake_block: Lake,
    metrics_url: str,
    window: Window,
    credentials: SalesforceCredentials | None,
    object_name: str,
    external_id_field: str,
    out_prefix: str,
    snapshot_rel: str,
    error_threshold_pct: float,
    poll_seconds: float = 5.0,
) -> Any:
    log = _log(window, "salesforce_sync")
    sf = None
    reauth = None
    if credentials is not None:
        sf = salesforce_mod.connect(credentials)

        def reauth():
            return salesforce_mod.connect(credentials)

    return salesforce_mod.sync_metrics(
        lake_of(lake_block),
        metrics_url,
        sf=sf,
        object_name=object_name,
        external_id_field=external_id_field,
        out_prefix=out_prefix,
        snapshot_rel=snapshot_rel,
        error_threshold_pct=error_threshold_pct,
        reauth=reauth,
        wait=poll_seconds,
        logger=log,
    )
