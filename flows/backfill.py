"""Backfill: run the weekly reverse ETL for a range of weeks, a bounded number at a time.

Two ways to fan out:

* ``mode="subflow"`` (default): each week is a subflow run of ``weekly_reverse_etl`` inside this flow run's
  process. Works anywhere, including ``python -m flows.backfill --start ... --end ...``.
* ``mode="deployment"``: each week is a run of the deployed weekly flow (``run_deployment``), picked up by that
  deployment's workers, so the weeks run where the schedule runs. Its concurrency limit (1) still holds: runs
  beyond it wait in ``AwaitingConcurrencySlot``; ``max_concurrency`` bounds how many are queued at once.

Weeks are submitted oldest first. The weekly flow's checkpoint moves across committed weeks only, so a week that
fails in the middle of a range holds it there: the backfill fails naming those weeks (BackfillError), and either
the next scheduled run or a second backfill over just them repairs the gap (``full_refresh`` reprocesses weeks
that did complete).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date, timedelta
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from pydantic import BaseModel, Field

from tasks.errors import BackfillError, ConfigurationError, PipelineError
from tasks.weeks import parse_week

DEFAULT_DEPLOYMENT = "weekly-reverse-etl/weekly-reverse-etl"
MAX_WEEKS = 520
Mode = Literal["subflow", "deployment"]


class WeekRun(BaseModel):
    week_start: date
    state: str
    flow_run_id: str | None = None
    message: str | None = None

    @property
    def completed(self) -> bool:
        return self.state == "COMPLETED"


class BackfillSummary(BaseModel):
    mode: str
    weeks: list[WeekRun] = Field(default_factory=list)

    @property
    def failed(self) -> dict[str, str]:
        return {w.week_start.isoformat(): w.state for w in self.weeks if not w.completed}


def week_range(start: date | str, end: date | str) -> list[date]:
    """Every Monday from ``start`` to ``end`` inclusive (both must be Mondays, start <= end, at most MAX_WEEKS)."""
    first = parse_week(start, field="start")
    last = parse_week(end, field="end")
    if last < first:
        raise ConfigurationError("end", f"{last.isoformat()} is before start {first.isoformat()}")
    count = (last - first).days // 7 + 1
    if count > MAX_WEEKS:
        raise ConfigurationError("end", f"{count} weeks is more than {MAX_WEEKS}; split the backfill")
    return [first + timedelta(weeks=i) for i in range(count)]


@task(task_run_name="week-{week}", cache_policy=NO_CACHE)
def run_week(
    week: date, full_refresh: bool, dry_run: bool | None, mode: Mode, deployment: str, timeout_seconds: float | None
) -> WeekRun:
    """One week: a subflow run or a deployment run. Never raises for the week's own failure: it is reported."""
    if mode == "subflow":
        from flows.weekly import weekly_reverse_etl

        state = weekly_reverse_etl(week=week, full_refresh=full_refresh, dry_run=dry_run, return_state=True)
        run_id = state.state_details.flow_run_id
        return WeekRun(
            week_start=week,
            state=state.type.value,
            flow_run_id=str(run_id) if run_id else None,
            message=None if state.is_completed() else state.message,
        )
    from prefect.deployments import run_deployment

    params: dict[str, Any] = {"week": week.isoformat(), "full_refresh": full_refresh, "dry_run": dry_run}
    run = run_deployment(name=deployment, parameters=params, timeout=timeout_seconds, as_subflow=True)
    state = run.state
    return WeekRun(
        week_start=week,
        state=state.type.value if state else "UNKNOWN",
        flow_run_id=str(run.id),
        message=None if state is not None and state.is_completed() else (state.message if state else None),
    )


@flow(name="weekly-backfill", log_prints=False)
def weekly_backfill(
    start: date,
    end: date,
    full_refresh: bool = False,
    dry_run: bool | None = None,
    max_concurrency: int = 2,
    mode: Mode = "subflow",
    deployment: str = DEFAULT_DEPLOYMENT,
    week_timeout_seconds: float | None = 4 * 3600,
) -> BackfillSummary:
    """Run the weekly reverse ETL for every week from ``start`` to ``end`` (Mondays, inclusive).

    Args:
        start: First week start (a Monday).
        end: Last week start (a Monday), inclusive.
        full_refresh: Reprocess weeks that already completed.
        dry_run: Passed to each week (None: dry run exactly when no Salesforce block is saved).
        max_concurrency: Weeks in flight at once (1-16).
        mode: "subflow" (in this process) or "deployment" (runs of ``deployment`` on its work pool).
        deployment: "flow-name/deployment-name" of the weekly deployment (mode="deployment").
        week_timeout_seconds: How long to wait for one deployment run (mode="deployment"; None: forever).
    """
    log = get_run_logger()
    if not 1 <= max_concurrency <= 16:
        raise ConfigurationError("max_concurrency", f"{max_concurrency} is not between 1 and 16")
    if mode not in ("subflow", "deployment"):
        raise ConfigurationError("mode", f"{mode!r} is not 'subflow' or 'deployment'")
    weeks = week_range(start, end)
    log.info("backfilling %d week(s) %s..%s, %d at a time (%s)", len(weeks), weeks[0], weeks[-1], max_concurrency, mode)

    pending = list(weeks)
    in_flight: dict[int, tuple[PrefectFuture[WeekRun], date]] = {}  # keyed by id(future)
    results: dict[date, WeekRun] = {}
    while pending or in_flight:
        while pending and len(in_flight) < max_concurrency:
            week = pending.pop(0)
            future = run_week.submit(week, full_refresh, dry_run, mode, deployment, week_timeout_seconds)
            in_flight[id(future)] = (future, week)
        done = next(as_completed([f for f, _ in in_flight.values()]))
        _, week = in_flight.pop(id(done))
        try:
            outcome = done.result()
        except Exception as exc:  # noqa: BLE001 - e.g. the deployment does not exist: reported with its week
            outcome = WeekRun(week_start=week, state="FAILED", message=f"{type(exc).__name__}: {exc}")
        results[week] = outcome
        log.info("week %s: %s", week, outcome.state)

    summary = BackfillSummary(mode=mode, weeks=[results[w] for w in weeks])
    create_table_artifact(
        key="weekly-backfill",
        table=[
            {"week_start": w.week_start.isoformat(), "state": w.state, "flow_run_id": w.flow_run_id or ""}
            for w in summary.weeks
        ],
        description=f"Backfill {weeks[0]}..{weeks[-1]} ({mode})",
    )
    if summary.failed:
        raise BackfillError(summary.failed)
    return summary


def main(argv: list[str] | None = None) -> int:
    # The ephemeral API server takes 8-12 s to start here, more on a loaded machine; Prefect gives up at 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = argparse.ArgumentParser(prog="python -m flows.backfill", description=weekly_backfill.description)
    parser.add_argument("--start", required=True, help="first week start (a Monday, YYYY-MM-DD)")
    parser.add_argument("--end", required=True, help="last week start (a Monday, YYYY-MM-DD), inclusive")
    parser.add_argument("--full-refresh", action="store_true", help="reprocess weeks that already completed")
    dry = parser.add_mutually_exclusive_group()
    dry.add_argument("--dry-run", dest="dry_run", action="store_true", default=None, help="never call Salesforce")
    dry.add_argument("--no-dry-run", dest="dry_run", action="store_false", help="require Salesforce credentials")
    parser.add_argument("--max-concurrency", type=int, default=2, help="weeks in flight at once (default 2)")
    parser.add_argument("--mode", choices=["subflow", "deployment"], default="subflow")
    parser.add_argument("--deployment", default=DEFAULT_DEPLOYMENT, help=f"default {DEFAULT_DEPLOYMENT}")
    args = parser.parse_args(argv)
    try:
        week_range(args.start, args.end)
    except ConfigurationError as exc:
        parser.error(str(exc))
    try:
        summary = weekly_backfill(
            start=date.fromisoformat(args.start),
            end=date.fromisoformat(args.end),
            full_refresh=args.full_refresh,
            dry_run=args.dry_run,
            max_concurrency=args.max_concurrency,
            mode=args.mode,
            deployment=args.deployment,
        )
    except PipelineError as exc:
        print(f"backfill failed: {exc}", file=sys.stderr)
        return 1
    for w in summary.weeks:
        print(f"{w.week_start}  {w.state:<10} {w.flow_run_id or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
