"""Smoke run of bench/weekly.py on a tiny N: every variant runs in its own process against the demo API
(itself in its own process) and they all see the same rows. Counts only: no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
N = 2000


def test_bench_weekly_quick_run_prints_the_table_and_counts_agree(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "weekly.py"), "--quick", "--sizes", str(N), "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = done.stdout
    assert f"N = {N:,} events, pages of 1,000" in text
    for label in ("a fetch (httpx+orjson)", "b library extract->transform->load", "c dlt rest_api->parquet"):
        assert label in text
    assert "b/a = " in text and "b/c = " in text and "so b/c >= 8 needs b/a >= " in text
    assert "rows agree across variants: yes" in text

    report = json.loads(out.read_text())
    (run,) = report["runs"]
    results = run["results"]
    assert set(results) == {"a", "b", "c"}
    assert {key: r["rows"] for key, r in results.items()} == {"a": N, "b": N, "c": N}
    counts = results["b"]["counts"]
    # every fetched row is valid, rejected or a superseded duplicate; the demo API makes ~2% invalid
    assert counts["fetched"] == counts["valid"] + counts["rejected"] + counts["duplicates"] == N
    assert 0 < counts["rejected"] < N * 0.06
    assert counts["published_rows"] == counts["valid"] + counts["rejected"] + counts["duplicates"] + counts["customers"]
    assert results["a"]["pages"] == results["b"]["pages"] == N // 1000 + 1  # offset paging ends on a short page
    for r in results.values():
        assert r["peak_rss_mb"] >= r["base_rss_mb"] > 0
        assert r["rows_per_s"] > 0
    ratios = run["ratios"]
    assert set(ratios) == {"b/a", "b/c", "a/c"}
    assert ratios["b/c"] == pytest.approx(ratios["b/a"] * ratios["a/c"])  # the identity the bench prints


def test_bench_weekly_in_sequence_variant_and_server_latency(tmp_path):
    """(s) is (b) without the contract check overlapping the fetch: same rows, same counts; --latency-ms slows
    the demo API down (a remote API's round trip), and the b/s ratio is printed. Two rounds: each variant's
    median run is reported, with every round's time."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "weekly.py"), "--sizes", str(N), "--variants", "a,b,s"]
    cmd += ["--latency-ms", "20", "--rounds", "2", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "latency 20 ms" in done.stdout and "b/s = " in done.stdout
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    results = run["results"]
    assert results["b"]["counts"] == results["s"]["counts"]
    assert results["a"]["seconds"] >= 0.02 * results["a"]["pages"]  # every page waited the latency
    assert set(run["ratios"]) == {"b/a", "b/s"}
    assert report["rounds"] == 2 and "per round" in done.stdout
    for r in results.values():  # the lower median of two rounds is the faster one
        assert len(r["round_seconds"]) == 2 and r["seconds"] == pytest.approx(min(r["round_seconds"]), abs=1e-3)
