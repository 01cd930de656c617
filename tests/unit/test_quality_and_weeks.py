from datetime import date

import pytest

from tasks.errors import ConfigurationError, DataQualityError
from tasks.quality import RunStatus, enforce, evaluate, reject_rate_pct
from tasks.weeks import last_complete_week, parse_week, plan_weeks


def test_rate_and_statuses():
    assert reject_rate_pct(0, 0) == 0.0
    assert reject_rate_pct(5, 200) == 2.5
    assert evaluate(100, 0, 5.0).status is RunStatus.SUCCESS
    assert evaluate(100, 5, 5.0).status is RunStatus.SUCCESS_WITH_REJECTS  # at the threshold passes
    assert evaluate(100, 6, 5.0).status is RunStatus.FAILED


def test_enforce_names_rate_and_threshold():
    report = evaluate(200, 30, 5.0, top_reject_reasons=[("amount", 30)])
    with pytest.raises(DataQualityError) as info:
        enforce(report)
    assert "15.00%" in str(info.value) and "5.00%" in str(info.value)
    assert info.value.rejected == 30 and info.value.fetched == 200


def test_rejected_cannot_exceed_fetched():
    with pytest.raises(ValueError):
        reject_rate_pct(3, 2)


@pytest.mark.parametrize("bad", ["2024-01-02", "2024-13-01", "next monday", "../2024-01-01"])
def test_parse_week_rejects_with_field_name(bad):
    with pytest.raises(ConfigurationError) as info:
        parse_week(bad)
    assert info.value.field == "week"


def test_parse_week_names_the_monday_to_use():
    with pytest.raises(ConfigurationError, match="2024-01-01"):
        parse_week("2024-01-03")
    assert parse_week("2024-01-01") == date(2024, 1, 1)


def test_plan_catches_up_in_order_and_caps():
    today = date(2024, 2, 7)  # a Wednesday: last complete week starts 2024-01-29
    assert last_complete_week(today) == date(2024, 1, 29)
    weeks = plan_weeks(explicit_week=None, checkpoint=date(2024, 1, 8), first_week=None, today=today, max_weeks=10)
    assert [w.start for w in weeks] == [date(2024, 1, 8), date(2024, 1, 15), date(2024, 1, 22), date(2024, 1, 29)]
    assert weeks[0].end == date(2024, 1, 14)
    capped = plan_weeks(explicit_week=None, checkpoint=date(2024, 1, 8), first_week=None, today=today, max_weeks=2)
    assert len(capped) == 2


def test_plan_nothing_due_and_future_week_refused():
    today = date(2024, 2, 7)
    assert plan_weeks(explicit_week=None, checkpoint=date(2024, 2, 5), first_week=None, today=today, max_weeks=5) == []
    with pytest.raises(ConfigurationError, match="has not ended"):
        plan_weeks(explicit_week=date(2024, 2, 5), checkpoint=None, first_week=None, today=today, max_weeks=5)


def test_plan_defaults_to_last_complete_week():
    weeks = plan_weeks(explicit_week=None, checkpoint=None, first_week=None, today=date(2024, 2, 7), max_weeks=5)
    assert [w.start for w in weeks] == [date(2024, 1, 29)]
