"""Throughput of transform_week on N synthetic events (~2% invalid, ~1% duplicates) in 1,000-record pages.

Usage: .venv/bin/python bench/bench_transform.py [N] [part_rows]
"""

from __future__ import annotations

import gc
import os
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import orjson
import polars as pl

from tasks.lake import LakeFS
from tasks.models import Window
from tasks.transform import transform_week


def make_payloads(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    types = ["page_view", "add_to_cart", "purchase", "refund", "subscription_renewal"]
    out = []
    for i in range(n):
        rec = {
            "id": f"evt_{i if rng.random() > 0.01 else rng.randrange(max(i, 1))}",
            "customer_id": f"c_{rng.randrange(50_000)}",
            "event_type": rng.choice(types),
            "amount": round(rng.random() * 200, 2),
            "currency": "usd",
            "occurred_at": f"2024-01-0{rng.randint(1, 7)}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00+00:00",
            "metadata": {"source": "web", "n": i % 7},
        }
        roll = rng.random()
        if roll < 0.005:
            rec["amount"] = -1
        elif roll < 0.01:
            rec["occurred_at"] = "2024-01-03T10:00:00"
        elif roll < 0.015:
            rec["id"] = None
        elif roll < 0.02:
            rec["amount"] = "12.50x"
        out.append(orjson.dumps(rec).decode())
    return out


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    part_rows = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    payloads = make_payloads(n)
    with tempfile.TemporaryDirectory() as tmp:
        lake = LakeFS(Path(tmp).as_uri())
        refs = []
        for k, start in enumerate(range(0, n, part_rows)):
            chunk = payloads[start : start + part_rows]
            frame = pl.DataFrame(
                {
                    "_seq": range(start, start + len(chunk)),
                    "_page": [(start + j) // 1000 for j in range(len(chunk))],
                    "payload": chunk,
                },
                schema={"_seq": pl.Int64, "_page": pl.Int64, "payload": pl.String},
            )
            refs.append(lake.write_parquet(frame, f"raw/part-{k:05d}.parquet"))
        del payloads
        gc.collect()
        gc.freeze()
        t0, c0 = time.perf_counter(), time.process_time()
        res = transform_week(lake, refs, Window.for_week(date(2024, 1, 1)), "out")
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"rows={res.fetched} valid={res.valid.rows} rejected={res.rejected} duplicates={res.duplicates}")
    print(f"transform_week: {dt:.2f}s wall, {res.fetched / dt:,.0f} rows/s; {cpu:.2f} CPU-s (all threads)")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work skews wall time)")


if __name__ == "__main__":
    main()
