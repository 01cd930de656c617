"""The weekly flow against the services it is built for: Azure Blob (Azurite), PostgreSQL faults, Slack alerts."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import psycopg
import pytest
from prefect.blocks.notifications import SlackWebhook

import blocks
from flows.weekly import CURATED_ZONE, weekly_reverse_etl
from tasks import pending, tracking
from tasks.errors import DataQualityError, LakeUnavailableError
from tasks.lake import LakeFS
from tasks.publish import read_manifest
from tests.flows.conftest import WEEK, checkpoint_variable, db_checkpoint

PIPELINE = "weekly-customer-metrics"


def _abfs_lake(block) -> LakeFS:
    return LakeFS.from_block(block, retries=1, retry_backoff=0.1)


def test_weekly_run_on_azurite_verifies_and_repairs_remote_files(
    weekly_env, make_source_api, source_api, azurite_lake_block
):
    weekly_env.save(make_source_api("page_number"), blocks.SOURCE_BLOCK)
    weekly_env.save(azurite_lake_block, blocks.LAKE_BLOCK)
    weekly_env.settings()
    lake = _abfs_lake(azurite_lake_block)

    first = weekly_reverse_etl(week=WEEK).weeks[0]
    assert first.status.startswith("SUCCESS")
    manifest = read_manifest(lake, CURATED_ZONE, WEEK)
    assert manifest is not None and all(url.startswith("abfs://") for url in first.files.values())
    for ref in manifest.files.values():  # SHA-256 recorded as blob metadata and equal to the manifest's
        assert lake.remote_sha256(ref.url) == ref.sha256
    requests_before = source_api.stats.requests

    # Intact: a re-run skips the week.
    assert weekly_reverse_etl(week=WEEK).weeks[0].status == "SKIPPED"

    # A deleted remote file is re-uploaded by the next run; a corrupted one (bytes changed behind the lake's
    # back, no matching metadata) is replaced. Nothing is fetched again: the stage caches hold.
    metrics = manifest.files["metrics.parquet"]
    valid = manifest.files["valid.parquet"]
    lake.delete(metrics.url)
    lake.fs.pipe_file(lake._path(valid.url), b"not parquet at all")
    repaired = weekly_reverse_etl(week=WEEK).weeks[0]
    assert repaired.status == first.status
    assert lake.remote_sha256(metrics.url) == metrics.sha256
    assert lake.remote_sha256(valid.url) == valid.sha256 and lake.read_bytes(valid.url)[:4] == b"PAR1"
    assert source_api.stats.requests == requests_before
    assert read_manifest(lake, CURATED_ZONE, WEEK).files == manifest.files  # same committed files, repaired in place


def test_azurite_going_away_mid_run_fails_clearly_and_keeps_checkpoint(
    weekly_env, make_source_api, source_api, azurite, azurite_lake_block, pg_url
):
    source_api.config.total = 2000
    weekly_env.save(make_source_api("page_number", page_size=100, pages_per_file=5), blocks.SOURCE_BLOCK)
    weekly_env.save(azurite_lake_block, blocks.LAKE_BLOCK)
    weekly_env.settings()
    engine = weekly_env.database(pg_url)
    source_api.faults.slow_seconds = 1.0
    source_api.faults.slow_times = 0

    def stop_after_first_part() -> None:
        deadline = time.monotonic() + 60
        while source_api.stats.pages < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        azurite.stop()  # during extract paging: part 1 is written, part 2 cannot be

    killer = threading.Thread(target=stop_after_first_part, daemon=True)
    killer.start()
    try:
        with pytest.raises(LakeUnavailableError) as info:
            weekly_reverse_etl(week=WEEK)
    finally:
        killer.join(timeout=60)
        azurite.start()
    assert "AccountKey" not in str(info.value) and "Eby8vdM02" not in str(info.value)
    assert db_checkpoint(engine) is None and checkpoint_variable() is None
    runs = tracking.runs(engine, PIPELINE)
    # Task retries, then week retries: several attempts, every one recorded FAILED at the extract stage.
    assert len(runs) >= 2 and all(r.status == "FAILED" and "extract" in r.failure_reason for r in runs)


def test_tracking_writes_lost_to_a_killed_connection_are_replayed_once(
    weekly_env, make_source_api, source_api, pg_url, pg_database, monkeypatch
):
    weekly_env.save(make_source_api("page_number"), blocks.SOURCE_BLOCK)
    weekly_env.lake_block()
    weekly_env.settings()
    engine = weekly_env.database(pg_url)
    real_apply = pending.apply_or_queue
    admin = psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True)

    def kill_database_then_apply(engine_, lake, pipeline, op, args, **kw):
        if op == "finish_run":  # the data is committed in the lake; now the database goes away for real
            admin.execute(f'alter database "{pg_database}" allow_connections false')
            admin.execute("select pg_terminate_backend(pid) from pg_stat_activity where datname = %s", (pg_database,))
        return real_apply(engine_, lake, pipeline, op, args, **kw)

    monkeypatch.setattr(pending, "apply_or_queue", kill_database_then_apply)
    try:
        summary = weekly_reverse_etl(week=WEEK)
    finally:
        admin.execute(f'alter database "{pg_database}" allow_connections true')
        monkeypatch.setattr(pending, "apply_or_queue", real_apply)
    assert summary.weeks[0].status.startswith("SUCCESS")
    assert len(pending.pending_items(weekly_env.lake, PIPELINE)) == 2  # finish_run + checkpoint_after_week queued
    [run] = tracking.runs(engine, PIPELINE)
    assert run.status == "RUNNING" and db_checkpoint(engine) is None
    assert checkpoint_variable() is None  # the mirror never runs ahead of the database

    requests_before = source_api.stats.requests
    again = weekly_reverse_etl(week=WEEK)
    assert again.replayed_pending == 2
    assert pending.pending_items(weekly_env.lake, PIPELINE) == []
    [run] = tracking.runs(engine, PIPELINE)  # applied exactly once, no second run for the week
    assert run.status == summary.weeks[0].status and run.fetched == summary.weeks[0].fetched
    assert db_checkpoint(engine) == WEEK + timedelta(days=7)
    assert checkpoint_variable()["next_week_start"] == (WEEK + timedelta(days=7)).isoformat()
    assert again.weeks[0].status == "SKIPPED" and source_api.stats.requests == requests_before
    admin.close()


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def slack_receiver():
    _Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/services/T000/B000/hook-secret-xyz", _Receiver.received
    server.shutdown()


def test_failure_posts_slack_alert_naming_flow_week_stage_and_error(
    weekly_env, make_source_api, source_api, slack_receiver
):
    url, received = slack_receiver
    source_api.config.invalid_ratio = 0.4
    weekly_env.save(make_source_api("page_number", auth="api_key", secret="api-key-SECRET-42"), blocks.SOURCE_BLOCK)
    source_api.config.auth, source_api.config.secret = "api_key", "api-key-SECRET-42"
    weekly_env.settings()
    weekly_env.save(SlackWebhook(url=url), "weekly-alerts")

    with pytest.raises(DataQualityError):
        weekly_reverse_etl(week=WEEK)

    [message] = received
    text = message["text"]
    assert "weekly-reverse-etl" in text and WEEK.isoformat() in text
    assert "stage: quality_gate" in text and "DataQualityError" in text and "threshold" in text
    assert "api-key-SECRET-42" not in text and "hook-secret-xyz" not in text


def test_postgres_restarted_mid_run_ends_in_one_committed_success(
    weekly_env, make_source_api, source_api, pg_url, pg_database
):
    import subprocess
    from pathlib import Path

    source_api.faults.slow_times, source_api.faults.slow_seconds = 6, 0.5  # extract spans the restart
    weekly_env.save(make_source_api("page_number", page_size=100), blocks.SOURCE_BLOCK)
    weekly_env.lake_block()
    weekly_env.settings()
    engine = weekly_env.database(pg_url)
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    restarted: list[int] = []

    def restart_during_extract() -> None:
        deadline = time.monotonic() + 60
        while source_api.stats.pages < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        done = subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], capture_output=True
        )
        restarted.append(done.returncode)

    restarter = threading.Thread(target=restart_during_extract, daemon=True)
    restarter.start()
    summary = weekly_reverse_etl(week=WEEK)
    restarter.join(timeout=60)

    assert restarted == [0]  # the real server really went down and came back during the run
    assert summary.weeks[0].status.startswith("SUCCESS")
    runs = tracking.runs(engine, PIPELINE)
    assert [r.status for r in runs].count(summary.weeks[0].status) == 1  # one committed success, no duplicate
    assert all(r.status in ("SUCCESS", "SUCCESS_WITH_REJECTS", "FAILED") for r in runs)
    assert db_checkpoint(engine) == WEEK + timedelta(days=7)
    manifest = read_manifest(weekly_env.lake, CURATED_ZONE, WEEK)
    assert manifest.extra["fetched"] == summary.weeks[0].fetched == source_api.config.total
