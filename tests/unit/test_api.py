"""Read API against the real PostgreSQL: pagination (anchors vs plain OFFSET), filters, literal search, auth,
health when the database is down, stats after a failed run, a real uvicorn run and a bounded schemathesis run."""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import polars as pl
import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import text

from api.app import create_app
from tasks.ingest_db import NORMALIZED_SCHEMA, finish_run, start_run, upsert_normalized

BASE = datetime(2024, 1, 1, tzinfo=UTC)
SPECIAL = ["100% pure", "under_score", "it's quoted", 'dq "x"', "back\\slash", "UPPER case", "1000 pure"]


def _rows(n: int, source: str, *, start: int = 0, same_time_every: int = 3) -> pl.DataFrame:
    ids = range(start, start + n)
    return pl.DataFrame(
        {
            "source": [source] * n,
            "source_id": [f"{source}-{i}" for i in ids],
            "name": [SPECIAL[i % len(SPECIAL)] if i % 10 == 0 else f"item {i}" for i in ids],
            "value": [float(i) for i in ids],
            "description": ["plain" if i % 2 else None for i in ids],
            "category": ["c1" if i % 2 else "c2" for i in ids],
            # ties on created_at on purpose: the id tie-breaker must keep pages disjoint
            "created_at": [BASE + timedelta(minutes=i // same_time_every) for i in ids],
            "updated_at": [BASE for _ in ids],
            "content_hash": [f"h{i}" for i in ids],
        },
        schema=NORMALIZED_SCHEMA,
    )


def _seed(engine):
    with engine.begin() as conn:
        upsert_normalized(conn, _rows(230, "api"), "r1")
        upsert_normalized(conn, _rows(120, "csv"), "r1")
    return engine


@pytest.fixture(scope="module")
def seeded(ingest_engine_module):
    """Shared, read-only seed data (tests that write use ``fresh``); with the optional pg_trgm search indexes."""
    from tasks.ingest_db import ensure_schema

    ensure_schema(ingest_engine_module, search_indexes=True)
    return _seed(ingest_engine_module)


@pytest.fixture
def fresh(ingest_engine):
    return _seed(ingest_engine)


@pytest.fixture(scope="module")
def client(seeded):
    with TestClient(create_app(seeded, anchor_every=7)) as c:
        yield c


def _expected_ids(engine, where: str = "true", params: dict | None = None) -> list[int]:
    with engine.connect() as conn:
        return [
            r[0]
            for r in conn.execute(
                text(f"select id from normalized_data where {where} order by created_at desc, id desc"), params or {}
            )
        ]


def _walk(client, **params) -> tuple[list[int], list[dict]]:
    ids, bodies, page = [], [], 1
    while True:
        body = client.get("/data", params={**params, "page": page}).json()
        bodies.append(body)
        ids += [r["id"] for r in body["data"]]
        if not body["has_more"]:
            return ids, bodies
        page += 1


def test_anchor_pagination_matches_a_plain_ordered_scan(client, seeded):
    expected = _expected_ids(seeded)
    for page_size in (3, 7, 10, 33, 100):
        ids, bodies = _walk(client, page_size=page_size)
        assert ids == expected, page_size
        assert {b["total"] for b in bodies} == {350}
        assert all(len(b["data"]) == page_size for b in bodies[:-1])
        assert bodies[0]["metadata"]["latency_ms"] >= 0 and bodies[0]["metadata"]["request_id"]


def test_source_filter_and_pages_past_the_end(client, seeded):
    ids, bodies = _walk(client, source="csv", page_size=50)
    assert ids == _expected_ids(seeded, "source = 'csv'")
    assert [b["total"] for b in bodies] == [120, 120, 120]
    past = client.get("/data", params={"source": "csv", "page": 4, "page_size": 50}).json()
    assert (past["data"], past["has_more"], past["total"]) == ([], False, 120)
    none = client.get("/data", params={"source": "nope"}).json()
    assert (none["data"], none["total"], none["has_more"]) == ([], 0, False)
    far = client.get("/data", params={"page": 10_000_000, "page_size": 100}).json()
    assert far["data"] == [] and far["total"] == 350


def test_new_data_invalidates_the_page_anchors(fresh):
    with TestClient(create_app(fresh, anchor_every=7)) as client:
        assert client.get("/data").json()["total"] == 350
        with fresh.begin() as conn:
            upsert_normalized(conn, _rows(5, "api", start=1000), "r2")
        body = client.get("/data", params={"page_size": 100}).json()
        assert body["total"] == 355
        assert _walk(client, page_size=100)[0] == _expected_ids(fresh)


def test_search_matches_metacharacters_literally(client, seeded):
    with seeded.connect() as conn:
        rows = conn.execute(text("select id, name, description from normalized_data")).all()
    for term in ["100%", "_score", "it's", 'dq "', "back\\", "upper CASE", "%", "_", "'", "0 p"]:
        needle = term.lower()
        expected = {r[0] for r in rows if needle in (r[1] or "").lower() or needle in (r[2] or "").lower()}
        assert expected, term
        ids, bodies = _walk(client, search=term, page_size=100)
        assert set(ids) == expected and len(ids) == len(expected), term
        assert bodies[0]["total"] == len(expected)
    # "%" is not a wildcard: only names that contain a percent sign come back
    assert {r["name"] for r in client.get("/data", params={"search": "%", "page_size": 100}).json()["data"]} == {
        "100% pure"
    }


def test_search_by_description_and_injection_attempt(client, seeded):
    assert client.get("/data", params={"search": "PLAIN", "page_size": 1}).json()["total"] == 175
    hostile = client.get("/data", params={"search": "' or 1=1 --"}).json()
    assert hostile["total"] == 0
    with seeded.connect() as conn:
        assert conn.execute(text("select count(*) from normalized_data")).scalar() == 350


@pytest.mark.parametrize(
    ("params", "field"),
    [({"page": 0}, "page"), ({"page_size": 0}, "page_size"), ({"page_size": 101}, "page_size"),
     ({"page": "x"}, "page"), ({"search": ""}, "search"), ({"search": "a\x00b"}, "search")],
)  # fmt: skip
def test_input_errors_are_422_naming_the_field(client, params, field):
    resp = client.get("/data", params=params)
    assert resp.status_code == 422
    assert field in [d["loc"][-1] for d in resp.json()["detail"]]


def test_api_key(seeded):
    with TestClient(create_app(seeded, SecretStr("k3y"))) as c:
        assert c.get("/data").status_code == 401
        assert c.get("/stats", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/data", headers={"X-API-Key": "k3y"}).status_code == 200
        assert c.get("/health").status_code == 200
        assert "X-API-Key" in str(c.get("/openapi.json").json()["components"]["securitySchemes"])


def test_health_and_stats_with_runs(fresh):
    seeded = fresh
    client = TestClient(create_app(fresh))
    body = client.get("/health").json()
    assert body == {"status": "ok", "database": "up", "last_run": None}
    start_run(seeded, "ok-1")
    finish_run(seeded, "ok-1", status="success", counts={"a": {"read": 10}})
    time.sleep(0.01)
    start_run(seeded, "bad-2")
    finish_run(seeded, "bad-2", status="failed", counts={"a": {"read": 3}}, failure_reason="csv: no such file")
    health = client.get("/health").json()
    assert health["last_run"]["run_id"] == "bad-2" and health["last_run"]["status"] == "failed"
    stats = client.get("/stats").json()
    assert stats["run_count"] == 2
    assert stats["total_records_processed"] == 13
    assert stats["last_failure_reason"] == "csv: no such file"
    assert stats["last_success_at"] is not None and stats["last_failure_at"] >= stats["last_success_at"]
    assert stats["total_duration_seconds"] >= 0


def test_database_down_is_503_not_500():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    app = create_app(f"postgresql+psycopg://postgres@127.0.0.1:{port}/nowhere")
    with TestClient(app) as c:
        resp = c.get("/health")
        assert resp.status_code == 503
        assert resp.json() == {"status": "unavailable", "database": "down", "last_run": None}
        assert c.get("/data").status_code == 503
        assert c.get("/stats").status_code == 503


def test_real_uvicorn_server(seeded):
    config = uvicorn.Config(create_app(seeded), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        resp = httpx.get(f"http://127.0.0.1:{port}/data", params={"page": 2, "page_size": 5},
                         headers={"X-Request-ID": "req-42"})  # fmt: skip
        assert resp.status_code == 200
        assert resp.headers["x-request-id"] == "req-42" and resp.json()["metadata"]["request_id"] == "req-42"
        assert len(resp.json()["data"]) == 5
        assert httpx.get(f"http://127.0.0.1:{port}/docs").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_schemathesis_finds_no_server_errors(seeded):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    app = create_app(seeded, anchor_every=7)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.query, response.text)

        check()
        seen += 1
    assert seen == 3
