"""Run tracking, checkpoint and pending replay against a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tasks import checkpoint as cp
from tasks import pending
from tasks import tracking as tr
from tasks.errors import DatabaseUnavailableError, DuplicateRunError, TrackingError, is_retryable
from tasks.lake import LakeFS
from tasks.sql import make_engine
from tests.support.postgres import PG_HOST, PG_PORT, PG_USER

P = "weekly-test"
W1 = date(2026, 11, 2)  # Mondays
W2 = date(2026, 11, 9)
W3 = date(2026, 11, 16)
W4 = date(2026, 11, 23)
T0 = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'tracking.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    eng = make_engine(url)
    tr.ensure_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def pg_engine(pg_database: str) -> Iterator[Engine]:
    # A password in the URL (trust auth ignores it) so messages can be checked for leaks.
    eng = make_engine(f"postgresql+psycopg://{PG_USER}:Sup3rS3cretPW@{PG_HOST}:{PG_PORT}/{pg_database}")
    tr.ensure_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def lake(tmp_path) -> LakeFS:
    return LakeFS((tmp_path / "lake").as_uri())


# --- schema and lifecycle -------------------------------------------------------------------------------------


def test_schema_is_idempotent_and_has_the_filtered_unique_index(engine: Engine) -> None:
    tr.ensure_schema(engine)
    tr.ensure_schema(engine)
    insp = sa.inspect(engine)
    assert {"pipeline_checkpoint", "pipeline_run", "pipeline_stage"} <= set(insp.get_table_names())
    indexes = {ix["name"]: ix for ix in insp.get_indexes("pipeline_run")}
    assert indexes["uq_pipeline_run_success"]["unique"]
    assert indexes["uq_pipeline_run_success"]["column_names"] == ["pipeline", "week_start"]
    assert insp.get_pk_constraint("pipeline_stage")["constrained_columns"] == ["run_id", "stage"]


def test_run_and_stage_lifecycle(engine: Engine) -> None:
    run_id = tr.start_run(engine, P, W1, flow_run_id="fr-1", now=T0)
    assert tr.start_run(engine, P, W1, run_id=run_id, now=T0) == run_id  # retry after an ambiguous commit
    tr.start_stage(engine, run_id, "extract", now=T0)
    tr.start_stage(engine, run_id, "transform", rows_in=10, now=T0 + timedelta(seconds=1))
    assert tr.finish_stage(engine, run_id, "extract", "SUCCESS", rows_out=10, now=T0 + timedelta(seconds=1))
    assert not tr.finish_stage(engine, run_id, "extract", "FAILED")  # already closed: no-op
    assert tr.finish_stage(
        engine, run_id, "transform", "SUCCESS_WITH_REJECTS", rows_out=9, detail="1 reject", now=T0 + timedelta(2)
    )
    assert tr.finish_stage(engine, run_id, "sync", "SKIPPED", detail="dry run", now=T0 + timedelta(3))

    run = tr.get_run(engine, run_id)
    assert run.status == "RUNNING" and run.started_at == T0 and run.flow_run_id == "fr-1"

    counts = {"fetched": 10, "valid": 9, "rejected": 1, "duplicates": 0, "synced": 9, "failed_rows": 0}
    assert tr.finish_run(engine, run_id, "SUCCESS_WITH_REJECTS", counts, now=T0 + timedelta(hours=1))
    assert not tr.finish_run(engine, run_id, "FAILED", failure_reason="late")  # already finished: no-op

    run = tr.get_run(engine, run_id)
    assert run.status == "SUCCESS_WITH_REJECTS"
    assert (run.fetched, run.valid, run.rejected, run.synced) == (10, 9, 1, 9)
    assert run.reject_rate_pct == pytest.approx(10.0)
    assert run.ended_at == T0 + timedelta(hours=1)
    assert run.failure_reason is None
    got = {s.stage: s for s in tr.stages(engine, run_id)}
    assert [s.stage for s in tr.stages(engine, run_id)] == ["extract", "transform", "sync"]
    assert got["extract"].status == "SUCCESS" and got["extract"].rows_out == 10
    assert got["transform"].rows_in == 10 and got["transform"].detail == "1 reject"
    assert got["sync"].status == "SKIPPED" and got["sync"].started_at == got["sync"].ended_at
    assert tr.last_successful_run(engine, P, W1).run_id == run_id
    assert tr.last_successful_run(engine, P, W2) is None
    assert tr.runs(engine, P)[0].as_dict()["week_start"] == W1.isoformat()


def test_bad_arguments_name_the_field(engine: Engine) -> None:
    with pytest.raises(TrackingError, match="week_start: 2026-11-03 is a Tuesday"):
        tr.start_run(engine, P, date(2026, 11, 3))
    with pytest.raises(TrackingError, match="pipeline"):
        tr.start_run(engine, "bad/name", W1)
    run_id = tr.start_run(engine, P, W1)
    with pytest.raises(TrackingError, match="status"):
        tr.finish_run(engine, run_id, "DONE")
    with pytest.raises(TrackingError, match=r"counts\.fetched"):
        tr.finish_run(engine, run_id, "SUCCESS", {"fetched": -1})
    with pytest.raises(TrackingError, match=r"counts\.rows"):
        tr.finish_run(engine, run_id, "SUCCESS", {"rows": 1})
    with pytest.raises(TrackingError, match="no run nope"):
        tr.finish_run(engine, "nope", "FAILED")
    assert tr.get_run(engine, run_id).status == "RUNNING"  # nothing half-written


def test_second_successful_run_of_a_week_is_refused(engine: Engine) -> None:
    first = tr.start_run(engine, P, W1)
    tr.finish_run(engine, first, "SUCCESS", {"fetched": 1, "valid": 1})
    with pytest.raises(DuplicateRunError) as info:
        tr.start_run(engine, P, W1)
    assert P in str(info.value) and W1.isoformat() in str(info.value) and first in str(info.value)

    # Past the early check (e.g. two runs raced), the filtered unique index still refuses the second success.
    second = tr.start_run(engine, P, W1, check_duplicate=False)
    with pytest.raises(DuplicateRunError, match=first):
        tr.finish_run(engine, second, "SUCCESS_WITH_REJECTS")
    assert tr.get_run(engine, second).status == "RUNNING"
    assert tr.finish_run(engine, second, "FAILED", failure_reason="duplicate")  # a failed one is fine
    # Other weeks and other pipelines are unaffected.
    tr.finish_run(engine, tr.start_run(engine, P, W2), "SUCCESS")
    tr.finish_run(engine, tr.start_run(engine, "other", W1), "SUCCESS")


def test_failed_then_successful_run_of_the_same_week_is_allowed(engine: Engine) -> None:
    failed = tr.start_run(engine, P, W1, now=T0)
    tr.finish_run(engine, failed, "FAILED", failure_reason=RuntimeError("source down"), now=T0 + timedelta(1))
    ok = tr.start_run(engine, P, W1, now=T0 + timedelta(hours=2))
    tr.finish_run(engine, ok, "SUCCESS", {"fetched": 5, "rejected": 0})
    history = tr.runs(engine, P, week=W1)
    assert [r.run_id for r in history] == [ok, failed]
    assert history[1].failure_reason == "RuntimeError: source down"
    assert tr.last_successful_run(engine, P, W1).run_id == ok


def test_failure_reason_is_scrubbed_and_truncated(engine: Engine) -> None:
    run_id = tr.start_run(engine, P, W1)
    reason = (
        "connect to postgresql+psycopg://etl:Hunter2Pass@db.example:5432/x failed; "
        "DRIVER={ODBC Driver 18 for SQL Server};PWD={se;cr}}et};AccountKey=abc123== "
        "Authorization: Bearer eyJhbGciOi.xyz " + "x" * 5000
    )
    tr.finish_run(engine, run_id, "FAILED", failure_reason=reason)
    stored = tr.get_run(engine, run_id).failure_reason
    assert len(stored) == tr.FAILURE_REASON_LIMIT
    for secret in ("Hunter2Pass", "se;cr", "cr}}et", "abc123", "eyJhbGciOi"):
        assert secret not in stored
    assert stored.endswith("[truncated]") and "db.example:5432" in stored


def test_fail_abandoned_runs(engine: Engine) -> None:
    stale = tr.start_run(engine, P, W1)
    current = tr.start_run(engine, P, W2)
    assert tr.fail_abandoned_runs(engine, P, exclude=current) == 1
    assert tr.get_run(engine, stale).status == "FAILED"
    assert tr.get_run(engine, current).status == "RUNNING"


# --- checkpoint -----------------------------------------------------------------------------------------------


def test_checkpoint_upsert_is_monotonic(engine: Engine) -> None:
    assert cp.get_checkpoint(engine, P) is None
    assert cp.advance_checkpoint(engine, P, W2, "r1", now=T0) == W2
    assert cp.advance_checkpoint(engine, P, W3, "r2", now=T0 + timedelta(1)) == W3
    assert cp.advance_checkpoint(engine, P, W1, "r3") == W3  # backwards: ignored
    assert cp.advance_checkpoint(engine, P, W3, "r4") == W3  # same: ignored
    state = cp.checkpoint_state(engine, P)
    assert (state.next_week_start, state.last_run_id, state.updated_at) == (W3, "r2", T0 + timedelta(1))
    assert cp.advance_checkpoint(engine, P, W1, "r5", force=True) == W1
    assert cp.checkpoint_state(engine, P).last_run_id == "r5"
    assert cp.get_checkpoint(engine, "other") is None
    with pytest.raises(TrackingError, match="next_week_start"):
        cp.advance_checkpoint(engine, P, date(2026, 11, 4), "r6")


def test_concurrent_advance_ends_at_the_max(engine: Engine) -> None:
    weeks = [W1 + timedelta(weeks=i) for i in range(30)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(mine: list[date]) -> None:
        try:
            barrier.wait()
            for week in mine:
                cp.advance_checkpoint(engine, P, week, f"run-{week}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    # One thread climbs, the other descends from the top: the top must win whatever the interleaving.
    threads = [
        threading.Thread(target=worker, args=(weeks[0::2],)),
        threading.Thread(target=worker, args=(list(reversed(weeks[1::2])),)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    state = cp.checkpoint_state(engine, P)
    assert state.next_week_start == weeks[-1]
    assert state.last_run_id == f"run-{weeks[-1]}"


def _commit(engine: Engine, week: date, status: str = "SUCCESS") -> str:
    run_id = tr.start_run(engine, P, week)
    tr.finish_run(engine, run_id, status)
    return run_id


W5, W6 = W4 + timedelta(weeks=1), W4 + timedelta(weeks=2)


def test_checkpoint_moves_across_committed_weeks_only(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    # the first committed week starts the checkpoint
    assert cp.checkpoint_after_week(engine, P, W1, _commit(engine, W1), now=T0) == W2
    # W4 committed ahead (an explicit week, or a backfill whose W2 failed): the checkpoint holds at W2, and says so
    _commit(engine, W2, "FAILED")
    w4 = _commit(engine, W4)
    with caplog.at_level("WARNING", logger="tasks.checkpoint"):
        assert cp.checkpoint_after_week(engine, P, W4, w4) == W2
    assert "week 2026-11-23 is committed, but the checkpoint of weekly-test stays at 2026-11-09" in caplog.text
    state = cp.checkpoint_state(engine, P)
    assert (state.next_week_start, state.updated_at) == (W2, T0)  # nothing written while it holds
    # W2 committed at last: the checkpoint moves to W3, the first week not committed
    w2 = _commit(engine, W2)
    assert cp.checkpoint_after_week(engine, P, W2, w2) == W3
    # W3 committed: it rolls over W4 (committed earlier) to W5
    w3 = _commit(engine, W3)
    assert cp.checkpoint_after_week(engine, P, W3, w3) == W5
    assert cp.checkpoint_state(engine, P).last_run_id == w3
    # a re-run of an old week moves nothing (and the call is idempotent)
    assert cp.checkpoint_after_week(engine, P, W1, "rerun") == W5
    assert cp.checkpoint_after_week(engine, P, W3, w3) == W5
    assert cp.checkpoint_state(engine, P).last_run_id == w3


def test_checkpoint_after_week_rolls_over_weeks_committed_before_a_crash(engine: Engine) -> None:
    """The skip path: W2 and W3 were committed but their checkpoint writes were lost; re-advancing W2 heals it."""
    cp.advance_checkpoint(engine, P, W2, "r1")
    _commit(engine, W2)
    _commit(engine, W3)
    assert cp.checkpoint_after_week(engine, P, W2, "skip") == W4


def test_checkpoint_after_week_baseline_for_an_empty_database(engine: Engine) -> None:
    # the Variable (or first_week) said W1: committing W3 first must not skip W1 and W2
    assert cp.checkpoint_after_week(engine, P, W3, _commit(engine, W3), baseline=W1) == W1
    assert cp.checkpoint_after_week(engine, P, W1, _commit(engine, W1)) == W2
    # once the database has a checkpoint, a baseline changes nothing
    assert cp.checkpoint_after_week(engine, P, W2, _commit(engine, W2), baseline=W6) == W4
    with pytest.raises(TrackingError, match="baseline"):
        cp.checkpoint_after_week(engine, P, W2, "x", baseline=date(2026, 11, 4))
    with pytest.raises(TrackingError, match="week_start"):
        cp.checkpoint_after_week(engine, P, date(2026, 11, 4), "x")


def test_checkpoint_after_week_is_queued_and_replayed(engine: Engine, lake: LakeFS) -> None:
    """The flow's op goes through the pending queue like the others; the replay applies the rule at replay time."""
    w1 = _commit(engine, W1)
    pending.queue_pending(lake, P, "checkpoint_after_week", {"pipeline": P, "week_start": W1, "run_id": w1})
    pending.queue_pending(lake, P, "checkpoint_after_week", {"week_start": W3.isoformat(), "baseline": W1})
    result = pending.replay_pending(engine, lake, P)
    assert (result.applied, result.remaining, result.ok) == (2, 0, True)
    assert cp.get_checkpoint(engine, P) == W2
    pending.queue_pending(lake, P, "checkpoint_after_week", {"pipeline": "other", "week_start": W1})
    assert "not 'weekly-test'" in (pending.replay_pending(engine, lake, P).error or "")


def test_merge_form_of_the_upsert_runs_on_postgresql(pg_engine: Engine) -> None:
    """The MERGE text used for SQL Server, executed for real on PostgreSQL 15 (same semantics)."""

    def merge(week: date, run_id: str, *, force: bool = False) -> date:
        values = {"pipeline": P, "next_week_start": week, "updated_at": T0, "last_run_id": run_id}
        with pg_engine.begin() as conn:
            conn.execute(cp.checkpoint_merge_sql(conn.dialect, force=force), values)
        return cp.get_checkpoint(pg_engine, P)

    assert merge(W2, "a") == W2  # insert
    assert merge(W3, "b") == W3  # forward
    assert merge(W1, "c") == W3  # backwards ignored
    assert merge(W1, "d", force=True) == W1
    assert cp.checkpoint_state(pg_engine, P).last_run_id == "d"


def test_checkpoint_document_round_trip_and_errors() -> None:
    doc = cp.checkpoint_document(W2, "run-1", T0)
    assert doc == {"next_week_start": "2026-11-09", "updated_at": T0.isoformat(), "last_run_id": "run-1"}
    assert len(json.dumps(doc)) < 5000
    assert cp.parse_checkpoint_document(doc) == W2
    assert cp.parse_checkpoint_document(json.dumps(doc)) == W2
    with pytest.raises(TrackingError, match="next_week_start: missing"):
        cp.parse_checkpoint_document({"updated_at": "x"})
    with pytest.raises(TrackingError, match="not an ISO date"):
        cp.parse_checkpoint_document({"next_week_start": "next monday"})
    with pytest.raises(TrackingError, match="Tuesday"):
        cp.parse_checkpoint_document({"next_week_start": "2026-11-10"})
    with pytest.raises(TrackingError, match="JSON object"):
        cp.parse_checkpoint_document(["2026-11-09"])
    with pytest.raises(TrackingError, match="limit"):
        cp.checkpoint_document(W2, "x" * 6000, T0)
    with pytest.raises(TrackingError, match="timezone"):
        cp.checkpoint_document(W2, "r", datetime(2026, 1, 1))


# --- pending replay -------------------------------------------------------------------------------------------


def test_pending_items_replay_in_order_once(engine: Engine, lake: LakeFS) -> None:
    run_id = tr.start_run(engine, P, W1)
    tr.start_stage(engine, run_id, "publish")
    pending.queue_pending(lake, P, "finish_stage", {"run_id": run_id, "stage": "publish", "status": "SUCCESS"})
    pending.queue_pending(lake, P, "finish_run", {"run_id": run_id, "status": "SUCCESS", "counts": {"fetched": 3}})
    pending.queue_pending(lake, P, "advance_checkpoint", {"pipeline": P, "next_week_start": W3, "run_id": run_id})
    # An older checkpoint queued later must not move the checkpoint back (monotonic).
    pending.queue_pending(lake, P, "advance_checkpoint", {"next_week_start": W2.isoformat(), "run_id": "older"})
    items = pending.pending_items(lake, P)
    assert len(items) == 4 and items == sorted(items)
    assert all(i.startswith(f"_pending/{P}/") and i.endswith(".json") for i in items)
    first = json.loads(lake.read_bytes(items[0]))
    assert first["op"] == "finish_stage" and first["args"]["now"].endswith("+00:00")

    result = pending.replay_pending(engine, lake, P)
    assert (result.applied, result.remaining, result.ok) == (4, 0, True)
    assert pending.pending_items(lake, P) == []
    assert tr.get_run(engine, run_id).status == "SUCCESS" and tr.get_run(engine, run_id).fetched == 3
    assert tr.stages(engine, run_id)[0].status == "SUCCESS"
    assert cp.checkpoint_state(engine, P).next_week_start == W3
    assert cp.checkpoint_state(engine, P).last_run_id == run_id

    again = pending.replay_pending(engine, lake, P)
    assert (again.applied, again.remaining, again.ok) == (0, 0, True)


def test_replaying_an_item_that_already_landed_is_a_no_op(engine: Engine, lake: LakeFS) -> None:
    run_id = tr.start_run(engine, P, W1)
    args = {"run_id": run_id, "status": "SUCCESS", "counts": {"fetched": 7}, "now": T0}
    tr.finish_run(engine, **args)  # the write landed, but the caller thought it failed and queued it
    pending.queue_pending(lake, P, "finish_run", args)
    cp.advance_checkpoint(engine, P, W2, run_id)
    pending.queue_pending(lake, P, "advance_checkpoint", {"next_week_start": W2, "run_id": run_id})
    result = pending.replay_pending(engine, lake, P)
    assert (result.applied, result.remaining) == (2, 0)
    assert tr.get_run(engine, run_id).fetched == 7 and len(tr.runs(engine, P)) == 1
    assert cp.get_checkpoint(engine, P) == W2


def test_partial_replay_removes_only_what_was_applied(engine: Engine, lake: LakeFS) -> None:
    pending.queue_pending(lake, P, "advance_checkpoint", {"next_week_start": W2, "run_id": "a"})
    pending.queue_pending(lake, P, "finish_run", {"run_id": "never-started", "status": "SUCCESS"})
    pending.queue_pending(lake, P, "advance_checkpoint", {"next_week_start": W3, "run_id": "c"})
    items = pending.pending_items(lake, P)

    result = pending.replay_pending(engine, lake, P)
    assert (result.applied, result.remaining, result.failed_item) == (1, 2, items[1])
    assert not result.retryable and "never-started" in result.error
    assert pending.pending_items(lake, P) == items[1:]
    assert cp.get_checkpoint(engine, P) == W2  # the third item waits behind the failed one (order kept)
    with pytest.raises(TrackingError, match="pending replay stopped at"):
        result.raise_for_error()


def test_corrupt_pending_item_is_reported_by_file(engine: Engine, lake: LakeFS) -> None:
    lake.write_bytes(f"_pending/{P}/00000000T000000000000000Z-bad.json", b"{not json")
    result = pending.replay_pending(engine, lake, P)
    assert result.applied == 0 and result.remaining == 1
    assert "bad.json" in result.failed_item
    with pytest.raises(TrackingError):
        pending.queue_pending(lake, P, "drop_table", {})
    with pytest.raises(TrackingError, match="unknown argument"):
        pending.queue_pending(lake, P, "finish_run", {"run_id": "x", "status": "SUCCESS", "sql": "drop"})


# --- connection failures (real PostgreSQL kills) --------------------------------------------------------------


def _terminate(pid: int) -> None:
    """pg_terminate_backend from a second connection, then wait until the backend is really gone."""
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(%s)", (pid,))
        for _ in range(500):
            if admin.execute("select 1 from pg_stat_activity where pid = %s", (pid,)).fetchone() is None:
                return
            time.sleep(0.01)
    raise AssertionError(f"backend {pid} survived pg_terminate_backend")


class KillBeforeCheckpointWrite:
    """Kills the session's backend right before the checkpoint upsert is sent, ``times`` times."""

    def __init__(self, engine: Engine, times: int, table: str = "pipeline_checkpoint") -> None:
        self.engine, self.remaining, self.table, self.kills = engine, times, table, 0
        sa.event.listen(engine, "before_cursor_execute", self)

    def __call__(self, conn, cursor, statement, parameters, context, executemany) -> None:
        head = statement.lstrip().upper()
        if self.remaining and self.table.upper() in head and head.startswith(("INSERT", "MERGE", "UPDATE")):
            self.remaining -= 1
            self.kills += 1
            _terminate(conn.connection.dbapi_connection.info.backend_pid)

    def remove(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self)


def test_a_connection_killed_once_is_retried_on_a_fresh_pool(pg_engine: Engine) -> None:
    hook = KillBeforeCheckpointWrite(pg_engine, times=1)
    try:
        assert cp.advance_checkpoint(pg_engine, P, W2, "r1") == W2
    finally:
        hook.remove()
    assert hook.kills == 1
    assert cp.get_checkpoint(pg_engine, P) == W2


def test_idle_pooled_connections_killed_are_replaced_by_pre_ping(pg_engine: Engine, pg_database: str) -> None:
    cp.advance_checkpoint(pg_engine, P, W1, "r0")
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True) as admin:
        pids = [r[0] for r in admin.execute("select pid from pg_stat_activity where datname = %s", (pg_database,))]
    assert pids  # the pool holds an idle connection
    for pid in pids:
        _terminate(pid)
    assert cp.advance_checkpoint(pg_engine, P, W2, "r1") == W2


def test_checkpoint_write_killed_is_queued_and_replayed_exactly_once(pg_engine: Engine, lake: LakeFS) -> None:
    run_id = tr.start_run(pg_engine, P, W1)
    tr.finish_run(pg_engine, run_id, "SUCCESS", {"fetched": 1})
    hook = KillBeforeCheckpointWrite(pg_engine, times=2)  # the write and its one retry both die
    try:
        with pytest.raises(DatabaseUnavailableError) as info:
            cp.advance_checkpoint(pg_engine, P, W2, run_id)
        assert hook.kills == 2
        message = str(info.value)
        assert "advance_checkpoint" in message and "Sup3rS3cretPW" not in message and PG_USER + ":" not in message
        assert is_retryable(info.value) and info.value.__cause__ is None
        assert cp.get_checkpoint(pg_engine, P) is None  # nothing landed

        # The caller's path: apply_or_queue queues when the database is unavailable.
        hook.remaining = 2
        assert (
            pending.apply_or_queue(pg_engine, lake, P, "advance_checkpoint", {"next_week_start": W2, "run_id": run_id})
            is False
        )
    finally:
        hook.remove()
    [item] = pending.pending_items(lake, P)
    stored = json.loads(lake.read_bytes(item))
    assert stored["op"] == "advance_checkpoint" and "Sup3rS3cretPW" not in lake.read_bytes(item).decode()

    result = pending.replay_pending(pg_engine, lake, P)
    assert (result.applied, result.remaining) == (1, 0)
    state = cp.checkpoint_state(pg_engine, P)
    assert (state.next_week_start, state.last_run_id) == (W2, run_id)
    assert pending.replay_pending(pg_engine, lake, P).applied == 0
    assert pending.apply_or_queue(pg_engine, lake, P, "advance_checkpoint", {"next_week_start": W3}) is True


def test_replay_stops_on_a_dropped_connection_and_resumes(pg_engine: Engine, lake: LakeFS) -> None:
    run_id = tr.start_run(pg_engine, P, W1)
    pending.queue_pending(lake, P, "finish_run", {"run_id": run_id, "status": "SUCCESS"})
    pending.queue_pending(lake, P, "advance_checkpoint", {"next_week_start": W2, "run_id": run_id})
    hook = KillBeforeCheckpointWrite(pg_engine, times=2)
    try:
        result = pending.replay_pending(pg_engine, lake, P)
    finally:
        hook.remove()
    assert (result.applied, result.remaining, result.retryable) == (1, 1, True)
    assert "Sup3rS3cretPW" not in result.error
    with pytest.raises(DatabaseUnavailableError):
        result.raise_for_error()
    assert tr.get_run(pg_engine, run_id).status == "SUCCESS"
    assert cp.get_checkpoint(pg_engine, P) is None
    resumed = pending.replay_pending(pg_engine, lake, P)
    assert (resumed.applied, resumed.remaining) == (1, 0)
    assert cp.get_checkpoint(pg_engine, P) == W2


def test_server_down_is_retryable_and_hides_the_password() -> None:
    eng = make_engine(
        "postgresql+psycopg://etl:Sup3rS3cretPW@127.0.0.1:1/tracking", connect_args={"connect_timeout": 2}
    )
    with pytest.raises(DatabaseUnavailableError) as info:
        cp.get_checkpoint(eng, P)
    text = str(info.value)
    assert "Sup3rS3cretPW" not in text and "etl" not in text
    assert "127.0.0.1:1/tracking" in text and "get_checkpoint" in text
    assert info.value.__cause__ is None and info.value.__suppress_context__
    eng.dispose()


def test_sqlite_missing_table_is_not_mistaken_for_unavailable(tmp_path) -> None:
    eng = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(sa.exc.OperationalError, match="no such table"):
        cp.get_checkpoint(eng, P)
    eng.dispose()


class FutureLake(LakeFS):
    """The JSON/list/delete methods the lake owner is adding; the queue must use them when present."""

    calls: list[str]

    def write_json_atomic(self, rel: str, obj: object) -> None:
        self.calls.append("write_json_atomic")
        self.write_bytes(rel, json.dumps(obj).encode())

    def read_json(self, rel: str, default: object = None) -> object:
        self.calls.append("read_json")
        return json.loads(self.read_bytes(rel)) if self.exists(rel) else default

    def list(self, prefix: str) -> list[str]:
        self.calls.append("list")
        path = self._path(prefix)
        return (
            [self.url(prefix, p.rsplit("/", 1)[-1]) for p in self.fs.ls(path, detail=False)]
            if self.fs.exists(path)
            else []
        )

    def delete(self, rel: str) -> None:
        self.calls.append("delete")
        self.fs.rm(self._path(rel))


@pytest.mark.parametrize("kind", ["memory", "future"])
def test_pending_queue_on_other_lakes(kind: str, tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    tr.ensure_schema(engine)
    if kind == "memory":
        lake = LakeFS(f"memory://lake-{time.time_ns()}")
    else:
        lake = FutureLake((tmp_path / "lake").as_uri())
        lake.calls = []
    assert pending.pending_items(lake, P) == []
    pending.queue_pending(lake, P, "advance_checkpoint", {"next_week_start": W2, "run_id": "a"})
    pending.queue_pending(lake, P, "advance_checkpoint", {"next_week_start": W3, "run_id": "b"})
    assert len(pending.pending_items(lake, P)) == 2
    result = pending.replay_pending(engine, lake, P)
    assert (result.applied, result.remaining) == (2, 0)
    assert pending.pending_items(lake, P) == []
    assert cp.checkpoint_state(engine, P).last_run_id == "b"
    if kind == "future":
        assert {"write_json_atomic", "read_json", "list", "delete"} <= set(lake.calls)
    engine.dispose()


def test_sqlite_lock_contention_is_unavailable_and_naive_times_are_refused(tmp_path, lake: LakeFS) -> None:
    path = tmp_path / "locked.db"
    engine = make_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    tr.ensure_schema(engine)
    import sqlite3

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DatabaseUnavailableError, match="locked"):
            cp.advance_checkpoint(engine, P, W2, "r")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert cp.advance_checkpoint(engine, P, W2, "r") == W2
    with pytest.raises(TrackingError, match="timezone"):
        pending.queue_pending(lake, P, "advance_checkpoint", {"next_week_start": W3, "now": datetime(2026, 1, 1)})
    assert pending.pending_items(lake, P) == []
    engine.dispose()


def test_full_refresh_supersedes_the_earlier_success(engine: Engine) -> None:
    week = date(2024, 1, 8)
    first = tr.start_run(engine, "p", week)
    assert tr.finish_run(engine, first, "SUCCESS", {"fetched": 10, "valid": 10})
    second = tr.start_run(engine, "p", week, check_duplicate=False)
    # Without supersede the index refuses a second success for the week ...
    with pytest.raises(DuplicateRunError):
        tr.finish_run(engine, second, "SUCCESS")
    # ... with it, the earlier run is kept as history, marked SUPERSEDED, in the same transaction.
    assert tr.finish_run(engine, second, "SUCCESS_WITH_REJECTS", {"fetched": 12, "rejected": 1}, supersede=True)
    assert tr.get_run(engine, first).status == "SUPERSEDED"
    assert tr.last_successful_run(engine, "p", week).run_id == second


def test_fail_abandoned_runs_scoped_to_a_week_leaves_other_live_weeks_alone(engine: Engine) -> None:
    crashed = tr.start_run(engine, "p", date(2024, 1, 1))
    live_other_week = tr.start_run(engine, "p", date(2024, 1, 8))  # e.g. a concurrent backfill subflow
    assert tr.fail_abandoned_runs(engine, "p", week_start=date(2024, 1, 1)) == 1
    assert tr.get_run(engine, crashed).status == "FAILED"
    assert tr.get_run(engine, live_other_week).status == "RUNNING"
