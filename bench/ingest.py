"""Benchmark of the ingestion load path and the read API (not run by the tests).

    .venv/bin/python bench/ingest.py [--rows 1000000] [--batch 100000] [--database-url URL] [--requests 300]

1. Generates ``--rows`` normalized rows with Polars and loads them through ``upsert_normalized`` (COPY -> temp
   table -> INSERT ... ON CONFLICT), ``--batch`` rows per transaction, into a fresh database; reports rows/s.
   Then re-upserts 10% unchanged (skipped by the content-hash guard) and 10% changed rows.
2. Serves the API with a real uvicorn server and measures ``GET /data?page=10000&page_size=100`` (the cold
   first request builds the page anchors; then p50/p99 over ``--requests`` requests), page 1, a source filter
   and a search, client side (httpx) and server side (``metadata.latency_ms``).
Targets: load >= 100k rows/s, deep-page p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import polars as pl
import psycopg
import uvicorn
from sqlalchemy import create_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.app import create_app  # noqa: E402
from tasks.ingest_db import NORMALIZED_SCHEMA, copy_frame, ensure_schema, upsert_normalized  # noqa: E402


def make_rows(n: int, offset: int = 0, salt: str = "") -> pl.DataFrame:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    i = pl.int_range(offset, offset + n, eager=True)
    frame = pl.DataFrame({"i": i}).select(
        source=pl.when(pl.col("i") % 3 == 0)
        .then(pl.lit("api"))
        .when(pl.col("i") % 3 == 1)
        .then(pl.lit("csv"))
        .otherwise(pl.lit("rss")),
        source_id=pl.format("id-{}", pl.col("i")),
        name=pl.format("item {}{}", pl.col("i"), pl.lit(salt)),
        value=(pl.col("i") % 1000).cast(pl.Float64) / 10,
        description=pl.format("description of record {} with some text", pl.col("i")),
        category=pl.format("cat-{}", pl.col("i") % 50),
        created_at=pl.lit(base) + pl.duration(seconds=pl.col("i") * 7 % 31_536_000),
        updated_at=pl.lit(base) + pl.duration(seconds=pl.col("i")),
        content_hash=pl.format("h-{}{}", pl.col("i"), pl.lit(salt)),
    )
    return frame.cast(NORMALIZED_SCHEMA)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--database-url", default=None, help="Default: a fresh database on 127.0.0.1:5432.")
    parser.add_argument("--search-indexes", action="store_true", help="Build the pg_trgm indexes after the load.")
    args = parser.parse_args()

    dbname = None
    url = args.database_url
    if url is None:
        dbname = f"bench_ingest_{uuid.uuid4().hex[:8]}"
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'create database "{dbname}"')
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}"
    engine = create_engine(url)
    try:
        ensure_schema(engine)
        frames = [make_rows(min(args.batch, args.rows - o), o) for o in range(0, args.rows, args.batch)]
        t0 = time.perf_counter()
        written = 0
        for frame in frames:
            with engine.begin() as conn:
                written += upsert_normalized(conn, frame, "bench")
        load_s = time.perf_counter() - t0
        print(f"load: {written:,} rows in {load_s:.2f}s = {written / load_s:,.0f} rows/s "
              f"(batches of {args.batch:,}; target >= 100,000)")  # fmt: skip

        # same machine, same moment: raw COPY of the same rows into an index-free table (the ceiling)
        with engine.begin() as conn:
            conn.exec_driver_sql("create table copy_baseline (like normalized_data including defaults)")
        t0 = time.perf_counter()
        for frame in frames:
            with engine.begin() as conn:
                copy_frame(conn, "copy_baseline", frame.with_columns(run_id=pl.lit("bench")))
        copy_s = time.perf_counter() - t0
        with engine.begin() as conn:
            conn.exec_driver_sql("drop table copy_baseline")
        print(
            f"raw COPY baseline (no indexes, no conflict check): {args.rows / copy_s:,.0f} rows/s; upsert path = "
            f"{copy_s / load_s:.0%} of it; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )

        tenth = max(1, args.rows // 10)
        same = make_rows(tenth, 0)
        t0 = time.perf_counter()
        with engine.begin() as conn:
            n_same = upsert_normalized(conn, same, "bench-2")
        same_s = time.perf_counter() - t0
        changed = make_rows(tenth, tenth, salt="-v2")
        t0 = time.perf_counter()
        with engine.begin() as conn:
            n_changed = upsert_normalized(conn, changed, "bench-3")
        changed_s = time.perf_counter() - t0
        print(f"re-upsert unchanged: {tenth:,} rows, {n_same} written, {tenth / same_s:,.0f} rows/s")
        print(f"re-upsert changed:   {tenth:,} rows, {n_changed:,} written, {tenth / changed_s:,.0f} rows/s")

        if args.search_indexes:
            t0 = time.perf_counter()
            ensure_schema(engine, search_indexes=True)
            print(f"pg_trgm search indexes built after the load in {time.perf_counter() - t0:.1f}s")
        with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
            conn.execute("vacuum analyze normalized_data")

        server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        deep_page = max(1, min(10_000, args.rows // 100))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

            def measure(label: str, params: dict, n: int) -> None:
                t = time.perf_counter()
                first = client.get("/data", params=params)
                cold = (time.perf_counter() - t) * 1000
                assert first.status_code == 200, first.text
                wall, server_ms = [], []
                for _ in range(n):
                    t = time.perf_counter()
                    resp = client.get("/data", params=params)
                    wall.append((time.perf_counter() - t) * 1000)
                    server_ms.append(resp.json()["metadata"]["latency_ms"])
                body = resp.json()
                print(
                    f"{label:<34} cold {cold:8.1f} ms | p50 {statistics.median(wall):6.2f} ms "
                    f"p99 {pct(wall, 99):6.2f} ms (server p50 {statistics.median(server_ms):6.2f} "
                    f"p99 {pct(server_ms, 99):6.2f}) | rows {len(body['data'])} total {body['total']:,}"
                )

            measure(f"/data page={deep_page} size=100", {"page": deep_page, "page_size": 100}, args.requests)
            measure("/data page=1 size=100", {"page": 1, "page_size": 100}, args.requests)
            measure(f"/data source=csv page={deep_page // 3}", {"source": "csv", "page": deep_page // 3,
                    "page_size": 100}, args.requests)  # fmt: skip
            measure("/data search='item 4242' page=1", {"search": "item 4242", "page_size": 10}, 20)
        server.should_exit = True
        thread.join(timeout=10)
    finally:
        engine.dispose()
        if dbname:
            with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
                conn.execute(f'drop database if exists "{dbname}" with (force)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
