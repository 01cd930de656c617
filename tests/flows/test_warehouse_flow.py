# ruff: noqa: F811 - the receiver fixtures are imported from the alerts tests
"""The warehouse flow end to end on the ephemeral Prefect API and a real PostgreSQL database (3 runs)."""

from __future__ import annotations

import json
import uuid
from datetime import date

import pytest
from prefect.blocks.notifications import SlackWebhook
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect_sqlalchemy import ConnectionComponents
from sqlalchemy import create_engine, text

from blocks import SmtpAlertServer, SqlAlchemyConnector, WarehouseSettings
from flows.warehouse import main, warehouse
from tasks.errors import DataTestError
from tests.unit.test_alerts import smtp, webhook  # noqa: F401 - real local receivers

RUN_DATE = date(2024, 1, 20)


def _artifact(key: str):
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found


def test_warehouse_flow_full_incremental_and_failing_runs(
    prefect_harness, pg_database, pg_server, pg_url, webhook, smtp
):  # noqa: F811
    url, received, _ = webhook
    host, port, inbox = smtp
    env = f"t{uuid.uuid4().hex[:8]}"
    SqlAlchemyConnector(
        connection_info=ConnectionComponents(
            driver="postgresql+psycopg",
            database=pg_database,
            host=pg_server["host"],
            port=pg_server["port"],
            username=pg_server["user"],
        )
    ).save(f"warehouse-database-{env}")
    SlackWebhook(url=url).save(f"slack-{env}")
    SmtpAlertServer(host=host, port=port, security="none", sender="etl@x.io", recipients=["ops@x.io"]).save(
        f"smtp-{env}"
    )
    settings = WarehouseSettings(seed_order_items=2000, slack_block=f"slack-{env}", smtp_block=f"smtp-{env}")
    settings.save(f"warehouse-settings-{env}")

    first = warehouse(run_date=RUN_DATE, full_refresh=True, env=env)
    assert first["marts"]["fct_sales"]["inserted"] == 2000
    assert first["tests"]["error"] == 0 and first["tests"]["warn"] >= 1
    assert all(first["reconciliation"].values())
    artifact = _artifact(f"warehouse-data-tests-{env}")
    rows = json.loads(artifact[0].data)
    assert len(rows) == 16 and isinstance(rows[0]["tested_at"], str)
    assert _artifact(f"warehouse-publish-{env}")
    warn_alerts = len(received)
    assert warn_alerts == first["tests"]["warn"] and len(inbox.messages) == warn_alerts
    assert all("warning" in r["json"]["text"] for r in received)

    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "update oltp.order_items set quantity = 7, updated_at = '2024-01-21T00:30:00Z' where order_item_id = 3"
            )
        )
    second = warehouse(run_date=RUN_DATE, env=env)
    assert second["raw"]["order_items"]["updated"] == 1
    assert second["marts"]["fct_sales"]["incremental"] is True
    assert second["marts"]["fct_sales"]["updated"] == 1 and second["marts"]["fct_sales"]["rows"] < 100
    assert len(received) == warn_alerts  # same warnings within the window: throttled

    # Freshness now fails at error level: nothing is published, a failure alert goes out.
    WarehouseSettings(**(settings.model_dump() | {"freshness_error_hours": 1.0})).save(
        f"warehouse-settings-{env}", overwrite=True
    )
    with engine.begin() as conn:
        conn.execute(
            text("update oltp.products set name = 'Renamed', updated_at = '2024-01-21T01:00:00Z' where product_id = 2")
        )
    with pytest.raises(DataTestError, match="freshness_fct_orders_updated_at"):
        warehouse(run_date=date(2024, 3, 1), env=env)
    with engine.connect() as conn:
        assert conn.execute(text("select name from marts.dim_products where product_id = 2")).scalar_one() != "Renamed"
        assert conn.execute(text("select count(distinct run_id) from meta.data_test_history")).scalar_one() == 3
    engine.dispose()
    failure = [r["json"]["text"] for r in received[warn_alerts:] if "failed" in r["json"]["text"]]
    assert len(failure) == 1 and "DataTestError" in failure[0]
    # The CLI reports the failure with a non-zero exit code.
    assert main(["--date", "2024-03-01", "--env", env]) == 1
