"""Run liveness of the ingest flow (real PostgreSQL): a run whose process was SIGKILLed is marked failed by the next
start; a live run (lock held by another session) and a finished run are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tasks.errors import DatabaseUnavailableError, TrackingError
from tasks.ingest_db import ABANDONED_REASON, RUN_LOCK_NAMESPACE, finish_run, run_lock_key, start_run

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import sys, time
    from sqlalchemy import create_engine
    from tasks.ingest_db import start_run

    lease = start_run(create_engine(sys.argv[1]), sys.argv[2])
    print("started", flush=True)
    time.sleep(120)
    """
)


def _lock_holders(engine, run_id: str) -> int:
    """Sessions holding the run's advisory lock (pg_locks shows the two int4 keys as unsigned oids)."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "select count(*) from pg_locks where locktype = 'advisory' and objsubid = 2 and granted "
                "and classid = cast(:ns as oid) and objid = cast(:k as oid)"
            ),
            {"ns": RUN_LOCK_NAMESPACE % 2**32, "k": run_lock_key(run_id) % 2**32},
        ).scalar_one()


def _statuses(engine) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(text("select run_id, status, failure_reason from etl_runs")).all()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_killed_run_is_failed_live_and_finished_runs_are_untouched(ingest_engine, pg_url):
    # a run in another process, SIGKILLed below while 'running'
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, pg_url, "killed"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    live = None
    try:
        assert child.stdout.readline().strip() == "started", child.stderr.read() if child.poll() is not None else ""
        assert _lock_holders(ingest_engine, "killed") == 1  # the child really holds its liveness lock
        # while the child lives: a run that finishes, and a run that stays live in THIS process (its own session);
        # neither start touches the child's run, its owner is alive
        with start_run(ingest_engine, "done") as done:
            finish_run(ingest_engine, "done", status="success", counts={"a": {"read": 1}})
        live = start_run(ingest_engine, "live")
        assert done.abandoned == [] and live.abandoned == []
        assert _statuses(ingest_engine)["killed"] == ("running", None)

        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
        # synchronisation, not a timing assertion: the server ends the dead client's session asynchronously
        deadline = time.monotonic() + 30
        while _lock_holders(ingest_engine, "killed") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _lock_holders(ingest_engine, "killed") == 0, "the server never ended the killed client's session"

        with start_run(ingest_engine, "next") as lease:
            assert lease.held and lease.abandoned == ["killed"]
            assert _statuses(ingest_engine) == {
                "killed": ("failed", ABANDONED_REASON),
                "live": ("running", None),
                "done": ("success", None),
                "next": ("running", None),
            }
        assert not lease.held and _lock_holders(ingest_engine, "next") == 0
        # "next" was released without finish_run (its process "ended"): the next start marks it, "live" stays
        with start_run(ingest_engine, "later") as later:
            assert later.abandoned == ["next"]
        assert _statuses(ingest_engine)["live"] == ("running", None)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
        if live is not None:
            live.release()


def test_same_run_id_live_elsewhere_is_refused(ingest_engine):
    with start_run(ingest_engine, "twin"):
        with pytest.raises(TrackingError, match="running twice"):
            start_run(ingest_engine, "twin", lock_wait_seconds=0.2)
    assert _lock_holders(ingest_engine, "twin") == 0


def test_unreachable_database_is_unavailable_without_credentials():
    engine = create_engine("postgresql+psycopg://someone:s3cret-pw@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseUnavailableError) as info:
        start_run(engine, "r1")
    assert "s3cret-pw" not in str(info.value) and "someone" not in str(info.value)
    assert "start ingest run r1" in str(info.value)
