"""EXTRACT: page through the source API for one window and stream the records into raw Parquet parts.

Plain functions over an ``httpx.Client`` and the lake (no Prefect here). The entry point is
:func:`extract_window`; :func:`fetch_pages` is the page iterator underneath it. The pagination strategies live
in :mod:`tasks.paginators`, the retry policy below (Retry-After, backoff, rate limit) in :mod:`tasks.retries`
(both re-exported here).

Raw part schema (the contract with the transform stage)::

    _seq: Int64     0-based global receive order across the window
    _page: Int64    page number in fetch order, 0-based
    payload: String the record's JSON text: exactly as received when the page is compact UTF-8 JSON (most APIs;
                    split out by :func:`parse_page` without being parsed), else re-serialized compactly by orjson

Failure policy, per HTTP request (tenacity, ``source.max_attempts`` attempts in all):

* 429, 5xx, transport errors (connect, read, timeouts): retried with exponential backoff and jitter
  (``backoff_base_seconds`` doubling, capped at ``backoff_max_seconds``). A positive ``Retry-After`` (seconds or
  HTTP-date) is honoured, capped at ``backoff_max_seconds``; ``Retry-After: 0``, a date in the past or no header
  fall back to the backoff (never below ``backoff_base_seconds``). When the budget is spent:
  :class:`RateLimitedError` (last answer 429) or :class:`SourceUnavailableError`, both retryable later.
* Other non-2xx answers (401, 403, 404, 400, 3xx): :class:`SourceResponseError` at once, with the status and
  the redacted URL.
* A body that is not valid JSON: re-fetched ONCE (a body cut short by a proxy or a dropped connection is
  usually transient), then :class:`SourceResponseError` naming the page. It is not retried further because a
  server that keeps sending broken JSON has a bug that waiting will not fix.
* A page without the records key: :class:`MissingRecordsKeyError` listing the keys the page had; the records
  key holding something other than a list: :class:`SourceResponseError`. A next token or next URL seen
  before: :class:`PaginationLoopError`. None of these are retried (they are deterministic).

If the extract fails half way, the parts written so far stay in the lake but no :class:`ExtractResult` claims
them; a rerun writes the same part names again (``part-00000`` ...) and returns only its own files.

The records of a compact page are parsed once, by the contract check (``tasks.validation``), not here: the
fetch thread only finds where each record starts and ends (msgspec), which keeps the GIL free for the rest of
the pipeline. A record that is valid JSON but that a parser refuses (a number beyond the double range) is then
rejected as that row, with the reason, instead of failing its page.

Known limits: on the re-serialized path (pretty-printed pages, ``\\u`` escapes), orjson reads integers beyond 64
bits as floats, so such values are not byte-for-byte preserved in ``payload``. Page-number and offset paging
stop at the first page shorter than ``page_size``: a server that silently caps the page size below
``page_size`` would end the extract early (configure ``page_size`` at or below the server's maximum).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx
import msgspec
import orjson
import polars as pl
import tenacity

from tasks.errors import (
    ConfigurationError,
    MissingRecordsKeyError,
    RateLimitedError,
    SourceResponseError,
    SourceUnavailableError,
    redact_url,
)
from tasks.lake import LakeFS
from tasks.models import ExtractResult, FileRef, Window
from tasks.paginators import (
    PAGINATORS,
    CursorPaginator,
    LinkHeaderPaginator,
    OffsetPaginator,
    PageNumberPaginator,
    Paginator,
    Request,
    dig,
    make_paginator,
)
from tasks.retries import (
    Clock,
    MalformedBody,
    RateLimiter,
    RetryAfterOrBackoff,
    Sleep,
    TransientAttempt,
    parse_retry_after,
    should_retry,
)

if TYPE_CHECKING:
    from blocks.source import SourceApi

RAW_SCHEMA = {"_seq": pl.Int64, "_page": pl.Int64, "payload": pl.String}
"""Schema of every raw part (contract with the transform stage)."""

USER_AGENT = "weekly-etl-extract/1"
Progress = Callable[[int, int], None]
PartHook = Callable[[FileRef, pl.DataFrame], None]
FrameHook = Callable[[pl.DataFrame], None]
RAW_COMPRESSION = "zstd"
RAW_COMPRESSION_LEVEL = 1
"""Raw parts stay in the lake as the record of what the source sent. zstd level 1 without statistics: a 50k-row
part of the demo's events is 1.18 MB against lz4's 2.17 MB, encoded in 13.7 ms against 16.0 ms and decoded in
6.8 ms against 4.5 ms (the transform reads parts back for the week-level rejects' payloads)."""


# --- fetching ----------------------------------------------------------------------------------


class Page(NamedTuple):
    index: int
    """0-based, in fetch order."""
    records: list[Any]
    url: str
    """Redacted URL of the request that returned it."""
    verbatim: bool = False
    """True: ``records`` are each record's JSON text exactly as received (``msgspec.Raw``, bytes-like), not
    parsed values (see :func:`parse_page`)."""


# One pass over the page: a top-level list is split into its items' texts (the records), every other value is
# parsed. A page with a value msgspec cannot hold (a number beyond the double range) is left to orjson.
_ONE_PASS = msgspec.json.Decoder(dict[str, list[msgspec.Raw] | dict[str, Any] | str | int | float | bool | None])


def _compact(content: bytes) -> bool:
    """No line break and no ``\\u`` escape. (``b"\\u" in`` is a slow two-byte search, ~0.15 ms a 180 kB page
    on the fetch thread: most pages have no backslash at all, which a one-byte search tells at memchr speed.)"""
    return b"\n" not in content and b"\r" not in content and (b"\\" not in content or b"\\u" not in content)


def parse_page(content: bytes, records_key: str | None = None) -> tuple[Any, bool]:
    """A page body -> (body, verbatim).

    Without ``records_key``: the body parsed by orjson (``verbatim`` False). With it, when the body is a JSON
    object holding that key with a list, and is compact UTF-8 (no line break and no ``\\u`` escape anywhere, like
    most APIs' output): the records are split out WITHOUT being parsed, each one its exact text as received
    (``msgspec.Raw``), and only the other keys are parsed (pagination needs them); ``verbatim`` True. So the
    records are decoded once, by the contract check, and their text keeps every byte the source sent (number
    formats, key order); one msgspec pass does both. Otherwise (pretty-printed pages, escapes, a missing key or a
    non-list: the caller's errors name them) the whole body is parsed as without ``records_key``. Raises
    ``ValueError`` (orjson's or msgspec's decode error, or ``UnicodeDecodeError``) for a body that is not valid
    JSON.
    """
    if records_key is not None and _compact(content):
        try:
            body = _ONE_PASS.decode(content)
        except msgspec.ValidationError:  # not an object, or a value it cannot hold: the parsed path reports it
            body = None
        except msgspec.DecodeError as exc:
            raise ValueError(str(exc)) from None
        if body is not None and isinstance(body.get(records_key), list):
            content.decode("utf-8")  # msgspec does not check the UTF-8 of the text it only skips
            for key, value in body.items():  # another top-level list: its items parsed, as orjson reads them
                if key != records_key and isinstance(value, list):
                    body[key] = [orjson.loads(memoryview(item)) for item in value]
            return body, True
    return orjson.loads(content), False


def auth_headers(source: SourceApi) -> dict[str, str]:
    """Headers carrying the credentials (never log these)."""
    if source.auth == "none":
        return {}
    secret = source.secret.get_secret_value() if source.secret is not None else ""
    if not secret:
        raise ConfigurationError("secret", f"required when auth={source.auth!r}")
    if source.auth == "api_key":
        return {source.api_key_header: secret}
    if source.auth == "bearer":
        return {"Authorization": f"Bearer {secret}"}
    raise ConfigurationError("auth", f"unknown auth kind {source.auth!r}")


def records_of(body: Any, key: str, page_no: int, url: str) -> list[Any]:
    """The list of records in one page, or a clear error naming the page, the key expected and the keys seen."""
    if isinstance(body, dict):
        if key in body:
            records = body[key]
        else:
            found, records = dig(body, key) if "." in key else (False, None)
            if not found:
                raise MissingRecordsKeyError(
                    f"page {page_no}: records key {key!r} is not in the page; keys present: {sorted(body)}",
                    url=url,
                )
    else:
        raise MissingRecordsKeyError(
            f"page {page_no}: expected a JSON object holding records key {key!r}, got a JSON {type(body).__name__}",
            url=url,
        )
    if not isinstance(records, list):
        raise SourceResponseError(
            f"page {page_no}: records key {key!r} holds a {type(records).__name__}, expected a list", url=url
        )
    return records


@dataclass
class _Fetcher:
    source: SourceApi
    client: httpx.Client
    headers: dict[str, str]
    limiter: RateLimiter
    sleep: Sleep
    log: logging.Logger | logging.LoggerAdapter
    verbatim_key: str | None = None

    def get(self, url: str, params: dict[str, Any] | None, page_no: int) -> tuple[httpx.Response, tuple[Any, bool]]:
        src = self.source
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(src.max_attempts),
            wait=RetryAfterOrBackoff(src.backoff_base_seconds, src.backoff_max_seconds),
            retry=should_retry,
            sleep=self.sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            return retrying(self._attempt, url, params, page_no)
        except TransientAttempt as exc:
            what = f"page {page_no}: {exc.what} after {src.max_attempts} attempt(s) (url={redact_url(exc.url)})"
            err: SourceUnavailableError | RateLimitedError
            if exc.status == 429:
                err = RateLimitedError(f"source rate limit: {what}", retry_after=exc.retry_after)
            else:
                err = SourceUnavailableError(f"source unavailable: {what}", retry_after=exc.retry_after)
            err.status_code = exc.status  # type: ignore[attr-defined]
            raise err from exc
        except MalformedBody as exc:
            raise SourceResponseError(
                f"page {page_no}: the body is not valid JSON ({exc.size} bytes, {exc.detail}), also after a re-fetch",
                url=exc.url,
            ) from exc

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        wait = retry_state.upcoming_sleep
        if isinstance(exc, TransientAttempt | MalformedBody):
            what = exc.what if isinstance(exc, TransientAttempt) else f"malformed JSON ({exc.detail})"
            self.log.warning(
                "attempt %d failed: %s (url=%s); retrying in %.2fs",
                retry_state.attempt_number,
                what,
                redact_url(exc.url),
                wait,
            )

    def _attempt(
        self, url: str, params: dict[str, Any] | None, page_no: int
    ) -> tuple[httpx.Response, tuple[Any, bool]]:
        target = httpx.URL(url)
        if params:  # merge, so a query already in the endpoint (e.g. ?api_version=2) is kept
            target = target.copy_merge_params(params)
        request = self.client.build_request("GET", target, headers=self.headers, timeout=self.source.timeout_seconds)
        self.limiter.acquire()
        try:
            response = self.client.send(request)
        except httpx.TimeoutException as exc:
            raise TransientAttempt(
                f"{type(exc).__name__} (timeout {self.source.timeout_seconds}s)", str(request.url)
            ) from exc
        except httpx.TransportError as exc:
            raise TransientAttempt(type(exc).__name__, str(request.url)) from exc
        status = response.status_code
        if status == 429 or status >= 500:
            hint = parse_retry_after(response.headers.get("retry-after"))
            raise TransientAttempt(f"HTTP {status}", str(request.url), status=status, retry_after=hint)
        if not 200 <= status < 300:
            raise SourceResponseError(
                f"page {page_no}: source answered HTTP {status}", status_code=status, url=str(request.url)
            )
        content = response.content
        try:
            parsed = parse_page(content, self.verbatim_key)
        except ValueError as exc:  # orjson.JSONDecodeError, msgspec's, UnicodeDecodeError
            raise MalformedBody(str(request.url), len(content), str(exc)[:120]) from exc
        return response, parsed


def fetch_pages(
    source: SourceApi,
    window: Window,
    *,
    client: httpx.Client,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
    verbatim: bool = False,
) -> Iterator[Page]:
    """Yield every page of the window in order, records parsed by orjson or, with ``verbatim``, where
    :func:`parse_page` can, as their exact text. Raises as the module doc says."""
    log = logger or logging.getLogger(__name__)
    fetcher = _Fetcher(
        source=source,
        client=client,
        headers={"Accept": "application/json", "User-Agent": USER_AGENT, **auth_headers(source)},
        limiter=RateLimiter(source.rate_limit_per_second, clock=clock, sleep=sleep),
        sleep=sleep,
        log=log,
        verbatim_key=source.records_key if verbatim else None,
    )
    paginator = make_paginator(source, window)
    request: Request | None = paginator.first()
    page_no = 0
    while request is not None:
        url, params = request
        started = clock()
        response, (body, exact) = fetcher.get(url, params, page_no)
        shown = redact_url(response.request.url)
        records = records_of(body, source.records_key, page_no, str(response.request.url))
        log.debug("page %d: %d records in %.0f ms from %s", page_no, len(records), (clock() - started) * 1e3, shown)
        request = paginator.next(response, body, records, page_no)
        yield Page(page_no, records, shown, exact)
        page_no += 1


# --- prefetching ------------------------------------------------------------------------------


class _Cancelled(Exception):
    """The consumer stopped: the fetch thread ends at its next wait or page boundary."""


PREFETCH_PAGES = 2
"""Pages fetched (and parsed) ahead of the one being processed by :func:`extract_window`."""


def _prefetch(
    make_pages: Callable[[Sleep], Iterator[Page]], sleep: Sleep, depth: int = PREFETCH_PAGES
) -> Iterator[Page]:
    """Run the page iterator in a background thread, at most ``depth`` pages ahead of the consumer.

    The socket reads release the GIL, so fetching page k+1 overlaps the processing of page k. Pages come out in
    order; an exception of the fetcher is raised here after the pages before it, as without prefetching. When the
    consumer stops early (an exception, or closing this generator) the fetcher ends at its next page boundary or
    retry wait (the waits are cut short) and is joined before this generator returns: no request is in flight
    on the caller's client afterwards.
    """
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def wait(seconds: float) -> None:
        if stop.is_set():
            raise _Cancelled
        if sleep is time.sleep:
            if stop.wait(seconds):
                raise _Cancelled
        else:
            sleep(seconds)
        if stop.is_set():
            raise _Cancelled

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        pages = make_pages(wait)
        try:
            for page in pages:
                if not put(("page", page)):
                    return
            put(("end", None))
        except _Cancelled:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", exc))
        finally:
            pages.close()  # type: ignore[attr-defined]

    thread = threading.Thread(target=run, name="extract-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "page":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join()


# --- the stage ---------------------------------------------------------------------------------


_SEP = b"\x1e"  # cannot occur in JSON text (a control character: escaped inside strings, not whitespace)


def raw_frame_of_pages(segments: list[bytes], page_ids: list[int], counts: list[int], first_seq: int) -> pl.DataFrame:
    """One raw part's frame in :data:`RAW_SCHEMA` from per-page segments (each page's record texts joined by
    :data:`_SEP`; pages with records only). The split runs in Polars, outside the GIL."""
    total = sum(counts)
    payload = pl.Series("payload", segments, dtype=pl.Binary).cast(pl.String).str.split(_SEP.decode()).explode()
    if payload.len() != total:  # cannot happen with valid JSON; never write a misaligned part
        raise SourceResponseError(f"raw part: {payload.len()} record texts split out of {total} records")
    return pl.DataFrame(
        {
            "_seq": pl.int_range(first_seq, first_seq + total, dtype=pl.Int64, eager=True),
            "_page": pl.Series(page_ids, dtype=pl.Int64).repeat_by(pl.Series(counts, dtype=pl.UInt32)).explode(),
            "payload": payload,
        }
    )


def extract_window(
    source: SourceApi,
    window: Window,
    lake: LakeFS,
    prefix: str,
    *,
    client: httpx.Client | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    on_progress: Progress | None = None,
    on_part: PartHook | None = None,
    on_frame: FrameHook | None = None,
    frame_rows: int | None = None,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> ExtractResult:
    """Fetch every page of ``window`` and write them as raw Parquet parts ``{prefix}/part-00000.parquet`` ...

    Pages are fetched and parsed in a background thread up to :data:`PREFETCH_PAGES` ahead, and each part is
    encoded and written in a second background thread while the next one fills (at most one write in flight),
    so network waits, JSON work and Parquet encoding overlap. Memory holds at most ``source.pages_per_file``
    pages being buffered, one part being written and the prefetched pages. ``on_progress(pages, rows)`` is
    called after each page (in the calling thread). ``on_frame(frame)`` is called with each raw part's frame as
    soon as it is built, in the calling thread, before the writer thread encodes and writes it: a consumer can
    start on the rows before the write ends. With ``frame_rows``, the part's rows are announced sooner, in
    slices: ``on_frame`` is called each time at least that many rows have been buffered since the last slice (at
    a page boundary), and with the part's remaining rows when the part is complete; the part's frame is then
    the slices' concatenation. ``on_part(ref, frame)`` is called with the part's frame right after the part is
    written, in the writer thread (the weekly flow checks the rows from ``on_frame`` on, and binds the checks to
    the written part in ``on_part``, see ``tasks.part_checks.PartValidator``); while it runs, the next part
    waits. The slices announced before an ``on_part`` are exactly that part's rows, in order; ``on_frame`` of
    the next part's slices may run before the previous part's ``on_part`` has returned, but never the whole
    next part's. ``sleep``/``clock`` are injectable (tests); ``client`` may be shared (the block's
    timeout and auth headers are applied per request); one is created and closed here when omitted.
    """
    if frame_rows is not None and frame_rows < 1:
        raise ValueError(f"frame_rows must be >= 1, got {frame_rows}")
    log = logger or logging.getLogger(__name__)
    prefix = prefix.rstrip("/")
    own_client = client is None
    http = client or httpx.Client(timeout=source.timeout_seconds, follow_redirects=False)
    files: list[FileRef] = []
    segments: list[bytes] = []
    page_ids: list[int] = []
    counts: list[int] = []
    slices: list[pl.DataFrame] = []  # the current part's rows announced so far (on_frame)
    buffered_pages = 0
    pages = rows = 0
    written = 0  # rows already handed to the writer
    parts = 0  # parts handed to the writer
    started = time.perf_counter()
    dumps = orjson.dumps
    join = _SEP.join
    # One part is encoded and written in the background (Parquet encoding releases the GIL) while the next
    # one fills; at most one write is in flight, so memory holds at most two parts' payloads.
    writer = ThreadPoolExecutor(1, thread_name_prefix="extract-write")
    in_flight: Future[FileRef] | None = None

    def write_part(frame: pl.DataFrame, name: str) -> FileRef:
        ref = lake.write_parquet(
            frame, name, compression=RAW_COMPRESSION, compression_level=RAW_COMPRESSION_LEVEL, statistics=False
        )
        log.debug("wrote raw part %s (%d rows)", redact_url(ref.url), ref.rows)
        if on_part is not None:
            on_part(ref, frame)
        return ref

    def collect() -> None:
        nonlocal in_flight
        if in_flight is not None:
            done, in_flight = in_flight, None
            files.append(done.result())

    def cut() -> None:
        """The buffered pages -> one slice of the current part, announced to ``on_frame``."""
        nonlocal segments, page_ids, counts
        if segments:
            frame = raw_frame_of_pages(segments, page_ids, counts, written + sum(s.height for s in slices))
            if on_frame is not None:  # before the part's write is handed over: on_part cannot overtake it
                on_frame(frame)
            slices.append(frame)
        segments, page_ids, counts = [], [], []

    def flush() -> None:
        nonlocal slices, buffered_pages, written, parts, in_flight
        collect()  # the previous part's write (and its on_part) first
        cut()
        if slices:
            frame = slices[0] if len(slices) == 1 else pl.concat(slices, rechunk=False)
            in_flight = writer.submit(write_part, frame, f"{prefix}/part-{parts:05d}.parquet")
            written += frame.height
            parts += 1
        slices, buffered_pages = [], 0

    def make_pages(wait: Sleep) -> Iterator[Page]:
        return fetch_pages(source, window, client=http, logger=log, sleep=wait, clock=clock, verbatim=True)

    fetched = _prefetch(make_pages, sleep)
    try:
        for page in fetched:
            n = len(page.records)
            if n:  # verbatim records are joined as received; parsed ones re-serialized compactly by orjson
                segments.append(join(page.records if page.verbatim else map(dumps, page.records)))
                page_ids.append(page.index)
                counts.append(n)
            buffered_pages += 1
            pages += 1
            rows += n
            if buffered_pages >= source.pages_per_file:
                flush()
            elif frame_rows is not None and sum(counts) >= frame_rows:
                cut()
            if on_progress is not None:
                on_progress(pages, rows)
        flush()
        collect()
    finally:
        fetched.close()  # stops and joins the fetch thread before the client may be closed
        writer.shutdown(wait=True)
        if own_client:
            http.close()
    elapsed = time.perf_counter() - started
    log.info(
        "extracted %d rows in %d pages into %d raw parts from %s for %s..%s in %.1fs (%.0f rows/s)",
        rows,
        pages,
        len(files),
        redact_url(source.url),
        window.start.isoformat(),
        window.end.isoformat(),
        elapsed,
        rows / elapsed if elapsed > 0 else 0.0,
    )
    return ExtractResult(window=window, files=files, pages=pages, rows=rows)


__all__ = [
    "PAGINATORS",
    "RAW_SCHEMA",
    "CursorPaginator",
    "LinkHeaderPaginator",
    "OffsetPaginator",
    "Page",
    "PageNumberPaginator",
    "Paginator",
    "RateLimiter",
    "RetryAfterOrBackoff",
    "auth_headers",
    "extract_window",
    "fetch_pages",
    "make_paginator",
    "parse_page",
    "parse_retry_after",
    "raw_frame_of_pages",
    "records_of",
]
