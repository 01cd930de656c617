"""The ingestion flow on the session's ephemeral Prefect API: API + CSV + RSS into the real PostgreSQL,
re-run is a no-op, a failing source fails the run (recorded, visible in /stats), drift becomes an artifact."""

from __future__ import annotations

from datetime import date

import pytest
from fastapi.testclient import TestClient
from prefect_sqlalchemy import SqlAlchemyConnector
from sqlalchemy import create_engine, text

from api.app import create_app
from blocks.ingest import ApiIngestSource, CsvIngestSource, IngestSettings, RssIngestSource
from blocks.lake import Lake
from flows.ingest import ingest_flow
from tests.unit.test_ingest_rss import RSS

API_MAP = {
    "source_id": "id",
    "name": "event_type",
    "value": "amount",
    "description": "customer_id",
    "category": "event_type",
    "created_at": "occurred_at",
}


def _drift_events(source: str, timeout: float = 15.0) -> list:
    """Events named ingest.schema.drift about ``source``, as the Prefect API stored them (polled: async delivery)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(EventFilter(event=EventNameFilter(name=["ingest.schema.drift"])), limit=50)
            found = [e for e in page.events if e.resource.id == f"ingest.source.{source}"]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.3)


def _artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {a.key for a in client.read_artifacts(limit=200)}


@pytest.fixture
def db(pg_url):
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


def test_three_sources_then_a_no_op_rerun(prefect_harness, pg_url, db, tmp_path, file_server, make_source_api):
    base, root, _ = file_server
    (root / "feed.xml").write_bytes(RSS)
    csv_path = tmp_path / "orders.csv"
    csv_path.write_text("id,name,value,created_at\n1,a,1.5,2024-01-02\n2,b,oops,2024-01-03\n3,c\n4,d,4,\n")
    sources = [
        CsvIngestSource(name="orders", location=str(csv_path), batch_size=2),
        RssIngestSource(name="news", location=f"{base}/feed.xml"),
        ApiIngestSource(name="events", api=make_source_api("page_number"), field_map=API_MAP,
                        first_date=date(2024, 1, 1)),
    ]  # fmt: skip
    database = SqlAlchemyConnector(connection_info=pg_url)
    settings = IngestSettings(lake=Lake(base_url=str(tmp_path / "lake")))

    first = ingest_flow(sources=sources, database=database, settings=settings, today=date(2024, 1, 8))
    assert first.status == "success"
    by = {s.source: s for s in first.sources}
    assert by["orders"].counts == {"read": 4, "raw_new": 3, "duplicates": 0, "upserted": 2, "rejected": 2}
    assert by["news"].counts["upserted"] == 3
    events = by["events"].counts
    assert events["read"] >= 1000 and events["upserted"] + events["rejected"] == events["raw_new"]
    assert events["upserted"] > 900
    with db.connect() as conn:
        per_source = dict(conn.execute(text("select source, count(*) from normalized_data group by source")).all())
        assert per_source == {"orders": 2, "news": 3, "events": events["upserted"]}
        rejects = conn.execute(text("select ref, field from etl_rejects where source = 'orders' order by ref")).all()
        assert [tuple(r) for r in rejects] == [(3, "value"), (4, "line")]
        cps = dict(conn.execute(text("select source, cursor from etl_checkpoint")).all())
        assert cps["orders"]["line"] == 5 and cps["events"]["complete"] is True and cps["news"]["etag"]

    second = ingest_flow(sources=sources, database=database, settings=settings, today=date(2024, 1, 8))
    assert second.status == "success"
    assert all(s.counts.get("upserted", 0) == 0 for s in second.sources)
    again = {s.source: s.counts for s in second.sources}
    assert again["orders"]["read"] == 0  # after the checkpoint line
    assert again["news"]["read"] == 0  # 304 Not Modified (ETag)
    assert again["events"]["read"] == 0  # no complete day after the last window
    with db.connect() as conn:
        runs = conn.execute(text("select status, records_processed from etl_runs order by started_at")).all()
        assert [r[0] for r in runs] == ["success", "success"]
        assert conn.execute(text("select count(*) from normalized_data")).scalar() == 5 + events["upserted"]
    assert "ingest-run-summary" in _artifact_keys()


def test_failed_source_fails_the_run_and_drift_is_published(prefect_harness, pg_url, db, tmp_path):
    csv_path = tmp_path / "orders.csv"
    csv_path.write_text("id,name,value\n1,a,1\n")
    database = SqlAlchemyConnector(connection_info=pg_url)
    orders = CsvIngestSource(name="orders", location=str(csv_path))
    assert ingest_flow(sources=[orders], database=database).status == "success"

    drifted = tmp_path / "orders2.csv"
    drifted.write_text("id,name,value,extra\n2,b,2,x\n")
    sources = [
        CsvIngestSource(name="orders", location=str(drifted)),
        CsvIngestSource(name="missing", location=str(tmp_path / "nope.csv")),
    ]
    state = ingest_flow(sources=sources, database=database, return_state=True)
    assert state.is_failed()
    with db.connect() as conn:
        run = conn.execute(
            text("select status, failure_reason, counts from etl_runs order by started_at desc limit 1")
        ).one()
        assert run[0] == "failed" and "nope.csv: no such file" in run[1]
        assert run[2]["orders"]["upserted"] == 1  # the healthy source still loaded
        assert conn.execute(text("select added from etl_schema_drift")).scalar() == {"extra": "string"}
    assert "ingest-drift-orders" in _artifact_keys()
    events = _drift_events("orders")
    assert events and events[0].payload["added"] == {"extra": "string"} and events[0].payload["policy"] == "accept"
    stats = TestClient(create_app(db)).get("/stats").json()
    assert stats["run_count"] == 2 and "nope.csv" in stats["last_failure_reason"]
