"""flows.setup and flows.backfill pieces that need no server: validation, templates, the checkpoint seed."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from flows.backfill import MAX_WEEKS, week_range
from flows.backfill import main as backfill_main
from flows.setup import _default_base_job_template, checkpoint_seed
from flows.setup import main as setup_main
from tasks.checkpoint import parse_checkpoint_document
from tasks.errors import ConfigurationError


def test_week_range_is_every_monday_inclusive() -> None:
    assert week_range("2024-01-01", "2024-01-15") == [date(2024, 1, 1), date(2024, 1, 8), date(2024, 1, 15)]
    assert week_range(date(2024, 1, 8), date(2024, 1, 8)) == [date(2024, 1, 8)]


@pytest.mark.parametrize(
    ("start", "end", "field", "words"),
    [
        ("2024-01-02", "2024-01-15", "start", "Tuesday"),
        ("2024-01-01", "2024-01-14", "end", "Sunday"),
        ("2024-01-15", "2024-01-01", "end", "before start"),
        ("2024-01-01", "not-a-date", "end", "ISO date"),
        ("2000-01-03", "2024-01-01", "end", f"more than {MAX_WEEKS}"),
    ],
)
def test_week_range_rejects_bad_input_naming_the_field(start: str, end: str, field: str, words: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        week_range(start, end)
    assert info.value.field == field
    assert words in str(info.value)


def test_backfill_cli_rejects_a_bad_range_before_starting_prefect(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        backfill_main(["--start", "2024-01-03", "--end", "2024-01-15"])
    assert info.value.code == 2
    assert "Wednesday" in capsys.readouterr().err


def test_checkpoint_seed_is_what_the_weekly_flow_reads() -> None:
    seed = checkpoint_seed(date(2024, 1, 1), now=datetime(2024, 2, 1, tzinfo=UTC))
    assert parse_checkpoint_document(seed) == date(2024, 1, 1)
    assert seed["last_run_id"] is None and seed["updated_at"].startswith("2024-02-01")
    with pytest.raises(ConfigurationError, match="Friday"):
        checkpoint_seed(date(2024, 1, 5))


def test_setup_cli_rejects_a_first_week_that_is_not_a_monday(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        setup_main(["--first-week", "2024-01-05"])
    assert info.value.code == 2
    assert "Friday, not a Monday" in capsys.readouterr().err


@pytest.mark.parametrize("pool_type", ["process", "docker", "azure-container-instance"])
def test_base_job_templates_come_from_the_installed_workers(pool_type: str) -> None:
    template = _default_base_job_template(pool_type)
    assert {"job_configuration", "variables"} <= set(template)
    assert "env" in template["variables"]["properties"]


def test_unknown_pool_type_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        _default_base_job_template("kubernetes")
    assert info.value.field == "pool_type"
