"""Read API over ``normalized_data`` and ``etl_runs``: ``GET /data``, ``GET /health``, ``GET /stats``.

Pagination strategy (stays fast at 1M+ rows while keeping page numbers):

* Order is ``created_at DESC, id DESC`` (index ``(created_at, id)``; with a source filter ``(source, created_at, id)``).
* Without ``search``: the app keeps, per source filter, the key of every ``ANCHOR_EVERY``-th row ("page anchors")
  plus the exact row count, computed in one index-only pass. A page is then a keyset query from the nearest anchor
  (``(created_at, id) <= anchor``) with an ``OFFSET`` below ``ANCHOR_EVERY``: page 10,000 costs the same as page 1.
  The anchors are keyed on ``etl_meta.data_version``, which every committed upsert bumps in its own transaction,
  and each request reads the version, the anchors and the page in one REPEATABLE READ snapshot, so a page is
  never computed from stale anchors. ``total`` is that cached exact count (the "cheap count": one pass per data
  version, not one per request).
* With ``search`` (case-insensitive substring of name or description; ``%``, ``_``, ``\\`` and quotes are matched
  literally: LIKE metacharacters are escaped, values are bound parameters): a filtered scan with ``OFFSET`` and an
  exact ``count(*)`` over the same filter.

Auth: when ``api_key`` is set, ``/data`` and ``/stats`` need header ``X-API-Key`` (401 when missing or wrong);
``/health`` stays open for probes and reveals no data. Database faults answer 503, never 500.
"""

import logging
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field, SecretStr
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from tasks.errors import redact_url

ANCHOR_EVERY = 1000
ANCHOR_CACHE_SIZE = 64
API_KEY_HEADER = "X-API-Key"
MAX_PAGE = 10_000_000
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_NO_NUL = r"^[^\x00]*$"
_log = logging.getLogger(__name__)

_COLUMNS = "id, source, source_id, name, value, description, category, created_at, updated_at"


class Record(BaseModel):
    id: int = Field(description="Surrogate key (tie-breaker of the order).")
    source: str
    source_id: str
    name: str | None
    value: float | None
    description: str | None
    category: str | None
    created_at: datetime
    updated_at: datetime


class Meta(BaseModel):
    request_id: str = Field(description="X-Request-ID of the request, or a generated one.")
    latency_ms: float = Field(description="Server-side time spent on this request.")


class DataPage(BaseModel):
    data: list[Record]
    total: int = Field(description="Rows matching the filters.")
    page: int
    page_size: int
    has_more: bool
    metadata: Meta


class LastRun(BaseModel):
    run_id: str
    status: str
    started_at: datetime
    finished_at: datetime | None


class Health(BaseModel):
    status: str = Field(description="ok or unavailable.")
    database: str = Field(description="up or down.")
    last_run: LastRun | None = None


class Stats(BaseModel):
    run_count: int
    total_records_processed: int
    total_duration_seconds: float
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_failure_reason: str | None


@dataclass
class _Anchors:
    version: int
    total: int
    keys: list[tuple[datetime, int]]


class _AnchorCache:
    def __init__(self, every: int) -> None:
        self.every = every
        self._data: OrderedDict[str | None, _Anchors] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, conn: Connection, source: str | None, version: int) -> _Anchors:
        with self._lock:
            hit = self._data.get(source)
            if hit is not None and hit.version == version:
                self._data.move_to_end(source)
                return hit
        where = "where source = :source" if source is not None else ""
        params = {"source": source, "k": self.every}
        rows = conn.execute(
            text(
                f"select created_at, id, n from (select created_at, id, "  # noqa: S608
                f"row_number() over (order by created_at desc, id desc) as rn, count(*) over () as n "
                f"from normalized_data {where}) t where (rn - 1) % :k = 0 order by rn"
            ),
            params,
        ).all()
        anchors = _Anchors(version=version, total=int(rows[0][2]) if rows else 0, keys=[(r[0], r[1]) for r in rows])
        with self._lock:
            self._data[source] = anchors
            self._data.move_to_end(source)
            while len(self._data) > ANCHOR_CACHE_SIZE:
                self._data.popitem(last=False)
        return anchors


def escape_like(value: str) -> str:
    """``value`` as a LIKE pattern that matches itself literally (escape character: backslash)."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _engine(engine_or_url: Engine | str) -> tuple[Engine, bool]:
    if isinstance(engine_or_url, Engine):
        return engine_or_url, False
    url = str(engine_or_url)
    args = {"connect_timeout": 3} if "psycopg" in url or url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, connect_args=args), True


def create_app(
    engine_or_url: Engine | str, api_key: SecretStr | None = None, *, anchor_every: int = ANCHOR_EVERY
) -> FastAPI:
    """The read API over an engine (kept open) or a SQLAlchemy URL (engine owned and disposed by the app)."""
    engine, owned = _engine(engine_or_url)
    cache = _AnchorCache(anchor_every)
    schema_ready = threading.Event()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if owned:
            engine.dispose()

    app = FastAPI(
        title="Ingestion read API",
        version="1.0",
        description="Normalized records ingested from API, CSV and RSS sources, plus ETL run health and stats.",
        lifespan=lifespan,
    )
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="Required when the server has a key.")

    def require_key(given: Annotated[str | None, Depends(header)]) -> None:
        if api_key is None:
            return
        expected = api_key.get_secret_value().encode()
        if given is None or not secrets.compare_digest(given.encode("utf-8", "replace"), expected):
            raise HTTPException(status_code=401, detail=f"missing or wrong {API_KEY_HEADER} header")

    def ensure_ready() -> None:
        if schema_ready.is_set():
            return
        from tasks.ingest_db import ensure_schema

        ensure_schema(engine)
        schema_ready.set()

    @app.middleware("http")
    async def request_id(request: Request, call_next: Any) -> Response:
        given = request.headers.get("x-request-id")
        rid = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.request_id = rid
        request.state.started = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-ID"] = rid
        return response

    @app.exception_handler(SQLAlchemyError)
    async def database_fault(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        kind = type(getattr(exc, "orig", None) or exc).__name__
        _log.warning("database fault on %s: %s (%s)", request.url.path, kind, redact_url(str(engine.url)))
        schema_ready.clear()
        return JSONResponse(status_code=503, content={"detail": "database unavailable"})

    @app.get("/data", response_model=DataPage, dependencies=[Depends(require_key)], summary="Page of records")
    def get_data(
        request: Request,
        page: Annotated[int, Query(ge=1, le=MAX_PAGE, description="1-based page number.")] = 1,
        page_size: Annotated[int, Query(ge=1, le=100, description="Rows per page (1..100).")] = 10,
        source: Annotated[
            str | None, Query(min_length=1, max_length=63, pattern=_NO_NUL, description="Only this source.")
        ] = None,
        search: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=200,
                pattern=_NO_NUL,
                description="Case-insensitive substring of name or description (matched literally).",
            ),
        ] = None,
    ) -> DataPage:
        ensure_ready()
        offset = (page - 1) * page_size
        params: dict[str, Any] = {"source": source, "size": page_size}
        filters = ["source = :source"] if source is not None else []
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                if search is not None:
                    params["pat"] = f"%{escape_like(search)}%"
                    filters.append("(name ilike :pat escape '\\' or description ilike :pat escape '\\')")
                    where = "where " + " and ".join(filters)
                    total = conn.execute(text(f"select count(*) from normalized_data {where}"), params).scalar_one()
                    params["offset"] = offset
                    rows = conn.execute(
                        text(
                            f"select {_COLUMNS} from normalized_data {where} "  # noqa: S608
                            "order by created_at desc, id desc offset :offset limit :size"
                        ),
                        params,
                    ).all()
                else:
                    version = conn.execute(text("select data_version from etl_meta where id = 1")).scalar_one()
                    anchors = cache.get(conn, source, version)
                    total = anchors.total
                    slot, rest = divmod(offset, cache.every)
                    if slot >= len(anchors.keys):
                        rows = []
                    else:
                        params.update(ac=anchors.keys[slot][0], aid=anchors.keys[slot][1], offset=rest)
                        filters.append("(created_at, id) <= (:ac, :aid)")
                        rows = conn.execute(
                            text(
                                f"select {_COLUMNS} from normalized_data where {' and '.join(filters)} "  # noqa: S608
                                "order by created_at desc, id desc offset :offset limit :size"
                            ),
                            params,
                        ).all()
        data = [Record.model_validate(dict(r._mapping)) for r in rows]
        return DataPage(
            data=data,
            total=total,
            page=page,
            page_size=page_size,
            has_more=offset + len(data) < total,
            metadata=Meta(
                request_id=request.state.request_id,
                latency_ms=round((time.perf_counter() - request.state.started) * 1000, 3),
            ),
        )

    @app.get(
        "/health",
        response_model=Health,
        responses={503: {"model": Health, "description": "The database is unreachable."}},
        summary="Database connectivity and the last ETL run",
    )
    def health() -> Any:
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
                last = None
                exists = conn.execute(text("select to_regclass('etl_runs') is not null")).scalar_one()
                if exists:
                    row = conn.execute(
                        text(
                            "select run_id, status, started_at, finished_at from etl_runs "
                            "order by started_at desc limit 1"
                        )
                    ).first()
                    last = LastRun.model_validate(dict(row._mapping)) if row else None
        except (DBAPIError, SQLAlchemyError) as exc:
            _log.warning("health: database unreachable (%s)", type(getattr(exc, "orig", None) or exc).__name__)
            return JSONResponse(status_code=503, content=Health(status="unavailable", database="down").model_dump())
        return Health(status="ok", database="up", last_run=last)

    @app.get("/stats", response_model=Stats, dependencies=[Depends(require_key)], summary="ETL run statistics")
    def stats() -> Stats:
        ensure_ready()
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "select count(*) as run_count, "
                    "coalesce(sum(records_processed), 0) as total_records_processed, "
                    "coalesce(sum(duration_seconds), 0) as total_duration_seconds, "
                    "max(finished_at) filter (where status = 'success') as last_success_at, "
                    "(select finished_at from etl_runs where status = 'failed' "
                    " order by finished_at desc nulls last limit 1) as last_failure_at, "
                    "(select failure_reason from etl_runs where status = 'failed' "
                    " order by finished_at desc nulls last limit 1) as last_failure_reason "
                    "from etl_runs"
                )
            ).one()
        return Stats.model_validate(dict(row._mapping))

    return app
