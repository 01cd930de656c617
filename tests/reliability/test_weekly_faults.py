"""Faults from the outside, at flow level (child processes of the weekly flow against real servers).

Complements, does not repeat: tests/unit/test_extract.py (every HTTP fault of one extract: 429 with Retry-After 0 /
HTTP-date, 5xx streaks, timeouts, truncated JSON, cursor loops, repeated records, missing records key, empty final
page), tests/unit/test_salesforce.py (each Salesforce fault on sync_metrics), tests/unit/test_lake_azurite.py
(Azurite down / mid-publish on LakeFS), tests/flows/test_weekly_services.py (Azurite going away mid-run, a killed
database connection after the data landed). Here: the same kinds of faults through the whole flow, in a fresh
process, checking what is committed (manifest, checkpoint, tracking, Salesforce) afterwards.
"""

from __future__ import annotations

import json
import time
from datetime import date, timedelta

import psycopg
import pytest
import sqlalchemy as sa

import blocks
from tasks import checkpoint, tracking
from tasks.lake import LakeFS
from tasks.publish import read_manifest
from tests.reliability.conftest import PIPELINE, save_standard_blocks

WEEK = date(2024, 1, 1)
NEXT = WEEK + timedelta(days=7)
ZONE = "curated/events"

pytestmark = pytest.mark.reliability


def _variable_checkpoint() -> date | None:
    from prefect.variables import Variable

    value = Variable.get("weekly-checkpoint", default=None)
    if value is None:
        return None
    doc = json.loads(value) if isinstance(value, str) else value
    return date.fromisoformat(doc["next_week_start"])


def _db_checkpoint(engine: sa.Engine) -> date | None:
    if not sa.inspect(engine).has_table("pipeline_checkpoint"):
        return None
    return checkpoint.get_checkpoint(engine, PIPELINE)


def _assert_nothing_committed(engine: sa.Engine, lake: LakeFS) -> None:
    assert read_manifest(lake, ZONE, WEEK) is None
    assert _db_checkpoint(engine) is None and _variable_checkpoint() is None
    if sa.inspect(engine).has_table("pipeline_run"):
        assert all(r.status == "FAILED" for r in tracking.runs(engine, PIPELINE))


@pytest.fixture
def world(rig, pg_url, make_source_api, source_api):
    source_api.config.total = 300
    source = make_source_api("cursor", page_size=50, pages_per_file=2, max_attempts=2, timeout_seconds=30)
    save_standard_blocks(rig, source, pg_url)  # dry run unless a test saves Salesforce credentials
    engine = sa.create_engine(pg_url)
    yield rig, engine, LakeFS(rig.lake_dir.as_uri())
    engine.dispose()


def test_5xx_streak_longer_than_every_retry_budget_fails_clearly_and_commits_nothing(world, source_api, figures):
    rig, engine, lake = world
    source_api.faults.error_times = 10_000
    result = rig.run("--week", WEEK.isoformat())
    figures.faults["source 5xx streak beyond the retry budget (flow level)"] += 1
    assert result.returncode == 1
    assert "SourceUnavailableError" in result.stderr and "HTTP 503" in result.stderr
    # request budget: (task retries 3 + 1) x (flow retries 2 + 1) x max_attempts 2
    assert source_api.stats.requests == 4 * 3 * 2
    _assert_nothing_committed(engine, lake)
    runs = tracking.runs(engine, PIPELINE)  # one tracking run per flow-level attempt of the week
    assert len(runs) == 3 and all("extract" in r.failure_reason and "503" in r.failure_reason for r in runs)


def test_database_connection_killed_mid_run_is_retried_to_success(world, source_api, pg_database, figures):
    rig, engine, lake = world
    proc = rig.popen("--week", WEEK.isoformat())
    deadline = time.monotonic() + 60
    while source_api.stats.pages < 2:  # the run is in extract, with its pooled tracking connection open
        assert rig.alive(proc) and time.monotonic() < deadline
        time.sleep(0.005)
    source_api.faults.slow_seconds, source_api.faults.slow_times = 1.0, 1
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True) as admin:
        killed = admin.execute(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity"
            " where datname = %s and pid <> pg_backend_pid()",
            (pg_database,),
        ).fetchone()[0]
    figures.faults["pg_terminate_backend mid-run"] += 1
    result = rig.finish(proc)
    assert killed >= 1
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(lake, ZONE, WEEK)
    assert manifest is not None and manifest.extra["fetched"] == 300
    assert _db_checkpoint(engine) == NEXT and _variable_checkpoint() == NEXT
    [run] = tracking.runs(engine, PIPELINE)
    assert run.status.startswith("SUCCESS")


def test_azurite_unavailable_at_start_fails_before_any_request(
    rig, pg_url, make_source_api, source_api, azurite, azurite_lake_block, figures
):
    save_standard_blocks(rig, make_source_api("cursor"), pg_url, lake_block=azurite_lake_block)
    engine = sa.create_engine(pg_url)
    with azurite.down():
        result = rig.run("--week", WEEK.isoformat())
    figures.faults["Azurite unavailable at start"] += 1
    assert result.returncode == 1
    assert "LakeUnavailableError" in result.stderr
    assert "AccountKey" not in result.stderr
    assert source_api.stats.requests == 0
    assert _db_checkpoint(engine) is None and _variable_checkpoint() is None
    engine.dispose()


def test_salesforce_5xx_and_expired_session_are_retried_to_one_upsert_per_id(
    rig, pg_url, make_source_api, source_api, fake_salesforce, figures
):
    source_api.config.total = 300
    rig.sf_port = fake_salesforce.port
    save_standard_blocks(
        rig, make_source_api("cursor", page_size=100), pg_url, salesforce=fake_salesforce.credentials("password")
    )
    fake_salesforce.fail_polls(2)  # GET job answers 503 twice
    fake_salesforce.expire_session(on="successfulResults")  # session dies before the results are read
    figures.faults["Salesforce 5xx on job polls"] += 1
    figures.faults["Salesforce session expired mid-sync"] += 1
    result = rig.run("--week", WEEK.isoformat())
    assert result.returncode == 0, result.stderr[-3000:]
    assert fake_salesforce.counts["soap_login"] == 2  # logged in again once
    assert len(fake_salesforce.uploads) == 1  # the job was not sent twice
    engine = sa.create_engine(pg_url)
    assert _db_checkpoint(engine) == NEXT
    engine.dispose()


def test_salesforce_job_failed_commits_no_checkpoint_and_the_rerun_completes(
    rig, pg_url, make_source_api, source_api, fake_salesforce, figures
):
    source_api.config.total = 300
    rig.sf_port = fake_salesforce.port
    save_standard_blocks(
        rig, make_source_api("cursor", page_size=100), pg_url, salesforce=fake_salesforce.credentials("password")
    )
    engine = sa.create_engine(pg_url)
    fake_salesforce.fail_next_job("InvalidBatch : simulated failure", after_rows=10)
    figures.faults["Salesforce job Failed (after 10 rows)"] += 1
    first = rig.run("--week", WEEK.isoformat())
    assert first.returncode == 1 and "SalesforceSyncError" in first.stderr and "simulated failure" in first.stderr
    assert _db_checkpoint(engine) is None and _variable_checkpoint() is None
    partial = set(fake_salesforce.records())
    assert len(partial) == 10
    requests = source_api.stats.requests

    second = rig.run("--week", WEEK.isoformat())
    assert second.returncode == 0, second.stderr[-3000:]
    assert source_api.stats.requests == requests  # extract and transform came from the stage caches
    assert _db_checkpoint(engine) == NEXT == _variable_checkpoint()
    store = fake_salesforce.records()
    assert partial < set(store)
    # the 10 rows Salesforce confirmed in the failed job were not sent again (diff sync against the snapshot)
    import csv
    import io

    resent = {row[0] for row in list(csv.reader(io.StringIO(fake_salesforce.uploads[-1].decode())))[1:]}
    assert not (resent & partial)
    engine.dispose()


def test_lake_block_abfs_without_credentials_names_the_field_before_any_request(
    rig, pg_url, make_source_api, source_api, figures
):
    save_standard_blocks(
        rig, make_source_api("cursor"), pg_url, lake_block=blocks.Lake(base_url="abfs://some-container/lake")
    )
    figures.hostile_inputs["config: abfs lake without credentials"] += 1
    result = rig.run("--week", WEEK.isoformat())
    assert result.returncode == 1 and "azure_credentials" in result.stderr
    assert source_api.stats.requests == 0
