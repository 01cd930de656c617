"""Batch-week arithmetic: which weeks a run processes. Plain logic, no Prefect."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from tasks.errors import ConfigurationError
from tasks.models import Window


def parse_week(value: str | date, *, field: str = "week") -> date:
    """A week start from a parameter: ISO date string or date, must be a Monday."""
    if isinstance(value, datetime):
        value = value.date()
    if isinstance(value, str):
        try:
            value = date.fromisoformat(value.strip())
        except ValueError as exc:
            raise ConfigurationError(field, f"{value!r} is not an ISO date (YYYY-MM-DD)") from exc
    if not isinstance(value, date):
        raise ConfigurationError(field, f"expected a date, got {type(value).__name__}")
    if value.weekday() != 0:
        monday = value - timedelta(days=value.weekday())
        raise ConfigurationError(
            field, f"{value.isoformat()} is a {value.strftime('%A')}; weeks start on Monday (e.g. {monday.isoformat()})"
        )
    return value


def today_in(timezone: str, now: datetime | None = None) -> date:
    now = now or datetime.now(ZoneInfo("UTC"))
    return now.astimezone(ZoneInfo(timezone)).date()


def last_complete_week(today: date) -> date:
    """Monday of the most recent week that has fully ended before ``today``."""
    this_monday = today - timedelta(days=today.weekday())
    return this_monday - timedelta(days=7)


def plan_weeks(
    *,
    explicit_week: date | None,
    checkpoint: date | None,
    first_week: date | None,
    today: date,
    max_weeks: int,
) -> list[Window]:
    """Weeks to process in order.

    An explicit week is processed alone (it must have ended). Otherwise every complete week from the
    checkpoint (or ``first_week``, or the last complete week) up to the last complete week, at most
    ``max_weeks`` of them; the rest are left for the next run.
    """
    last = last_complete_week(today)
    if explicit_week is not None:
        if explicit_week > last:
            raise ConfigurationError(
                "week",
                f"{explicit_week.isoformat()} has not ended yet (last complete week starts {last.isoformat()})",
            )
        return [Window.for_week(explicit_week)]
    start = checkpoint or first_week or last
    if start.weekday() != 0:
        raise ConfigurationError("checkpoint", f"{start.isoformat()} is not a Monday")
    weeks: list[Window] = []
    current = start
    while current <= last and len(weeks) < max_weeks:
        weeks.append(Window.for_week(current))
        current += timedelta(days=7)
    return weeks
