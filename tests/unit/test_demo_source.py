"""The demo events API: synthetic data quality and the real HTTP server's paging, auth and faults."""

from __future__ import annotations

import collections
import time
from datetime import date, datetime, timedelta
from email.utils import parsedate_to_datetime
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest

from tasks.demo_source import (
    BLOCK,
    CURRENCIES,
    DEFECTS,
    EVENT_TYPES,
    DemoConfig,
    EventSource,
    create_app,
    decode_cursor,
    encode_cursor,
    make_events,
    serve,
)

WEEK = date(2024, 1, 1)
PARAMS = {"start": "2024-01-01", "end": "2024-01-07"}


def _valid(events: list[dict], kinds: list[str | None]) -> list[dict]:
    return [e for e, k in zip(events, kinds, strict=True) if k is None]


# --- synthetic events --------------------------------------------------------------------------


def test_make_events_is_deterministic_per_seed():
    a = make_events(WEEK, 3000, seed=7)
    assert a == make_events(WEEK, 3000, seed=7)
    assert a != make_events(WEEK, 3000, seed=8)
    assert make_events(WEEK, 0) == []


def test_page_matches_make_events_across_block_boundaries_and_past_the_end():
    src = EventSource(WEEK, 2500, seed=3)
    whole = make_events(WEEK, 2500, seed=3)
    assert src.page(BLOCK - 5, 10) == whole[BLOCK - 5 : BLOCK + 5]
    assert src.page(2490, 100) == whole[2490:]
    assert src.page(2500, 10) == []
    assert len(src) == 2500


def test_page_returns_copies_and_the_block_cache_stays_bounded():
    src = EventSource(WEEK, 50 * BLOCK)
    first = src.page(0, 3)
    first[0]["amount"] = "tampered"
    assert src.page(0, 3)[0]["amount"] != "tampered"
    for offset in range(0, 50 * BLOCK, BLOCK):
        src.page(offset, BLOCK)
    assert len(src._cache) <= 4  # memory does not grow with the week's size


def test_valid_events_follow_the_contract():
    src = EventSource(WEEK, 20_000, seed=1, tz="Europe/Berlin")
    events, kinds = src.page(0, 20_000), src.defects(0, 20_000)
    valid = _valid(events, kinds)
    assert len(valid) > 19_000
    zone = ZoneInfo("Europe/Berlin")
    currency_of: dict[str, set] = collections.defaultdict(set)
    offsets = set()
    for e in valid:
        assert e["id"].startswith("evt_") and isinstance(e["customer_id"], str) and e["customer_id"]
        assert e["event_type"] in EVENT_TYPES
        assert isinstance(e["amount"], float) and e["amount"] >= 0
        if e["event_type"] == "page_view":
            assert e["amount"] == 0
        assert e["currency"] in CURRENCIES
        currency_of[e["customer_id"]].add(e["currency"])
        ts = datetime.fromisoformat(e["occurred_at"])
        assert ts.tzinfo is not None
        assert WEEK <= ts.astimezone(zone).date() <= WEEK + timedelta(days=6)
        offsets.add(e["occurred_at"][19:])
        if "metadata" in e:
            assert isinstance(e["metadata"], dict)
    assert all(len(c) == 1 for c in currency_of.values()), "one currency per customer"
    assert {"Z", "+02:00", "-05:00"} <= offsets
    assert {e["event_type"] for e in valid} == set(EVENT_TYPES)


def test_invalid_rows_are_varied_and_near_the_ratio():
    n = 40_000
    src = EventSource(WEEK, n, invalid_ratio=0.02, seed=2)
    events, kinds = src.page(0, n), src.defects(0, n)
    counts = collections.Counter(k for k in kinds if k)
    bad = sum(v for k, v in counts.items() if k != "duplicate")
    assert 0.015 * n < bad < 0.025 * n
    assert set(DEFECTS) <= set(counts)
    by_kind = {k: e for e, k in zip(events, kinds, strict=True) if k}
    assert by_kind["negative_amount"]["amount"] < 0
    assert by_kind["unknown_event_type"]["event_type"] not in EVENT_TYPES
    assert by_kind["bad_currency"]["currency"] not in CURRENCIES
    assert not by_kind["missing_customer_id"].get("customer_id")
    assert datetime.fromisoformat(by_kind["naive_timestamp"]["occurred_at"]).tzinfo is None
    assert not isinstance(by_kind["non_numeric_amount"]["amount"], float)
    out = datetime.fromisoformat(by_kind["out_of_window"]["occurred_at"]).date()
    assert not WEEK - timedelta(days=1) <= out <= WEEK + timedelta(days=7)


def test_duplicates_reuse_an_earlier_id_with_different_content():
    n = 20_000
    src = EventSource(WEEK, n, seed=5)
    events, kinds = src.page(0, n), src.defects(0, n)
    first_seen: dict[str, dict] = {}
    dup_count = 0
    for e, k in zip(events, kinds, strict=True):
        if k == "duplicate":
            dup_count += 1
            assert e["id"] in first_seen
            assert e != first_seen[e["id"]]
        else:
            first_seen.setdefault(e["id"], e)
    assert 0 < dup_count < 0.01 * n
    assert EventSource(WEEK, 2000, invalid_ratio=0, duplicate_ratio=0).defects(0, 2000) == [None] * 2000


def test_cursor_round_trip():
    assert decode_cursor(encode_cursor(12345)) == 12345
    with pytest.raises(ValueError):
        decode_cursor(encode_cursor(1)[::-1] + "x")


# --- the HTTP server ---------------------------------------------------------------------------


def _ids(events: list[dict]) -> list[str]:
    return [e["id"] for e in events]


def _fetch_all(client: httpx.Client, url: str, style: str, size: int) -> list[dict]:
    out: list[dict] = []
    if style in ("page_number", "offset"):
        i = 0
        while True:
            q = {"page": i + 1, "page_size": size} if style == "page_number" else {"offset": i * size, "limit": size}
            r = client.get(url, params={**PARAMS, **q})
            r.raise_for_status()
            page = r.json()["data"]
            out += page
            if len(page) < size:
                return out
            i += 1
    params: dict | None = {**PARAMS, "page_size": size}
    while True:
        r = client.get(url, params=params)
        r.raise_for_status()
        body = r.json()
        out += body["data"]
        if style == "cursor":
            if not body["next_cursor"]:
                return out
            params = {**PARAMS, "page_size": size, "cursor": body["next_cursor"]}
        else:
            nxt = r.links.get("next")
            if not nxt:
                return out
            url, params = nxt["url"], None


@pytest.mark.parametrize("style", ["page_number", "offset", "cursor", "link_header"])
def test_server_serves_every_record_once_in_each_style(source_api, style):
    source_api.config.total = 1234
    expected = EventSource(WEEK, 1234).page(0, 1234)
    with httpx.Client() as client:
        got = _fetch_all(client, source_api.url(style), style, 100)
    assert got == expected
    assert source_api.stats.pages == 13 and source_api.stats.rows == 1234
    assert source_api.stats.by_status[200] == 13


def test_server_bodies_carry_paging_fields(source_api):
    source_api.config.total = 250
    with httpx.Client() as c:
        body = c.get(source_api.url("page_number"), params={**PARAMS, "page": 3, "page_size": 100}).json()
        assert (body["page"], body["total"], len(body["data"])) == (3, 250, 50)
        body = c.get(source_api.url("offset"), params={**PARAMS, "offset": 200, "limit": 100}).json()
        assert (body["offset"], body["limit"], len(body["data"])) == (200, 100, 50)
        r = c.get(source_api.url("link_header"), params={**PARAMS, "page_size": 100})
        assert set(r.links) == {"first", "next"} and "page=2" in r.links["next"]["url"]
        source_api.config.pagination = "cursor"
        source_api.config.cursor_path = "meta.next"
        body = c.get(source_api.url(), params={**PARAMS, "page_size": 100}).json()
        assert decode_cursor(body["meta"]["next"]) == 100


def test_server_rejects_bad_requests(source_api):
    with httpx.Client() as c:
        assert c.get(source_api.url("page_number"), params={"start": "2024-01-01"}).status_code == 400
        assert c.get(source_api.url("page_number"), params={**PARAMS, "page": "x"}).status_code == 400
        assert c.get(source_api.url("cursor"), params={**PARAMS, "cursor": "!!"}).status_code == 400
        assert c.get(source_api.url("nope"), params=PARAMS).status_code == 404


@pytest.mark.parametrize("kind", ["api_key", "bearer"])
def test_server_checks_auth(source_api, kind):
    source_api.config.auth, source_api.config.secret = kind, "s3cret"
    good = {"X-API-Key": "s3cret"} if kind == "api_key" else {"Authorization": "Bearer s3cret"}
    bad = {"X-API-Key": "wrong"} if kind == "api_key" else {"Authorization": "Bearer wrong"}
    with httpx.Client() as c:
        assert c.get(source_api.url("offset"), params=PARAMS).status_code == 401
        assert c.get(source_api.url("offset"), params=PARAMS, headers=bad).status_code == 401
        assert c.get(source_api.url("offset"), params=PARAMS, headers=good).status_code == 200
    assert source_api.stats.by_status == {401: 2, 200: 1}


def test_server_faults_fire_the_configured_number_of_times(source_api):
    f = source_api.faults
    url = source_api.url("offset")
    with httpx.Client() as c:
        f.rate_limit_times, f.retry_after = 1, "0"
        r = c.get(url, params=PARAMS)
        assert (r.status_code, r.headers["retry-after"]) == (429, "0")
        f.rate_limit_times, f.retry_after = 1, None
        assert "retry-after" not in c.get(url, params=PARAMS).headers
        f.rate_limit_times, f.retry_after_http_date_in = 1, 30
        when = parsedate_to_datetime(c.get(url, params=PARAMS).headers["retry-after"])
        assert timedelta(seconds=20) < when - datetime.now(when.tzinfo) <= timedelta(seconds=31)
        f.error_times, f.error_status = 2, 500
        assert [c.get(url, params=PARAMS).status_code for _ in range(3)] == [500, 500, 200]
        f.truncate_times = 1
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(c.get(url, params=PARAMS).content)
        f.missing_key_times = 1
        assert "data" not in c.get(url, params=PARAMS).json()
        f.fail_on_page, f.fail_on_page_times = 1, 1
        assert c.get(url, params={**PARAMS, "offset": 0, "limit": 10}).status_code == 200
        assert c.get(url, params={**PARAMS, "offset": 10, "limit": 10}).status_code == 500
        assert c.get(url, params={**PARAMS, "offset": 10, "limit": 10}).status_code == 200
    assert source_api.stats.requests == 11
    assert source_api.stats.by_status == {429: 3, 500: 3, 200: 5}


def test_server_slow_response(source_api):
    source_api.faults.slow_times, source_api.faults.slow_seconds = 1, 0.5
    with httpx.Client(timeout=0.1) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get(source_api.url("offset"), params=PARAMS)
        assert c.get(source_api.url("offset"), params=PARAMS).status_code == 200


def test_server_cursor_loop_empty_final_page_and_repeated_record(source_api):
    source_api.config.total = 30
    with httpx.Client() as c:
        source_api.faults.loop_at_page = 1
        first = c.get(source_api.url("cursor"), params={**PARAMS, "page_size": 10}).json()["next_cursor"]
        second = c.get(source_api.url("cursor"), params={**PARAMS, "page_size": 10, "cursor": first}).json()
        assert second["next_cursor"] == first
        source_api.faults.reset()
        source_api.faults.empty_final_page = True
        got = _fetch_all(c, source_api.url("cursor"), "cursor", 10)
        assert len(got) == 30 and source_api.stats.log[-1][0] == 200
        assert source_api.stats.pages == 2 + 4  # 3 data pages and an empty one
        source_api.faults.reset()
        source_api.faults.repeat_record_at = 10
        got = _fetch_all(c, source_api.url("page_number"), "page_number", 10)
        assert len(got) == 31 and got[10] == got[9]


def test_serve_stops_cleanly():
    with serve(create_app(DemoConfig(total=5))) as base:
        assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=1)


def test_latency_delays_every_events_answer(source_api):
    source_api.config.total = 10
    with httpx.Client() as c:
        started = time.perf_counter()
        assert c.get(source_api.url("offset"), params={**PARAMS, "offset": 0, "limit": 5}).status_code == 200
        quick = time.perf_counter() - started
        source_api.config.latency_seconds = 0.3
        started = time.perf_counter()
        body = c.get(source_api.url("offset"), params={**PARAMS, "offset": 5, "limit": 5}).json()
        slow = time.perf_counter() - started
    assert len(body["data"]) == 5
    assert slow >= 0.3 > quick  # a lower bound only: the machine may be slow, never fast


def test_the_test_rig_reset_restores_every_setting(source_api):
    """The shared source API's reset between tests covers every DemoConfig setting (a missed one leaks into every
    later test: latency_seconds once added 0.3 s to each request of the tests after the latency test)."""
    from dataclasses import fields

    from tasks.demo_source import DemoConfig
    from tests.support.source_api import DEFAULT_TOTAL

    settings = [f.name for f in fields(DemoConfig) if not f.name.startswith("_") and f.name not in ("faults", "stats")]
    assert {"latency_seconds", "total", "auth", "secret", "records_key"} <= set(settings)
    for name in settings:  # a value no default has
        setattr(source_api.config, name, object())
    source_api.reset()
    fresh = DemoConfig(total=DEFAULT_TOTAL)
    assert {name: getattr(source_api.config, name) for name in settings} == {
        name: getattr(fresh, name) for name in settings
    }
