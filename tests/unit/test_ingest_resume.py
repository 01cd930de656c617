"""One source end to end without Prefect: resume from the last committed batch after a real database failure,
re-ingest is a no-op, schema drift accepted or failed per source, reject-rate gate."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from blocks.ingest import DEFAULT_FIELD_MAP
from tasks.errors import DataQualityError, SchemaDriftError
from tasks.ingest_db import get_checkpoint
from tasks.ingest_sources import ingest_batches, read_csv_batches
from tests.unit.test_ingest_db import fail_on_source_id


def _csv(path, rows, header="id,name,value"):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return str(path)


def _run(engine, location, run_id, **kw):
    def batches(cp):
        line = cp.cursor["line"] if cp is not None and cp.cursor.get("location") == location else 0
        return read_csv_batches(location, batch_size=kw.pop("batch_size", 3), start_after_line=line)

    return ingest_batches(
        engine, kind="csv", source="orders", field_map=DEFAULT_FIELD_MAP, make_batches=batches, run_id=run_id, **kw
    )


def test_failure_mid_source_resumes_from_the_last_committed_batch(ingest_engine, tmp_path):
    location = _csv(tmp_path / "o.csv", [f"{i},n{i},{i}" for i in range(1, 11)])
    fail_on_source_id(ingest_engine, "8")  # the third batch (lines 8-10) fails
    with pytest.raises(Exception, match="injected failure"):
        _run(ingest_engine, location, "run-1")
    cursor = get_checkpoint(ingest_engine, "orders").cursor
    assert (cursor["location"], cursor["line"]) == (location, 7)
    with ingest_engine.begin() as conn:
        conn.exec_driver_sql("drop trigger _boom on normalized_data")
        assert conn.execute(text("select count(*) from normalized_data")).scalar() == 6

    outcome = _run(ingest_engine, location, "run-2")
    assert outcome.counts == {"read": 4, "raw_new": 4, "duplicates": 0, "upserted": 4, "rejected": 0}
    with ingest_engine.connect() as conn:
        runs = dict(conn.execute(text("select run_id, count(*) from raw_csv_data group by run_id")).all())
        assert runs == {"run-1": 6, "run-2": 4}  # nothing read twice, nothing lost
        assert conn.execute(text("select count(*) from normalized_data")).scalar() == 10

    # the same file again: everything before the checkpoint is skipped; from scratch it is a no-op
    assert _run(ingest_engine, location, "run-3").counts["read"] == 0
    with ingest_engine.begin() as conn:
        conn.exec_driver_sql("delete from etl_checkpoint")
    again = _run(ingest_engine, location, "run-4")
    assert again.counts == {"read": 10, "raw_new": 0, "duplicates": 10, "upserted": 0, "rejected": 0}


def test_schema_drift_accept_then_fail(ingest_engine, tmp_path):
    first = _csv(tmp_path / "a.csv", ["1,a,1", "2,b,2"])
    assert _run(ingest_engine, first, "run-1").drift is None  # first run: the baseline

    seen = []
    drifted = _csv(tmp_path / "b.csv", ["3,c,x,1", "4,d,y,2"], header="id,name,value,extra")
    outcome = _run(ingest_engine, drifted, "run-2", on_drift=lambda *a: seen.append(a))
    assert outcome.drift.added == {"extra": "number"}
    assert outcome.drift.changed == {"value": ("number", "string")}
    assert outcome.counts["upserted"] == 0 and outcome.counts["rejected"] == 2  # 'x' is not a number
    assert seen and seen[0][0] == "orders" and seen[0][2] == "accept"

    back = _csv(tmp_path / "c.csv", ["5,e,z"], header="id,name,value")
    with pytest.raises(SchemaDriftError, match="removed extra"):
        _run(ingest_engine, back, "run-3", drift_policy="fail")
    with ingest_engine.connect() as conn:
        drift = conn.execute(text("select run_id, policy, removed from etl_schema_drift order by id")).all()
    assert [(r[0], r[1]) for r in drift] == [("run-2", "accept"), ("run-3", "fail")]
    assert "extra" in drift[1][2]

    # a refused drift does not become the baseline: the next run with policy fail refuses it again
    with pytest.raises(SchemaDriftError):
        _run(ingest_engine, _csv(tmp_path / "d.csv", ["6,f,w"]), "run-4", drift_policy="fail")


def test_added_field_with_policy_fail_stops_before_loading(ingest_engine, tmp_path):
    _run(ingest_engine, _csv(tmp_path / "a.csv", ["1,a,1"]), "run-1")
    with pytest.raises(SchemaDriftError, match="added extra"):
        _run(ingest_engine, _csv(tmp_path / "b.csv", ["2,b,2,z"], "id,name,value,extra"), "run-2", drift_policy="fail")
    with ingest_engine.connect() as conn:
        assert conn.execute(text("select count(*) from raw_csv_data where run_id = 'run-2'")).scalar() == 0


def test_reject_rate_gate(ingest_engine, tmp_path):
    location = _csv(tmp_path / "a.csv", ["1,a,1", "2,b,bad", "3,c,bad", "x,y"])
    with pytest.raises(DataQualityError, match="75.00%"):
        _run(ingest_engine, location, "run-1", reject_threshold_pct=50)
