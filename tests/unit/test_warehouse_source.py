"""Source generator, incremental raw load (real PostgreSQL), file extracts and the SQL Server MERGE text."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.dialects import mssql

import tasks.warehouse_source as ws
from tasks.errors import SourceFileError
from tasks.lake import LakeFS
from tasks.warehouse_source import TABLES, SourceSize, generate_oltp, load_oltp, sync_all, sync_table

AS_OF = datetime(2024, 1, 20, tzinfo=UTC)
SMALL = SourceSize(customers=200, products=30, orders=500, order_items=1500)


@pytest.fixture
def engine(pg_url):
    eng = create_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def loaded(engine):
    frames = generate_oltp(SMALL, as_of=AS_OF)
    load_oltp(engine, frames)
    return frames


def _count(engine, sql, **params):
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


def test_generator_is_deterministic_and_dirty():
    a = generate_oltp(SMALL, as_of=AS_OF)
    b = generate_oltp(SMALL, as_of=AS_OF)
    for name in a:
        assert a[name].equals(b[name]), name
        assert a[name].height == getattr(SMALL, name)
        assert a[name].get_column(TABLES[name].pk).is_unique().all()
    customers, items, orders = a["customers"], a["order_items"], a["orders"]
    assert customers.get_column("email").null_count() == 200 // ws.NULL_EMAIL_EVERY
    norm = customers.get_column("email").str.strip_chars().str.to_lowercase()
    assert norm.drop_nulls().is_duplicated().sum() > 0  # duplicates differing by case/whitespace
    assert items.filter(pl.col("quantity") < 0).height == 1500 // ws.NEGATIVE_QTY_EVERY
    orphans = items.join(orders, on="order_id", how="anti")
    assert orphans.height == 1500 // ws.ORPHAN_ITEM_EVERY
    assert items.get_column("updated_at").max() <= AS_OF


def test_first_sync_copies_everything_and_round_trips(engine, loaded):
    results = {r.table: r for r in sync_all(engine)}
    assert {k: r.inserted for k, r in results.items()} == {k: v.height for k, v in loaded.items()}
    with engine.connect() as conn:
        back = ws.read_table(conn, "raw", TABLES["order_items"]).sort("order_item_id")
    assert back.equals(loaded["order_items"])
    assert results["orders"].watermark_after == loaded["orders"].get_column("updated_at").max()


def test_incremental_picks_up_inserts_updates_and_boundary_rows(engine, loaded):
    sync_all(engine, overlap=timedelta(minutes=10))
    wm = sync_table(engine, TABLES["customers"]).watermark_after
    with engine.begin() as conn:
        # An update made between runs (newer timestamp).
        conn.execute(
            text("update oltp.customers set full_name = 'Changed Name', updated_at = :t where customer_id = 5"),
            {"t": wm + timedelta(minutes=1)},
        )
        # A new row written exactly at the watermark (the boundary) ...
        conn.execute(text("insert into oltp.customers values (90001, 'b@x.io', 'Boundary', 'US', :t, :t)"), {"t": wm})
        # ... and one committed late by a long transaction, stamped before the watermark (inside the overlap).
        conn.execute(
            text("insert into oltp.customers values (90002, 'l@x.io', 'Late', 'US', :t, :t)"),
            {"t": wm - timedelta(minutes=3)},
        )
        # Outside the overlap window: the documented limit of watermark extraction.
        conn.execute(
            text("insert into oltp.customers values (90003, 'o@x.io', 'Old', 'US', :t, :t)"),
            {"t": wm - timedelta(hours=2)},
        )
    result = sync_table(engine, TABLES["customers"], overlap=timedelta(minutes=10))
    assert result.inserted == 2
    assert result.updated == 1
    assert result.watermark_after == wm + timedelta(minutes=1)
    ids = {
        r[0] for r in engine.connect().execute(text("select customer_id from raw.customers where customer_id > 90000"))
    }
    assert ids == {90001, 90002}
    assert _count(engine, "select full_name from raw.customers where customer_id = 5") == "Changed Name"
    # A third run re-reads only the overlap and changes nothing.
    again = sync_table(engine, TABLES["customers"], overlap=timedelta(minutes=10))
    assert (again.inserted, again.updated) == (0, 0)
    # --full-refresh reloads everything, including the row the watermark skipped, and drops deleted rows.
    with engine.begin() as conn:
        conn.execute(text("delete from oltp.customers where customer_id = 7"))
    full = sync_table(engine, TABLES["customers"], full_refresh=True)
    assert full.full_refresh and full.extracted == SMALL.customers + 3 - 1
    assert _count(engine, "select count(*) from raw.customers") == SMALL.customers + 2
    assert _count(engine, "select count(*) from raw.customers where customer_id in (7)") == 0
    assert _count(engine, "select count(*) from raw.customers where customer_id = 90003") == 1


def test_stale_version_never_overwrites_newer_raw_row(engine, loaded):
    sync_all(engine)
    spec = TABLES["products"]
    with engine.connect() as conn:
        row = ws.read_table(conn, "raw", spec, "product_id = 3")
    stale = row.with_columns(name=pl.lit("stale"), updated_at=pl.col("updated_at") - timedelta(days=1))
    with engine.begin() as conn:
        assert ws.upsert_raw(conn, spec, stale) == (0, 0)
    assert _count(engine, "select name from raw.products where product_id = 3") == "Product 3"


def test_watermark_does_not_advance_when_the_load_fails(engine, loaded, monkeypatch):
    sync_all(engine)
    wm = sync_table(engine, TABLES["orders"]).watermark_after
    with engine.begin() as conn:
        conn.execute(
            text("update oltp.orders set status = 'paid', updated_at = :t where order_id = 1"),
            {"t": wm + timedelta(hours=1)},
        )
    real = ws.upsert_raw

    def upsert_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("connection lost after the upsert")

    monkeypatch.setattr(ws, "upsert_raw", upsert_then_fail)
    with pytest.raises(RuntimeError):
        sync_table(engine, TABLES["orders"])
    with engine.connect() as conn:
        assert ws.get_watermark(conn, "oltp", "orders") == wm
        assert conn.execute(text("select updated_at from raw.orders where order_id = 1")).scalar_one() < wm + timedelta(
            hours=1
        )
    monkeypatch.setattr(ws, "upsert_raw", real)
    assert sync_table(engine, TABLES["orders"]).updated == 1


def test_dedupe_on_pk_keeps_latest_version():
    spec = TABLES["orders"]
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    frame = pl.DataFrame(
        {
            "order_id": [1, 1, 2],
            "customer_id": [1, 1, 2],
            "status": ["new", "paid", "x"],
            "ordered_at": [t0, t0, t0],
            "updated_at": [t0 + timedelta(hours=2), t0 + timedelta(hours=1), t0],
        }
    )
    out = ws.dedupe_on_pk(frame, spec).sort("order_id")
    assert out.get_column("status").to_list() == ["new", "x"]


def test_csv_and_json_extracts_load_into_raw(engine, tmp_path):
    lake = LakeFS(tmp_path.as_uri())
    spec = TABLES["products"]
    frame = generate_oltp(SMALL, as_of=AS_OF)["products"].head(5)
    lake.write_bytes("in/products.csv", ws.frame_to_csv(frame))
    records = frame.with_columns(pl.col("updated_at").dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_dicts()
    records.append({**records[0], "name": "newer", "updated_at": "2024-02-01T00:00:00Z"})
    lake.write_bytes("in/products.json", json.dumps(records).encode())
    assert ws.read_file_extract(lake, "in/products.csv", spec).equals(frame)
    r1 = ws.load_file_extract(engine, lake, "in/products.csv", spec)
    r2 = ws.load_file_extract(engine, lake, "in/products.json", spec)
    assert (r1.inserted, r2.inserted, r2.updated, r2.deduplicated) == (5, 0, 1, 1)
    assert _count(engine, "select name from raw.products where product_id = 1") == "newer"
    assert _count(engine, "select _source from raw.products where product_id = 1") == "file:products.json"


def test_bad_extract_names_file_and_field(tmp_path):
    lake = LakeFS(tmp_path.as_uri())
    lake.write_bytes(
        "orders.csv", b"order_id,customer_id,status,ordered_at,updated_at\n1,abc,new,2024-01-01,2024-01-01\n"
    )
    with pytest.raises(SourceFileError, match=r"orders\.csv: customer_id: 1 value\(s\)"):
        ws.read_file_extract(lake, "orders.csv", TABLES["orders"])
    lake.write_bytes("o2.csv", b"order_id,status\n1,new\n")
    with pytest.raises(SourceFileError, match=r"o2\.csv: customer_id: column missing"):
        ws.read_file_extract(lake, "o2.csv", TABLES["orders"])
    lake.write_bytes("o.xml", b"<x/>")
    with pytest.raises(SourceFileError, match="unsupported extension"):
        ws.read_file_extract(lake, "o.xml", TABLES["orders"])


def test_mssql_merge_compiles_with_the_mssql_dialect():
    sql = ws.mssql_merge_sql(TABLES["order_items"])
    compiled = str(text(sql).compile(dialect=mssql.dialect()))
    assert compiled.startswith("MERGE INTO raw.order_items WITH (HOLDLOCK) AS t")
    assert "USING #stage_order_items AS s" in compiled
    assert "ON t.order_item_id = s.order_item_id" in compiled
    assert "WHEN MATCHED AND t.updated_at <= s.updated_at AND (" in compiled
    assert "WHEN NOT MATCHED BY TARGET THEN" in compiled
    assert compiled.rstrip().endswith("OUTPUT $action;")
    # Reserved words are bracket-quoted by the dialect's preparer.
    weird = ws.TableSpec("order", "key", {"key": "bigint", "updated_at": "timestamptz"})
    assert "MERGE INTO raw.[order]" in ws.mssql_merge_sql(weird)
    assert "t.[key] = s.[key]" in ws.mssql_merge_sql(weird)
