"""Publishing marts on the real PostgreSQL: change detection, one transaction, data-test gate, reconciliation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from sqlalchemy import create_engine, text

import tasks.warehouse_source as ws
from tasks.data_tests import DataTest
from tasks.errors import DataTestError, ReconciliationError
from tasks.warehouse_models import build_marts, read_raw, warehouse_tests
from tasks.warehouse_publish import (
    check_and_publish,
    marts_built_through,
    publish_marts,
    raise_on_mismatch,
    reconcile,
)

AS_OF = datetime(2024, 1, 20, tzinfo=UTC)
SIZE = ws.SourceSize(customers=150, products=25, orders=400, order_items=1200)


@pytest.fixture
def engine(pg_url):
    eng = create_engine(pg_url)
    ws.load_oltp(eng, ws.generate_oltp(SIZE, as_of=AS_OF))
    ws.sync_all(eng)
    yield eng
    eng.dispose()


def _build(engine, since=None):
    with engine.connect() as conn:
        raw = read_raw(conn)
    return build_marts(raw, as_of=AS_OF, sales_since=since)


def _snapshot(engine, mart, pk):
    with engine.connect() as conn:
        return conn.execute(text(f"select {pk}, row_hash, _published_at from marts.{mart} order by 1")).all()


def test_publish_detects_inserts_updates_and_unchanged_rows(engine):
    build = _build(engine)
    first = publish_marts(engine, build.frames, full=build.full, built_through=build.loaded_through)
    assert {k: (c.inserted, c.updated, c.unchanged) for k, c in first.items()} == {
        k: (f.height, 0, 0) for k, f in build.frames.items()
    }
    again = publish_marts(engine, build.frames, full=build.full)
    assert all((c.inserted, c.updated, c.deleted, c.unchanged) == (0, 0, 0, c.rows) for c in again.values())
    changed = build.frames["dim_products"].with_columns(
        name=pl.when(pl.col("product_id") == 3).then(pl.lit("Renamed")).otherwise(pl.col("name"))
    )
    third = publish_marts(engine, {"dim_products": changed.filter(pl.col("product_id") != 4)})
    c = third["dim_products"]
    assert (c.inserted, c.updated, c.deleted, c.unchanged) == (0, 1, 1, SIZE.products - 2)
    with engine.connect() as conn:
        assert conn.execute(text("select name from marts.dim_products where product_id = 3")).scalar_one() == "Renamed"
        log = conn.execute(text("select count(*) from meta.publish_log")).scalar_one()
        assert log == 4 + 4 + 1
        assert marts_built_through(conn) == build.loaded_through


def test_a_failure_during_publish_leaves_every_mart_as_it_was(engine):
    build = _build(engine)
    publish_marts(engine, build.frames, full=build.full)
    before = {
        m: _snapshot(engine, m, pk) for m, pk in (("dim_customers", "customer_id"), ("fct_sales", "order_item_id"))
    }
    frames = dict(build.frames)
    frames["dim_customers"] = frames["dim_customers"].with_columns(full_name=pl.lit("Everyone Changed"))
    # fct_sales is written last; a null key makes PostgreSQL fail after dim_customers was already written.
    good_sales = frames["fct_sales"]
    frames["fct_sales"] = good_sales.with_columns(
        order_item_id=pl.when(pl.col("order_item_id") == 7).then(None).otherwise(pl.col("order_item_id"))
    )
    with pytest.raises(Exception, match="not-null constraint"):
        publish_marts(engine, frames, full=build.full)
    # A duplicated key is refused before it reaches the database (ON CONFLICT would silently keep one).
    frames["fct_sales"] = pl.concat([good_sales, good_sales.head(1)])
    with pytest.raises(DataTestError, match="fct_sales.order_item_id has 1 duplicated key"):
        publish_marts(engine, frames, full=build.full)
    after = {
        m: _snapshot(engine, m, pk) for m, pk in (("dim_customers", "customer_id"), ("fct_sales", "order_item_id"))
    }
    assert after == before


def test_failing_data_test_publishes_nothing_but_records_history(engine):
    build = _build(engine)
    check_and_publish(engine, build, warehouse_tests(), run_id="run-1", now=AS_OF)
    before = _snapshot(engine, "fct_orders", "order_id")
    bad = _build(engine)
    bad.frames["fct_orders"] = bad.frames["fct_orders"].with_columns(status=pl.lit("teleported"))
    bad.frames["dim_products"] = bad.frames["dim_products"].with_columns(name=pl.lit("x"))
    with pytest.raises(DataTestError, match="accepted_values_fct_orders_status"):
        check_and_publish(engine, bad, warehouse_tests(), run_id="run-2", now=AS_OF)
    assert _snapshot(engine, "fct_orders", "order_id") == before
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from marts.dim_products where name = 'x'")).scalar_one() == 0
        hist = dict(conn.execute(text("select run_id, count(*) from meta.data_test_history group by 1")).all())
        errors = conn.execute(text("select count(*) from meta.data_test_history where status = 'error'")).scalar_one()
    assert hist == {"run-1": len(warehouse_tests()), "run-2": len(warehouse_tests())}
    assert errors == 1


def test_reconciliation_matches_then_catches_a_dropped_row(engine):
    build = _build(engine)
    publish_marts(engine, build.frames, full=build.full)
    with engine.connect() as conn:
        checks = reconcile(conn)
        assert all(c.ok for c in checks), checks
        assert all(c.ok for c in reconcile(conn, source_schema="oltp"))
    raise_on_mismatch(checks)
    with engine.begin() as conn:
        amount = conn.execute(text("delete from marts.fct_sales where order_item_id = 2 returning amount")).scalar_one()
    with engine.connect() as conn:
        checks = {c.check: c for c in reconcile(conn)}
    assert not checks["rows fct_sales"].ok and checks["rows fct_sales"].difference == -1
    assert not checks["revenue fct_sales"].ok
    assert checks["revenue fct_sales"].difference == pytest.approx(-float(amount))
    assert checks["rows fct_orders"].ok
    with pytest.raises(ReconciliationError, match="rows fct_sales: source 1200 vs marts 1199"):
        raise_on_mismatch(list(checks.values()))


def test_incremental_publish_upserts_only_the_delta(engine):
    build = _build(engine)
    publish_marts(engine, build.frames, full=build.full, built_through=build.loaded_through)
    with engine.begin() as conn:
        conn.execute(
            text("update oltp.order_items set quantity = 9, updated_at = :t where order_item_id = 11"),
            {"t": AS_OF + timedelta(hours=1)},
        )
        conn.execute(
            text("insert into oltp.order_items values (99001, 1, 1, 2, 5.00, :t)"), {"t": AS_OF + timedelta(hours=1)}
        )
    ws.sync_all(engine)
    with engine.connect() as conn:
        since = marts_built_through(conn)
    inc = _build(engine, since=since)
    assert inc.full["fct_sales"] is False
    counts = publish_marts(engine, inc.frames, full=inc.full, built_through=inc.loaded_through)["fct_sales"]
    assert counts.inserted == 1 and counts.updated >= 1 and counts.deleted == 0
    assert counts.rows < SIZE.order_items / 10
    with engine.connect() as conn:
        assert all(c.ok for c in reconcile(conn))
        assert conn.execute(text("select quantity from marts.fct_sales where order_item_id = 11")).scalar_one() == 9


def test_custom_test_list_with_unknown_kind_rejected():
    with pytest.raises(ValueError):
        DataTest(model="m", kind="positive", column="c")
