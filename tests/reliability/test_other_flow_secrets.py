"""Secrets of the ingest and warehouse flows stay in their blocks: known values in every block, success and failure
paths, then Prefect logs, artifacts, flow-run states, database rows and lake files are scanned."""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa
from prefect.blocks.notifications import SlackWebhook
from prefect.client.orchestration import get_client
from prefect_sqlalchemy import ConnectionComponents, SqlAlchemyConnector
from pydantic import SecretStr

from blocks.ingest import ApiIngestSource, IngestSettings
from blocks.lake import Lake
from blocks.warehouse import SmtpAlertServer, WarehouseSettings
from flows.ingest import ingest_flow
from flows.warehouse import warehouse
from tests.unit.test_alerts import smtp, webhook  # noqa: F401 - real local receivers

pytestmark = pytest.mark.reliability

SOURCE_SECRET = "ingSRC-9d1f3b5a77"
DB_PASSWORD = "dbPW-c4e6a8f013"
SMTP_PASSWORD = "smtpPW-2b4d6f8a19"


def _connector(pg_server: dict, database: str) -> SqlAlchemyConnector:
    # Trust auth ignores the password, so it can be a known value that must never show up anywhere.
    return SqlAlchemyConnector(
        connection_info=ConnectionComponents(
            driver="postgresql+psycopg",
            database=database,
            host=pg_server["host"],
            port=pg_server["port"],
            username=pg_server["user"],
            password=SecretStr(DB_PASSWORD),
        )
    )


def _leaks(secrets: list[str], pg_url: str, roots: list[Path], errors: list[str]) -> list[str]:
    found: list[str] = []

    def scan(where: str, text: object) -> None:
        for secret in secrets:
            if secret in str(text):
                found.append(f"{secret[:6]}… in {where}")

    for i, text in enumerate(errors):
        scan(f"exception {i}", text)
    with get_client(sync_client=True) as client:
        for read, describe in (
            (client.read_logs, lambda log: ("a Prefect log", log.message)),
            (client.read_artifacts, lambda a: (f"artifact {a.key}", f"{a.data} {a.description}")),
            (
                client.read_flow_runs,
                lambda r: (f"flow run {r.name}", f"{r.state.message if r.state else ''} {r.parameters}"),
            ),
        ):
            offset = 0
            while page := read(limit=200, offset=offset):
                for item in page:
                    scan(*describe(item))
                offset += len(page)
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        tables = conn.execute(
            sa.text(
                "select table_schema, table_name from information_schema.tables "
                "where table_schema not in ('pg_catalog', 'information_schema')"
            )
        ).all()
        for schema, table in tables:
            for row in conn.execute(sa.text(f'select * from "{schema}"."{table}"')):
                scan(f"{schema}.{table}", row)
    engine.dispose()
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                scan(str(path.relative_to(root)), path.read_bytes().decode("latin-1"))
    return found


def test_ingest_flow_leaks_no_secret(
    prefect_harness, pg_server, pg_database, pg_url, tmp_path, make_source_api, source_api
):
    source_api.config.auth, source_api.config.secret = "bearer", SOURCE_SECRET
    source = ApiIngestSource(
        name="events",
        api=make_source_api("page_number", auth="bearer", secret=SOURCE_SECRET),
        field_map={"source_id": "id", "name": "event_type", "value": "amount", "created_at": "occurred_at"},
        first_date=date(2024, 1, 1),
    )
    settings = IngestSettings(lake=Lake(base_url=str(tmp_path / "lake")))
    database = _connector(pg_server, pg_database)
    errors: list[str] = []

    ok = ingest_flow(sources=[source], database=database, settings=settings, today=date(2024, 1, 4))
    assert ok.status == "success"
    source_api.config.secret = "rotated-" + uuid.uuid4().hex  # the saved token is now refused: 401
    try:
        failed = ingest_flow(sources=[source], database=database, settings=settings, today=date(2024, 1, 8))
        errors.append(failed.model_dump_json())
        assert failed.status != "success"
    except Exception as exc:  # noqa: BLE001 - the failure path may raise; its text is scanned
        errors.append(f"{type(exc).__name__}: {exc}")

    assert _leaks([SOURCE_SECRET, DB_PASSWORD], pg_url, [tmp_path], errors) == []


def test_warehouse_flow_leaks_no_secret(prefect_harness, pg_server, pg_database, pg_url, tmp_path, webhook, smtp):  # noqa: F811
    url, received, _ = webhook
    host, port, _inbox = smtp
    env = f"s{uuid.uuid4().hex[:8]}"
    _connector(pg_server, pg_database).save(f"warehouse-database-{env}")
    SlackWebhook(url=url).save(f"slack-{env}")
    # The local SMTP server offers no AUTH: every e-mail alert fails at login, with the password in hand.
    SmtpAlertServer(
        host=host, port=port, security="none", sender="etl@x.io", recipients=["ops@x.io"],
        username="etl", password=SecretStr(SMTP_PASSWORD),
    ).save(f"smtp-{env}")  # fmt: skip
    WarehouseSettings(seed_order_items=500, slack_block=f"slack-{env}", smtp_block=f"smtp-{env}").save(
        f"warehouse-settings-{env}"
    )
    errors: list[str] = []
    try:
        errors.append(str(warehouse(run_date=date(2024, 1, 20), full_refresh=True, env=env)))
    except Exception as exc:  # noqa: BLE001 - scanned below
        errors.append(f"{type(exc).__name__}: {exc}")
    # Failure path: the database block now names a database that does not exist.
    _connector(pg_server, f"missing_{uuid.uuid4().hex[:8]}").save(f"warehouse-database-{env}", overwrite=True)
    with pytest.raises(Exception) as info:
        warehouse(run_date=date(2024, 1, 20), env=env)
    errors.append(f"{type(info.value).__name__}: {info.value}")
    errors.extend(r["json"]["text"] for r in received)

    webhook_secret = url.rsplit("/", 1)[1]
    assert _leaks([DB_PASSWORD, SMTP_PASSWORD, webhook_secret], pg_url, [tmp_path], errors) == []
