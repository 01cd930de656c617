"""Warehouse benchmark: N order items end to end on the local PostgreSQL (default 1,000,000).

    .venv/bin/python bench/warehouse.py [--items 1000000] [--pg postgresql+psycopg://postgres@127.0.0.1:5432]

Creates a throwaway database, then times: generate (Polars) -> COPY into oltp -> incremental extract/load into
raw (full) -> read raw + build marts -> data tests -> publish (one transaction, row-hash upsert) -> reconcile ->
an incremental run after touching 1% of the items. Prints rows/s per stage and the process's peak RSS.
Not run by the tests.
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.data_tests import run_data_tests  # noqa: E402
from tasks.warehouse_models import build_marts, read_raw, warehouse_tests  # noqa: E402
from tasks.warehouse_publish import marts_built_through, publish_marts, reconcile  # noqa: E402
from tasks.warehouse_source import SourceSize, generate_oltp, load_oltp, sync_all  # noqa: E402

AS_OF = datetime(2024, 1, 20, tzinfo=UTC)


class PeakRss:
    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    n = args.items
    size = SourceSize.for_items(n)
    db = f"wh_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(args.pg.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True)
    admin.execute(f'create database "{db}"')
    engine = create_engine(f"{args.pg}/{db}")
    timings: list[tuple[str, float, int]] = []

    def stage(name: str, rows: int, fn):
        t0 = time.perf_counter()
        out = fn()
        timings.append((name, time.perf_counter() - t0, rows))
        return out

    try:
        with PeakRss() as rss:
            start = time.perf_counter()
            frames = stage("generate source (Polars)", n, lambda: generate_oltp(size, as_of=AS_OF))
            total_source = sum(f.height for f in frames.values())
            stage("COPY into oltp", total_source, lambda: load_oltp(engine, frames))
            gc.collect()
            stage("extract+load raw (full, 4 tables)", total_source, lambda: sync_all(engine, full_refresh=True))

            def _read():
                with engine.connect() as conn:
                    return read_raw(conn)

            raw = stage("read raw (COPY out)", total_source, _read)
            build = stage("build marts (Polars)", n, lambda: build_marts(raw, as_of=AS_OF))
            stage(
                "data tests (16)",
                n,
                lambda: run_data_tests(build.frames, warehouse_tests(), run_id="bench", now=AS_OF),
            )
            mart_rows = sum(f.height for f in build.frames.values())
            stage(
                "publish marts (1 txn, insert)",
                mart_rows,
                lambda: publish_marts(engine, build.frames, full=build.full, built_through=build.loaded_through),
            )
            counts = stage(
                "publish again (all unchanged)", mart_rows, lambda: publish_marts(engine, build.frames, full=build.full)
            )
            assert all(c.unchanged == c.rows for c in counts.values())
            gc.collect()

            def _recon():
                with engine.connect() as conn:
                    checks = reconcile(conn)
                assert all(c.ok for c in checks), checks
                return checks

            stage("reconcile", n, _recon)
            # A normal run does not publish twice: leave the "all unchanged" check out of the end-to-end figure.
            end_to_end = time.perf_counter() - start - timings[7][1]
            touched = n // 100
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "update oltp.order_items set quantity = quantity + 1, updated_at = '2024-01-21T00:00:00Z' "
                        "where order_item_id % 100 = 0"
                    )
                )

            def _incremental():
                sync_all(engine)
                with engine.connect() as conn:
                    since = marts_built_through(conn)
                    raw2 = read_raw(conn)
                b = build_marts(raw2, as_of=AS_OF, sales_since=since)
                run_data_tests(b.frames, warehouse_tests(), run_id="bench-2", now=AS_OF)
                c = publish_marts(engine, b.frames, full=b.full, built_through=b.loaded_through)
                assert c["fct_sales"].updated == touched, c["fct_sales"]
                with engine.connect() as conn:
                    assert all(x.ok for x in reconcile(conn))

            stage(f"incremental run ({touched} items changed)", n, _incremental)
    finally:
        engine.dispose()
        admin.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and pid <> pg_backend_pid()",
            (db,),
        )
        admin.execute(f'drop database if exists "{db}"')
        admin.close()

    print(
        f"\nWarehouse bench: {n:,} order items ({size.orders:,} orders, {size.customers:,} customers, "
        f"{size.products:,} products)\n"
    )
    print("| stage | seconds | rows | rows/s |\n|---|---|---|---|")
    for name, secs, rows in timings:
        print(f"| {name} | {secs:.2f} | {rows:,} | {rows / secs:,.0f} |")
    print(
        f"\nEnd to end (generate -> reconcile, one publish): {end_to_end:.1f} s = {n / end_to_end:,.0f} order items/s"
    )
    print(f"Peak RSS: {rss.peak / 2**20:,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
