"""Crash and restart of the warehouse flow (``python -m flows.warehouse``) on PostgreSQL.

The sample OLTP source (2,000 order items, seeded by the first run) is copied into ``raw`` table by table (one
transaction each), the marts are built and published in one transaction. The child is SIGKILLed between two raw
table loads and between the raw load and the mart publish, then the same command runs again in a fresh process.
Afterwards ``marts.fct_sales`` holds every order item exactly once, and the flow's own reconciliation against the
source passed (exit code 0).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from prefect_sqlalchemy import SqlAlchemyConnector

from blocks import WarehouseSettings

pytestmark = pytest.mark.reliability

ITEMS = 2000
KILL_POINTS = {
    "between-raw-tables": ("warehouse: between two raw table loads", "call:flows.warehouse.sync_table#2"),
    "raw|publish": ("warehouse: after the raw load, before the mart publish", "call:flows.warehouse.publish_marts"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_warehouse_sigkill_then_rerun_publishes_every_row_once(point, rig, pg_url, figures):
    name, spec = KILL_POINTS[point]
    env = "rel"
    rig.save(SqlAlchemyConnector(connection_info=pg_url), f"warehouse-database-{env}")
    rig.save(WarehouseSettings(seed_order_items=ITEMS), f"warehouse-settings-{env}")
    rig.extra_env["RELIABILITY_MODULE"] = "flows.warehouse"
    args = ("--date", "2024-01-20", "--env", env)

    first = rig.run(*args, kill_at=spec)
    assert first.killed and first.killed_at == spec, first.stderr[-3000:]
    figures.kill_points.append(name)
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        published = conn.execute(sa.text("select to_regclass('marts.fct_sales')")).scalar()
        before = conn.execute(sa.text("select count(*) from marts.fct_sales")).scalar_one() if published else 0
    assert before == 0  # nothing was published by the killed run

    second = rig.run(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    with engine.connect() as conn:
        source = conn.execute(sa.text("select count(*) from oltp.order_items")).scalar_one()
        rows, distinct = conn.execute(
            sa.text("select count(*), count(distinct order_item_id) from marts.fct_sales")
        ).one()
    engine.dispose()
    assert source == ITEMS
    figures.rows_served += source
    figures.rows_lost += max(0, source - distinct)
    figures.rows_duplicated += rows - distinct
    assert rows == distinct == source
    figures.behaviour[name] = "redoes the raw load incrementally (watermarks), builds and publishes the marts"
