"""Real PostgreSQL on 127.0.0.1:5432 (trust auth). Each test that asks gets a database of its own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")


def _admin() -> psycopg.Connection:
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True)


@pytest.fixture(scope="session")
def pg_server() -> dict:
    """Connection facts of the server; skips nothing: a missing server is an error the test entry fixes."""
    with _admin() as conn:
        conn.execute("select 1")
    return {"host": PG_HOST, "port": PG_PORT, "user": PG_USER}


@pytest.fixture
def pg_database(pg_server: dict) -> Iterator[str]:
    """Name of a fresh, empty database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(f'create database "{name}"')
    try:
        yield name
    finally:
        with _admin() as conn:
            conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(f'drop database if exists "{name}"')


@pytest.fixture
def pg_url(pg_database: str, pg_server: dict) -> str:
    """SQLAlchemy URL (psycopg 3 driver) of the test's own database."""
    return f"postgresql+psycopg://{pg_server['user']}@{pg_server['host']}:{pg_server['port']}/{pg_database}"
