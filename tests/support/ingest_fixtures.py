"""Fixtures of the ingestion flow tests: a migrated PostgreSQL engine and a static HTTP file server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine


@pytest.fixture(scope="module")
def ingest_engine_module(pg_server: dict) -> Iterator[Engine]:
    """Like ``ingest_engine`` but one database per test module (for read-only tests over shared seed data)."""
    import uuid

    import psycopg

    from tasks.ingest_db import ensure_schema

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = {"host": pg_server["host"], "port": pg_server["port"], "user": pg_server["user"], "dbname": "postgres"}
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    engine = create_engine(f"postgresql+psycopg://{pg_server['user']}@{pg_server['host']}:{pg_server['port']}/{name}")
    ensure_schema(engine)
    try:
        yield engine
    finally:
        engine.dispose()
        with psycopg.connect(**admin, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def ingest_engine(pg_url: str) -> Iterator[Engine]:
    """SQLAlchemy engine on the test's own database with every ingestion table created."""
    from tasks.ingest_db import ensure_schema

    engine = create_engine(pg_url)
    ensure_schema(engine)
    try:
        yield engine
    finally:
        engine.dispose()


class _Handler(SimpleHTTPRequestHandler):
    requests: list[dict] = []

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def end_headers(self) -> None:
        path = Path(self.translate_path(self.path))
        if path.is_file():
            self.send_header("ETag", '"' + hashlib.sha256(path.read_bytes()).hexdigest()[:16] + '"')
        super().end_headers()

    def do_GET(self) -> None:  # noqa: N802
        type(self).requests.append({"path": self.path, "headers": dict(self.headers)})
        path = Path(self.translate_path(self.path))
        etag = '"' + hashlib.sha256(path.read_bytes()).hexdigest()[:16] + '"' if path.is_file() else None
        if etag and self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.end_headers()
            return
        super().do_GET()


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path, list[dict]]]:
    """(base URL, served folder, request log) of a real HTTP server on 127.0.0.1 serving ``tmp_path/www``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = type("H", (_Handler,), {"requests": []})

    def factory(*args, **kwargs):
        return handler(*args, directory=str(root), **kwargs)

    server = ThreadingHTTPServer(("127.0.0.1", 0), factory)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, handler.requests
    finally:
        server.shutdown()
        server.server_close()
