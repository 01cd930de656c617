"""Statements compiled for SQL Server / Azure SQL (no server here), PostgreSQL and SQLite; engine helpers."""

from __future__ import annotations

import re
from datetime import date

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mssql, postgresql, sqlite
from sqlalchemy.dialects.mssql import pyodbc as mssql_pyodbc

from tasks import checkpoint as cp
from tasks import tracking as tr
from tasks.errors import ConfigurationError, DatabaseUnavailableError
from tasks.sql import describe_odbc, engine_from_odbc, odbc_dialect, parse_odbc, scrub_secrets

AZURE = (
    "DRIVER={ODBC Driver 18 for SQL Server};SERVER=tcp:myserver.database.windows.net,1433;"
    "DATABASE=etl;UID=etl_user;PWD={p@ss;w}}rd};Encrypt=yes;TrustServerCertificate=no;Connection Timeout=30;"
)


def _one_line(sql: object) -> str:
    return re.sub(r"\s+", " ", str(sql)).strip()


def test_mssql_merge_text() -> None:
    dialect = mssql_pyodbc.dialect(paramstyle="qmark")
    sql, order = cp.checkpoint_upsert_qmark("mssql")
    assert order == ["pipeline", "next_week_start", "updated_at", "last_run_id"]
    assert sql == _one_line(cp.checkpoint_merge_sql(dialect).compile(dialect=dialect))
    assert sql.startswith(
        "MERGE INTO pipeline_checkpoint WITH (HOLDLOCK) AS target USING (SELECT CAST(? AS VARCHAR(200))"
    )
    assert "CAST(? AS DATE) AS next_week_start" in sql and "CAST(? AS DATETIMEOFFSET) AS updated_at" in sql
    assert "ON target.pipeline = source.pipeline" in sql
    assert "WHEN MATCHED AND target.next_week_start < source.next_week_start THEN UPDATE SET" in sql
    assert "WHEN NOT MATCHED THEN INSERT (pipeline, next_week_start, updated_at, last_run_id)" in sql
    assert sql.endswith(";")  # SQL Server requires MERGE to be terminated
    forced, _ = cp.checkpoint_upsert_qmark("mssql", force=True)
    assert "WHEN MATCHED THEN UPDATE SET" in forced and "<" not in forced


def test_portable_upsert_picks_merge_for_mssql_and_on_conflict_elsewhere() -> None:
    values = {"pipeline": "p", "next_week_start": date(2026, 11, 2), "updated_at": None, "last_run_id": "r"}
    ms = mssql_pyodbc.dialect(paramstyle="qmark")
    assert _one_line(cp.checkpoint_upsert(ms, values).compile(dialect=ms)).startswith("MERGE INTO pipeline_checkpoint")
    for dialect in (postgresql.dialect(), sqlite.dialect()):
        sql = _one_line(cp.checkpoint_upsert(dialect, values).compile(dialect=dialect))
        assert "ON CONFLICT (pipeline) DO UPDATE SET next_week_start = excluded.next_week_start" in sql
        assert sql.endswith("WHERE pipeline_checkpoint.next_week_start < excluded.next_week_start")
        forced = _one_line(cp.checkpoint_upsert(dialect, values, force=True).compile(dialect=dialect))
        assert "WHERE" not in forced


@pytest.mark.parametrize("dialect", [mssql.dialect(), postgresql.dialect(), sqlite.dialect()], ids=lambda d: d.name)
def test_filtered_unique_index_text(dialect) -> None:
    sql = _one_line(sa.schema.CreateIndex(tr.uq_pipeline_run_success).compile(dialect=dialect))
    assert sql == (
        "CREATE UNIQUE INDEX uq_pipeline_run_success ON pipeline_run (pipeline, week_start) "
        "WHERE status IN ('SUCCESS', 'SUCCESS_WITH_REJECTS')"
    )


def test_mssql_table_ddl() -> None:
    dialect = mssql.dialect()
    run = _one_line(sa.schema.CreateTable(tr.pipeline_run).compile(dialect=dialect))
    assert "started_at DATETIMEOFFSET NOT NULL" in run
    assert "failure_reason VARCHAR(2000) NULL" in run  # bounded: no VARCHAR(max)
    assert "CHECK (status IN ('RUNNING', 'SUCCESS', 'SUCCESS_WITH_REJECTS', 'FAILED', 'SUPERSEDED'))" in run
    stage = _one_line(sa.schema.CreateTable(tr.pipeline_stage).compile(dialect=dialect))
    assert "PRIMARY KEY (run_id, stage)" in stage and "FOREIGN KEY(run_id) REFERENCES pipeline_run (run_id)" in stage
    ckpt = _one_line(sa.schema.CreateTable(tr.pipeline_checkpoint).compile(dialect=postgresql.dialect()))
    assert "updated_at TIMESTAMP WITH TIME ZONE NOT NULL" in ckpt and "PRIMARY KEY (pipeline)" in ckpt


def test_parse_and_describe_odbc_never_show_the_password() -> None:
    parts = parse_odbc(AZURE)
    assert parts["DRIVER"] == "ODBC Driver 18 for SQL Server"
    assert parts["PWD"] == "p@ss;w}rd"
    assert parts["SERVER"] == "tcp:myserver.database.windows.net,1433"
    summary = describe_odbc(AZURE)
    assert "p@ss" not in summary and "etl_user" not in summary and "myserver" in summary
    assert "p@ss" not in scrub_secrets(AZURE) and "w}}rd" not in scrub_secrets(AZURE)
    with pytest.raises(ConfigurationError, match="unterminated") as info:
        parse_odbc("DRIVER={x;PWD=secret")
    assert "secret" not in str(info.value)
    with pytest.raises(ConfigurationError, match="no '='"):
        parse_odbc("DRIVER=x;garbage")


def test_odbc_dialect_choice() -> None:
    assert odbc_dialect(AZURE) == "mssql+pyodbc"
    with pytest.raises(ConfigurationError, match="no postgresql\\+pyodbc"):
        odbc_dialect("DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1")
    with pytest.raises(ConfigurationError, match="DRIVER"):
        odbc_dialect("SERVER=x;PWD=y")


def test_engine_from_odbc_keeps_the_string_out_of_url_and_errors() -> None:
    engine = engine_from_odbc(AZURE)
    assert engine.dialect.name == "mssql" and engine.dialect.driver == "pyodbc"
    assert engine.dialect.fast_executemany is True
    assert "p@ss" not in str(engine.url) and "p@ss" not in repr(engine)
    # The SQL Server driver is not installed here: the creator's failure is a ConfigurationError without PWD.
    with pytest.raises((ConfigurationError, DatabaseUnavailableError)) as info:
        cp.get_checkpoint(engine, "p")
    assert "p@ss" not in str(info.value) and "w}rd" not in str(info.value)
    assert "ODBC Driver 18 for SQL Server" in str(info.value)
    engine.dispose()


def test_scrub_secrets_variants() -> None:
    text = scrub_secrets(
        "postgresql://u:pw1@h/db password=pw2 AccountKey=pw3== token=pw4&x=1 Authorization: Bearer pw5 api_key: ok"
    )
    for secret in ("pw1", "pw2", "pw3", "pw4", "pw5"):
        assert secret not in text
    assert "h/db" in text and "x=1" in text
