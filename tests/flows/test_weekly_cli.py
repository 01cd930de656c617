"""`python -m flows.weekly` in a fresh process on embedded defaults: the README's first command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    environ.update(
        PREFECT_HOME=str(cwd / ".prefect"),
        PREFECT_LOCAL_STORAGE_PATH=str(cwd / ".prefect" / "storage"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(REPO),
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "flows.weekly", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_help_lists_the_parameters(tmp_path):
    out = _run(["--help"], tmp_path)
    assert out.returncode == 0
    for option in ("--week", "--full-refresh", "--dry-run"):
        assert option in out.stdout


def test_bad_week_is_refused_with_a_clear_message(tmp_path):
    out = _run(["--week", "2024-01-03"], tmp_path)
    assert out.returncode == 2 and "Monday" in out.stderr and "2024-01-01" in out.stderr
    assert not (tmp_path / "lake").exists()


def test_embedded_defaults_run_with_json_logs(tmp_path):
    # JSON logs are one setting away: Prefect's console handler takes the "json" formatter.
    out = _run(["--week", "2024-01-01"], tmp_path, PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER="json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 week(s) processed" in out.stdout and "next batch week (checkpoint): 2024-01-08" in out.stdout
    records = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    stage_lines = [r for r in records if r.get("stage") == "extract"]
    assert stage_lines and all(r["week"] == "2024-01-01" and r.get("flow_run_id") for r in stage_lines)
    # The bundled demo API served real data into a local lake; the dry run left the exact CSV in the outbox.
    manifest = json.loads((tmp_path / "lake/curated/events/week=2024-01-01/_manifest.json").read_text())
    assert (
        manifest["extra"]["fetched"]
        == manifest["extra"]["valid"] + manifest["extra"]["rejected"] + (manifest["extra"]["duplicates"])
    )
    [csv] = list((tmp_path / "lake/salesforce").rglob("*.csv"))
    assert pl.read_csv(csv).height == manifest["files"]["metrics.parquet"]["rows"]
    assert (tmp_path / ".data/weekly.db").exists()
