"""Staging/intermediate/mart models in Polars: rules, flags (dirty rows flagged, never lost), incremental facts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

import tasks.warehouse_source as ws
from tasks.data_tests import run_data_tests
from tasks.warehouse_models import (
    MARTS,
    RFM_SEGMENTS,
    ModelSettings,
    build_marts,
    stg_customers,
    stg_products,
    warehouse_tests,
)

AS_OF = datetime(2024, 1, 20, tzinfo=UTC)
SIZE = ws.SourceSize(customers=300, products=40, orders=900, order_items=3000)


def _raw(frames, loaded_at=AS_OF):
    return {k: v.with_columns(_loaded_at=pl.lit(loaded_at, dtype=pl.Datetime("us", "UTC"))) for k, v in frames.items()}


@pytest.fixture(scope="module")
def source():
    return ws.generate_oltp(SIZE, as_of=AS_OF)


@pytest.fixture(scope="module")
def build(source):
    return build_marts(_raw(source), as_of=AS_OF)


def test_marts_have_the_declared_columns_and_one_row_per_source_row(build, source):
    for name, frame in build.frames.items():
        assert frame.columns == list(MARTS[name].columns), name
        assert frame.get_column(MARTS[name].pk).is_unique().all()
    assert build.frames["dim_customers"].height == SIZE.customers
    assert build.frames["dim_products"].height == SIZE.products
    assert build.frames["fct_orders"].height == SIZE.orders
    assert build.frames["fct_sales"].height == SIZE.order_items  # dirty items kept
    assert all(build.full.values())


def test_dirty_rows_are_flagged_not_lost(build, source):
    sales = build.frames["fct_sales"]
    neg = sales.filter(pl.col("dq_flags").str.contains("negative_quantity"))
    assert neg.height == source["order_items"].filter(pl.col("quantity") < 0).height > 0
    assert neg.get_column("is_valid").not_().all()
    assert (neg.get_column("dq_score") < 1).all()
    orphans = sales.filter(pl.col("dq_flags").str.contains("orphan_order"))
    assert orphans.height == SIZE.order_items // ws.ORPHAN_ITEM_EVERY
    assert orphans.get_column("customer_id").null_count() == orphans.height
    clean = sales.filter(pl.col("dq_flags") == "")
    assert clean.get_column("dq_score").eq(1.0).all() and clean.get_column("is_valid").all()
    customers = build.frames["dim_customers"]
    assert customers.filter(pl.col("dq_flags").str.contains("email_missing")).height == SIZE.customers // 97
    assert build.flag_counts["fct_sales.negative_quantity"] == neg.height
    # Invalid items do not count as valid revenue, but are in the order total (reconciles with the source).
    orders = build.frames["fct_orders"]
    assert orders.get_column("order_total").sum() != pytest.approx(orders.get_column("valid_total").sum())


def test_duplicate_customers_differing_by_case_and_whitespace_share_one_canonical_id(source):
    stg = stg_customers(source["customers"])
    dup = stg.filter(pl.col("customer_id") == ws.DUPLICATE_CUSTOMER_EVERY).row(0, named=True)
    assert dup["canonical_customer_id"] == ws.DUPLICATE_CUSTOMER_EVERY - 1
    assert dup["email"] == dup["email"].strip().lower()
    assert "duplicate_customer" in dup["dq_flags"]
    assert stg.filter(pl.col("customer_id") == ws.DUPLICATE_CUSTOMER_EVERY - 1).row(0, named=True)["dq_flags"] == ""


def test_rfm_segments_are_shared_by_duplicates_and_prospects_have_no_orders(build):
    dim = build.frames["dim_customers"]
    assert set(dim.get_column("rfm_segment").unique()) <= set(RFM_SEGMENTS)
    prospects = dim.filter(pl.col("rfm_segment") == "prospect")
    assert prospects.get_column("order_count").eq(0).all()
    ranked = dim.filter(pl.col("rfm_segment") != "prospect")
    assert ranked.select(pl.col("r_score", "f_score", "m_score").is_between(1, 5).all()).row(0) == (True, True, True)
    pairs = dim.join(dim, left_on="canonical_customer_id", right_on="customer_id", suffix="_c")
    assert (pairs.get_column("rfm_segment") == pairs.get_column("rfm_segment_c")).all()
    champions = dim.filter(pl.col("rfm_segment") == "champion")
    if champions.height:
        assert champions.get_column("m_score").min() >= 4


def test_pricing_tier_boundaries():
    t = datetime(2024, 1, 1, tzinfo=UTC)
    raw = pl.DataFrame(
        {
            "product_id": [1, 2, 3, 4, 5],
            "sku": [" a1", "b2", "c3", "d4", "e5"],
            "name": ["a", "b", "c", "d", "e"],
            "category": [" Toys ", None, "home", "home", ""],
            "unit_price": [19.99, 20.0, 99.99, 100.0, -1.0],
            "updated_at": [t] * 5,
        }
    )
    out = stg_products(raw, ModelSettings(budget_below=20, premium_from=100))
    assert out.get_column("pricing_tier").to_list() == ["budget", "standard", "standard", "premium", "unknown"]
    assert out.get_column("category").to_list() == ["toys", "uncategorized", "home", "home", "uncategorized"]
    assert out.get_column("dq_flags").to_list() == ["", "category_missing", "", "", "category_missing,price_invalid"]
    assert out.get_column("sku").to_list()[0] == "A1"


def test_incremental_fct_sales_rebuilds_only_items_touched_since(source):
    later = AS_OF + timedelta(hours=1)
    since = AS_OF + timedelta(minutes=30)
    raw = _raw(source)
    raw["order_items"] = raw["order_items"].with_columns(
        _loaded_at=pl.when(pl.col("order_item_id") <= 5).then(pl.lit(later)).otherwise(pl.col("_loaded_at"))
    )
    raw["orders"] = raw["orders"].with_columns(
        _loaded_at=pl.when(pl.col("order_id") == 10).then(pl.lit(later)).otherwise(pl.col("_loaded_at"))
    )
    b = build_marts(raw, as_of=AS_OF, sales_since=since)
    expected = source["order_items"].filter((pl.col("order_item_id") <= 5) | (pl.col("order_id") == 10))
    assert set(b.frames["fct_sales"].get_column("order_item_id")) == set(expected.get_column("order_item_id"))
    assert b.full["fct_sales"] is False and b.full["fct_orders"] is True
    assert b.frames["fct_orders"].height == SIZE.orders
    assert b.loaded_through == later


def test_default_data_tests_pass_or_warn_on_the_generated_data(build):
    results = run_data_tests(build.frames, warehouse_tests(), run_id="r1", now=AS_OF)
    status = {r.test_name: r.status for r in results}
    assert "error" not in status.values(), [r for r in results if r.status == "error"]
    assert status["relationships_fct_sales_order_id"] == "warn"  # the orphan items
    assert status["not_null_dim_customers_email"] == "warn"
    assert status["unique_fct_sales_order_item_id"] == "pass"
