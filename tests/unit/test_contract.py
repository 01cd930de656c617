"""The pydantic contract on its own, and the vectorized validator agreeing with it on every record."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.contract import CURRENCIES, EVENT_TYPES, EventRecord, validate_payload
from tasks.validation import extract_fields, validate_fields

GOOD = {
    "id": "evt_1",
    "customer_id": "c_42",
    "event_type": "purchase",
    "amount": 12.5,
    "currency": "usd",
    "occurred_at": "2024-01-03T10:00:00+02:00",
    "metadata": {"k": "v"},
}


def with_(**changes):
    record = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            record.pop(key, None)
        else:
            record[key] = value
    return json.dumps(record)


def vectorized(payloads: list[str | None]) -> list[tuple[str | None, str | None]]:
    raw = pl.DataFrame(
        {"_seq": range(len(payloads)), "_page": [0] * len(payloads), "payload": payloads},
        schema={"_seq": pl.Int64, "_page": pl.Int64, "payload": pl.String},
    )
    out = validate_fields(extract_fields(raw)).sort("_seq")
    return list(zip(out.get_column("_field").to_list(), out.get_column("_reason").to_list(), strict=True))


def test_good_record_is_normalized():
    record, field, reason = validate_payload(with_(id="  evt_1\t", currency=" usd ", amount="12.50"))
    assert field is None and reason is None
    assert record.id == "evt_1"
    assert record.currency == "USD"
    assert record.amount == 12.5
    assert record.occurred_at == datetime(2024, 1, 3, 8, 0, tzinfo=UTC)
    assert record.metadata == {"k": "v"}


def test_exports():
    assert EVENT_TYPES == ("page_view", "add_to_cart", "purchase", "refund", "subscription_renewal")
    assert {"USD", "EUR", "JPY", "GBP"} <= set(CURRENCIES)
    assert "XXX" not in CURRENCIES and all(len(c) == 3 and c.isupper() for c in CURRENCIES)


def test_extra_fields_are_ignored():
    record, field, _ = validate_payload(with_(extra=[1, 2], another={"x": None}))
    assert field is None
    assert not hasattr(record, "extra")


@pytest.mark.parametrize(
    ("payload", "field", "reason_start"),
    [
        ("not json", "payload", "payload is not valid JSON"),
        ('{"amount": NaN}', "payload", "payload is not valid JSON"),
        ('{"amount": 1e400}', "payload", "payload is not valid JSON"),
        ("[1, 2]", "payload", "payload must be a JSON object"),
        ("null", "payload", "payload must be a JSON object"),
        (with_(id=...), "id", "id is required"),
        (with_(id=None), "id", "id is required"),
        (with_(id=7), "id", "id must be a string"),
        (with_(id="   "), "id", "id must not be empty"),
        (with_(id="a\x00b"), "id", "id must not contain control characters"),
        (with_(id="x" * 256), "id", "id must be at most 255 characters"),
        (with_(customer_id=True), "customer_id", "customer_id must be a string"),
        (with_(event_type="Purchase"), "event_type", "event_type must be one of"),
        (with_(amount=-3), "amount", "amount must be >= 0, got -3"),
        (with_(amount="NaN"), "amount", "amount must be a number"),
        (with_(amount=True), "amount", "amount must be a number"),
        (with_(amount="1e400"), "amount", "amount must be finite"),
        (with_(amount=1e12), "amount", "amount must be < 1e12"),
        (with_(currency="usdx"), "currency", "currency must be a 3-letter ISO 4217 code"),
        (with_(currency="abc"), "currency", "currency must be an active ISO 4217 code"),
        (with_(occurred_at="2024-01-03T10:00:00"), "occurred_at", "occurred_at must include a timezone offset"),
        (with_(occurred_at="2024-01-03 10:00:00Z"), "occurred_at", "occurred_at must be an RFC 3339 timestamp"),
        (with_(occurred_at=1704268800), "occurred_at", "occurred_at must be a string"),
        (with_(occurred_at="2024-02-30T10:00:00Z"), "occurred_at", "occurred_at is not a valid date"),
        (with_(occurred_at="1969-12-31T23:59:59Z"), "occurred_at", "occurred_at must be in [1970-01-01"),
        (with_(metadata=[1]), "metadata", "metadata must be an object or null"),
        # the first failing field in contract order wins
        (with_(amount=-1, id=None), "id", "id is required"),
    ],
)
def test_rules_pydantic_and_vectorized(payload, field, reason_start):
    _, got_field, got_reason = validate_payload(payload)
    assert (got_field, got_reason[: len(reason_start)]) == (field, reason_start)
    [(v_field, v_reason)] = vectorized([payload])
    assert v_field == field
    if field not in ("occurred_at", "id", "customer_id") or "string" not in reason_start:
        assert v_reason.startswith(reason_start), v_reason


def test_boundaries():
    assert validate_payload(with_(amount=0))[1] is None
    assert validate_payload(with_(amount=999_999_999_999.99))[1] is None
    assert validate_payload(with_(occurred_at="2024-01-03T10:00:00.1234567-23:59"))[1] is None
    record = validate_payload(with_(occurred_at="2024-01-03T10:00:00.9999999Z"))[0]
    assert record.occurred_at.microsecond == 999_999  # truncated, not rounded
    assert validate_payload(with_(metadata=None))[1] is None
    assert validate_payload(with_(metadata=...))[1] is None
    # duplicate keys: the first value wins (as in Polars' reader)
    dup = '{"id":"a","id":"b","customer_id":"c","event_type":"refund","amount":1,"currency":"EUR",'
    dup += '"occurred_at":"2024-01-01T00:00:00Z"}'
    assert validate_payload(dup)[0].id == "a"


# --- property: the vectorized validator agrees with the pydantic oracle on every record ---------------

nasty_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", " ", "\t x \n", "\x00", "é", "日本", "\u2028", "{}", "[1]", "true", "12", "{", '"', "\\", "\ud800"]
)
ID_LOOKALIKES = ["12", "-1", "1e5", "true", "false", "[1]", "{x", "{}", "null", "evt_1", "tru", "truex"]
NON_STRINGS = [12, -1.5, True, False, [1], {"a": 1}, {}]


@pytest.mark.parametrize("field", ["id", "customer_id"])
def test_ids_that_read_like_other_json_types_are_told_apart_from_them(field):
    """A string id that reads like a number, a boolean, an array or an object is a valid id (its raw text shows
    the quotes), the JSON values themselves are rejected, with or without metadata in the record, and a
    reject's event_id is the id only when it was a string."""
    from tasks.validation import validate_chunk

    cases = [(v, True) for v in ID_LOOKALIKES] + [(v, False) for v in NON_STRINGS]
    payloads = [with_(**{field: value}) for value, _ in cases]
    payloads += [with_(**{field: value, "metadata": ...}) for value, _ in cases]
    expected = [validate_payload(p)[1] for p in payloads]
    assert [f for f, _ in vectorized(payloads)] == expected
    assert expected == [None if is_str else field for _, is_str in cases] * 2
    raw = pl.DataFrame({"_seq": range(len(payloads)), "_page": [0] * len(payloads), "payload": payloads})
    good, bad = validate_chunk(raw)
    assert good.height == 2 * len(ID_LOOKALIKES) and bad.height == 2 * len(NON_STRINGS)
    if field == "id":
        assert good.get_column("id").to_list() == ID_LOOKALIKES * 2
        assert bad.get_column("event_id").to_list() == [None] * len(bad)


@pytest.mark.parametrize(
    "metadata",
    [
        {"path": "C:\\dir\\file", "tab": "a\tb", "quote": 'say "hi"', "nl": "x\ny"},  # escapes in the source
        {"nested": {"id": 5, "metadata": [1, {"k": None}]}, "f": 1.5, "big": 2**70},
        {},
    ],
)
def test_metadata_is_stored_as_json_of_the_same_value(metadata):
    from tasks.validation import validate_chunk

    payloads = [with_(metadata=metadata), with_(metadata=metadata, id="evt_2") + " "]
    good, _ = validate_chunk(pl.DataFrame({"_seq": [0, 1], "_page": [0, 0], "payload": payloads}))
    assert [json.loads(text) for text in good.get_column("metadata")] == [metadata, metadata]


def test_metadata_that_is_a_string_reading_like_an_object_is_rejected():
    [(field, reason)] = vectorized([with_(metadata='{"k": "v"}')])
    assert (field, reason) == ("metadata", "metadata must be an object or null, got scalar")
    assert validate_payload(with_(metadata='{"k": "v"}'))[1] == "metadata"


json_scalar = st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=False) | nasty_text
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nasty_text, inner, max_size=3),
    max_leaves=6,
)

ids = st.sampled_from(["evt_1", "evt_2", " evt_3 ", "id", "metadata"]) | json_value
amounts = (
    st.floats(allow_nan=False, allow_infinity=False, min_value=-10, max_value=2e12)
    | st.integers(-5, 10**13)
    | st.sampled_from(["12.50", " 3 ", "1e3", "-0", ".5", "5.", "+1", "1e400", "NaN", "inf", "1_0", "0x1", "١٢"])
    | json_value
)
currencies = st.sampled_from(["usd", " EUR ", "JPY", "xxx", "usdd", "ıls", "ÉUR"]) | json_value
timestamps = (
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(lambda d: d.isoformat())
    | st.sampled_from(
        [
            "2024-01-03T10:00:00+02:00",
            "2024-01-07T23:59:59.999999-05:00",
            "2024-01-03T10:00:00Z",
            "2024-01-03T10:00:00z",
            "2024-01-03 10:00:00Z",
            "2024-01-03T10:00:60Z",
            "2024-01-03T24:00:00Z",
            "2024-02-29T12:00:00.5+23:59",
            "0000-01-01T00:00:00Z",
            "1970-01-01T00:30:00+01:00",
            "2099-12-31T23:59:59-01:00",
            "2024-01-03T10:00:00+24:00",
            "2024-01-03T10:00:00.1234567890Z",
            " 2024-01-03T10:00:00Z ",
        ]
    )
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
    | json_value
)
field_values = {
    "id": ids,
    "customer_id": ids,
    "event_type": st.sampled_from([*EVENT_TYPES, " refund ", "Refund", "other"]) | json_value,
    "amount": amounts,
    "currency": currencies,
    "occurred_at": timestamps,
    "metadata": st.dictionaries(nasty_text, json_value, max_size=3) | json_value,
}


@st.composite
def records(draw):
    record = {}
    for name, strategy in field_values.items():
        if draw(st.integers(0, 9)) == 0:
            continue  # missing field
        record[name] = draw(strategy) if draw(st.integers(0, 2)) == 0 else draw(_good_value(name))
    if draw(st.booleans()):
        record[draw(nasty_text)] = draw(json_value)  # extra field (may shadow a contract key)
    return record


def _good_value(name):
    return {
        "id": st.sampled_from(["evt_1", "evt_2", "e"]),
        "customer_id": st.sampled_from(["c_1", "c_2"]),
        "event_type": st.sampled_from(EVENT_TYPES),
        "amount": st.floats(0, 1000, allow_nan=False) | st.integers(0, 1000),
        "currency": st.sampled_from(["usd", "EUR", "jpy"]),
        "occurred_at": st.sampled_from(["2024-01-03T10:00:00+02:00", "2024-01-07T23:59:59Z"]),
        "metadata": st.none()
        | st.just({"k": "v"})
        | st.dictionaries(  # values with escapes in their JSON text (backslash, tab, quote), nested, a float
            st.sampled_from(["k", "path", "n", "id"]),
            st.sampled_from(["C:\\dir", "a\tb", 'say "hi"', "x/y", 1.5, 2, [1, {"z": None}], {"metadata": "m"}]),
            max_size=3,
        ),
    }[name]


@st.composite
def payloads(draw):
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(json_value.map(json.dumps))  # not (necessarily) an object; ASCII-escaped
    if kind == 1:
        text = draw(nasty_text)  # probably not JSON at all
        return text.encode("utf-8", "replace").decode("utf-8")
    record = draw(records())
    if kind == 2 and record:
        # NaN / Infinity tokens, pretty printing, non-ASCII escapes
        record["amount"] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    indent = draw(st.sampled_from([None, None, None, 1]))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    text = json.dumps(record, ensure_ascii=draw(st.booleans()), indent=indent, separators=separators)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a raw lone surrogate cannot be stored in Parquet; send it \u-escaped
        text = json.dumps(record, ensure_ascii=True, indent=indent, separators=separators)
    return text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(payloads(), min_size=1, max_size=40))
def test_vectorized_validator_agrees_with_pydantic_oracle(batch):
    got = vectorized(batch)
    assert len(got) == len(batch)
    for payload, (v_field, v_reason) in zip(batch, got, strict=True):
        record, field, reason = validate_payload(payload)
        assert v_field == field, (payload, v_reason, reason)
        assert (v_reason is None) == (reason is None)


def test_vectorized_normalizes_like_pydantic():
    batch = [
        with_(
            id=" a ",
            customer_id="\tc\n",
            currency=" jpy",
            amount="0012.50",
            occurred_at=" 2024-01-03T10:00:00.5-01:30 ",
        )
    ]
    raw = pl.DataFrame(
        {"_seq": [0], "_page": [3], "payload": batch},
        schema={"_seq": pl.Int64, "_page": pl.Int64, "payload": pl.String},
    )
    row = validate_fields(extract_fields(raw)).row(0, named=True)
    record = EventRecord.model_validate(json.loads(batch[0]))
    assert row["_field"] is None
    assert (row["id"], row["customer_id"], row["currency"], row["amount"]) == (
        record.id,
        record.customer_id,
        record.currency,
        record.amount,
    )
    assert row["occurred_at"] == record.occurred_at


def test_ids_that_read_like_numbers_stay_on_the_fast_path(monkeypatch):
    """Numeric-looking string ids (common in real APIs) are told apart by the raw text, not by the per-row parser."""
    import tasks.validation as validation

    slow_rows = []
    real = validation._slow_extract
    monkeypatch.setattr(validation, "_slow_extract", lambda frame: slow_rows.append(frame.height) or real(frame))
    payloads = [with_(id=str(n), customer_id=str(-n)) for n in range(50)] + [with_(id=7)]
    assert [f for f, _ in vectorized(payloads)] == [None] * 50 + ["id"]
    assert slow_rows == [1]  # only the number 7


def test_metadata_text_is_the_same_on_both_paths():
    """The per-row path (here: a \\u escape elsewhere in the record) renders metadata like Polars' reader does."""
    from tasks.validation import validate_chunk

    metadata = {"k": "v", "n": [1, 2, None], "o": {"a": True}}
    payloads = [with_(metadata=metadata), with_(metadata=metadata, note="é").replace("é", "\\u00e9")]
    assert "\\u00e9" in payloads[1]
    good, _ = validate_chunk(pl.DataFrame({"_seq": [0, 1], "_page": [0, 0], "payload": payloads}))
    fast, slow = good.get_column("metadata").to_list()
    assert fast == slow and json.loads(fast) == metadata


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(payloads(), min_size=1, max_size=40))
def test_vectorized_values_agree_with_pydantic_oracle(batch):
    """Not only which rows pass: every valid row's normalized values (metadata as the JSON value it reads back
    as) are the pydantic record's, and a reject's event_id is the payload's id when that was a JSON string."""
    from tasks.contract import parse_payload
    from tasks.validation import validate_chunk

    raw = pl.DataFrame(
        {"_seq": range(len(batch)), "_page": [0] * len(batch), "payload": batch},
        schema={"_seq": pl.Int64, "_page": pl.Int64, "payload": pl.String},
    )
    good, bad = validate_chunk(raw)
    rows = {row["_seq"]: row for row in good.iter_rows(named=True)}
    rejected = {row["_seq"]: row for row in bad.iter_rows(named=True)}
    assert set(rows) | set(rejected) == set(range(len(batch))) and not set(rows) & set(rejected)
    for seq, payload in enumerate(batch):
        record, _, _ = validate_payload(payload)
        if record is None:
            assert seq in rejected
            try:
                value = parse_payload(payload)
            except ValueError:
                value = None
            expected_id = value.get("id") if isinstance(value, dict) else None
            assert rejected[seq]["event_id"] == (expected_id if isinstance(expected_id, str) else None), payload
            continue
        row = rows[seq]
        got = (row["id"], row["customer_id"], row["event_type"], row["amount"], row["currency"], row["occurred_at"])
        want = (record.id, record.customer_id, record.event_type, record.amount, record.currency, record.occurred_at)
        assert got == want, payload
        assert (json.loads(row["metadata"]) if row["metadata"] is not None else None) == record.metadata, payload
