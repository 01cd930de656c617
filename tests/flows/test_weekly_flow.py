"""The weekly flow end to end: real demo API server, real lake folder, real PostgreSQL, the fake Salesforce."""

from __future__ import annotations

from datetime import timedelta

import polars as pl
import pytest
from prefect.client.orchestration import get_client

import blocks
from flows.weekly import weekly_reverse_etl
from tasks import checkpoint, tracking
from tasks.errors import ConfigurationError, DataQualityError
from tasks.publish import read_committed, read_manifest
from tasks.weeks import last_complete_week, today_in
from tests.flows.conftest import WEEK, checkpoint_variable, db_checkpoint

PIPELINE = "weekly-customer-metrics"


def _artifact_keys() -> set[str]:
    with get_client(sync_client=True) as client:
        return {a.key for a in client.read_artifacts() if a.key}


def test_happy_path_syncs_to_salesforce_and_advances_checkpoint(
    weekly_env, make_source_api, source_api, routed_salesforce, pg_url
):
    source_api.config.total = 1500
    weekly_env.save(make_source_api("cursor", page_size=200, auth="bearer", secret="tok-123"), blocks.SOURCE_BLOCK)
    source_api.config.auth, source_api.config.secret = "bearer", "tok-123"
    weekly_env.lake_block()
    weekly_env.settings()
    engine = weekly_env.database(pg_url)
    weekly_env.save(routed_salesforce.credentials("password"), blocks.SALESFORCE_BLOCK)

    summary = weekly_reverse_etl(week=WEEK)

    [week] = summary.weeks
    assert week.status == "SUCCESS_WITH_REJECTS" and not week.dry_run
    # Every served record is accounted for: valid + rejected + superseded duplicates.
    assert week.fetched == source_api.stats.rows
    assert week.valid + week.rejected + week.duplicates == week.fetched
    manifest = read_manifest(weekly_env.lake, "curated/events", WEEK)
    assert manifest is not None and manifest.extra["fetched"] == week.fetched
    valid = read_committed(weekly_env.lake, "curated/events", WEEK, "valid.parquet")
    rejects = read_committed(weekly_env.lake, "curated/events", WEEK, "rejects.parquet")
    metrics = read_committed(weekly_env.lake, "curated/events", WEEK, "metrics.parquet")
    assert valid.height == week.valid and rejects.height == week.rejected + week.duplicates
    # Salesforce holds exactly one record per customer-week, with the metrics' values.
    store = routed_salesforce.records()
    assert set(store) == set(metrics["External_Id__c"].to_list())
    one = metrics.row(0, named=True)
    assert int(store[one["External_Id__c"]]["Event_Count__c"]) == one["Event_Count__c"]
    assert week.synced == metrics.height
    # Tracking: DB first, Variable mirrors it; one run with five finished stages.
    assert db_checkpoint(engine) == WEEK + timedelta(days=7)
    assert checkpoint_variable()["next_week_start"] == (WEEK + timedelta(days=7)).isoformat()
    [run] = tracking.runs(engine, PIPELINE)
    assert run.status == "SUCCESS_WITH_REJECTS" and run.fetched == week.fetched
    assert {s.stage: s.status for s in tracking.stages(engine, run.run_id)} == {
        "extract": "SUCCESS",
        "validate_and_transform": "SUCCESS",
        "load": "SUCCESS",
        "quality_gate": "SUCCESS",
        "salesforce_sync": "SUCCESS",
    }
    assert {f"quality-{WEEK.isoformat()}", "weekly-run-summary", f"extract-progress-{WEEK.isoformat()}"} <= (
        _artifact_keys()
    )


def test_rerun_skips_committed_week_and_full_refresh_reprocesses_without_duplicates(
    weekly_env, make_source_api, source_api, routed_salesforce
):
    weekly_env.save(make_source_api("page_number"), blocks.SOURCE_BLOCK)
    weekly_env.lake_block()
    weekly_env.settings()
    weekly_env.save(routed_salesforce.credentials("session"), blocks.SALESFORCE_BLOCK)
    first = weekly_reverse_etl(week=WEEK).weeks[0]
    ids_after_first = dict(routed_salesforce.records())
    requests_after_first = source_api.stats.requests

    again = weekly_reverse_etl(week=WEEK).weeks[0]
    assert again.status == "SKIPPED" and "already committed" in again.skipped_reason
    assert source_api.stats.requests == requests_after_first  # nothing fetched

    refreshed = weekly_reverse_etl(week=WEEK, full_refresh=True).weeks[0]
    assert refreshed.status == first.status and refreshed.fetched == first.fetched
    assert source_api.stats.requests > requests_after_first  # full refresh really re-fetched
    store = routed_salesforce.records()
    assert set(store) == set(ids_after_first)  # same external ids, no duplicates
    assert {k: v["Id"] for k, v in store.items()} == {k: v["Id"] for k, v in ids_after_first.items()}


def test_quality_gate_failure_keeps_files_but_not_checkpoint_or_sync(
    weekly_env, make_source_api, source_api, routed_salesforce, pg_url
):
    source_api.config.invalid_ratio = 0.3
    weekly_env.save(make_source_api("offset"), blocks.SOURCE_BLOCK)
    weekly_env.lake_block()
    weekly_env.settings(reject_threshold_pct=5.0)
    engine = weekly_env.database(pg_url)
    weekly_env.save(routed_salesforce.credentials("password"), blocks.SALESFORCE_BLOCK)

    with pytest.raises(DataQualityError) as info:
        weekly_reverse_etl(week=WEEK)
    assert "threshold 5.00%" in str(info.value)
    assert read_manifest(weekly_env.lake, "curated/events", WEEK) is not None  # files stay written
    assert routed_salesforce.records() == {}  # the sync did not run
    assert db_checkpoint(engine) is None and checkpoint_variable() is None
    [run] = tracking.runs(engine, PIPELINE)
    assert run.status == "FAILED" and "quality_gate" in run.failure_reason
    assert f"quality-{WEEK.isoformat()}" in _artifact_keys()


def _run_failing_at_sync(weekly_env, source, routed_salesforce) -> None:
    """Save the blocks with ``source``, make the first Salesforce job fail, and run WEEK: it fails at the sync."""
    weekly_env.save(source, blocks.SOURCE_BLOCK)
    weekly_env.lake_block()
    weekly_env.settings()
    weekly_env.save(routed_salesforce.credentials("password"), blocks.SALESFORCE_BLOCK)
    routed_salesforce.fail_next_job("InvalidBatch : simulated failure")
    with pytest.raises(Exception, match="simulated failure"):
        weekly_reverse_etl(week=WEEK)


def test_failure_at_sync_reruns_without_fetching_again(weekly_env, make_source_api, source_api, routed_salesforce):
    _run_failing_at_sync(weekly_env, make_source_api("link_header"), routed_salesforce)
    fetched_requests = source_api.stats.requests
    assert fetched_requests > 0 and routed_salesforce.records() == {}

    summary = weekly_reverse_etl(week=WEEK)
    assert summary.weeks[0].status.startswith("SUCCESS")
    assert source_api.stats.requests == fetched_requests  # extract and transform came from the cache
    assert len(routed_salesforce.records()) == summary.weeks[0].synced > 0


def test_catches_up_pending_weeks_in_order_on_embedded_defaults(weekly_env, make_source_api, source_api):
    source_api.config.total = 200
    last = last_complete_week(today_in("UTC"))
    weekly_env.save(make_source_api("page_number"), blocks.SOURCE_BLOCK)
    weekly_env.settings(first_week=last - timedelta(days=14))

    summary = weekly_reverse_etl()

    assert [w.week_start for w in summary.weeks] == [last - timedelta(days=14), last - timedelta(days=7), last]
    assert all(w.dry_run and w.status.startswith("SUCCESS") for w in summary.weeks)
    assert summary.next_week_start == last + timedelta(days=7)
    assert "database" in summary.embedded_defaults and "lake" in summary.embedded_defaults
    # Dry run: the exact CSV is in the outbox of each week, nothing else was needed.
    outbox = list((weekly_env.tmp_path / "lake" / "salesforce").rglob("*.csv"))
    assert len(outbox) == 3
    assert pl.read_csv(outbox[0]).columns[0] == "External_Id__c"
    # Nothing more is due: the next run processes no week.
    assert weekly_reverse_etl().weeks == []


def test_a_week_run_ahead_does_not_skip_the_weeks_before_it(weekly_env, make_source_api, source_api, pg_url, caplog):
    source_api.config.total = 200
    last = last_complete_week(today_in("UTC"))
    first = last - timedelta(days=14)
    weekly_env.save(make_source_api("page_number"), blocks.SOURCE_BLOCK)
    weekly_env.settings(first_week=first)
    engine = weekly_env.database(pg_url)

    # An explicit run of the newest week commits it, but the checkpoint stays at the first week not processed.
    with caplog.at_level("WARNING"):
        ahead = weekly_reverse_etl(week=last)
    assert ahead.weeks[0].status.startswith("SUCCESS")
    assert db_checkpoint(engine) == first and ahead.next_week_start == first
    assert checkpoint_variable()["next_week_start"] == first.isoformat()
    assert any("the checkpoint of weekly-customer-metrics stays at" in r.getMessage() for r in caplog.records)

    # The scheduled run processes the two weeks in between, skips the committed one and ends past it.
    summary = weekly_reverse_etl()
    assert [(w.week_start, w.status[:7]) for w in summary.weeks] == [
        (first, "SUCCESS"),
        (first + timedelta(days=7), "SUCCESS"),
        (last, "SKIPPED"),
    ]
    assert db_checkpoint(engine) == last + timedelta(days=7) == summary.next_week_start
    assert len(list((weekly_env.tmp_path / "lake" / "salesforce").rglob("*.csv"))) == 3  # one per week, once


@pytest.mark.parametrize("during_extract", [True, False])
def test_contract_check_during_the_extract_is_a_setting(
    weekly_env, make_source_api, source_api, caplog, during_extract
):
    source_api.config.total = 3000
    weekly_env.save(make_source_api("offset", page_size=500, pages_per_file=2), blocks.SOURCE_BLOCK)
    weekly_env.settings(check_during_extract=during_extract)
    with caplog.at_level("INFO"):
        [week] = weekly_reverse_etl(week=WEEK).weeks
    assert week.status.startswith("SUCCESS") and week.valid + week.rejected + week.duplicates == week.fetched == 3000
    parts = weekly_env.tmp_path / "lake" / "staging" / "events" / f"week={WEEK.isoformat()}" / "parts"
    stored = sorted(p.name for p in parts.glob("*.parquet")) if parts.exists() else []
    reused = [r.getMessage() for r in caplog.records if "made during the extract" in r.getMessage()]
    if during_extract:  # 3 raw parts, each checked while fetching and reused by the transform
        assert len(stored) == 6 and len(reused) == 1 and reused[0].endswith("during the extract for 3 of 3 raw parts")
    else:
        assert stored == [] and reused == []


def test_non_monday_week_is_refused_before_any_work(weekly_env, make_source_api, source_api):
    weekly_env.save(make_source_api("page_number"), blocks.SOURCE_BLOCK)
    with pytest.raises(ConfigurationError, match="Monday"):
        weekly_reverse_etl(week="2024-01-03")
    assert source_api.stats.requests == 0


def test_unreachable_api_fails_clearly_and_keeps_checkpoint(weekly_env, make_source_api, source_api):
    weekly_env.save(make_source_api("page_number", base_url="http://127.0.0.1:9", max_attempts=2), blocks.SOURCE_BLOCK)
    weekly_env.settings()
    with pytest.raises(Exception) as info:
        weekly_reverse_etl(week=WEEK)
    assert "127.0.0.1:9" in str(info.value) or "connect" in str(info.value).lower()
    assert checkpoint_variable() is None


def test_seeded_variable_starts_an_empty_database_and_a_stale_checkpoint_warns(
    weekly_env, make_source_api, source_api, caplog
):
    from datetime import UTC, datetime

    from prefect.variables import Variable

    source_api.config.total = 200
    weekly_env.save(make_source_api("page_number"), blocks.SOURCE_BLOCK)
    weekly_env.settings()
    # What `python -m flows.setup --first-week` writes, 20 days ago; the tracking database has no checkpoint yet.
    last = last_complete_week(today_in("UTC"))
    Variable.set(
        "weekly-checkpoint",
        checkpoint.checkpoint_document(last, None, datetime.now(UTC) - timedelta(days=20)),
        overwrite=True,
    )
    with caplog.at_level("WARNING"):
        summary = weekly_reverse_etl()
    assert [w.week_start for w in summary.weeks] == [last]
    assert any("last updated 20 days ago" in r.getMessage() for r in caplog.records)
    assert checkpoint_variable()["next_week_start"] == (last + timedelta(days=7)).isoformat()


def test_changed_source_does_not_reuse_the_cached_extract(weekly_env, make_source_api, source_api, routed_salesforce):
    _run_failing_at_sync(weekly_env, make_source_api("page_number", page_size=100), routed_salesforce)
    after_first = source_api.stats.requests

    # Same week, but the source block changed (another page size): the cache key changes, so it fetches again.
    weekly_env.save(make_source_api("page_number", page_size=250), blocks.SOURCE_BLOCK)
    summary = weekly_reverse_etl(week=WEEK)
    assert summary.weeks[0].status.startswith("SUCCESS")
    assert source_api.stats.requests > after_first
    assert summary.weeks[0].fetched == source_api.config.total
