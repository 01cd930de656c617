"""Engine and dialect helpers for the tracking database (SQLite file, PostgreSQL, Azure SQL).

* :func:`make_engine` builds an engine from a SQLAlchemy URL with ``pool_pre_ping`` on.
* :func:`engine_from_odbc` builds one from a raw ODBC connection string (Azure SQL through pyodbc).
* :func:`run_in_transaction` runs one unit of work, retries it once on a stale pooled connection and turns
  connection-level failures into :class:`~tasks.errors.DatabaseUnavailableError` without the URL or password.

No Prefect import here: the flow gets the engine from the ``SqlAlchemyConnector`` block and passes it in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from tasks.errors import ConfigurationError, DatabaseUnavailableError, redact_url

T = TypeVar("T")

_LOG = logging.getLogger(__name__)

# SQLite reports transient trouble (lock contention, a vanished file) as OperationalError, but also schema
# mistakes ("no such table"); only the former are "unavailable".
_SQLITE_TRANSIENT = ("locked", "busy", "unable to open", "disk i/o", "readonly database")

# key=value secrets inside free text (ODBC strings, Azure connection strings, query strings, headers).
_SECRET_KV = re.compile(
    r"(?i)\b(pwd|password|passwd|accountkey|sharedaccesssignature|sig|token|access_token|client_secret|"
    r"api_key|apikey|secret|sessionid|session_id)\s*=\s*(\{(?:[^}]|\}\})*\}|[^;&\s,'\"]+)"
)
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@'\"]+@")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]+")


def scrub_secrets(text: str) -> str:
    """Mask credentials that may sit in free text: URL user info, ``PWD=``/``password=``-style pairs, bearer tokens."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _SECRET_KV.sub(lambda m: f"{m.group(1)}=***", text)
    return _BEARER.sub(r"\1 ***", text)


def safe_text(text: object, limit: int = 1000) -> str:
    """``text`` without secrets, whitespace-trimmed and cut to ``limit`` characters (with a marker when cut)."""
    out = scrub_secrets(str(text)).strip()
    if len(out) > limit:
        marker = "...[truncated]"
        out = out[: max(0, limit - len(marker))] + marker
    return out


# --- ODBC connection strings ------------------------------------------------------------------------------------


def parse_odbc(odbc: str) -> dict[str, str]:
    """Split an ODBC connection string into ``{UPPERCASE_KEY: value}``; braces ``{..}`` quote values (``}}`` = ``}``).

    Raises ConfigurationError (field ``odbc_connection_string``, without echoing the string) when malformed.
    """
    out: dict[str, str] = {}
    i, n = 0, len(odbc)
    while i < n:
        while i < n and odbc[i] in "; \t\r\n":
            i += 1
        if i >= n:
            break
        eq = odbc.find("=", i)
        if eq < 0:
            raise ConfigurationError(
                "odbc_connection_string", f"segment {len(out) + 1} has no '=' (expected KEY=value)"
            )
        key = odbc[i:eq].strip().upper()
        if not key:
            raise ConfigurationError("odbc_connection_string", f"segment {len(out) + 1} has an empty key")
        i = eq + 1
        while i < n and odbc[i] in " \t":
            i += 1
        if i < n and odbc[i] == "{":
            i += 1
            buf: list[str] = []
            while True:
                if i >= n:
                    raise ConfigurationError("odbc_connection_string", f"unterminated '{{' in the value of {key}")
                if odbc[i] == "}":
                    if i + 1 < n and odbc[i + 1] == "}":
                        buf.append("}")
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(odbc[i])
                i += 1
            value = "".join(buf)
            while i < n and odbc[i] != ";":
                i += 1
        else:
            end = odbc.find(";", i)
            end = n if end < 0 else end
            value = odbc[i:end].strip()
            i = end
        out[key] = value
    return out


_ODBC_SAFE_KEYS = ("DRIVER", "SERVER", "PORT", "DATABASE", "UID", "AUTHENTICATION", "ENCRYPT")


def describe_odbc(odbc: str) -> str:
    """A loggable summary of an ODBC string: driver, server, database only (never PWD or tokens)."""
    try:
        parts = parse_odbc(odbc)
    except ConfigurationError:
        return "<malformed odbc connection string>"
    return ";".join(f"{k}={parts[k]}" for k in _ODBC_SAFE_KEYS if k in parts and k != "UID")


def odbc_dialect(odbc: str) -> str:
    """The SQLAlchemy dialect for an ODBC string's driver: ``mssql+pyodbc`` for SQL Server / Azure SQL."""
    driver = parse_odbc(odbc).get("DRIVER", "")
    lowered = driver.lower()
    if "sql server" in lowered or "azure" in lowered or "freetds" in lowered:
        return "mssql+pyodbc"
    if "postgres" in lowered:
        raise ConfigurationError(
            "odbc_connection_string",
            f"driver {driver!r}: SQLAlchemy has no postgresql+pyodbc dialect; use a postgresql+psycopg URL "
            "(or plain pyodbc for raw SQL)",
        )
    if not driver:
        raise ConfigurationError("odbc_connection_string", "has no DRIVER={...}")
    raise ConfigurationError("odbc_connection_string", f"driver {driver!r} is not supported (SQL Server only)")


_ODBC_CONFIG_STATES = ("IM002", "IM003", "IM004", "01000", "01S00", "28000")


def odbc_connect(odbc: str, **kwargs: Any) -> Any:
    """``pyodbc.connect(odbc)`` with failures mapped to our errors, never echoing the string (it may hold PWD=).

    Driver missing / bad keywords / login refused -> ConfigurationError; anything else (server down, network)
    -> DatabaseUnavailableError.
    """
    import pyodbc

    try:
        return pyodbc.connect(odbc, **kwargs)
    except pyodbc.Error as exc:
        state = str(exc.args[0]) if exc.args else ""
        detail = safe_text(exc.args[1] if len(exc.args) > 1 else exc, 300)
        where = describe_odbc(odbc)
        if state in _ODBC_CONFIG_STATES:
            raise ConfigurationError("odbc_connection_string", f"{where}: [{state}] {detail}") from None
        raise DatabaseUnavailableError(f"ODBC connect to {where} failed: [{state}] {detail}") from None


def engine_from_odbc(odbc: str, *, fast_executemany: bool = True, **engine_kwargs: Any) -> Engine:
    """Engine for a raw ODBC connection string (e.g. ``DRIVER={ODBC Driver 18 for SQL Server};SERVER=...;PWD=...``).

    Connections come from ``pyodbc.connect(odbc)`` through ``creator`` so the string is passed verbatim (no URL
    quoting of ``{}`` or ``;``) and never appears in the engine URL, its repr or a log line.
    """
    dialect = odbc_dialect(odbc)

    def _connect() -> Any:
        return odbc_connect(odbc)

    kwargs: dict[str, Any] = {"pool_pre_ping": True, "creator": _connect}
    if dialect == "mssql+pyodbc":
        kwargs["fast_executemany"] = fast_executemany
    kwargs.update(engine_kwargs)
    return sa.create_engine(f"{dialect}://", **kwargs)


def make_engine(url: str | sa.URL, **engine_kwargs: Any) -> Engine:
    """``create_engine`` with ``pool_pre_ping=True`` (checks a pooled connection before handing it out)."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    kwargs.update(engine_kwargs)
    return sa.create_engine(url, **kwargs)


# --- errors -----------------------------------------------------------------------------------------------------


def engine_label(engine: Engine) -> str:
    """``dialect://host:port/database`` with no user or password, for messages."""
    url = engine.url
    if url.drivername.startswith("sqlite"):
        return f"{url.drivername}:///{url.database or ':memory:'}"
    host = url.host or ""
    port = f":{url.port}" if url.port else ""
    db = f"/{url.database}" if url.database else ""
    return redact_url(f"{url.drivername}://{host}{port}{db}") if host or db else url.drivername


def is_unavailable(exc: BaseException, dialect_name: str = "") -> bool:
    """True when ``exc`` means "the database is not reachable right now" (retry later), not a bad statement."""
    if isinstance(exc, DatabaseUnavailableError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if isinstance(exc, sa_exc.InterfaceError):
            return True
        if isinstance(exc, sa_exc.OperationalError):
            if dialect_name == "sqlite":
                text = str(exc.orig).lower()
                return any(word in text for word in _SQLITE_TRANSIENT)
            return True
    if isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError | ConnectionError):
        return True
    return False


def unavailable(exc: BaseException, engine: Engine, operation: str) -> DatabaseUnavailableError:
    """A DatabaseUnavailableError naming the operation and the server, never the URL's user or password."""
    orig = getattr(exc, "orig", None) or exc
    first_line = safe_text(str(orig).splitlines()[0] if str(orig) else type(orig).__name__, 300)
    err = DatabaseUnavailableError(
        f"{operation}: database {engine_label(engine)} is unavailable ({type(orig).__name__}: {first_line})"
    )
    err.original_type = type(orig).__name__  # type: ignore[attr-defined]
    return err


def run_in_transaction(
    engine: Engine,
    operation: str,
    work: Callable[[Connection], T],
    *,
    retry_stale: bool = True,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> T:
    """Run ``work(conn)`` in one transaction.

    A connection that the server dropped while it sat in the pool (``connection_invalidated``) gets one retry on a
    fresh pool (``work`` must therefore be idempotent). Connection-level failures end as DatabaseUnavailableError,
    raised ``from None`` so SQLAlchemy's text (statement, parameters, URL) does not ride along in the traceback.
    Any other error (integrity, programming) propagates unchanged.
    """
    log = logger or _LOG
    attempts = 2 if retry_stale else 1
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as conn:
                return work(conn)
        except DatabaseUnavailableError:
            raise
        except sa_exc.DBAPIError as exc:
            if not is_unavailable(exc, engine.dialect.name):
                raise
            stale = exc.connection_invalidated
            if stale and attempt < attempts:
                log.warning(
                    "%s: pooled connection to %s was dropped; disposing the pool and retrying once",
                    operation,
                    engine_label(engine),
                )
                engine.dispose()
                continue
            err = unavailable(exc, engine, operation)
        except (sa_exc.DisconnectionError, sa_exc.TimeoutError, ConnectionError) as exc:
            err = unavailable(exc, engine, operation)
        raise err from None
    raise AssertionError("unreachable")  # pragma: no cover
