"""The bundled events API: deterministic synthetic events served over real HTTP.

Three layers, usable separately:

* :class:`EventSource` / :func:`make_events`: synthetic events for a week. Events are generated lazily in
  blocks of :data:`BLOCK` from ``(seed, week, block)``, so serving a million events never holds a million
  dicts. About ``invalid_ratio`` of the rows are deliberately bad (see :data:`DEFECTS`) and about
  ``duplicate_ratio`` re-send an earlier id with slightly different content (the later copy wins).
* :func:`create_app`: a Starlette app serving ``GET /events`` (style from the config) and
  ``GET /{style}/events`` for the four pagination styles, with optional auth and a mutable :class:`Faults`
  object tests flip between calls, plus :class:`Stats` counters.
* :func:`serve`: uvicorn in a background thread on a free port (``with serve(app) as base_url: ...``).

``python -m tasks.demo_source --port 8765 --total 100000`` runs it standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import collections
import contextlib
import functools
import logging
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import orjson
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

logger = logging.getLogger(__name__)

EVENT_TYPES = ("page_view", "add_to_cart", "purchase", "refund", "subscription_renewal")
# cumulative weights for EVENT_TYPES
_TYPE_CUTS = (0.55, 0.75, 0.90, 0.93, 1.0)
CURRENCIES = ("USD", "EUR", "GBP", "CHF", "CAD")
_CURRENCY_WEIGHTS = (5, 4, 2, 1, 1)
_OFFSETS = (
    ("Z", 0),
    ("+00:00", 0),
    ("+01:00", 60),
    ("+02:00", 120),
    ("-05:00", -300),
    ("-08:00", -480),
    ("+05:30", 330),
    ("+09:00", 540),
)
_PLANS = (9.99, 19.99, 49.0, 99.0)
_PATHS = ("/", "/pricing", "/products/42", "/products/7", "/cart", "/blog/launch", "/checkout")

DEFECTS = (
    "negative_amount",
    "unknown_event_type",
    "bad_currency",
    "missing_customer_id",
    "naive_timestamp",
    "non_numeric_amount",
    "out_of_window",
    "bad_timestamp",
)
"""Kinds of deliberately invalid rows (see :meth:`EventSource.defects`). Duplicates are marked ``"duplicate"``."""

BLOCK = 1000
PAGINATION_STYLES = ("page_number", "offset", "cursor", "link_header")


# --- events ------------------------------------------------------------------------------------


class EventSource:
    """Deterministic synthetic events for the window ``[start, end]`` (dates in ``tz``), ``total`` rows.

    ``page(offset, limit)`` returns rows ``offset .. offset+limit-1``; the same arguments always return the
    same rows. Valid rows' ``occurred_at`` falls inside the window when read in ``tz``.
    """

    def __init__(
        self,
        start: date,
        total: int,
        *,
        end: date | None = None,
        invalid_ratio: float = 0.02,
        duplicate_ratio: float = 0.002,
        seed: int = 0,
        customers: int = 500,
        tz: str = "UTC",
    ) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        if customers < 1:
            raise ValueError(f"customers must be >= 1, got {customers}")
        if not 0 <= invalid_ratio <= 1 or not 0 <= duplicate_ratio <= 1:
            raise ValueError("invalid_ratio and duplicate_ratio must be within [0, 1]")
        self.start = start
        self.end = end or start + timedelta(days=6)
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        self.total = total
        self.invalid_ratio = invalid_ratio
        self.duplicate_ratio = duplicate_ratio
        self.seed = seed
        self.customers = customers
        zone = ZoneInfo(tz)
        self._t0 = datetime.combine(self.start, datetime.min.time(), zone).timestamp()
        self._t1 = datetime.combine(self.end + timedelta(days=1), datetime.min.time(), zone).timestamp()
        crng = random.Random(f"customers:{seed}")
        self._customer_ids = [f"cus_{c:05d}" for c in range(customers)]
        self._currency = crng.choices(CURRENCIES, weights=_CURRENCY_WEIGHTS, k=customers)
        self._tag = f"{self.start:%Y%m%d}" + (f"s{seed}" if seed else "")
        self._cache: collections.OrderedDict[int, tuple[list[dict], list[str | None]]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.total

    def page(self, offset: int, limit: int, *, copy: bool = True) -> list[dict[str, Any]]:
        """Rows ``[offset, offset+limit)`` (fewer at the end, empty past it).

        With ``copy`` (the default) the dicts are fresh and callers may mutate them; ``copy=False`` returns the
        cached dicts (read-only use, e.g. serializing straight away).
        """
        rows, _ = self._slice(offset, limit, copy=copy)
        return rows

    def defects(self, offset: int, limit: int) -> list[str | None]:
        """Ground truth for the same slice: the defect kind of each row (None = valid, "duplicate" = re-sent id)."""
        _, kinds = self._slice(offset, limit)
        return kinds

    def _slice(self, offset: int, limit: int, *, copy: bool = False) -> tuple[list[dict], list[str | None]]:
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must be >= 0")
        stop = min(offset + limit, self.total)
        rows: list[dict] = []
        kinds: list[str | None] = []
        pos = offset
        while pos < stop:
            b, lo = divmod(pos, BLOCK)
            hi = min(BLOCK, stop - b * BLOCK)
            block_rows, block_kinds = self._block(b)
            rows.extend(block_rows[lo:hi])
            kinds.extend(block_kinds[lo:hi])
            pos = b * BLOCK + hi
        if not copy:
            return rows, kinds
        # metadata dicts are copied too: nothing is shared with the cache
        return [{**r, "metadata": dict(r["metadata"])} if "metadata" in r else dict(r) for r in rows], kinds

    def _block(self, b: int) -> tuple[list[dict], list[str | None]]:
        with self._lock:
            hit = self._cache.get(b)
            if hit is not None:
                self._cache.move_to_end(b)
                return hit
        built = self._build_block(b)
        with self._lock:
            self._cache[b] = built
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        return built

    def _build_block(self, b: int) -> tuple[list[dict], list[str | None]]:
        # Column-wise with list comprehensions: ~3x faster than a per-row loop (the server generates on demand).
        rng = random.Random(f"events:{self.seed}:{self.start.isoformat()}:{b}")
        rnd = rng.random
        first = b * BLOCK
        n = max(0, min(BLOCK, self.total - first))
        t0, span = self._t0, self._t1 - self._t0
        customers, cids, cur = self.customers, self._customer_ids, self._currency
        rng_n = range(n)
        cidx = [int(customers * r * r) for r in [rnd() for _ in rng_n]]  # skewed: a few customers do most
        etypes = [bisect.bisect_left(_TYPE_CUTS, r) for r in [rnd() for _ in rng_n]]
        prices = [rnd() for _ in rng_n]
        amounts = [
            0.0 if t == 0 else _PLANS[int(p * 4)] if t == 4 else round(5 + p * 495, 2)
            for t, p in zip(etypes, prices, strict=True)
        ]
        stamps = [t0 + rnd() * span for _ in rng_n]
        offsets = [int(rnd() * _N_OFFSETS) for _ in rng_n]
        occurred = [_iso(ts, o) for ts, o in zip(stamps, offsets, strict=True)]
        tag = f"evt_{self._tag}_"
        rows = [
            {
                "id": f"{tag}{i:08d}",
                "customer_id": cids[c],
                "event_type": EVENT_TYPES[t],
                "amount": a,
                "currency": cur[c],
                "occurred_at": ts,
            }
            for i, c, t, a, ts in zip(range(first, first + n), cidx, etypes, amounts, occurred, strict=True)
        ]
        for k in [k for k, m in enumerate([rnd() for _ in rng_n]) if m < 0.6]:
            t, m = etypes[k], prices[k]
            if t == 0:
                rows[k]["metadata"] = {"path": _PATHS[k % len(_PATHS)], "session": f"s{int(stamps[k]) % 99991}"}
            elif t in (2, 3):
                rows[k]["metadata"] = {"order_id": f"ord_{first + k:08d}", "items": 1 + int(m * 10)}
            else:
                rows[k]["metadata"] = {"channel": "web" if m < 0.5 else "app"}
        kinds: list[str | None] = [None] * n
        if self.invalid_ratio:
            for k in [k for k, r in enumerate([rnd() for _ in rng_n]) if r < self.invalid_ratio]:
                kind = DEFECTS[int(rnd() * len(DEFECTS))]
                _apply_defect(rows[k], kind, rng, t0, self._t1, _OFFSETS[offsets[k]])
                kinds[k] = kind
        if self.duplicate_ratio:
            for k in [k for k, r in enumerate([rnd() for _ in rng_n]) if r < self.duplicate_ratio and k > 0]:
                src = k - 1 - int(rnd() * min(k, 50))
                rows[k] = _revise(rows[src], rng)
                kinds[k] = "duplicate"
        return rows, kinds


_EPOCH = date(1970, 1, 1)
_N_OFFSETS = len(_OFFSETS)


@functools.cache
def _day(n: int) -> str:
    return (_EPOCH + timedelta(days=n)).isoformat()


@functools.cache
def _hms_table() -> tuple[str, ...]:
    return tuple(f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86400))


def _iso(ts: float, offset: int | tuple[str, int]) -> str:
    """ISO 8601 text of the instant ``ts`` (epoch seconds) written in one of :data:`_OFFSETS`."""
    name, minutes = _OFFSETS[offset] if isinstance(offset, int) else offset
    d, s = divmod(int(ts) + minutes * 60, 86400)
    return f"{_day(d)}T{_hms_table()[s]}{name}"


def _revise(src: dict, rng: random.Random) -> dict:
    """A later copy of ``src`` with the same id and slightly different content."""
    row = dict(src)
    if "metadata" in src:
        row["metadata"] = dict(src["metadata"])
    amount = row.get("amount")
    if isinstance(amount, float) and amount > 0:
        row["amount"] = round(amount + 1 + int(rng.random() * 5), 2)
    else:
        row["metadata"] = {**row.get("metadata", {}), "revised": True}
    return row


def _apply_defect(row: dict, kind: str, rng: random.Random, t0: float, t1: float, offset: tuple[str, int]) -> None:
    pick = rng.random()
    if kind == "negative_amount":
        row["amount"] = -round(1 + pick * 99, 2)
    elif kind == "unknown_event_type":
        row["event_type"] = ("click", "signup", "page-view", "")[int(pick * 4)]
    elif kind == "bad_currency":
        row["currency"] = ("usd?", "XXXX", "", "eu")[int(pick * 4)]
    elif kind == "missing_customer_id":
        if pick < 0.5:
            del row["customer_id"]
        else:
            row["customer_id"] = None if pick < 0.75 else ""
    elif kind == "naive_timestamp":
        row["occurred_at"] = row["occurred_at"].removesuffix(offset[0])
    elif kind == "non_numeric_amount":
        row["amount"] = ("12,50", "ten", "N/A", "")[int(pick * 4)]
    elif kind == "out_of_window":
        ts = t0 - 86400 * (1 + pick * 5) if pick < 0.5 else t1 + 86400 * (1 + pick * 5)
        row["occurred_at"] = _iso(ts, offset)
    elif kind == "bad_timestamp":
        row["occurred_at"] = ("2024-13-45T99:00:00Z", "yesterday", "", "1700000000")[int(pick * 4)]


def make_events(
    week_start: date,
    n: int,
    *,
    invalid_ratio: float = 0.02,
    duplicate_ratio: float = 0.002,
    seed: int = 0,
    customers: int = 500,
    tz: str = "UTC",
) -> list[dict[str, Any]]:
    """``n`` synthetic events for the week ``[week_start, week_start+6]`` (all in memory: use for small n)."""
    src = EventSource(
        week_start,
        n,
        invalid_ratio=invalid_ratio,
        duplicate_ratio=duplicate_ratio,
        seed=seed,
        customers=customers,
        tz=tz,
    )
    return src.page(0, n)


# --- server config, faults, counters -----------------------------------------------------------


@dataclass
class Faults:
    """Mutable fault switches read on every request. Counters (``*_times``) go down as faults fire."""

    rate_limit_times: int = 0
    retry_after: str | None = "1"
    """Retry-After header value sent with 429s; None sends no header."""
    retry_after_http_date_in: float | None = None
    """When set, Retry-After is an HTTP-date this many seconds from now (overrides ``retry_after``)."""
    error_times: int = 0
    error_status: int = 503
    slow_times: int = 0
    slow_seconds: float = 2.0
    truncate_times: int = 0
    missing_key_times: int = 0
    missing_key_replacement: str = "items"
    fail_on_page: int | None = None
    """0-based page index that fails with ``fail_on_page_status`` (``fail_on_page_times`` times)."""
    fail_on_page_status: int = 500
    fail_on_page_times: int = 1
    loop_at_page: int | None = None
    """cursor/link_header: page k hands out the token/link of page k itself again."""
    repeat_record_at: int | None = None
    """The page starting at this offset also carries the record just before it (a source-side duplicate)."""
    empty_final_page: bool = False
    """cursor/link_header: the last data page still points to a next page, which is empty."""

    def reset(self) -> None:
        for name, f in self.__dataclass_fields__.items():
            setattr(self, name, f.default)


@dataclass
class Stats:
    """What the server answered. ``log`` keeps the last requests as ``(status, path, query)``."""

    requests: int = 0
    in_flight: int = 0
    pages: int = 0
    rows: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2000))

    def reset(self) -> None:
        """Zero the counters (``in_flight`` is live state and is kept)."""
        self.requests = self.pages = self.rows = 0
        self.by_status.clear()
        self.log.clear()


@dataclass
class DemoConfig:
    """What the demo API serves. Mutable: tests change fields between requests."""

    total: int = 10_000
    """Events per requested window."""
    seed: int = 0
    invalid_ratio: float = 0.02
    duplicate_ratio: float = 0.002
    customers: int = 500
    tz: str = "UTC"
    pagination: str = "page_number"
    """Style of ``GET /events``; ``GET /{style}/events`` overrides it."""
    records_key: str = "data"
    cursor_path: str = "next_cursor"
    """Dotted path of the next token in cursor pages (e.g. ``meta.next``)."""
    default_page_size: int = 100
    max_page_size: int = 10_000
    auth: str = "none"
    """none, api_key or bearer."""
    api_key_header: str = "X-API-Key"
    secret: str | None = None
    latency_seconds: float = 0.0
    """Every events answer waits this long first, like a remote API's round trip (benchmarks)."""
    faults: Faults = field(default_factory=Faults)
    stats: Stats = field(default_factory=Stats)
    _sources: dict = field(default_factory=dict, repr=False)
    _prefetched: dict = field(default_factory=dict, repr=False)
    _rendered: dict = field(default_factory=dict, repr=False)

    def prerender(self, start: date, end: date, limit: int) -> int:
        """Render every page of ``[start, end]`` at page size ``limit`` once, up front; returns the page count.

        Later requests for exactly those pages (same window, offset and limit, whatever the pagination style)
        are served from the rendered bytes instead of generating the events again, so the server answers at
        memory speed and a benchmark client is not bound by the server's event generation (~200k rows/s in
        Python). The rendered records are the same bytes the server would generate (deterministic); faults
        still apply. Memory: about the size of the window's JSON (~180 MB per million events).
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        src = self.source_for(start, end)
        pages = 0
        for offset in range(0, max(src.total, 1), limit):
            self._rendered[(src, offset, limit)] = orjson.dumps(src.page(offset, limit, copy=False))
            pages += 1
        return pages

    def source_for(self, start: date, end: date) -> EventSource:
        key = (start, end, self.total, self.seed, self.invalid_ratio, self.duplicate_ratio, self.customers, self.tz)
        src = self._sources.get(key)
        if src is None:
            if len(self._sources) > 16:
                self._sources.clear()
            src = EventSource(
                start,
                self.total,
                end=end,
                invalid_ratio=self.invalid_ratio,
                duplicate_ratio=self.duplicate_ratio,
                seed=self.seed,
                customers=self.customers,
                tz=self.tz,
            )
            self._sources[key] = src
        return src


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode().rstrip("=")


def decode_cursor(token: str) -> int:
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    if not raw.startswith("o:"):
        raise ValueError("not a cursor")
    return int(raw[2:])


# --- the app -----------------------------------------------------------------------------------


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type="application/json")


class _BadRequest(Exception):
    pass


def _int_param(request: Request, name: str, default: int | None, *, minimum: int = 0) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        if default is None:
            raise _BadRequest(f"missing query parameter {name!r}")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"query parameter {name!r} must be an integer") from None
    if value < minimum:
        raise _BadRequest(f"query parameter {name!r} must be >= {minimum}")
    return value


def _date_param(request: Request, name: str) -> date:
    raw = request.query_params.get(name)
    if not raw:
        raise _BadRequest(f"missing query parameter {name!r}")
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise _BadRequest(f"query parameter {name!r} must be an ISO date") from None


def _set_path(body: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = body
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def _authorized(config: DemoConfig, request: Request) -> bool:
    if config.auth == "none":
        return True
    if config.auth == "api_key":
        return request.headers.get(config.api_key_header) == config.secret
    if config.auth == "bearer":
        return request.headers.get("authorization") == f"Bearer {config.secret}"
    return False


def create_app(config: DemoConfig | None = None) -> Starlette:
    """The events API. ``app.state.config`` is the (mutable) :class:`DemoConfig`."""
    cfg = config or DemoConfig()

    async def events(request: Request) -> Response:
        stats = cfg.stats
        stats.requests += 1
        stats.in_flight += 1
        try:
            if cfg.latency_seconds > 0:
                await asyncio.sleep(cfg.latency_seconds)
            response = await _events(request)
        finally:
            stats.in_flight -= 1
        stats.by_status[response.status_code] += 1
        stats.log.append((response.status_code, request.url.path, request.url.query))
        return response

    async def _events(request: Request) -> Response:
        faults = cfg.faults
        style = request.path_params.get("style", cfg.pagination)
        if style not in PAGINATION_STYLES:
            return _json({"error": f"unknown pagination style {style!r}"}, 404)
        if not _authorized(cfg, request):
            return _json({"error": "unauthorized"}, 401, {"WWW-Authenticate": "Bearer"})
        slow = faults.slow_times > 0
        if slow:
            faults.slow_times -= 1
            await asyncio.sleep(faults.slow_seconds)
        # a slow answer is only slow: it does not consume other faults (tests may have flipped them meanwhile)
        if faults.rate_limit_times > 0 and not slow:
            faults.rate_limit_times -= 1
            headers = {}
            if faults.retry_after_http_date_in is not None:
                when = datetime.now(UTC) + timedelta(seconds=faults.retry_after_http_date_in)
                headers["Retry-After"] = format_datetime(when, usegmt=True)
            elif faults.retry_after is not None:
                headers["Retry-After"] = str(faults.retry_after)
            return _json({"error": "rate limited"}, 429, headers)
        if faults.error_times > 0 and not slow:
            faults.error_times -= 1
            return _json({"error": "server error"}, faults.error_status)
        try:
            start = _date_param(request, "start")
            end = _date_param(request, "end")
            if end < start:
                raise _BadRequest("end is before start")
            q = request.query_params
            size_default = cfg.default_page_size
            if style == "offset":
                limit = _int_param(request, "limit", size_default, minimum=1)
                offset = _int_param(request, "offset", 0)
            elif style == "cursor":
                limit = _int_param(request, "page_size", None, minimum=1) if "page_size" in q else None
                limit = limit or _int_param(request, "limit", size_default, minimum=1)
                token = q.get("cursor")
                try:
                    offset = decode_cursor(token) if token else 0
                except (ValueError, UnicodeDecodeError):
                    raise _BadRequest("invalid cursor") from None
            else:
                limit = _int_param(request, "page_size", size_default, minimum=1)
                offset = (_int_param(request, "page", 1, minimum=1) - 1) * limit
            if limit > cfg.max_page_size:
                raise _BadRequest(f"page size must be <= {cfg.max_page_size}")
        except _BadRequest as exc:
            return _json({"error": str(exc)}, 400)

        page_index = offset // limit
        if not slow and faults.fail_on_page == page_index and faults.fail_on_page_times > 0:
            faults.fail_on_page_times -= 1
            return _json({"error": f"failure injected on page {page_index}"}, faults.fail_on_page_status)

        src = cfg.source_for(start, end)
        total = src.total
        if faults.repeat_record_at is not None and offset == faults.repeat_record_at and 0 < offset <= total:
            records = src.page(offset - 1, 1, copy=False) + src.page(offset, limit, copy=False)
            records_json = orjson.dumps(records)
            n_records = len(records)
        else:
            records_json = (
                cfg._rendered.get((src, offset, limit))
                or cfg._prefetched.pop((src, offset, limit), None)
                or orjson.dumps(src.page(offset, limit, copy=False))
            )
            n_records = max(0, min(limit, total - offset))
        end_reached = offset + limit >= total
        if faults.empty_final_page and end_reached and offset < total:
            next_offset: int | None = offset + limit  # points past the end: an empty page follows
        elif end_reached:
            next_offset = None
        else:
            next_offset = offset + limit
        if faults.loop_at_page is not None and page_index == faults.loop_at_page:
            next_offset = offset

        key = cfg.records_key
        if faults.missing_key_times > 0 and not slow:
            faults.missing_key_times -= 1
            key = faults.missing_key_replacement
        headers: dict[str, str] = {}
        envelope: dict[str, Any] = {}  # everything but the records, which are spliced in as bytes
        if style == "page_number":
            envelope = {"page": page_index + 1, "page_size": limit, "total": total}
        elif style == "offset":
            envelope = {"offset": offset, "limit": limit, "total": total}
        elif style == "cursor":
            _set_path(envelope, cfg.cursor_path, encode_cursor(next_offset) if next_offset is not None else None)
        else:
            base = {k: v for k, v in request.query_params.items() if k not in ("page", "page_size")}
            links = [f'<{_page_url(request, base, 1, limit)}>; rel="first"']
            if next_offset is not None:
                links.append(f'<{_page_url(request, base, next_offset // limit + 1, limit)}>; rel="next"')
            headers["Link"] = ", ".join(links)
        rest = orjson.dumps(envelope)
        payload = b"".join((b"{", orjson.dumps(key), b":", records_json, b"," + rest[1:] if envelope else b"}"))
        if faults.truncate_times > 0 and not slow:
            faults.truncate_times -= 1
            payload = payload[: max(1, len(payload) // 2)]
        cfg.stats.pages += 1
        cfg.stats.rows += n_records
        background = None
        if (
            next_offset is not None
            and next_offset != offset
            and next_offset < total
            and (src, next_offset, limit) not in cfg._rendered
        ):
            # generate the next page right after this answer is sent: with the client in another process, the
            # server's generation overlaps the client's parsing instead of adding to it
            background = BackgroundTask(_prefetch, src, next_offset, limit)
        return Response(payload, headers=headers, media_type="application/json", background=background)

    async def _prefetch(src: EventSource, offset: int, limit: int) -> None:
        cache = cfg._prefetched
        if len(cache) >= 4:
            cache.clear()
        cache[(src, offset, limit)] = orjson.dumps(src.page(offset, limit, copy=False))

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/events", events),
            Route("/{style}/events", events),
        ]
    )
    app.state.config = cfg
    return app


def _page_url(request: Request, base: dict[str, str], page: int, size: int) -> str:
    query = urlencode({**base, "page": page, "page_size": size})
    return f"{request.url.scheme}://{request.url.netloc}{request.url.path}?{query}"


# --- running it --------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` with uvicorn in a daemon thread; yield its base URL once it accepts connections."""
    import uvicorn

    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on such sockets (else Nagle + delayed ACK = 40 ms)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"demo-api-{bound_port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"demo API did not start on {host}:{bound_port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the demo events API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--total", type=int, default=10_000, help="events per requested window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pagination", choices=PAGINATION_STYLES, default="page_number")
    parser.add_argument(
        "--prerender",
        metavar="START:END",
        help="render the window's pages (ISO dates, e.g. 2024-01-01:2024-01-07) once at startup and serve them "
        "from memory (benchmarks: the server then answers at memory speed instead of generating events)",
    )
    parser.add_argument(
        "--prerender-limit", type=int, default=1000, help="page size of the pre-rendered pages (default 1000)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="wait this long before every events answer (default 0)"
    )
    args = parser.parse_args(argv)
    if args.latency_ms < 0:
        parser.error("--latency-ms must be >= 0")
    cfg = DemoConfig(
        total=args.total, seed=args.seed, pagination=args.pagination, latency_seconds=args.latency_ms / 1000
    )
    if args.prerender:
        try:
            first, _, last = args.prerender.partition(":")
            window = date.fromisoformat(first), date.fromisoformat(last)
        except ValueError:
            parser.error(f"--prerender must be START:END as ISO dates, got {args.prerender!r}")
        if args.prerender_limit < 1:
            parser.error("--prerender-limit must be >= 1")
        started = time.perf_counter()
        pages = cfg.prerender(*window, args.prerender_limit)
        logger.info("pre-rendered %d pages in %.1fs", pages, time.perf_counter() - started)
    with serve(create_app(cfg), args.host, args.port) as url:
        print(f"demo events API on {url}/events (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()


__all__ = [
    "BLOCK",
    "DEFECTS",
    "EVENT_TYPES",
    "DemoConfig",
    "EventSource",
    "Faults",
    "Stats",
    "create_app",
    "decode_cursor",
    "encode_cursor",
    "make_events",
    "serve",
]
