"""transform_week end to end on a file:// lake: window, dedup, currency rule, metrics, determinism, bad parts."""

from __future__ import annotations

import itertools
import json
import logging
from datetime import UTC, date, datetime

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks import transform
from tasks.contract import validate_payload
from tasks.errors import ConfigurationError, RawPartError
from tasks.lake import LakeFS
from tasks.models import Window
from tasks.part_checks import PartValidator
from tasks.transform import METRICS_SCHEMA, transform_week
from tasks.validation import REJECT_SCHEMA, VALID_SCHEMA

WEEK = Window.for_week(date(2024, 1, 1))  # Monday 2024-01-01 .. Sunday 2024-01-07


def ev(i, customer="c_1", event_type="purchase", amount=10, currency="usd", at="2024-01-03T10:00:00Z", **extra):
    record = {
        "id": i,
        "customer_id": customer,
        "event_type": event_type,
        "amount": amount,
        "currency": currency,
        "occurred_at": at,
    }
    record.update(extra)
    return json.dumps(record)


@pytest.fixture
def lake(tmp_path):
    return LakeFS(tmp_path.as_uri())


def write_parts(lake, payloads, part_size=None):
    part_size = part_size or max(len(payloads), 1)
    refs = []
    for n, start in enumerate(range(0, max(len(payloads), 1), part_size)):
        chunk = payloads[start : start + part_size]
        frame = pl.DataFrame(
            {
                "_seq": range(start, start + len(chunk)),
                "_page": [start // 3 + k // 3 for k in range(len(chunk))],
                "payload": chunk,
            },
            schema={"_seq": pl.Int64, "_page": pl.Int64, "payload": pl.String},
        )
        refs.append(lake.write_parquet(frame, f"raw/part-{n:03d}.parquet"))
    return refs


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def captured_logger() -> tuple[logging.Logger, _Lines]:
    logger = logging.getLogger(f"test-transform-{next(_LOGGERS)}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = _Lines()
    logger.addHandler(handler)
    return logger, handler


_LOGGERS = itertools.count()
_MODE = {"prevalidated": False}


@pytest.fixture(autouse=True, params=["raw", "prevalidated"])
def mode(request):
    """Every test of this module runs twice: the transform validating the raw parts itself, and the transform
    given the contract checks a PartValidator made of the same parts (what the weekly flow's extract does).
    Both must give the same results."""
    _MODE["prevalidated"] = request.param == "prevalidated"
    yield request.param
    _MODE["prevalidated"] = False


def prevalidate(lake, refs, prefix):
    with PartValidator(lake, prefix) as validator:
        for ref in refs:
            validator.submit(ref, lake.read_parquet(ref.url))
        validated = validator.finish()
    assert [part.raw.url for part in validated] == [ref.url for ref in refs]
    return validated


def run(lake, payloads, window=WEEK, tz="UTC", part_size=None, prefix="out"):
    refs = write_parts(lake, payloads, part_size)
    validated = prevalidate(lake, refs, f"{prefix}-parts") if _MODE["prevalidated"] else []
    logger, lines = captured_logger()
    res = transform_week(lake, refs, window, prefix, timezone=tz, validated=validated, logger=logger)
    if validated:  # the checks were used, not silently redone
        used = f"used the contract check made during the extract for {len(refs)} of {len(refs)} raw parts"
        assert used in lines.lines
    return (
        res,
        lake.read_parquet(res.valid.url),
        lake.read_parquet(res.rejects.url),
        lake.read_parquet(res.metrics.url),
    )


def test_schemas_and_counts(lake):
    res, valid, rejects, metrics = run(lake, [ev("a"), ev("b", amount=-1), "[]"])
    assert dict(valid.schema) == VALID_SCHEMA
    assert dict(rejects.schema) == REJECT_SCHEMA
    assert dict(metrics.schema) == METRICS_SCHEMA
    assert (res.fetched, res.valid.rows, res.rejected, res.duplicates) == (3, 1, 2, 0)
    assert rejects.select("_seq", "field").rows() == [(1, "amount"), (2, "payload")]
    assert rejects.get_column("payload").to_list() == [ev("b", amount=-1), "[]"]  # raw, unchanged
    assert rejects.get_column("event_id").to_list() == ["b", None]


def test_dedup_latest_wins_ties_go_to_last_received(lake):
    payloads = [
        ev("x", amount=1, at="2024-01-03T10:00:00Z"),
        ev("x", amount=2, at="2024-01-03T12:00:00+02:00"),  # same instant as seq 0 ... tie
        ev("x", amount=3, at="2024-01-03T09:00:00Z"),  # older, received later
        ev("y", amount=4, at="2024-01-04T10:00:00Z"),
        ev("y", amount=5, at="2024-01-05T10:00:00Z"),  # newer
    ]
    res, valid, rejects, _ = run(lake, payloads, part_size=2)  # duplicates span parts
    assert valid.select("id", "amount").rows() == [("x", 2.0), ("y", 5.0)]
    dups = rejects.filter(pl.col("field") == "id")
    assert sorted(dups.get_column("_seq").to_list()) == [0, 2, 3]
    assert set(dups.get_column("reason")) == {"duplicate of a later record"}
    assert (res.duplicates, res.rejected) == (3, 0)


def test_large_weeks_find_duplicates_bucket_by_bucket(lake, monkeypatch):
    """A week of more than DEDUP_BUCKET_ROWS rows looks for repeated ids one hash bucket at a time: the files are
    byte-identical to a single pass."""
    payloads = [
        ev(f"e{i % 11}", customer=f"c_{i % 4}", amount=i, at=f"2024-01-0{1 + i % 7}T10:00:00Z") for i in range(40)
    ]
    single, *_ = run(lake, payloads, part_size=7, prefix="single")
    monkeypatch.setattr(transform, "DEDUP_BUCKET_ROWS", 3)  # 40 rows -> 14 buckets
    calls = []
    real = transform._repeated_hashes
    monkeypatch.setattr(transform, "_repeated_hashes", lambda scan, rows: calls.append(rows) or real(scan, rows))
    bucketed, *_ = run(lake, payloads, part_size=7, prefix="bucketed")
    assert calls == [40] and single.duplicates == bucketed.duplicates == 29
    for name in ("valid", "rejects", "metrics"):
        assert getattr(single, name).sha256 == getattr(bucketed, name).sha256


def test_raw_parts_out_of_receive_order_give_the_same_files(lake):
    """The valid and rejects files are in receive (``_seq``) order whatever order the raw parts are given in."""
    payloads = [ev(f"e{i % 5}", amount=i, at=f"2024-01-0{1 + i % 7}T10:00:00Z") for i in range(12)] + ["{bad"]
    refs = write_parts(lake, payloads, part_size=4)
    in_order = transform_week(lake, refs, WEEK, "in-order")
    reversed_ = transform_week(lake, refs[::-1], WEEK, "reversed")
    for name in ("valid", "rejects", "metrics"):
        assert getattr(in_order, name).sha256 == getattr(reversed_, name).sha256
    assert lake.read_parquet(reversed_.valid.url).get_column("_seq").is_sorted()


def test_rejects_stay_in_receive_order_when_only_the_rejected_parts_are_out_of_order(lake):
    """Parts given as [2, 0, 1] where part 0 is all valid and parts 1 and 2 all rejected: the valid rows look in
    order, the spooled rejects are not; the rejects file is still in _seq order and equal to the in-order run's."""
    good = [ev(f"g{i}", amount=i) for i in range(4)]
    bad = [ev(f"b{i}", amount=-1) for i in range(8)]
    refs = write_parts(lake, good + bad, part_size=4)
    in_order = transform_week(lake, refs, WEEK, "in-order")
    shuffled = transform_week(lake, [refs[2], refs[0], refs[1]], WEEK, "shuffled")
    assert (shuffled.valid.rows, shuffled.rejected) == (4, 8)
    for name in ("valid", "rejects", "metrics"):
        assert getattr(in_order, name).sha256 == getattr(shuffled, name).sha256
    assert lake.read_parquet(shuffled.rejects.url).get_column("_seq").to_list() == list(range(4, 12))


def test_week_level_rejects_of_parts_out_of_order_stay_in_receive_order(lake):
    """Parts given as [2, 0, 1] where parts 1 and 2 hold only events outside the window (an API ignoring the date
    filter): the window rejects are spooled part by part and still come out in _seq order, with their payloads."""
    inside = [ev(f"g{i}", amount=i) for i in range(4)]
    later = [ev(f"o{i}", amount=i, at="2024-02-01T10:00:00Z") for i in range(8)]
    refs = write_parts(lake, inside + later, part_size=4)
    in_order = transform_week(lake, refs, WEEK, "in-order")
    shuffled = transform_week(lake, [refs[2], refs[0], refs[1]], WEEK, "shuffled")
    for name in ("valid", "rejects", "metrics"):
        assert getattr(in_order, name).sha256 == getattr(shuffled, name).sha256
    rejects = lake.read_parquet(shuffled.rejects.url)
    assert rejects.get_column("_seq").to_list() == list(range(4, 12))
    assert rejects.get_column("payload").to_list() == later
    assert set(rejects.get_column("field")) == {"occurred_at"} and shuffled.rejected == 8


def test_window_edges_in_a_non_utc_timezone(lake):
    tz = "America/New_York"  # UTC-5 in January
    payloads = [
        ev("mon_start", at="2024-01-01T05:00:00Z"),  # Mon 00:00 local -> in
        ev("sun_before", at="2024-01-01T04:59:59Z"),  # Sun 23:59:59 local of the previous week -> out
        ev("sun_end", at="2024-01-07T23:59:00-05:00"),  # Sunday 23:59 local -> in
        ev("sun_end_utc", at="2024-01-08T04:59:59.999999Z"),  # still Sunday locally -> in
        ev("next_mon", at="2024-01-08T05:00:00Z"),  # Monday 00:00 local -> out
    ]
    res, valid, rejects, _ = run(lake, payloads, tz=tz)
    assert sorted(valid.get_column("id")) == ["mon_start", "sun_end", "sun_end_utc"]
    out = rejects.sort("_seq")
    assert out.get_column("event_id").to_list() == ["sun_before", "next_mon"]
    assert set(out.get_column("field")) == {"occurred_at"}
    assert out.get_column("reason")[0] == (
        "occurred_at is outside the batch window 2024-01-01..2024-01-07 (America/New_York), got 2023-12-31"
    )
    assert res.rejected == 2
    # the same events cut in UTC: sun_end and sun_end_utc fall on Monday 2024-01-08
    _, valid_utc, _, _ = run(lake, payloads, tz="UTC", prefix="utc")
    assert sorted(valid_utc.get_column("id")) == ["mon_start", "sun_before"]


def test_currency_rule_dominant_and_alphabetical_tie(lake):
    payloads = [
        ev("a1", customer="a", currency="usd"),
        ev("a2", customer="a", currency="EUR"),
        ev("a3", customer="a", currency="eur"),  # a: EUR 2 vs USD 1 -> EUR kept
        ev("b1", customer="b", currency="USD"),
        ev("b2", customer="b", currency="CHF"),  # b: tie -> CHF (alphabetical) kept
    ]
    res, valid, rejects, metrics = run(lake, payloads)
    assert sorted(valid.get_column("id")) == ["a2", "a3", "b2"]
    cur = rejects.filter(pl.col("field") == "currency").sort("_seq")
    assert cur.get_column("event_id").to_list() == ["a1", "b1"]
    assert cur.get_column("reason")[0].endswith(
        "kept the dominant currency EUR (most events, ties alphabetical), got USD"
    )
    assert metrics.select("Customer_Id__c", "Currency__c").rows() == [("a", "EUR"), ("b", "CHF")]
    assert res.rejected == 2


def test_metrics_match_a_hand_computation(lake):
    payloads = [
        ev("p1", event_type="purchase", amount=10.005, at="2024-01-02T10:00:00Z"),
        ev("p2", event_type="purchase", amount="20.10", at="2024-01-03T10:00:00+01:00"),
        ev("r1", event_type="refund", amount=5.5, at="2024-01-04T10:00:00Z"),
        ev("s1", event_type="subscription_renewal", amount=9.99, at="2024-01-06T23:00:00-03:00"),
        ev("v1", event_type="page_view", amount=0, at="2024-01-01T00:00:00Z"),
        ev("v2", event_type="page_view", amount=100, at="2024-01-01T00:00:01Z"),  # page_view amounts never count
        ev("k1", event_type="add_to_cart", amount=3, at="2024-01-05T00:00:00Z"),
        ev("z1", customer="c_0", event_type="refund", amount=1.25, currency="JPY"),
    ]
    _, _, _, metrics = run(lake, payloads)
    assert metrics.get_column("External_Id__c").to_list() == ["c_0-2024-01-01", "c_1-2024-01-01"]
    row = metrics.row(1, named=True)
    assert row == {
        "External_Id__c": "c_1-2024-01-01",
        "Customer_Id__c": "c_1",
        "Week_Start__c": date(2024, 1, 1),
        "Page_View_Count__c": 2,
        "Add_To_Cart_Count__c": 1,
        "Purchase_Count__c": 2,
        "Refund_Count__c": 1,
        "Subscription_Renewal_Count__c": 1,
        "Event_Count__c": 7,
        "Total_Amount__c": 34.6,  # 10.005 + 20.10 + 9.99 - 5.5 = 34.595 -> 34.6
        "Currency__c": "USD",
        "Last_Event_At__c": datetime(2024, 1, 7, 2, 0, tzinfo=UTC),
    }
    assert metrics.row(0, named=True)["Total_Amount__c"] == -1.25
    assert metrics.row(0, named=True)["Purchase_Count__c"] == 0


def test_same_input_gives_byte_identical_output(lake):
    payloads = [
        ev(f"e{i % 7}", customer=f"c_{i % 3}", amount=i / 3, at=f"2024-01-0{1 + i % 7}T1{i % 10}:00:00+01:00")
        for i in range(50)
    ]
    payloads += ["{bad", ev("n", amount="NaN")]
    first, *_ = run(lake, payloads, part_size=9, prefix="one")
    second, *_ = run(lake, payloads, part_size=9, prefix="two")
    for name in ("valid", "rejects", "metrics"):
        assert getattr(first, name).sha256 == getattr(second, name).sha256
    assert first.top_reject_reasons == second.top_reject_reasons


def test_top_reject_reasons(lake):
    payloads = [ev(f"n{i}", amount=-i - 1) for i in range(3)] + [ev("c", currency="zzz"), "1"]
    res, *_ = run(lake, payloads)
    assert res.top_reject_reasons[0] == ("amount: amount must be >= 0", 3)
    assert len(res.top_reject_reasons) == 3


def test_empty_input(lake):
    res, valid, rejects, metrics = run(lake, [])
    assert (res.fetched, valid.height, rejects.height, metrics.height) == (0, 0, 0, 0)
    res2 = transform_week(lake, [], WEEK, "none")
    assert res2.fetched == 0 and res2.metrics.rows == 0


def test_bad_parts_are_named(lake):
    with pytest.raises(RawPartError, match="missing.parquet"):
        transform_week(lake, [lake.url("raw/missing.parquet")], WEEK, "out")
    lake.write_bytes("raw/garbage.parquet", b"not parquet at all")
    with pytest.raises(RawPartError, match="garbage.parquet.*not readable"):
        transform_week(lake, [lake.url("raw/garbage.parquet")], WEEK, "out")
    ref = lake.write_parquet(pl.DataFrame({"_seq": [0], "body": ["{}"]}), "raw/wrong.parquet")
    with pytest.raises(RawPartError, match="wrong.parquet.*_page, payload"):
        transform_week(lake, [ref], WEEK, "out")
    with pytest.raises(ConfigurationError, match="timezone"):
        transform_week(lake, [], WEEK, "out", timezone="Mars/Olympus")


# --- property: nothing is lost, and each record's fate matches the oracle -----------------------------

record_ids = st.sampled_from(["e1", "e2", "e3", " e1 ", "e4"])
hostile = st.one_of(
    st.builds(
        ev,
        record_ids,
        customer=st.sampled_from(["c1", "c2", "", None, 5]),
        event_type=st.sampled_from(["purchase", "refund", "page_view", "bogus"]),
        amount=st.one_of(st.floats(-1, 1e13, allow_nan=False), st.sampled_from(["12.50", "x", None, True])),
        currency=st.sampled_from(["usd", "eur", "USD", "xyz", 3]),
        at=st.sampled_from(
            [
                "2024-01-03T10:00:00Z",
                "2024-01-07T23:59:00-08:00",
                "2024-01-01T00:30:00+02:00",
                "2024-01-03T10:00:00",
                "1999-01-01T00:00:00Z",
                "2150-01-01T00:00:00Z",
            ]
        ),
    ),
    st.sampled_from(["{bad", "[]", '{"id": NaN}', "null", '"s"', '{"id":"e9","metadata":[1]}']),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(st.lists(hostile, max_size=30), st.integers(1, 10))
def test_every_record_ends_valid_or_rejected(tmp_path_factory, payloads, part_size):
    lake = LakeFS(tmp_path_factory.mktemp("lake").as_uri())
    res, valid, rejects, metrics = run(lake, payloads, part_size=part_size)
    assert res.fetched == len(payloads) == res.valid.rows + res.rejected + res.duplicates
    seqs = sorted(valid.get_column("_seq").to_list() + rejects.get_column("_seq").to_list())
    assert seqs == list(range(len(payloads)))  # each record exactly once
    assert rejects.get_column("reason").null_count() == 0
    bad = dict(zip(rejects.get_column("_seq"), rejects.get_column("field"), strict=True))
    for seq, payload in enumerate(payloads):
        record, field, _ = validate_payload(payload)
        if record is None:  # contract-invalid per the oracle -> rejected for that field
            assert bad.get(seq) == field
    assert metrics.get_column("Event_Count__c").sum() == valid.height
    assert valid.get_column("id").n_unique() == valid.height


def test_payloads_off_the_fast_reader_agree_with_the_contract(lake):
    """Payloads the NDJSON reader must not be trusted with (line breaks, carriage returns, \\u escapes, escaped
    or repeated keys, leading blanks, non-objects) end valid or rejected exactly as the contract's own parser says,
    whether the slow-path markers or the reader's row-count check send them to the per-row path."""
    good = json.loads(ev("e1"))
    payloads = [
        json.dumps(good, indent=2),  # line breaks between keys
        json.dumps({**good, "id": "e2"}).replace(", ", ",\r\n"),  # CRLF between keys
        json.dumps({**good, "id": "e\u00e93"}, ensure_ascii=True),  # an escape in a checked field
        json.dumps({**good, "id": "e4", "customer_id": "\u0001c"}, ensure_ascii=True),  # an escaped control char
        " \t" + json.dumps({**good, "id": "e5"}),  # leading blanks
        json.dumps({**good, "id": "e6", "metadata": {"note": "a\\u"}}),  # an escaped backslash before a u
        "[1, 2]",
        "\n" + json.dumps({**good, "id": "e8"}),
        json.dumps({**good, "id": "e9"}),  # the fast path, for contrast
        json.dumps({**good, "id": "e10"})[:-1] + ', "\\u0069d": 5}',  # an escaped key: the last "id" is a number
        json.dumps({**good, "id": "e11"})[:-1] + ',\r"customer_id": 7}',  # a bare CR before a second key
    ]
    res, valid, rejects, _ = run(lake, payloads)
    assert res.fetched == len(payloads) == valid.height + rejects.height
    fields = dict(zip(rejects.get_column("_seq"), rejects.get_column("field"), strict=True))
    expected_ids = set()
    for seq, payload in enumerate(payloads):
        record, field, _ = validate_payload(payload)
        assert fields.get(seq) == (None if record is not None else field), payload
        if record is not None:
            expected_ids.add(record.id)
    assert set(valid.get_column("id")) == expected_ids
    assert {"e1", "e2", "e\u00e93", "e5", "e6", "e8", "e9"} <= expected_ids  # the oracle takes them, too


def test_invalid_json_inside_a_large_chunk_is_isolated(lake, monkeypatch):
    import tasks.part_checks as part_checks
    import tasks.transform as transform
    import tasks.validation as validation

    monkeypatch.setattr(transform, "CHUNK_ROWS", 700)
    monkeypatch.setattr(validation, "CHUNK_ROWS", 700)  # several chunks, validated on the thread pool
    monkeypatch.setattr(part_checks, "CHUNK_ROWS", 700)
    payloads = [ev(f"e{i}", customer=f"c{i % 5}") for i in range(2000)]
    broken = {3: "{bad", 650: '{"id": NaN}', 1999: ev("x")[:-1], 1200: '{"id":"e1200"} trailing'}
    for seq, text in broken.items():
        payloads[seq] = text
    payloads[10] = ev("nested", metadata={"id": 1, "metadata": "x"})  # ambiguous keys -> slow path, still valid
    payloads[11] = json.dumps(json.loads(ev("pretty")), indent=2)  # raw newlines -> slow path, still valid
    payloads[12] = ev("é-escaped", customer="Zoë")  # \u escapes -> slow path, still valid
    res, valid, rejects, _ = run(lake, payloads, part_size=900)
    assert res.rejected == len(broken) and res.duplicates == 0
    assert rejects.select("_seq", "field").rows() == [(seq, "payload") for seq in sorted(broken)]
    kept = valid.filter(pl.col("_seq").is_in([10, 11, 12]))
    assert kept.get_column("id").to_list() == ["nested", "pretty", "é-escaped"]
    assert kept.get_column("customer_id").to_list()[2] == "Zoë"
    assert json.loads(kept.get_column("metadata")[0]) == {"id": 1, "metadata": "x"}


def test_metadata_is_kept_as_json_text(lake):
    _, valid, _, _ = run(lake, [ev("a", metadata={"k": "v", "n": [1, 2.5, None]}), ev("b", metadata=None), ev("c")])
    texts = valid.sort("_seq").get_column("metadata").to_list()
    assert json.loads(texts[0]) == {"k": "v", "n": [1, 2.5, None]}
    assert texts[1:] == [None, None]


MIXED = (
    [ev(f"e{i}", customer=f"c_{i % 4}", amount=i, currency="usd" if i % 9 else "eur") for i in range(60)]
    + [ev("e5", amount=99, at="2024-01-06T00:00:00Z"), ev("late", at="2024-01-08T00:00:01Z"), "{bad", "[]"]
    + [ev("neg", amount=-1), ev(7), ev("naive", at="2024-01-03T10:00:00")]
)


def outputs(lake, res):
    return {name: lake.read_parquet(getattr(res, name).url) for name in ("valid", "rejects", "metrics")}


def test_validated_parts_give_byte_identical_files(lake, mode):
    refs = write_parts(lake, MIXED, part_size=11)
    plain = transform_week(lake, refs, WEEK, "plain", timezone="Europe/Berlin")
    checked = prevalidate(lake, refs, "parts")
    reused = transform_week(lake, refs, WEEK, "reused", timezone="Europe/Berlin", validated=checked)
    counts = [(r.rejected, r.duplicates, r.valid.rows) for r in (plain, reused)]
    assert counts[0] == counts[1]
    assert plain.duplicates == 1 and plain.rejected >= 6  # the mix exercises every week-level rule
    for name in ("valid", "rejects", "metrics"):
        assert getattr(plain, name).sha256 == getattr(reused, name).sha256, name
    assert plain.top_reject_reasons == reused.top_reject_reasons


@pytest.mark.parametrize("damage", ["fingerprint", "raw_changed", "file_gone", "file_corrupt", "row_count"])
def test_stale_or_damaged_validated_parts_are_not_used(lake, mode, damage):
    refs = write_parts(lake, MIXED, part_size=25)
    expected = transform_week(lake, refs, WEEK, "plain")
    checked = prevalidate(lake, refs, "parts")
    bad = checked[1]
    if damage == "fingerprint":  # made by another version of the validation code
        checked[1] = bad.model_copy(update={"fingerprint": "0" * 16})
    elif damage == "raw_changed":  # the raw part was re-extracted since
        checked[1] = bad.model_copy(update={"raw": bad.raw.model_copy(update={"sha256": "f" * 64})})
    elif damage == "file_gone":
        lake.delete(bad.valid.url)
    elif damage == "file_corrupt":
        lake.write_bytes(bad.rejects.url, b"PAR1 not really")
    else:
        checked[1] = bad.model_copy(update={"raw": bad.raw.model_copy(update={"rows": bad.raw.rows + 1})})
    logger, lines = captured_logger()
    res = transform_week(lake, refs, WEEK, "again", validated=checked, logger=logger)
    for name in ("valid", "rejects", "metrics"):
        assert getattr(res, name).sha256 == getattr(expected, name).sha256, name
    assert res.fetched == len(MIXED)
    assert "used the contract check made during the extract for 2 of 3 raw parts" in lines.lines
    if damage in ("file_gone", "file_corrupt", "row_count"):
        assert any(line.startswith("not using the contract check made during the extract") for line in lines.lines)


def test_a_part_whose_check_cannot_be_stored_is_left_out(lake, mode, monkeypatch):
    refs = write_parts(lake, MIXED, part_size=25)
    real_write = lake.write_parquet

    def flaky(frame, rel, **kwargs):
        if "part-001" in rel:
            raise OSError("disk full")
        return real_write(frame, rel, **kwargs)

    monkeypatch.setattr(lake, "write_parquet", flaky)
    logger, lines = captured_logger()
    with PartValidator(lake, "parts", logger=logger) as validator:
        for ref in refs:
            validator.submit(ref, lake.read_parquet(ref.url))
        checked = validator.finish()
    assert [part.raw.url for part in checked] == [refs[0].url, refs[2].url]
    assert any("could not store the contract check of a raw part (OSError: disk full)" in line for line in lines.lines)
    monkeypatch.setattr(lake, "write_parquet", real_write)
    res = transform_week(lake, refs, WEEK, "out", validated=checked)
    assert res.fetched == len(MIXED) == res.valid.rows + res.rejected + res.duplicates


def test_fingerprint_follows_the_validation_code(monkeypatch, tmp_path):
    import tasks.validation as transform

    first = transform.validation_fingerprint()
    assert len(first) == 16 and first == transform.validation_fingerprint()
    transform.validation_fingerprint.cache_clear()
    monkeypatch.setattr(transform, "__file__", str(tmp_path / "validation.py"))  # sources not installed
    try:
        without_sources = transform.validation_fingerprint()
        assert without_sources != first and len(without_sources) == 16
        (tmp_path / "contract.py").write_text("# another contract\n")
        (tmp_path / "validation.py").write_text("# another validation\n")
        transform.validation_fingerprint.cache_clear()
        assert transform.validation_fingerprint() not in (first, without_sources)
    finally:
        transform.validation_fingerprint.cache_clear()
