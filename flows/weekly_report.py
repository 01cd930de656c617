"""What a weekly run reports: per-week outcomes, the run summary, its artifacts and the CLI printout."""

from __future__ import annotations

from datetime import date
from typing import Any

from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from tasks.models import Window


class WeekOutcome(BaseModel):
    week_start: date
    run_id: str
    status: str
    fetched: int = 0
    valid: int = 0
    rejected: int = 0
    duplicates: int = 0
    reject_rate_pct: float = 0.0
    synced: int = 0
    sync_failed: int = 0
    dry_run: bool = True
    files: dict[str, str] = Field(default_factory=dict)
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    skipped_reason: str | None = None


class WeeklySummary(BaseModel):
    weeks: list[WeekOutcome] = Field(default_factory=list)
    next_week_start: date | None = None
    lake: str = ""
    database: str = ""
    embedded_defaults: list[str] = Field(default_factory=list)
    replayed_pending: int = 0

    def totals(self) -> dict[str, int]:
        return {
            "weeks": len([w for w in self.weeks if w.skipped_reason is None]),
            "fetched": sum(w.fetched for w in self.weeks),
            "valid": sum(w.valid for w in self.weeks),
            "rejected": sum(w.rejected for w in self.weeks),
            "files": sum(len(w.files) for w in self.weeks),
        }


def quality_artifact(window: Window, report: Any, files: dict[str, str]) -> None:
    reasons = "\n".join(f"| {reason} | {count} |" for reason, count in report.top_reject_reasons) or "| (none) | 0 |"
    links = "\n".join(f"- **{name}**: `{url}`" for name, url in files.items())
    create_markdown_artifact(
        key=f"quality-{window.label}",
        markdown=(
            f"# Quality gate, week {window.label}\n\n"
            f"| fetched | rejected | duplicates | reject rate | threshold | status |\n|---|---|---|---|---|---|\n"
            f"| {report.fetched} | {report.rejected} | {report.duplicates} | {report.rate_pct:.2f}% "
            f"| {report.threshold_pct:.2f}% | {report.status.value} |\n\n"
            f"## Top reject reasons\n\n| reason | count |\n|---|---|\n{reasons}\n\n## Files\n\n{links}\n"
        ),
        description=f"Quality gate for week {window.label}",
    )


def run_counts(outcome: WeekOutcome) -> dict[str, Any]:
    return {
        "fetched": outcome.fetched,
        "valid": outcome.valid,
        "rejected": outcome.rejected,
        "duplicates": outcome.duplicates,
        "synced": outcome.synced,
        "failed_rows": outcome.sync_failed,
        "reject_rate_pct": outcome.reject_rate_pct,
    }


def summary_artifact(summary: WeeklySummary) -> None:
    rows = "\n".join(
        f"| {w.week_start} | {w.status} | {w.fetched} | {w.valid} | {w.rejected} | {w.reject_rate_pct:.2f}% "
        f"| {w.synced} | {', '.join(f'{k} {v}s' for k, v in w.stage_seconds.items())} |"
        for w in summary.weeks
    )
    create_markdown_artifact(
        key="weekly-run-summary",
        markdown=(
            "# Weekly reverse ETL\n\n| week | status | fetched | valid | rejected | rate | synced | stages |\n"
            f"|---|---|---|---|---|---|---|---|\n{rows or '| (no week due) | | | | | | | |'}\n\n"
            f"Next batch week: **{summary.next_week_start}**. Lake: `{summary.lake}`.\n"
        ),
        description="Every stage of this run: rows in/out, files, duration",
    )


def print_summary(summary: WeeklySummary) -> None:
    t = summary.totals()
    print(f"\nWeekly reverse ETL: {t['weeks']} week(s) processed")
    for w in summary.weeks:
        line = f"  {w.week_start}  {w.status:<22} fetched {w.fetched:>7}  valid {w.valid:>7}  rejected {w.rejected:>5}"
        print(line + (f"  ({w.skipped_reason})" if w.skipped_reason else ""))
    print(f"  rows fetched / valid / rejected: {t['fetched']} / {t['valid']} / {t['rejected']}")
    print(f"  files written: {t['files']}")
    print(f"  next batch week (checkpoint): {summary.next_week_start}")
    print(f"  lake: {summary.lake}   tracking db: {summary.database}")
    if summary.embedded_defaults:
        print(f"  embedded defaults in use: {', '.join(summary.embedded_defaults)} (save blocks to change; see README)")
    print("  look at: the lake's curated/events/week=*/_manifest.json, salesforce/ outbox, `prefect artifact ls`")
