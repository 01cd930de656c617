"""Declarative data tests: kinds, warn/error thresholds (counts and percentages), history table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, text

from tasks.data_tests import (
    DataTest,
    Threshold,
    raise_on_errors,
    record_history,
    results_frame,
    results_table,
    run_data_tests,
)
from tasks.errors import ConfigurationError, DataTestError

NOW = datetime(2024, 1, 20, 12, tzinfo=UTC)


@pytest.fixture
def frames():
    orders = pl.DataFrame({"order_id": [1, 2, 3, 4], "status": ["paid", "paid", "lost", None]})
    items = pl.DataFrame(
        {
            "item_id": list(range(1, 21)),
            "order_id": [1] * 18 + [9, None],
            "ts": [NOW - timedelta(hours=30)] * 20,
        }
    )
    return {"orders": orders, "items": items, "dups": pl.DataFrame({"k": [1, 1, 2, None, None]})}


def _status(frames, test):
    return run_data_tests(frames, [test], run_id="t", now=NOW)[0]


def test_threshold_parsing_and_comparison():
    assert Threshold.parse(">0").breached(1, 100)
    assert not Threshold.parse(">0").breached(0, 100)
    assert Threshold.parse(">=10").breached(10, 100)
    assert not Threshold.parse(">5%").breached(5, 100)
    assert Threshold.parse(">5%").breached(6, 100)
    assert not Threshold.parse(">5%").breached(0, 0)
    with pytest.raises(ValueError, match="must look like"):
        Threshold.parse("5 or more")
    with pytest.raises(ValidationError, match="must look like"):
        DataTest(model="m", kind="unique", column="c", error_if="lots")


def test_unique_counts_every_duplicated_row_and_ignores_nulls(frames):
    r = _status(frames, DataTest(model="dups", kind="unique", column="k"))
    assert (r.status, r.failures, r.rows, r.failure_pct) == ("error", 2, 5, 40.0)


def test_not_null_and_accepted_values(frames):
    r = _status(frames, DataTest(model="orders", kind="not_null", column="status", warn_if=">0", error_if=">50%"))
    assert (r.status, r.failures) == ("warn", 1)
    r = _status(frames, DataTest(model="orders", kind="accepted_values", column="status", values=("paid",)))
    assert (r.status, r.failures) == ("error", 1) and "lost" in r.message


def test_relationships_with_percentage_thresholds(frames):
    base = dict(model="items", kind="relationships", column="order_id", to_model="orders", to_column="order_id")
    assert _status(frames, DataTest(**base, warn_if=">0", error_if=">10%")).status == "warn"  # 1 of 20 = 5%
    assert _status(frames, DataTest(**base, warn_if=">0", error_if=">=5%")).status == "error"
    assert _status(frames, DataTest(**base, warn_if=None, error_if=">1")).status == "pass"
    with pytest.raises(ValidationError, match="needs to_model"):
        DataTest(model="items", kind="relationships", column="order_id")


def test_freshness_levels(frames):
    def fresh(warn, error):
        return _status(
            frames, DataTest(model="items", kind="freshness", column="ts", warn_after=warn, error_after=error)
        )

    assert fresh(timedelta(hours=48), timedelta(hours=72)).status == "pass"
    assert fresh(timedelta(hours=24), timedelta(hours=72)).status == "warn"
    r = fresh(timedelta(hours=1), timedelta(hours=29))
    assert r.status == "error" and "30.0 h old" in r.message and r.error_if == ">29h"


def test_unknown_model_or_column_is_a_configuration_error(frames):
    with pytest.raises(ConfigurationError, match="column: .*no column 'nope'"):
        run_data_tests(frames, [DataTest(model="items", kind="not_null", column="nope")], run_id="t")
    with pytest.raises(ConfigurationError, match="model"):
        run_data_tests(frames, [DataTest(model="ghost", kind="not_null", column="x")], run_id="t")


def test_raise_on_errors_and_history_table(frames, pg_url):
    tests = [
        DataTest(model="dups", kind="unique", column="k"),
        DataTest(model="orders", kind="unique", column="order_id"),
        DataTest(model="orders", kind="not_null", column="status", error_if=None),
    ]
    results = run_data_tests(frames, tests, run_id="run-1", now=NOW)
    assert [r.status for r in results] == ["error", "pass", "warn"]
    with pytest.raises(DataTestError, match="unique_dups_k"):
        raise_on_errors(results)
    raise_on_errors(results[1:])  # warnings alone do not raise
    table = results_table(results)
    assert table[0]["tested_at"] == NOW.isoformat() and isinstance(table[0]["tested_at"], str)
    assert results_frame(results).height == 3
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        assert record_history(conn, results) == 3
        record_history(conn, results[1:2])
    with engine.connect() as conn:
        rows = conn.execute(text("select status, count(*) from meta.data_test_history group by 1 order by 1")).all()
    engine.dispose()
    assert rows == [("error", 1), ("pass", 2), ("warn", 1)]
