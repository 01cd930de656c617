"""Crash and restart of the weekly flow: SIGKILL a child process at each stage boundary and in the middle of each
stage, run it again in a fresh process, and check that nothing was lost, duplicated or committed twice.

Each case: run 1 (``python tests/reliability/driver.py --week 2024-01-01`` with a kill point) must die by SIGKILL
where intended; the state it leaves must never have the checkpoint ahead of the data; run 2 (fresh process, same
command, no kill) must succeed. Then:

* the lake holds exactly one committed copy of the week: one manifest, every file it lists intact (SHA-256), no
  file of the week's folder that the manifest does not reference;
* valid + rejected + duplicates = fetched = the rows the source served for the week; no id twice in valid;
* every CSV uploaded to the fake Salesforce, across both runs, never gave one external id two different rows, and
  the fake's store equals the committed metrics;
* checkpoint (DB and Variable) = the next week; the crashed tracking run (if it got that far) is FAILED as
  abandoned; exactly one successful run.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import date, timedelta

import pytest
import sqlalchemy as sa

import blocks
from tasks import checkpoint, tracking
from tasks.lake import LakeFS
from tasks.publish import read_committed, read_manifest
from tests.reliability.conftest import PIPELINE, save_standard_blocks

WEEK = date(2024, 1, 1)
NEXT = WEEK + timedelta(days=7)
TOTAL = 500
ZONE = "curated/events"
WEEK_DIR = f"*/curated/events/week={WEEK.isoformat()}"

pytestmark = pytest.mark.reliability

# id -> (kill point as the README names it, how run 1 is killed, what run 2 is expected to do)
KILL_POINTS = {
    "before-extract": ("before extract (run recorded)", "stage:extract", "redoes"),
    "extract-paging": ("during extract paging (page k in flight)", "external:slow-page", "redoes"),
    # the extract stores each raw part's contract check under staging/.../parts/ while it still fetches
    "extract-check-store": (
        "during the extract, storing a raw part's contract check",
        f"open:*/staging/events/week={WEEK.isoformat()}/parts/.tmp-*",
        "redoes",
    ),
    "extract|transform": ("extract -> transform boundary", "stage:validate_and_transform", "resumes"),
    "transform-write": (
        "during the transform's Parquet write",
        f"open:*/staging/events/week={WEEK.isoformat()}/.tmp-*",
        "resumes",
    ),
    "transform|load": ("transform -> load boundary", "stage:load", "resumes"),
    "publish-write": ("during the Parquet write of the publish", f"open:{WEEK_DIR}/attempt=*/.tmp-*#2", "resumes"),
    "publish-commit": ("publish staged, before the manifest commit", f"rename:{WEEK_DIR}/_manifest.json", "resumes"),
    "load|gate": ("load -> quality gate boundary (week committed)", "stage:quality_gate", "resumes"),
    "gate|sync": ("quality gate -> Salesforce boundary", "stage:salesforce_sync", "resumes"),
    "sf-poll": ("during the Salesforce job poll", "external:sf-poll", "resumes"),
    "sync|run-record": ("after the sync, before the run record", "op:finish_run", "resumes"),
    # the checkpoint lock is taken right before the checkpoint write: killed before taking it ...
    "run-record|checkpoint": (
        "after load + run record, before the checkpoint write",
        "call:flows.weekly.global_lock",
        "skips",
    ),
    # ... and inside it: the re-run waits for the dead holder's lease (60 s, the server's minimum) to expire. (A kill
    # at op:checkpoint_after_week, also inside the lock, leaves the same state as the case above plus this wait.)
    "checkpoint|variable": ("after the DB checkpoint, before the Variable mirror (in the lock)", "mirror", "skips"),
}


def _uploaded_rows(fake) -> dict[str, set[tuple]]:
    """External id -> every distinct row (as sent) across every CSV uploaded to the fake."""
    seen: dict[str, set[tuple]] = {}
    for data in fake.uploads:
        rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
        header, body = rows[0], rows[1:]
        ext = header.index("External_Id__c")
        for row in body:
            seen.setdefault(row[ext], set()).add(tuple(zip(header, row, strict=True)))
    return seen


def _kill_externally(rig, proc, spec: str, source_api, fake) -> None:
    """Wait for the expected state to appear (seen from the outside), then SIGKILL the child."""
    deadline = time.monotonic() + 90
    if spec == "external:slow-page":
        while source_api.stats.pages < 4:
            assert rig.alive(proc) and time.monotonic() < deadline, "child ended before page 4"
            time.sleep(0.005)
        source_api.faults.slow_seconds = 3.0
        source_api.faults.slow_times = 1
        while source_api.stats.in_flight == 0 or source_api.faults.slow_times:
            assert rig.alive(proc) and time.monotonic() < deadline, "child ended before the slow page"
            time.sleep(0.005)
    elif spec == "external:sf-poll":
        while not any(j.state == "InProgress" for j in list(fake.jobs.values())) or fake.counts["get_job"] < 2:
            assert rig.alive(proc) and time.monotonic() < deadline, "child ended before polling a job"
            time.sleep(0.01)
    else:
        raise AssertionError(spec)
    rig.kill(proc)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_loses_and_duplicates_nothing(
    point, rig, pg_url, make_source_api, source_api, fake_salesforce, figures
):
    name, spec, expected = KILL_POINTS[point]
    source_api.config.total = TOTAL
    source_api.config.auth, source_api.config.secret = "bearer", "tok-reliability"
    source = make_source_api(
        "cursor", page_size=50, pages_per_file=2, auth="bearer", secret="tok-reliability", timeout_seconds=30
    )
    rig.sf_port = fake_salesforce.port
    save_standard_blocks(rig, source, pg_url, salesforce=fake_salesforce.credentials("password"))
    engine = sa.create_engine(pg_url)
    lake = LakeFS(rig.lake_dir.as_uri())

    # --- run 1: dies by SIGKILL at the kill point ---
    if spec.startswith("external:"):
        if spec == "external:sf-poll":
            fake_salesforce.polls_until_done = 10**6  # the job stays InProgress while the flow polls
        proc = rig.popen("--week", WEEK.isoformat())
        _kill_externally(rig, proc, spec, source_api, fake_salesforce)
        first = rig.finish(proc)
        fake_salesforce.polls_until_done = 1
    else:
        first = rig.run("--week", WEEK.isoformat(), kill_at=spec)
        assert first.killed_at == spec, f"died elsewhere (rc={first.returncode}):\n{first.stderr[-3000:]}"
    assert first.killed, f"run 1 was not killed (rc={first.returncode}):\n{first.stderr[-3000:]}"
    figures.kill_points.append(name)

    # Whatever the crash left: the checkpoint is never ahead of the data.
    db_cp = checkpoint.get_checkpoint(engine, PIPELINE) if sa.inspect(engine).has_table("pipeline_checkpoint") else None
    var_cp = _variable_checkpoint()
    if db_cp is not None:
        assert read_manifest(lake, ZONE, WEEK) is not None, "DB checkpoint advanced without a committed week"
        assert db_cp <= NEXT
    if var_cp is not None:
        assert db_cp is not None and var_cp <= db_cp, "Variable ahead of the database checkpoint"
    if point.startswith(("run-record", "checkpoint")):  # killed where intended: run recorded, checkpoint not
        assert [r.status for r in tracking.runs(engine, PIPELINE)] in (["SUCCESS"], ["SUCCESS_WITH_REJECTS"])
        assert (db_cp is not None) == (point == "checkpoint|variable") and var_cp is None
    requests_before = source_api.stats.requests
    uploads_before = len(fake_salesforce.uploads)
    runs_before = tracking.runs(engine, PIPELINE) if sa.inspect(engine).has_table("pipeline_run") else []

    # --- run 2: fresh process, same command ---
    second = rig.run("--week", WEEK.isoformat())
    assert second.returncode == 0, f"re-run failed:\n{second.stderr[-4000:]}"

    # exactly one committed copy of the week
    manifest = read_manifest(lake, ZONE, WEEK)
    assert manifest is not None
    week_files = set(lake.list(f"{ZONE}/week={WEEK.isoformat()}"))
    listed = {lake.rel(ref.url) for ref in manifest.files.values()}
    assert week_files == listed | {f"{ZONE}/week={WEEK.isoformat()}/_manifest.json"}, week_files - listed
    valid = read_committed(lake, ZONE, WEEK, "valid.parquet")  # checks SHA-256 against the manifest
    rejects = read_committed(lake, ZONE, WEEK, "rejects.parquet")
    metrics = read_committed(lake, ZONE, WEEK, "metrics.parquet")

    # rows: everything served is accounted for, nothing twice
    extra = manifest.extra
    assert extra["fetched"] == TOTAL
    assert extra["valid"] + extra["rejected"] + extra["duplicates"] == TOTAL
    assert valid.height == extra["valid"] and rejects.height == extra["rejected"] + extra["duplicates"]
    lost = TOTAL - (valid.height + rejects.height)
    duplicated = valid.height - valid["id"].n_unique()
    assert lost == 0 and duplicated == 0
    figures.rows_served += TOTAL
    figures.rows_lost += lost
    figures.rows_duplicated += duplicated

    # Salesforce: no external id ever sent with two different rows; the store equals the committed metrics
    for ext, rows in _uploaded_rows(fake_salesforce).items():
        assert len(rows) == 1, f"{ext} upserted with different values: {rows}"
    store = fake_salesforce.records()
    assert set(store) == set(metrics["External_Id__c"].to_list())
    sample = metrics.row(0, named=True)
    assert int(store[sample["External_Id__c"]]["Event_Count__c"]) == sample["Event_Count__c"]

    # checkpoint and tracking
    assert checkpoint.get_checkpoint(engine, PIPELINE) == NEXT
    assert _variable_checkpoint() == NEXT
    runs = tracking.runs(engine, PIPELINE)
    successes = [r for r in runs if r.status.startswith("SUCCESS")]
    assert len(successes) == 1
    crashed = [r for r in runs_before if r.status == "RUNNING"]
    for run in crashed:
        after = next(r for r in runs if r.run_id == run.run_id)
        assert after.status == "FAILED" and "abandoned" in (after.failure_reason or "")
    assert all(r.status != "RUNNING" for r in runs)

    # what the re-run did
    refetched = source_api.stats.requests > requests_before
    new_success = successes[0].run_id not in {r.run_id for r in runs_before}
    if not new_success:
        did = "skips"
    elif refetched:
        did = "redoes"
    else:
        did = "resumes"
    load_detail = ""
    if new_success:
        load = {s.stage: s for s in tracking.stages(engine, successes[0].run_id)}.get("load")
        load_detail = (load.detail or "") if load else ""
    figures.behaviour[name] = (
        f"{did}: refetched={refetched}, load={load_detail.split(':')[0] or '-'}, "
        f"sf uploads={len(fake_salesforce.uploads) - uploads_before}"
    )
    assert did == expected, figures.behaviour[name]
    engine.dispose()


def _variable_checkpoint() -> date | None:
    import json

    from prefect.variables import Variable

    value = Variable.get("weekly-checkpoint", default=None)
    if value is None:
        return None
    doc = json.loads(value) if isinstance(value, str) else value
    return date.fromisoformat(doc["next_week_start"])


def test_blocks_are_saved_on_the_session_server(rig, make_source_api, pg_url):
    """The rig's own plumbing: blocks saved by the test process land on the session server the children use."""
    from prefect.settings import PREFECT_API_URL

    save_standard_blocks(rig, make_source_api("cursor"), pg_url)
    assert PREFECT_API_URL.value() == rig.server_url
    assert blocks.SourceApi.load(blocks.SOURCE_BLOCK).pagination == "cursor"
