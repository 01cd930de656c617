"""No secret leaves its block: known secret values in every block, the weekly flow run on the success path and on
failure paths, then every place a value could land is scanned.

Secrets: the source API bearer token, the Salesforce password and security token (and the session ids the fake
issues), the Azure account key of the abfs:// lake's connection string, the database password in the connector URL.
Scanned: the children's stdout/stderr (exception messages, the CLI summary), every Prefect log (``read_logs``), every
artifact (``read_artifacts``), every flow and task run's state message and parameters, the Variables, every blob in
the lake container (Parquet decoded to text), every persisted Prefect result file (base64 payloads decoded), and
every row of every tracking table.
"""

from __future__ import annotations

import base64
import io
import json
import re
from datetime import date
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa

from tests.reliability.conftest import save_standard_blocks
from tests.support.azurite import ACCOUNT_KEY
from tests.support.fake_salesforce import DEFAULT_USERNAME, ORG_ID

pytestmark = pytest.mark.reliability

WEEK = date(2024, 1, 1)
SOURCE_SECRET = "srcTOKEN-3f9a1c7e55"
SF_PASSWORD = "sfPW-8b2d4e6f10"
SF_TOKEN = "sfTOK-7c1a9e3b42"
DB_PASSWORD = "dbPW-5e7f0a2c91"
SESSION_RE = re.compile(re.escape(ORG_ID) + r"!AQ[0-9a-f]{20,}")


def _secrets() -> dict[str, str]:
    return {
        "source secret": SOURCE_SECRET,
        "salesforce password": SF_PASSWORD,
        "salesforce token": SF_TOKEN,
        "salesforce password+token": SF_PASSWORD + SF_TOKEN,
        "database password": DB_PASSWORD,
        "azure account key": ACCOUNT_KEY,
        "azure account key (prefix)": ACCOUNT_KEY[:24],
        "azure account key (url-quoted)": ACCOUNT_KEY.replace("/", "%2F").replace("+", "%2B")[:40],
    }


def _find(where: str, text: str, found: list[str]) -> None:
    for name, value in _secrets().items():
        if value in text:
            found.append(f"{name} in {where}")
    if SESSION_RE.search(text):
        found.append(f"salesforce session id in {where}")


def _decoded_payloads(raw: bytes) -> str:
    """A persisted result file: its JSON plus any base64 payload decoded (pickles keep strings readable)."""
    text = raw.decode("utf-8", "replace")
    try:
        doc = json.loads(raw)
    except ValueError:
        return text
    parts = [text]
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and len(node) > 40:
            try:
                parts.append(base64.b64decode(node, validate=True).decode("latin-1"))
            except ValueError:
                pass
    return "\n".join(parts)


def _scan_prefect(found: list[str], seen_logs: list[str]) -> int:
    from prefect.client.orchestration import get_client

    scanned = 0
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            logs = client.read_logs(limit=200, offset=offset)
            for entry in logs:
                _find("a Prefect log", entry.message, found)
                seen_logs.append(entry.message)
            scanned += len(logs)
            offset += len(logs)
            if len(logs) < 200:
                break
        for artifact in client.read_artifacts():
            _find(f"artifact {artifact.key}", f"{artifact.data} {artifact.description}", found)
            scanned += 1
        for run in client.read_flow_runs():
            state = run.state
            _find(
                f"flow run {run.name} state", f"{state.name if state else ''} {state.message if state else ''}", found
            )
            _find(f"flow run {run.name} parameters", json.dumps(run.parameters, default=str), found)
            scanned += 1
        for run in client.read_task_runs():
            state = run.state
            _find(f"task run {run.name} state", f"{state.message if state else ''}", found)
            scanned += 1
        for variable in client.read_variables():
            _find(f"variable {variable.name}", json.dumps(variable.value, default=str), found)
            scanned += 1
    return scanned


def _scan_lake(lake, found: list[str]) -> int:
    names = lake.list("")
    for rel in names:
        data = lake.read_bytes(rel)
        if rel.endswith(".parquet"):
            frame = pl.read_parquet(io.BytesIO(data))
            buf = io.StringIO()
            frame.select(pl.all().cast(pl.String)).write_csv(buf)
            text = buf.getvalue()
        else:
            text = data.decode("utf-8", "replace")
        _find(f"lake file {rel}", text, found)
    return len(names)


def _scan_files(root: Path, found: list[str]) -> int:
    n = 0
    for path in root.rglob("*"):
        if path.is_file():
            _find(f"file {path.relative_to(root)}", _decoded_payloads(path.read_bytes()), found)
            n += 1
    return n


def _scan_db(engine: sa.Engine, found: list[str]) -> int:
    n = 0
    with engine.connect() as conn:
        for table in sa.inspect(engine).get_table_names():
            for row in conn.execute(sa.text(f'select * from "{table}"')):
                _find(f"table {table}", " ".join(str(v) for v in row), found)
                n += 1
    return n


def test_no_secret_in_logs_artifacts_states_files_or_tables(
    rig, pg_url, make_source_api, source_api, fake_salesforce, azurite, azurite_lake_block, azurite_lake, figures
):
    from tasks.publish import read_manifest

    source_api.config.total = 300
    source_api.config.auth, source_api.config.secret = "bearer", SOURCE_SECRET
    fake_salesforce.users[DEFAULT_USERNAME] = (SF_PASSWORD, SF_TOKEN)
    rig.sf_port = fake_salesforce.port
    url = sa.make_url(pg_url).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    assert DB_PASSWORD in url
    creds = fake_salesforce.credentials("password", password=SF_PASSWORD, security_token=SF_TOKEN)
    source = make_source_api("cursor", page_size=100, auth="bearer", secret=SOURCE_SECRET, max_attempts=2)
    save_standard_blocks(rig, source, url, salesforce=creds, lake_block=azurite_lake_block)

    # success path
    ok = rig.run("--week", WEEK.isoformat())
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert read_manifest(azurite_lake, "curated/events", WEEK) is not None
    assert fake_salesforce.records()
    # failure paths: Salesforce refuses the login; the source refuses the token; the database refuses the login
    fake_salesforce.users[DEFAULT_USERNAME] = ("other-" + SF_PASSWORD, SF_TOKEN)
    sf_fail = rig.run("--week", WEEK.isoformat(), "--full-refresh")
    assert sf_fail.returncode == 1 and "SalesforceAuthError" in sf_fail.stderr
    source_api.config.secret = "rotated-" + SOURCE_SECRET
    src_fail = rig.run("--week", "2024-01-08")
    assert src_fail.returncode == 1 and "401" in src_fail.stderr
    figures.faults["secret scan: failure paths (Salesforce login refused, source 401)"] += 2

    found: list[str] = []
    for n, result in enumerate((ok, sf_fail, src_fail), start=1):
        _find(f"run {n} stdout", result.stdout, found)
        _find(f"run {n} stderr", result.stderr, found)
    logs: list[str] = []
    scanned = _scan_prefect(found, logs)
    # the scan really read the children's logs, including the lines that name the source and the failures
    assert any("extracted 300 rows" in m for m in logs)
    assert any("SalesforceAuthError" in m for m in logs) and any("401" in m for m in logs)
    scanned += _scan_lake(azurite_lake, found)
    scanned += _scan_files(rig.tmp_path / "prefect-results", found)
    engine = sa.create_engine(url)
    scanned += _scan_db(engine, found)
    engine.dispose()
    assert scanned > 50
    assert found == []
