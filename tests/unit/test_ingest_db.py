"""Normalization contract, COPY upsert, raw dedupe, checkpoints in the batch transaction, runs, drift (real PG)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from blocks.ingest import DEFAULT_FIELD_MAP
from tasks.ingest_db import (
    Checkpoint,
    NormalizedRecord,
    diff_schema,
    finish_run,
    get_checkpoint,
    load_batch,
    normalize,
    observe_json_schema,
    raw_frame,
    start_run,
    upsert_normalized,
)

FETCHED = datetime(2025, 1, 1, tzinfo=UTC)


def _raw(records: list[dict]) -> pl.DataFrame:
    return raw_frame([json.dumps(r) for r in records])


def test_normalize_parses_safely_and_names_the_bad_field():
    raw = _raw(
        [
            {"id": "1", "name": " a ", "value": "1.5", "created_at": "2024-01-02T03:04:05Z", "category": "x"},
            {"id": "2", "value": "abc"},
            {"name": "no id"},
            {"id": 4, "created_at": "Tue, 10 Jun 2003 04:00:00 GMT", "value": 3},
            {"id": "5", "created_at": "2024-13-45"},
            {"id": "6", "value": "inf"},
            {"id": "7", "updated_at": "2024-01-02 10:00:00+02:00", "created_at": "2024-01-02"},
            {"id": "8", "name": "x" * 1001},
            {"id": "9", "name": "nul \u0000 inside"},
        ]
    )
    valid, rejects = normalize(raw, source="s", field_map=DEFAULT_FIELD_MAP, fetched_at=FETCHED)
    assert valid["source_id"].to_list() == ["1", "4", "7"]
    assert valid["name"].to_list()[0] == "a"
    assert valid.row(1, named=True)["created_at"] == datetime(2003, 6, 10, 4, tzinfo=UTC)
    row7 = valid.row(2, named=True)
    assert row7["created_at"] == datetime(2024, 1, 2, tzinfo=UTC)
    assert row7["updated_at"] == datetime(2024, 1, 2, 8, tzinfo=UTC)
    got = {(r["ref"], r["field"]) for r in rejects.iter_rows(named=True)}
    assert got == {(2, "value"), (3, "source_id"), (5, "created_at"), (6, "value"), (8, "name"), (9, "payload")}
    assert "abc" in rejects.filter(pl.col("ref") == 2)["reason"][0]
    # missing dates fall back to the fetch time; the rows satisfy the pydantic contract
    for row in valid.iter_rows(named=True):
        NormalizedRecord.model_validate({k: row[k] for k in NormalizedRecord.model_fields})
    assert valid.filter(pl.col("source_id") == "4")["updated_at"][0] == datetime(2003, 6, 10, 4, tzinfo=UTC)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "name", "value", "created_at", "category", "description"]),
        st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=True), st.none()),
    )
)
def test_vectorized_checks_agree_with_the_contract(record):
    valid, rejects = normalize(_raw([record]), source="s", field_map=DEFAULT_FIELD_MAP, fetched_at=FETCHED)
    assert valid.height + rejects.height == 1  # never lost, never duplicated, never raises
    if valid.height:
        row = valid.row(0, named=True)
        NormalizedRecord.model_validate({k: row[k] for k in NormalizedRecord.model_fields})


def test_upsert_is_idempotent_and_updates_changed_rows(ingest_engine):
    valid, _ = normalize(
        _raw([{"id": str(i), "name": f"n{i}", "value": i} for i in range(500)]),
        source="s",
        field_map=DEFAULT_FIELD_MAP,
        fetched_at=FETCHED,
    )
    with ingest_engine.begin() as conn:
        assert upsert_normalized(conn, valid, "r1") == 500
    with ingest_engine.begin() as conn:
        assert upsert_normalized(conn, valid, "r2") == 0  # same content: untouched
    changed, _ = normalize(
        _raw([{"id": "7", "name": "seven", "value": 70}, {"id": "7", "name": "later", "value": 71}]),
        source="s",
        field_map=DEFAULT_FIELD_MAP,
        fetched_at=FETCHED,
    )
    with ingest_engine.begin() as conn:
        assert upsert_normalized(conn, changed, "r3") == 1  # duplicate key in one frame: last one wins
    with ingest_engine.connect() as conn:
        assert conn.execute(text("select count(*) from normalized_data")).scalar() == 500
        row = conn.execute(text("select name, value, run_id from normalized_data where source_id = '7'")).one()
        assert tuple(row) == ("later", 71.0, "r3")
        assert conn.execute(text("select data_version from etl_meta")).scalar() == 2


def test_load_batch_dedupes_raw_and_commits_checkpoint_with_the_batch(ingest_engine):
    records = [{"id": "1", "name": "a"}, {"id": "2", "value": "bad"}, {"id": "3", "name": "c"}]
    cp = Checkpoint(source="s", kind="csv", cursor={"line": 4})
    first = load_batch(
        ingest_engine,
        kind="csv",
        source="s",
        field_map=DEFAULT_FIELD_MAP,
        raw=_raw(records),
        run_id="r1",
        checkpoint=cp,
    )
    assert first.as_dict() == {"read": 3, "raw_new": 3, "duplicates": 0, "upserted": 2, "rejected": 1}
    again = load_batch(
        ingest_engine,
        kind="csv",
        source="s",
        field_map=DEFAULT_FIELD_MAP,
        raw=_raw(records),
        run_id="r2",
        checkpoint=Checkpoint(source="s", kind="csv", cursor={"line": 9}),
    )
    assert again.as_dict() == {"read": 3, "raw_new": 0, "duplicates": 3, "upserted": 0, "rejected": 0}
    with ingest_engine.connect() as conn:
        raw = conn.execute(text("select source_id, payload, run_id from raw_csv_data order by id")).all()
        assert [(r[0], r[1], r[2]) for r in raw] == [("1", records[0], "r1"), ("2", records[1], "r1"),
                                                    ("3", records[2], "r1")]  # fmt: skip
        assert conn.execute(text("select count(*) from etl_rejects")).scalar() == 1
    assert get_checkpoint(ingest_engine, "s").cursor == {"line": 9}

    # a NUL (PostgreSQL cannot store it) is a reject, not a failure
    nul = raw_frame(['{"id": "8", "name": "x\\u0000"}'])
    counts = load_batch(
        ingest_engine, kind="csv", source="s", field_map=DEFAULT_FIELD_MAP, raw=nul, run_id="r3", checkpoint=None
    )
    assert (counts.rejected, counts.upserted) == (1, 0)

    # a failure inside the transaction leaves nothing behind, checkpoint included
    fail_on_source_id(ingest_engine, "9")
    with pytest.raises(Exception, match="injected failure"):
        load_batch(
            ingest_engine, kind="csv", source="s", field_map=DEFAULT_FIELD_MAP,
            raw=_raw([{"id": "10"}, {"id": "9"}]), run_id="r4",
            checkpoint=Checkpoint(source="s", kind="csv", cursor={"line": 99}),
        )  # fmt: skip
    assert get_checkpoint(ingest_engine, "s").cursor == {"line": 9}
    with ingest_engine.connect() as conn:
        assert conn.execute(text("select count(*) from normalized_data")).scalar() == 2
        assert conn.execute(text("select count(*) from raw_csv_data where run_id = 'r4'")).scalar() == 0


def fail_on_source_id(engine, source_id: str) -> None:
    """A real database failure in the middle of a batch: a trigger that raises for one source_id."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "create or replace function _boom() returns trigger language plpgsql as $$ begin "
            f"if new.source_id = '{source_id}' then raise exception 'injected failure'; end if; return new; end $$"
        )
        conn.exec_driver_sql(
            "create trigger _boom before insert or update on normalized_data for each row execute function _boom()"
        )


def test_runs_record_status_counts_duration_and_reason(ingest_engine):
    with start_run(ingest_engine, "r1"):
        finish_run(ingest_engine, "r1", status="failed", counts={"a": {"read": 5}}, failure_reason="boom")
    with start_run(ingest_engine, "r2") as lease:
        finish_run(ingest_engine, "r2", status="success", counts={"a": {"read": 2}, "b": {"read": 3}})
    assert lease.abandoned == []  # r1 finished: not abandoned
    with ingest_engine.connect() as conn:
        rows = conn.execute(
            text("select run_id, status, records_processed, failure_reason, duration_seconds >= 0, counts "
                 "from etl_runs order by run_id")
        ).all()  # fmt: skip
    assert [tuple(r) for r in rows] == [
        ("r1", "failed", 5, "boom", True, {"a": {"read": 5}}),
        ("r2", "success", 5, None, True, {"a": {"read": 2}, "b": {"read": 3}}),
    ]


def test_schema_observation_and_diff():
    old = observe_json_schema(_raw([{"id": "1", "value": 1, "gone": "x", "tags": [1]}]))
    new = observe_json_schema(_raw([{"id": "1", "value": "one", "extra": {"a": 1}, "tags": None}]))
    diff = diff_schema(old, new)
    assert diff.added == {"extra": "object"}
    assert diff.removed == {"gone": "string"}
    assert diff.changed == {"value": ("number", "string")}  # tags: null is not a change
    assert "value (number -> string)" in diff.summary()
    assert not diff_schema(old, old)
