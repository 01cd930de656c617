"""pyodbc for real, through the PostgreSQL ODBC driver (the stand-in for Azure SQL's ODBC Driver 18)."""

from __future__ import annotations

import uuid
from contextlib import closing
from datetime import UTC, date, datetime, timedelta

import pyodbc
import pytest

from tasks import checkpoint as cp
from tasks import tracking as tr
from tasks.errors import ConfigurationError, DatabaseUnavailableError
from tasks.sql import make_engine, odbc_connect

P = "weekly-odbc"
W1, W2, W3 = date(2026, 11, 2), date(2026, 11, 9), date(2026, 11, 16)
T0 = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)


@pytest.fixture
def odbc_str(pg_server: dict, pg_database: str) -> str:
    return (
        f"DRIVER={{PostgreSQL Unicode}};SERVER={pg_server['host']};PORT={pg_server['port']};"
        f"DATABASE={pg_database};UID={pg_server['user']}"
    )


@pytest.fixture
def schema(pg_url: str) -> None:
    engine = make_engine(pg_url)
    tr.ensure_schema(engine)
    engine.dispose()


def _upsert(cur: pyodbc.Cursor, sql: str, order: list[str], week: date, run_id: str) -> None:
    values = {"pipeline": P, "next_week_start": week, "updated_at": T0, "last_run_id": run_id}
    cur.execute(sql, [values[name] for name in order])


def _checkpoint(cur: pyodbc.Cursor) -> tuple[date, str]:
    row = cur.execute("SELECT next_week_start, last_run_id FROM pipeline_checkpoint WHERE pipeline = ?", P).fetchone()
    return (row[0] if isinstance(row[0], date) else date.fromisoformat(str(row[0]))), row[1]


@pytest.mark.parametrize("merge", [False, True], ids=["on_conflict", "merge"])
def test_checkpoint_upsert_as_raw_parameterized_sql(odbc_str: str, schema: None, merge: bool) -> None:
    sql, order = cp.checkpoint_upsert_qmark("postgresql", merge=merge)
    with closing(odbc_connect(odbc_str, autocommit=False)) as conn:
        cur = conn.cursor()
        _upsert(cur, sql, order, W2, "a")
        _upsert(cur, sql, order, W3, "b")
        _upsert(cur, sql, order, W1, "c")  # backwards: ignored
        conn.commit()
        assert _checkpoint(cur) == (W3, "b")
    # And the library reads what ODBC wrote.
    engine = make_engine(odbc_str_to_url(odbc_str))
    assert cp.get_checkpoint(engine, P) == W3
    engine.dispose()


def odbc_str_to_url(odbc_str: str) -> str:
    parts = dict(kv.split("=", 1) for kv in odbc_str.split(";") if kv)
    return f"postgresql+psycopg://{parts['UID']}@{parts['SERVER']}:{parts['PORT']}/{parts['DATABASE']}"


def test_fast_executemany_batch_insert_and_the_filtered_unique_index(odbc_str: str, schema: None) -> None:
    n = 2000
    rows = [
        (str(uuid.uuid4()), P, W1 + timedelta(weeks=i), "SUCCESS", T0, T0 + timedelta(minutes=1), i, i, 0)
        for i in range(n)
    ]
    with closing(odbc_connect(odbc_str, autocommit=False)) as conn:
        cur = conn.cursor()
        cur.fast_executemany = True
        cur.executemany(
            "INSERT INTO pipeline_run (run_id, pipeline, week_start, status, started_at, ended_at, fetched, valid, "
            "rejected) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.commit()
        assert tuple(cur.execute("SELECT count(*), sum(fetched) FROM pipeline_run").fetchone()) == (n, sum(range(n)))
        # A second success for an existing week is refused by the same index the library created.
        with pytest.raises(pyodbc.IntegrityError):
            cur.execute(
                "INSERT INTO pipeline_run (run_id, pipeline, week_start, status, started_at) VALUES (?, ?, ?, ?, ?)",
                str(uuid.uuid4()),
                P,
                W1,
                "SUCCESS",
                T0,
            )
        conn.rollback()
        cur.execute(
            "INSERT INTO pipeline_run (run_id, pipeline, week_start, status, started_at) VALUES (?, ?, ?, ?, ?)",
            str(uuid.uuid4()),
            P,
            W1,
            "FAILED",
            T0,
        )
        conn.commit()
    engine = make_engine(odbc_str_to_url(odbc_str))
    assert len(tr.runs(engine, P, limit=None)) == n + 1
    first = tr.last_successful_run(engine, P, W1)
    assert first.fetched == 0 and first.started_at == T0 and first.ended_at == T0 + timedelta(minutes=1)
    engine.dispose()


def test_odbc_connect_errors_hide_the_password(pg_server: dict) -> None:
    down = "DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1;PORT=1;DATABASE=x;UID=postgres;PWD=Sup3rS3cretPW"
    with pytest.raises(DatabaseUnavailableError) as info:
        odbc_connect(down, timeout=2)
    assert "Sup3rS3cretPW" not in str(info.value) and "PORT=1" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        odbc_connect("DRIVER={No Such Driver 99};SERVER=x;PWD=Sup3rS3cretPW", timeout=2)
    assert "Sup3rS3cretPW" not in str(info.value) and "No Such Driver 99" in str(info.value)
