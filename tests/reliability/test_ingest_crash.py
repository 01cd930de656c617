"""Crash and restart of the ingest flow (``python -m flows.ingest``) on a CSV source into PostgreSQL.

A 600-row CSV (plus 12 malformed lines) is read in batches of 100; each batch commits raw rows, normalized upserts,
rejects and the checkpoint in one transaction. The child is SIGKILLed between batches and inside a batch's
transaction (after the raw insert, before the normalized upsert), then run again in a fresh process. Afterwards:
every source row is in ``normalized_data`` exactly once, every raw record once, every malformed line rejected
once, and the checkpoint is at the end of the file.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import blocks.ingest as ingest_blocks

pytestmark = pytest.mark.reliability

ROWS = 600
BAD_EVERY = 50  # a malformed line after every 50th row: 12 rejects
KILL_POINTS = {
    "between-batches": ("ingest: between batches (2 of 7 committed)", "call:tasks.ingest_db.load_batch#3"),
    "raw|normalized": (
        "ingest: between raw insert and normalized upsert (inside batch 3's transaction)",
        "call:tasks.ingest_db.upsert_normalized#3",
    ),
    "after-last-batch": ("ingest: after the last batch, before the run record", "call:flows.ingest.finish_run"),
}


def _csv(path) -> None:
    lines = ["id,name,value,category"]
    for i in range(ROWS):
        lines.append(f"r{i:05d},item {i},{i * 1.5},cat{i % 7}")
        if i % BAD_EVERY == BAD_EVERY - 1:
            lines.append(f"bad{i},too,many,columns,here")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_ingest_sigkill_then_rerun_loses_and_duplicates_nothing(point, rig, pg_url, figures):
    name, spec = KILL_POINTS[point]
    csv_path = rig.tmp_path / "orders.csv"
    _csv(csv_path)
    rig.save(ingest_blocks.CsvIngestSource(name="orders", location=str(csv_path), batch_size=100), "orders")
    rig.extra_env["RELIABILITY_MODULE"] = "flows.ingest"
    args = ("--source", "ingest-csv-source/orders", "--database-url", pg_url)

    first = rig.run(*args, kill_at=spec)
    assert first.killed and first.killed_at == spec, first.stderr[-3000:]
    figures.kill_points.append(name)
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        crashed = {r for (r,) in conn.execute(sa.text("select run_id from etl_runs where status = 'running'"))}

    second = rig.run(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    with engine.connect() as conn:
        q = lambda sql: conn.execute(sa.text(sql)).scalar_one()  # noqa: E731
        normalized = q("select count(*) from normalized_data where source = 'orders'")
        distinct = q("select count(distinct source_id) from normalized_data where source = 'orders'")
        raw = q("select count(*) from raw_csv_data where source = 'orders'")
        rejects = q("select count(*) from etl_rejects where source = 'orders'")
        line = q("select (cursor->>'line')::int from etl_checkpoint where source = 'orders'")
        statuses = dict(conn.execute(sa.text("select run_id, status from etl_runs")).all())
    engine.dispose()
    bad = ROWS // BAD_EVERY
    lost = ROWS - normalized
    duplicated = normalized - distinct + max(0, rejects - bad)
    figures.rows_served += ROWS + bad
    figures.rows_lost += max(lost, 0) + max(0, bad - rejects)
    figures.rows_duplicated += duplicated
    assert (normalized, distinct, raw, rejects) == (ROWS, ROWS, ROWS, bad)
    assert line == ROWS + bad + 1  # header + every line
    assert list(statuses.values()).count("success") == 1
    figures.behaviour[name] = "resumes from the last committed batch (checkpoint line)"
    # the killed run's liveness lock died with its process: the re-run's start marked it failed
    assert crashed and all(statuses[r] == "failed" for r in crashed), f"crashed run(s) {sorted(crashed)}: {statuses}"
