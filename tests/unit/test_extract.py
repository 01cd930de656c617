"""EXTRACT against the real demo API (tasks.demo_source on 127.0.0.1), plus pure paginator/backoff logic."""

from __future__ import annotations

import io
import logging
import threading
import time
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime

import httpx
import orjson
import polars as pl
import pyarrow.parquet as pq
import pytest
import tenacity

from tasks.demo_source import EventSource
from tasks.errors import (
    ConfigurationError,
    MissingRecordsKeyError,
    PaginationLoopError,
    RateLimitedError,
    RetryableError,
    SourceResponseError,
    SourceUnavailableError,
    is_retryable,
)
from tasks.extract import (
    RAW_SCHEMA,
    CursorPaginator,
    LinkHeaderPaginator,
    RateLimiter,
    RetryAfterOrBackoff,
    extract_window,
    fetch_pages,
    parse_page,
    parse_retry_after,
)
from tasks.lake import LakeFS
from tasks.models import Window

WEEK = Window.for_week(date(2024, 1, 1))
STYLES = ["page_number", "offset", "cursor", "link_header"]


class FakeTime:
    """Injected clock + sleep: sleeping advances the clock; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def lake(tmp_path) -> LakeFS:
    return LakeFS(tmp_path.as_uri())


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


def _read_parts(lake: LakeFS, result) -> pl.DataFrame:
    if not result.files:
        return pl.DataFrame(schema=RAW_SCHEMA)
    return pl.concat([lake.read_parquet(f.url) for f in result.files])


def _expected(total: int) -> list[dict]:
    return EventSource(WEEK.start, total, end=WEEK.end).page(0, total)


def _run(source, lake, fake_time, prefix="raw/2024-01-01", **kw):
    return extract_window(source, WEEK, lake, prefix, sleep=fake_time.sleep, clock=fake_time.clock, **kw)


# --- every pagination style, end to end ---------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_each_style_returns_exactly_the_served_records(source_api, make_source_api, lake, fake_time, style):
    source_api.config.total = 1050
    source = make_source_api(style, page_size=100, pages_per_file=4)
    progress: list[tuple[int, int]] = []
    result = _run(source, lake, fake_time, on_progress=lambda p, r: progress.append((p, r)))

    frame = _read_parts(lake, result)
    assert frame.schema == pl.Schema(RAW_SCHEMA)
    assert [orjson.loads(p) for p in frame["payload"]] == _expected(1050)  # same content, same order, no loss
    assert frame["_seq"].to_list() == list(range(1050))
    assert frame["_page"].to_list() == [i // 100 for i in range(1050)]
    assert (result.rows, result.pages, len(result.files)) == (1050, 11, 3)
    assert [f.rows for f in result.files] == [400, 400, 250]
    assert sum(f.rows for f in result.files) == result.rows
    assert progress[-1] == (11, 1050) and len(progress) == 11
    assert source_api.stats.requests == 11 and fake_time.sleeps == []


@pytest.mark.parametrize("style", ["page_number", "offset"])
def test_exact_multiple_of_page_size_ends_on_an_empty_page(source_api, make_source_api, lake, fake_time, style):
    source_api.config.total = 300
    result = _run(make_source_api(style, page_size=100), lake, fake_time)
    assert (result.rows, result.pages) == (300, 4)
    assert source_api.stats.log[-1][0] == 200 and source_api.stats.rows == 300


@pytest.mark.parametrize("style", ["cursor", "link_header"])
def test_empty_final_page_from_the_source(source_api, make_source_api, lake, fake_time, style):
    source_api.config.total = 300
    source_api.faults.empty_final_page = True
    result = _run(make_source_api(style, page_size=100), lake, fake_time)
    assert (result.rows, result.pages) == (300, 4)
    assert _read_parts(lake, result).height == 300


def test_zero_records_still_gives_a_valid_result(source_api, make_source_api, lake, fake_time):
    source_api.config.total = 0
    result = _run(make_source_api("cursor"), lake, fake_time)
    assert (result.rows, result.pages, result.files) == (0, 1, [])
    assert result.window == WEEK


def test_record_repeated_by_the_source_is_kept_as_received(source_api, make_source_api, lake, fake_time):
    """The client neither drops nor invents rows: a source-side repeat is passed on (transform dedupes)."""
    source_api.config.total = 250
    source_api.faults.repeat_record_at = 100
    result = _run(make_source_api("page_number", page_size=100), lake, fake_time)
    ids = [orjson.loads(p)["id"] for p in _read_parts(lake, result)["payload"]]
    assert len(ids) == 251 and ids[99] == ids[100]
    assert len(set(ids)) == len(set(e["id"] for e in _expected(250)))


def test_streaming_writes_many_small_parts_and_buffers_at_most_pages_per_file(
    source_api, make_source_api, lake, fake_time, monkeypatch
):
    source_api.config.total = 2000
    source = make_source_api("offset", page_size=50, pages_per_file=3)
    seen_heights: list[int] = []
    real_write = lake.write_parquet

    def spy(frame, rel, **kwargs):
        seen_heights.append(frame.height)
        return real_write(frame, rel, **kwargs)

    monkeypatch.setattr(lake, "write_parquet", spy)
    result = _run(source, lake, fake_time, prefix="raw/w1/")
    assert result.pages == 41 and result.rows == 2000  # 40 full pages + an empty one
    assert len(result.files) == 14  # ceil(41 / 3)
    assert max(seen_heights) <= 3 * 50  # the buffer never held more than pages_per_file pages
    assert sum(seen_heights) == 2000
    assert [f.url.rsplit("/", 1)[1] for f in result.files][:2] == ["part-00000.parquet", "part-00001.parquet"]
    assert all("/raw/w1/part-" in f.url for f in result.files)
    assert _read_parts(lake, result)["_seq"].to_list() == list(range(2000))
    # the raw zone keeps parts as zstd (level 1), without column statistics
    meta = pq.ParquetFile(io.BytesIO(lake.read_bytes(result.files[0].url))).metadata.row_group(0)
    columns = [meta.column(i) for i in range(meta.num_columns)]
    assert {c.compression for c in columns} == {"ZSTD"}
    assert all(c.statistics is None or not c.statistics.has_min_max for c in columns)


# --- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "http_date_in", "expected_first_wait"),
    [("3", None, 3.0), ("0", None, None), (None, None, None), (None, 120, 10.0), ("7", None, 7.0)],
    ids=["seconds", "zero", "absent", "http-date-capped", "seconds-b"],
)
def test_429_then_success(source_api, make_source_api, lake, fake_time, retry_after, http_date_in, expected_first_wait):
    source_api.config.total = 150
    f = source_api.faults
    f.rate_limit_times, f.retry_after, f.retry_after_http_date_in = 2, retry_after, http_date_in
    source = make_source_api("page_number", backoff_base_seconds=0.5, backoff_max_seconds=10, max_attempts=3)
    result = _run(source, lake, fake_time)
    assert result.rows == 150
    assert source_api.stats.by_status == {429: 2, 200: 2}
    assert len(fake_time.sleeps) == 2
    if expected_first_wait is None:  # no usable hint: backoff floor, never an instant retry
        assert all(0.5 <= s <= 10 for s in fake_time.sleeps)
    else:
        assert fake_time.sleeps == [expected_first_wait, expected_first_wait]


def test_real_short_retry_after_is_really_waited(source_api, make_source_api, lake):
    """No injected sleep here: the real default sleep honours the server's Retry-After: 1."""
    source_api.config.total = 20
    source_api.faults.rate_limit_times, source_api.faults.retry_after = 1, "1"
    t0 = time.monotonic()
    result = extract_window(make_source_api("cursor", backoff_max_seconds=5), WEEK, lake, "raw")
    assert result.rows == 20
    assert time.monotonic() - t0 >= 1.0
    assert source_api.stats.by_status == {429: 1, 200: 1}


def test_5xx_then_success(source_api, make_source_api, lake, fake_time):
    source_api.config.total = 150
    source_api.faults.error_times, source_api.faults.error_status = 3, 500
    result = _run(
        make_source_api("offset", max_attempts=4, backoff_base_seconds=0.2, backoff_max_seconds=10), lake, fake_time
    )
    assert result.rows == 150
    assert source_api.stats.by_status == {500: 3, 200: 2}
    assert len(fake_time.sleeps) == 3 and all(s >= 0.2 for s in fake_time.sleeps)
    assert fake_time.sleeps[2] > fake_time.sleeps[0]  # exponential


def test_5xx_streak_beyond_budget_is_retryable_and_claims_nothing(source_api, make_source_api, lake, fake_time):
    source_api.config.total = 1000
    f = source_api.faults
    f.fail_on_page, f.fail_on_page_status, f.fail_on_page_times = 6, 503, 99
    source = make_source_api("page_number", page_size=100, pages_per_file=2, max_attempts=3)
    with pytest.raises(SourceUnavailableError) as info:
        _run(source, lake, fake_time, prefix="raw/try1")
    err = info.value
    assert isinstance(err, RetryableError) and is_retryable(err)
    assert err.status_code == 503
    assert "page 6" in str(err) and "HTTP 503" in str(err) and "3 attempt" in str(err)
    assert "/page_number/events" in str(err)
    assert source_api.stats.by_status[503] == 3
    # once the source recovers, a rerun gets everything and only its own parts
    f.reset()
    result = _run(source, lake, fake_time, prefix="raw/try1")
    assert result.rows == 1000 and _read_parts(lake, result).height == 1000


def test_429_beyond_budget_raises_rate_limited_with_hint(source_api, make_source_api, lake, fake_time):
    source_api.faults.rate_limit_times, source_api.faults.retry_after = 10, "2"
    with pytest.raises(RateLimitedError) as info:
        _run(make_source_api("cursor", max_attempts=2), lake, fake_time)
    assert info.value.retry_after == 2.0 and info.value.status_code == 429
    assert source_api.stats.requests == 2


def test_timeout_then_success(source_api, make_source_api, lake, fake_time):
    source_api.config.total = 30
    source_api.faults.slow_times, source_api.faults.slow_seconds = 1, 2.0
    # 0.5 s, not less: the answers after the slow one must fit in it on a loaded 2-core machine
    result = _run(make_source_api("link_header", timeout_seconds=0.5), lake, fake_time)
    assert result.rows == 30 and len(fake_time.sleeps) == 1


def test_timeouts_beyond_budget(source_api, make_source_api, lake, fake_time):
    source_api.faults.slow_times, source_api.faults.slow_seconds = 2, 0.6
    with pytest.raises(SourceUnavailableError, match="ReadTimeout") as info:
        _run(make_source_api("offset", timeout_seconds=0.2, max_attempts=2), lake, fake_time)
    assert info.value.status_code is None


def test_connection_refused_is_retryable(lake, fake_time, make_source_api):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = make_source_api("offset", base_url=f"http://127.0.0.1:{port}", max_attempts=2)
    with pytest.raises(SourceUnavailableError, match="ConnectError"):
        _run(source, lake, fake_time)


# --- malformed pages --------------------------------------------------------------------------


def test_truncated_json_is_refetched_once(source_api, make_source_api, lake, fake_time):
    source_api.config.total = 150
    source_api.faults.truncate_times = 1
    result = _run(make_source_api("page_number"), lake, fake_time)
    assert result.rows == 150 and source_api.stats.requests == 3


def test_truncated_json_twice_fails_naming_the_page(source_api, make_source_api, lake, fake_time):
    source_api.config.total = 150
    source_api.faults.truncate_times = 2
    with pytest.raises(SourceResponseError, match=r"page 0: the body is not valid JSON") as info:
        _run(make_source_api("page_number", max_attempts=5), lake, fake_time)
    assert not is_retryable(info.value)
    assert source_api.stats.requests == 2


def test_missing_records_key_lists_the_keys(source_api, make_source_api, lake, fake_time):
    source_api.faults.missing_key_times = 1
    with pytest.raises(MissingRecordsKeyError) as info:
        _run(make_source_api("page_number"), lake, fake_time)
    msg = str(info.value)
    assert "'data'" in msg and "'items'" in msg and "'page'" in msg and "'total'" in msg and "page 0" in msg
    assert source_api.stats.requests == 1  # not retried


def test_records_key_not_a_list(source_api, make_source_api, lake, fake_time):
    with pytest.raises(SourceResponseError, match="records key 'total' holds a int"):
        _run(make_source_api("page_number", records_key="total"), lake, fake_time)


def test_nested_records_key_and_cursor_path(source_api, make_source_api, lake, fake_time):
    source_api.config.total = 250
    source_api.config.cursor_path = "meta.next"
    result = _run(make_source_api("cursor", cursor_path="meta.next"), lake, fake_time)
    assert result.rows == 250


def test_wrong_cursor_path_fails_instead_of_stopping_early(source_api, make_source_api, lake, fake_time):
    source_api.config.total = 250
    with pytest.raises(SourceResponseError, match=r"cursor path 'meta.next' is not in a full page"):
        _run(make_source_api("cursor", cursor_path="meta.next"), lake, fake_time)


@pytest.mark.parametrize("style", ["cursor", "link_header"])
def test_pagination_loop_is_detected(source_api, make_source_api, lake, fake_time, style):
    source_api.config.total = 1000
    source_api.faults.loop_at_page = 2
    with pytest.raises(PaginationLoopError, match="page 2"):
        _run(make_source_api(style), lake, fake_time)
    assert source_api.stats.requests == 3


# --- permanent errors and auth ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["api_key", "bearer"])
def test_auth_headers_are_sent(source_api, make_source_api, lake, fake_time, kind):
    source_api.config.total = 120
    source_api.config.auth, source_api.config.secret = kind, "tok-123"
    result = _run(make_source_api("offset", auth=kind, secret="tok-123"), lake, fake_time)
    assert result.rows == 120 and source_api.stats.by_status == {200: 2}


def test_401_fails_at_once_with_redacted_url(source_api, make_source_api, lake, fake_time):
    source_api.config.auth, source_api.config.secret = "bearer", "right"
    source = make_source_api("offset", auth="bearer", secret="wrong", endpoint="/offset/events?token=hunter2")
    with pytest.raises(SourceResponseError) as info:
        _run(source, lake, fake_time)
    msg = str(info.value)
    assert info.value.status_code == 401 and "HTTP 401" in msg and not is_retryable(info.value)
    assert "hunter2" not in msg and "wrong" not in msg and "token=***" in msg
    assert source_api.stats.requests == 1 and fake_time.sleeps == []


def test_404_fails_at_once_with_redacted_url(source_api, make_source_api, lake, fake_time, caplog):
    source = make_source_api("offset", endpoint="/missing/events?api_key=hunter2")
    with caplog.at_level(logging.DEBUG, logger="tasks.extract"), pytest.raises(SourceResponseError) as info:
        _run(source, lake, fake_time)
    assert info.value.status_code == 404 and "hunter2" not in str(info.value) and "api_key=***" in str(info.value)
    assert source_api.stats.requests == 1
    assert "hunter2" not in caplog.text


def test_logs_one_line_per_page_and_a_summary_without_secrets(source_api, make_source_api, lake, fake_time, caplog):
    source_api.config.total = 250
    source = make_source_api("page_number", endpoint="/page_number/events?token=hunter2")
    with caplog.at_level(logging.DEBUG, logger="tasks.extract"):
        _run(source, lake, fake_time)
    page_lines = [r for r in caplog.records if r.levelno == logging.DEBUG and r.getMessage().startswith("page ")]
    assert len(page_lines) == 3
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "250 rows in 3 pages" in infos[0]
    assert "hunter2" not in caplog.text and "token=***" in caplog.text


# --- rate limit -------------------------------------------------------------------------------


def test_rate_limit_spaces_requests_on_the_injected_clock(source_api, make_source_api, lake, fake_time):
    source_api.config.total = 500
    starts: list[float] = []

    def on_request(request: httpx.Request) -> None:
        starts.append(fake_time.now)

    source = make_source_api("offset", page_size=100, rate_limit_per_second=4)
    with httpx.Client(event_hooks={"request": [on_request]}) as client:
        result = _run(source, lake, fake_time, client=client)
    assert result.pages == 6
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps == pytest.approx([0.25] * 5)


def test_rate_limiter_unit():
    t = FakeTime()
    limiter = RateLimiter(2, clock=t.clock, sleep=t.sleep)
    limiter.acquire()
    limiter.acquire()
    t.now += 5  # idle time does not bank a burst beyond the next slot
    limiter.acquire()
    limiter.acquire()
    assert t.sleeps == [0.5, 0.5]
    with pytest.raises(ConfigurationError, match="rate_limit_per_second"):
        RateLimiter(0)


# --- pure logic (no network) ------------------------------------------------------------------


def test_parse_retry_after():
    now = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("5", now=now) == 5.0
    assert parse_retry_after(" 0 ", now=now) == 0.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("") is None
    assert parse_retry_after("-3") == 0.0


def test_wait_uses_hint_capped_else_backoff_floor():
    wait = RetryAfterOrBackoff(0.5, 8)

    def state(exc: Exception, attempt: int) -> tenacity.RetryCallState:
        rs = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        rs.attempt_number = attempt
        rs.set_exception((type(exc), exc, None))
        return rs

    class Hinted(Exception):
        retry_after: float | None = None

    e = Hinted()
    e.retry_after = 3.0
    assert wait(state(e, 1)) == 3.0
    e.retry_after = 100.0
    assert wait(state(e, 1)) == 8
    e.retry_after = 0.0
    assert all(0.5 <= wait(state(e, 1)) <= 1.0 for _ in range(20))
    assert all(wait(state(e, 10)) == 8 for _ in range(5))


def _page(body: dict, url: str, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(200, json=body, headers=headers or {}, request=httpx.Request("GET", url))


def test_cursor_paginator_decisions(make_source_api):
    p = CursorPaginator(make_source_api("cursor", page_size=2), WEEK)
    url, params = p.first()
    assert params["start"] == "2024-01-01" and params["end"] == "2024-01-07" and "cursor" not in params
    resp = _page({}, url)
    assert p.next(resp, {"next_cursor": "a"}, [1, 2], 0)[1]["cursor"] == "a"
    assert p.next(resp, {"next_cursor": 7}, [1, 2], 1)[1]["cursor"] == "7"
    assert p.next(resp, {"next_cursor": None}, [1, 2], 2) is None
    assert p.next(resp, {"next_cursor": ""}, [], 2) is None
    assert p.next(resp, {}, [1], 2) is None  # short page without a token: the end
    with pytest.raises(PaginationLoopError, match="cursor 'a' again"):
        p.next(resp, {"next_cursor": "a"}, [1, 2], 3)


def test_link_header_paginator_follows_relative_links_and_refuses_other_hosts(make_source_api):
    source = make_source_api("link_header", base_url="http://api.test")
    p = LinkHeaderPaginator(source, WEEK)
    url, _ = p.first()
    first = _page({}, url + "?page=1", {"Link": '</link_header/events?page=2>; rel="next", <x>; rel="first"'})
    nxt, params = p.next(first, {}, [1], 0)
    assert nxt == "http://api.test/link_header/events?page=2" and params is None
    second = _page({}, nxt, {"Link": '<http://api.test/link_header/events?page=1>; rel="next"'})
    with pytest.raises(PaginationLoopError):
        p.next(second, {}, [1], 1)
    evil = _page({}, nxt, {"Link": '<http://evil.test/steal?page=3>; rel="next"'})
    with pytest.raises(SourceResponseError, match="leaves the source's origin"):
        p.next(evil, {}, [1], 1)
    assert p.next(_page({}, nxt), {}, [1], 1) is None


def test_mock_transport_non_object_page_and_client_reuse(make_source_api, fake_time):
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json=[{"id": 1}])

    source = make_source_api("offset", base_url="http://api.test", auth="api_key", secret="k1")
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(MissingRecordsKeyError, match="got a JSON list"):
            list(fetch_pages(source, WEEK, client=client, sleep=fake_time.sleep, clock=fake_time.clock))
        assert not client.is_closed  # a caller's client is not closed by us
    assert calls[0].headers["X-API-Key"] == "k1"
    assert calls[0].url.params["limit"] == "100" and calls[0].url.params["offset"] == "0"


# --- records kept verbatim: split out of the page without being parsed ----------------------------------------

COMPACT = (
    b'{"data":[{"id":"a","amount":1.50,"n":123456789012345678901234567890},'
    b'{"id": "b" , "x":[1,{"y":"}{,\\"]"}]}],"meta":{"next":"t2"},"total":2}'
)
EXACT = [
    b'{"id":"a","amount":1.50,"n":123456789012345678901234567890}',
    b'{"id": "b" , "x":[1,{"y":"}{,\\"]"}]}',
]


def test_parse_page_splits_records_verbatim_and_parses_the_rest():
    body, verbatim = parse_page(COMPACT, "data")
    assert verbatim
    assert [bytes(r) for r in body["data"]] == EXACT  # every byte as sent: 1.50, a 100-bit integer, the spacing
    assert body["meta"] == {"next": "t2"} and body["total"] == 2  # what the paginators read is parsed
    parsed, verbatim = parse_page(COMPACT)
    assert not verbatim and parsed["data"][1]["x"][1]["y"] == '}{,"]'


@pytest.mark.parametrize(
    "content",
    [
        b'{"data":[{"id":"a"},{"id":"b"}],"links":[{"rel":"next","href":"/x"},1],"total":2}',  # another list
        b'{"data":[{"id":"a"}],"meta":{"pages":[1,{"b":2}],"next":null},"s":"\\"q","f":1.5,"t":true}',
        b'{"data":[{"id":"a"}],"data":[{"id":"b"},{"id":"c"}]}',  # a repeated key: the last one, as orjson
        b'{"data":[],"next_cursor":"abc"}',
    ],
)
def test_parse_page_splits_the_records_and_parses_every_other_key_like_orjson(content):
    """Whichever way the page is decoded (one pass, or two when another key holds a list), the records are their
    exact texts and every other key is what orjson reads."""
    body, verbatim = parse_page(content, "data")
    expected = orjson.loads(content)
    assert verbatim and set(body) == set(expected)
    assert [orjson.loads(bytes(r)) for r in body["data"]] == expected["data"]
    assert {k: v for k, v in body.items() if k != "data"} == {k: v for k, v in expected.items() if k != "data"}


def test_parse_page_finds_an_escape_after_other_backslashes():
    """A page with backslashes is searched for a \\u escape (the fast check only skips pages without any)."""
    late = b'{"data":[{"id":"q\\"1"},{"id":"' + b"x" * 5000 + b'\\u00e9"}]}'
    assert parse_page(late, "data") == (orjson.loads(late), False)
    assert parse_page(late.replace(b"\\u00e9", b"e"), "data")[1]


@pytest.mark.parametrize(
    ("content", "key"),
    [
        (b'{\n  "data": [{"id": "a"}]\n}', "data"),  # pretty-printed: line breaks
        (b'{"data":[{"id":"\\u00e9"}]}', "data"),  # an escape: the contract check's fast path wants UTF-8
        (b'{"result":{"items":[{"id":"a"}]}}', "result.items"),  # a dotted records key
        (b'{"data":{"id":"a"}}', "data"),  # not a list: the caller's error names it
        (b'{"other":[]}', "data"),  # no records key: the caller lists the keys
        (b'[{"id":"a"}]', "data"),  # not an object
    ],
)
def test_parse_page_parses_whatever_it_cannot_split(content, key):
    assert parse_page(content, key) == (orjson.loads(content), False)


@pytest.mark.parametrize(
    "content",
    [
        b'{"data":[{"id":"a"},{"id":"b"',  # cut short
        b'{"data":[{"id":"\xff"}]}',  # not UTF-8 inside a record (msgspec only skips it)
        b'{"data":[{"id":"a\x01"}]}',  # a raw control character
        b'{"data":[{"id":"a",}]}',  # trailing comma inside a record
    ],
)
@pytest.mark.parametrize("key", ["data", None])
def test_parse_page_refuses_invalid_json_either_way(content, key):
    with pytest.raises(ValueError):
        parse_page(content, key)


def test_extract_keeps_compact_records_verbatim_and_reserializes_the_others(make_source_api, lake, fake_time):
    pretty = orjson.dumps({"data": [{"id": "c", "amount": 2.0}, {"id": "d"}]}, option=orjson.OPT_INDENT_2)
    escaped = b'{"data":[{"id":"\\u00e9"},{"id":"f"}]}'
    bodies = {0: COMPACT, 2: pretty, 4: escaped}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=bodies.get(int(request.url.params["offset"]), b'{"data":[]}'))

    source = make_source_api("offset", base_url="http://api.test", page_size=2, pages_per_file=2)
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        result = _run(source, lake, fake_time, client=client)
    frame = _read_parts(lake, result)
    assert frame["payload"].to_list() == [
        *(r.decode() for r in EXACT),  # compact page: verbatim
        '{"id":"c","amount":2.0}',  # pretty-printed page: orjson's compact text
        '{"id":"d"}',
        '{"id":"\u00e9"}',  # escaped page: orjson's text, with the character itself
        '{"id":"f"}',
    ]
    assert frame["_seq"].to_list() == list(range(6)) and frame["_page"].to_list() == [0, 0, 1, 1, 2, 2]
    assert (result.rows, result.pages, [f.rows for f in result.files]) == (6, 4, [4, 2])


def test_a_number_beyond_double_range_rejects_its_row_not_its_page(make_source_api, lake, fake_time):
    """Valid JSON that orjson refuses (1e999) used to fail the whole page; kept verbatim, only that row is rejected."""
    from tasks.validation import validate_chunk

    good = (
        b'{"id":"e1","customer_id":"c1","event_type":"purchase","amount":1.5,"currency":"USD",'
        b'"occurred_at":"2024-01-02T00:00:00Z"}'
    )
    huge = good.replace(b'"e1"', b'"e2"').replace(b"1.5", b"1e999")
    bodies = {0: b'{"data":[' + good + b"," + huge + b"]}"}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=bodies.get(int(request.url.params["offset"]), b'{"data":[]}'))

    source = make_source_api("offset", base_url="http://api.test", page_size=2)
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        result = _run(source, lake, fake_time, client=client)
    assert result.rows == 2
    valid, rejects = validate_chunk(_read_parts(lake, result))
    assert valid["id"].to_list() == ["e1"]
    assert rejects.select("field", "payload").rows() == [("payload", huge.decode())]
    assert rejects["reason"][0].startswith("payload is not valid JSON")


def test_unknown_pagination_is_a_configuration_error(make_source_api, lake):
    source = make_source_api("offset")
    object.__setattr__(source, "pagination", "scroll")
    with pytest.raises(ConfigurationError, match="pagination"):
        extract_window(source, WEEK, lake, "raw")


def test_on_part_sees_each_written_part_and_can_validate_it(source_api, make_source_api, lake, fake_time):
    """The weekly flow's composition: each raw part is handed to a PartValidator right after it is written."""
    from tasks.part_checks import PartValidator
    from tasks.transform import transform_week

    source_api.config.total = 700
    source = make_source_api("cursor", page_size=100, pages_per_file=2)
    seen: list[tuple[str, int, str]] = []

    with PartValidator(lake, "staging/parts") as validator:

        def on_part(ref, frame):
            seen.append((ref.url, frame.height, ref.sha256))
            assert frame.schema == pl.Schema(RAW_SCHEMA)
            validator.submit(ref, frame)

        result = _run(source, lake, fake_time, on_part=on_part)
        result.validated = validator.finish()
    assert [(f.url, f.rows, f.sha256) for f in result.files] == seen
    assert [p.raw.url for p in result.validated] == [f.url for f in result.files]
    assert sum(p.valid.rows + p.rejects.rows for p in result.validated) == result.rows == 700
    reused = transform_week(lake, result.files, WEEK, "out-reused", validated=result.validated)
    plain = transform_week(lake, result.files, WEEK, "out-plain")
    assert (reused.valid.sha256, reused.rejects.sha256) == (plain.valid.sha256, plain.rejects.sha256)


def test_on_frame_sees_each_part_before_on_part_and_the_validator_starts_early(
    source_api, make_source_api, lake, fake_time
):
    """on_frame gets each part's frame (the same object on_part gets later, after the write); a PartValidator
    started there gives the same stored checks as one that only sees on_part."""
    from tasks.part_checks import PartValidator

    source_api.config.total = 700
    source = make_source_api("offset", page_size=100, pages_per_file=2)
    events: list[tuple[str, int]] = []
    stored = {}
    for early in (True, False):
        with PartValidator(lake, f"staging/parts-{early}") as validator:

            def on_frame(frame, validator=validator, early=early):
                events.append(("frame", id(frame)))
                if early:
                    validator.start(frame)

            def on_part(ref, frame, validator=validator):
                events.append(("part", id(frame)))
                validator.submit(ref, frame)

            result = _run(source, lake, fake_time, prefix=f"raw-{early}", on_frame=on_frame, on_part=on_part)
            stored[early] = [(p.valid.sha256, p.rejects.sha256, p.raw.sha256) for p in validator.finish()]
            assert not validator._started  # every started frame was bound to its written part
        assert len(events) == 2 * len(result.files) == 8
        for k in range(0, 8, 2):  # each frame is announced, then the same object comes back as written
            assert events[k][0] == "frame" and events[k + 1] == ("part", events[k][1])
        events.clear()
    assert stored[True] == stored[False] and len(stored[True]) == 4


def test_frame_rows_announces_each_part_in_slices_that_the_validator_binds_to_the_part(
    source_api, make_source_api, lake, fake_time
):
    """With frame_rows the rows are announced in slices as soon as that many are buffered (at page boundaries),
    each part's slices before its on_part; a PartValidator started on the slices stores the same checks as one
    that only sees the written parts, and the transform reuses them to the same files."""
    from tasks.part_checks import PartValidator
    from tasks.transform import transform_week

    source_api.config.total = 1050
    source = make_source_api("offset", page_size=100, pages_per_file=5)  # parts of 500, 500, 50 rows
    stored, results = {}, {}
    for sliced in (True, False):
        events: list[tuple] = []
        with PartValidator(lake, f"staging/parts-{sliced}") as validator:

            def on_frame(frame, validator=validator, events=events, sliced=sliced):
                events.append(("frame", frame.height, frame.item(0, "_seq")))
                if sliced:
                    validator.start(frame)

            def on_part(ref, frame, validator=validator, events=events):
                events.append(("part", frame.height, frame.item(0, "_seq")))
                validator.submit(ref, frame)

            result = _run(
                source,
                lake,
                fake_time,
                prefix=f"raw-{sliced}",
                on_frame=on_frame,
                on_part=on_part,
                frame_rows=200 if sliced else None,
            )
            result.validated = validator.finish()
            assert not validator._started
        results[sliced] = result
        stored[sliced] = [(p.valid.sha256, p.rejects.sha256, p.raw.sha256) for p in result.validated]
        frames = [e for e in events if e[0] == "frame"]
        if sliced:  # 200-row slices at page boundaries, the rest of each part when it is complete
            assert [h for _, h, _ in frames] == [200, 200, 100, 200, 200, 100, 50]
        else:
            assert [h for _, h, _ in frames] == [500, 500, 50]
        assert [(h, s) for kind, h, s in events if kind == "part"] == [(500, 0), (500, 500), (50, 1000)]
        seqs = [s for _, _, s in frames]
        assert seqs == sorted(seqs) and [s + h for _, h, s in frames][-1] == 1050  # contiguous, in order
    assert stored[True] == stored[False] and len(stored[True]) == 3
    assert [f.sha256 for f in results[True].files] == [f.sha256 for f in results[False].files]
    reused = transform_week(lake, results[True].files, WEEK, "out-reused", validated=results[True].validated)
    plain = transform_week(lake, results[True].files, WEEK, "out-plain")
    assert (reused.valid.sha256, reused.rejects.sha256) == (plain.valid.sha256, plain.rejects.sha256)


def test_a_part_whose_rows_were_not_started_as_such_is_checked_again(lake):
    """submit binds started frames only when they begin at the part's first _seq and hold exactly its rows;
    otherwise the part is checked from its own rows (the stale starts are left, never bound to another part)."""
    from tasks.part_checks import PartValidator

    payloads = [orjson.dumps(r).decode() for r in EventSource(date(2024, 1, 1), 300).page(0, 300)]
    raw = pl.DataFrame(
        {"_seq": list(range(300)), "_page": [i // 100 for i in range(300)], "payload": payloads},
        schema={"_seq": pl.Int64, "_page": pl.Int64, "payload": pl.String},
    )
    part = raw.slice(0, 200)
    ref = lake.write_parquet(part, "raw/part-00000.parquet")
    with PartValidator(lake, "checks-plain") as plain:
        plain.submit(ref, part)
        expected = [(p.valid.sha256, p.rejects.sha256, p.valid.rows) for p in plain.finish()]
    for started in ([raw.slice(0, 150), raw.slice(150, 150)], [raw.slice(100, 100)]):  # overshoots / wrong start
        with PartValidator(lake, f"checks-{len(started)}") as validator:
            for frame in started:
                validator.start(frame)
            validator.submit(ref, part)
            got = [(p.valid.sha256, p.rejects.sha256, p.valid.rows) for p in validator.finish()]
        assert got == expected


def test_an_extract_that_fails_stops_the_validator_cleanly(source_api, make_source_api, lake, fake_time):
    from tasks.part_checks import PartValidator

    source_api.config.total = 500
    source_api.faults.fail_on_page, source_api.faults.fail_on_page_status = 3, 404
    source = make_source_api("page_number", page_size=100, pages_per_file=1)
    with PartValidator(lake, "staging/parts") as validator:
        with pytest.raises(SourceResponseError, match="HTTP 404"):
            _run(source, lake, fake_time, on_part=validator.submit)
        assert len(validator._parts) == 3  # pages 0-2 were written and handed over before page 3 failed
    assert not [t for t in threading.enumerate() if t.name.startswith(("validate", "extract-"))]


@pytest.mark.parametrize("checks_prefix", [None, "staging/parts"])
def test_extract_and_check_stores_a_check_per_raw_part_only_when_asked(
    source_api, make_source_api, lake, fake_time, checks_prefix
):
    from tasks.part_checks import extract_and_check

    source_api.config.total = 450
    source = make_source_api("offset", page_size=100, pages_per_file=2)
    result = extract_and_check(source, WEEK, lake, "raw/w", checks_prefix, sleep=fake_time.sleep, clock=fake_time.clock)
    assert result.rows == 450 and len(result.files) == 3
    if checks_prefix is None:
        assert result.validated == [] and not lake.list("staging")
    else:
        assert [p.raw.sha256 for p in result.validated] == [f.sha256 for f in result.files]
        assert all("/staging/parts/part-0000" in p.valid.url for p in result.validated)
