"""The contract check of raw event rows, vectorized in Polars, and its overlap with the extract.

Validation applies exactly the rules of :class:`tasks.contract.EventRecord` (the tests use the pydantic model
as the oracle on every record). How raw rows are checked (:func:`validate_chunk`):

1. Raw parts are cut into chunks of ``CHUNK_ROWS``, validated on small thread pools (Polars releases the
   GIL; most string kernels are single-threaded). Payloads the fast path cannot read unambiguously (not
   starting with ``{``, containing a raw newline or a ``\\u`` escape) are marked for the slow path.
2. Fast path: the chunk's payloads (slow rows blanked to ``{}`` to keep lines aligned) are written as NDJSON
   and read ONCE by ``pl.read_ndjson`` with an all-String schema (``ignore_errors=True``: a field of the wrong
   JSON type reads as its text). Whether ``id`` and ``customer_id`` were JSON strings is told by the value read
   where it can be (``evt_1`` cannot be the text of a number, boolean, array or object), else, like whether
   ``metadata`` was a JSON object, off the raw text with cheap literal checks (``"id":"`` present and ``"id"``
   occurring once). Rows where that is ambiguous (a nested key of the same name, odd spacing) go to the slow
   path, and so does metadata from a payload with a backslash (Polars' text of an object read as String drops
   the escapes).
   A chunk Polars refuses (invalid JSON somewhere) is bisected down to small row ranges, which go to the
   slow path.
3. Slow path (rare): :func:`tasks.contract.parse_payload` per row, producing the same columns, scattered
   back into the chunk's columns.
4. The contract rules run as one Polars expression chain giving the first failing check (contract order);
   the human reason strings are built for the failing rows only.

The check depends on nothing but the raw part, so it can run early: the weekly flow's extract hands each raw
part's rows to a :class:`tasks.part_checks.PartValidator` in slices of ``CHUNK_ROWS``, as soon as each slice is
buffered, which checks them on the cores the fetching leaves idle and stores the result next to the week's
staging files (:class:`tasks.models.ValidatedPart`, bound to the raw part's SHA-256 and to
:func:`validation_fingerprint`).
``tasks.transform.transform_week`` reuses those checks and validates only the raw parts that have none (or a
stale one).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from pathlib import Path

import polars as pl

from tasks.contract import (
    AMOUNT_MAX,
    AMOUNT_RE,
    CONTROL_CHARS_RE,
    CURRENCIES,
    CURRENCY_RE,
    CUSTOMER_ID_MAX_LEN,
    EVENT_TYPES,
    ID_MAX_LEN,
    TRIM_CHARS,
    TS_NAIVE_RE,
    TS_RE,
    json_text,
    json_type,
    parse_payload,
)

RAW_SCHEMA: dict[str, pl.DataType] = {"_seq": pl.Int64(), "_page": pl.Int64(), "payload": pl.String()}
TEXT_FIELDS = ("id", "customer_id", "event_type", "amount", "currency", "occurred_at", "metadata")
_READ_SCHEMA = {name: pl.String() for name in TEXT_FIELDS}
EXTRACT_SCHEMA: dict[str, pl.DataType] = {
    "_seq": pl.Int64(),
    "_page": pl.Int64(),
    "payload": pl.String(),
    "payload_error": pl.String(),
    **_READ_SCHEMA,
    "id_is_str": pl.Boolean(),
    "customer_id_is_str": pl.Boolean(),
    "metadata_is_obj": pl.Boolean(),
}
VALID_SCHEMA: dict[str, pl.DataType] = {
    "_seq": pl.Int64(),
    "_page": pl.Int64(),
    "id": pl.String(),
    "customer_id": pl.String(),
    "event_type": pl.String(),
    "amount": pl.Float64(),
    "currency": pl.String(),
    "occurred_at": pl.Datetime("us", "UTC"),
    "metadata": pl.String(),
}
SPOOL_SCHEMA: dict[str, pl.DataType] = {**VALID_SCHEMA, "_hash": pl.UInt64()}
"""Valid rows as spooled per chunk: VALID_SCHEMA plus the 64-bit hash of ``id`` (de-duplication pre-filter)."""
REJECT_SCHEMA: dict[str, pl.DataType] = {
    "_seq": pl.Int64(),
    "_page": pl.Int64(),
    "event_id": pl.String(),
    "field": pl.String(),
    "reason": pl.String(),
    "payload": pl.String(),
}

CHUNK_ROWS = 25_000
"""Rows validated per task. 25k rather than 50k: half the per-chunk working set (parsed strings, helper
columns), and the freed pages the allocator keeps per thread between chunks shrink with it (1M rows: peak
-~100 MB, same time within noise)."""
WORKERS = max(2, min(4, os.cpu_count() or 2))  # Polars releases the GIL; string kernels are single-threaded

_SLOW_CHUNK = 256

_log = logging.getLogger(__name__)

# --- extraction: payload text -> one String column per contract field ----------------------------


def _slow_extract(frame: pl.DataFrame) -> pl.DataFrame:
    """Per-row path with the contract's own JSON parser (rare rows only)."""
    rows = []
    for seq, page, payload in frame.select("_seq", "_page", "payload").iter_rows():
        try:
            value = parse_payload(payload)
        except ValueError as exc:
            rows.append((seq, page, payload, str(exc)) + (None,) * 10)
            continue
        if not isinstance(value, dict):
            error = f"payload must be a JSON object, got {json_type(value)}"
            rows.append((seq, page, payload, error) + (None,) * 10)
            continue
        texts = tuple(json_text(value.get(name)) for name in TEXT_FIELDS)
        flags = (
            isinstance(value.get("id"), str),
            isinstance(value.get("customer_id"), str),
            isinstance(value.get("metadata"), dict),
        )
        rows.append((seq, page, payload, None) + texts + flags)
    return pl.DataFrame(rows, schema=EXTRACT_SCHEMA, orient="row")


def _read_ndjson(lines: pl.Series) -> pl.DataFrame | None:
    """All-String read of payload lines; None when Polars refuses the block (invalid JSON in it)."""
    buf = io.BytesIO()
    lines.to_frame("payload").write_csv(buf, include_header=False, quote_style="never")
    try:
        out = pl.read_ndjson(io.BytesIO(buf.getvalue()), schema=_READ_SCHEMA, ignore_errors=True)
    except pl.exceptions.PolarsError:
        return None
    return out if out.height == lines.len() else None


def _unreadable_ranges(lines: pl.Series, start: int = 0) -> list[tuple[int, int]]:
    """Bisect a block Polars refuses down to small row ranges holding the invalid JSON."""
    if _read_ndjson(lines) is not None:
        return []
    if lines.len() <= _SLOW_CHUNK:
        return [(start, start + lines.len())]
    half = lines.len() // 2
    return _unreadable_ranges(lines.slice(0, half), start) + _unreadable_ranges(lines.slice(half), start + half)


def _key_checks(key: str, kind: str) -> pl.Expr:
    """True when the raw text shows, unambiguously, that top-level ``key`` holds a string ("s") or object ("o")."""
    token = f'"{key}"'
    opener = '"' if kind == "s" else "{"
    p = pl.col("payload")
    return (p.str.count_matches(token, literal=True) == 1) & (
        p.str.contains(f"{token}:{opener}", literal=True) | p.str.contains(f"{token}: {opener}", literal=True)
    )


_NON_STRING_TEXT = r"^(?:[-0-9\[{]|true$|false$)"
"""What a JSON number, boolean, array or object reads as in a String column: text that does not match this can only
have been a JSON string (null reads as null)."""


def _json_types(frame: pl.DataFrame) -> pl.DataFrame:
    """Add the flags that tell, where it is certain, that ``id``/``customer_id`` were JSON strings and ``metadata``
    a JSON object (False: not shown, the caller then asks the contract's parser).

    For the ids the value read proves it for most rows: an id read as ``evt_1`` cannot have been a number, a
    boolean, an array or an object. Only the rows where the value cannot tell (an id that reads like a number,
    ``true``, or starts with ``[`` or ``{``) get the raw-text scans of :func:`_key_checks`. Metadata read as text
    starting with ``{`` may have been an object or a string, so it is always scanned (when any row has one); and
    from a payload with a backslash it is never shown to be an object: Polars renders an object read as text
    without escaping again what the source escaped (lossy, not JSON), so the contract's parser must read it.
    """

    def plain(name: str) -> pl.Expr:
        return pl.col(name).is_not_null() & ~pl.col(name).str.contains(_NON_STRING_TEXT)

    flags = frame.select(
        plain("id").alias("id_is_str"),
        plain("customer_id").alias("customer_id_is_str"),
        (_key_checks("metadata", "o") & ~pl.col("payload").str.contains("\\", literal=True)).alias("metadata_is_obj")
        if frame.select(pl.col("metadata").str.starts_with("{").any()).item()
        else pl.repeat(False, frame.height, dtype=pl.Boolean).alias("metadata_is_obj"),
    )
    columns = []
    for name, flag in (("id", "id_is_str"), ("customer_id", "customer_id_is_str")):
        column = flags.get_column(flag)
        scan = (frame.get_column(name).is_not_null() & ~column).arg_true()
        if scan.len():  # the value cannot tell: the raw text may
            column.scatter(scan, frame[scan].select(_key_checks(name, "s")).to_series())
        columns.append(column)
    return frame.with_columns(*columns, flags.get_column("metadata_is_obj"))


def _needs_slow_path(raw: pl.DataFrame) -> pl.Series:
    p = pl.col("payload")
    return raw.select(
        (
            p.is_null()
            | ~p.str.strip_chars_start(" \t").str.starts_with("{")
            | p.str.contains(r"[\n\r]|\\u")  # a line break or a \u escape: one regex pass, not three scans
        ).fill_null(True)
    ).to_series()


def extract_fields(raw: pl.DataFrame) -> pl.DataFrame:
    """Raw rows (``_seq``, ``_page``, ``payload``) -> EXTRACT_SCHEMA, one row per input row, same order."""
    raw = raw.select("_seq", "_page", "payload")
    slow = _needs_slow_path(raw)

    def lines_for(mask: pl.Series) -> pl.Series:
        # slow rows are blanked to "{}" so the NDJSON lines stay aligned with the rows
        return raw.select(pl.when(mask).then(pl.lit("{}")).otherwise(pl.col("payload"))).to_series()

    decoded = _read_ndjson(lines_for(slow)) if raw.height else pl.DataFrame(schema=_READ_SCHEMA)
    if decoded is None:
        row = pl.int_range(raw.height, eager=True)
        for lo, hi in _unreadable_ranges(lines_for(slow)):
            slow = slow | ((row >= lo) & (row < hi))
        decoded = _read_ndjson(lines_for(slow))
        if decoded is None:  # cannot happen; stay correct anyway
            slow = pl.repeat(True, raw.height, eager=True)
            decoded = _read_ndjson(lines_for(slow))
    assert decoded is not None
    frame = _json_types(pl.concat([raw, decoded], how="horizontal")).with_columns(
        pl.lit(None, pl.String).alias("payload_error")
    )
    ambiguous = frame.select(
        (pl.col("id").is_not_null() & ~pl.col("id_is_str"))
        | (pl.col("customer_id").is_not_null() & ~pl.col("customer_id_is_str"))
        | (pl.col("metadata").is_not_null() & ~pl.col("metadata_is_obj"))
    ).to_series()
    index = (slow | ambiguous).arg_true()
    frame = frame.select(list(EXTRACT_SCHEMA))
    if index.len():
        patch = _slow_extract(raw[index])
        columns = []
        for name in EXTRACT_SCHEMA:
            if name in ("_seq", "_page", "payload"):
                continue
            column = frame.get_column(name).clone()
            column.scatter(index, patch.get_column(name))
            columns.append(column)
        frame = frame.with_columns(columns)
    return frame


# --- validation: the contract as Polars expressions ----------------------------------------------


def _got(expr: pl.Expr, limit: int = 60) -> pl.Expr:
    text = expr.fill_null("null")
    return pl.when(text.str.len_chars() > limit).then(text.str.slice(0, limit - 3) + "...").otherwise(text)


def _checks() -> list[tuple[str, pl.Expr, pl.Expr]]:
    """(field, failing condition, reason) in contract order; conditions are evaluated null-safe."""
    checks: list[tuple[str, pl.Expr, pl.Expr]] = [
        ("payload", pl.col("payload_error").is_not_null(), pl.col("payload_error")),
    ]
    for name, max_len in (("id", ID_MAX_LEN), ("customer_id", CUSTOMER_ID_MAX_LEN)):
        raw = pl.col(name)
        text = pl.col(f"_t_{name}")
        length = pl.col(f"_len_{name}")
        checks += [
            (name, raw.is_null(), pl.lit(f"{name} is required")),
            (name, ~pl.col(f"{name}_is_str"), pl.lit(f"{name} must be a string, got ") + _got(raw)),
            (name, length == 0, pl.lit(f"{name} must not be empty")),
            (
                name,
                length > max_len,
                pl.lit(f"{name} must be at most {max_len} characters, got ") + length.cast(pl.String),
            ),
            (
                name,
                text.str.contains(CONTROL_CHARS_RE),
                pl.lit(f"{name} must not contain control characters, got ") + _got(text),
            ),
        ]
    event_type = pl.col("event_type")
    checks += [
        ("event_type", event_type.is_null(), pl.lit("event_type is required")),
        (
            "event_type",
            ~pl.col("_t_event_type").is_in(EVENT_TYPES),
            pl.lit(f"event_type must be one of {', '.join(EVENT_TYPES)}, got ") + _got(event_type),
        ),
    ]
    amount = pl.col("amount")
    value = pl.col("_amount")
    checks += [
        ("amount", amount.is_null(), pl.lit("amount is required")),
        ("amount", ~pl.col("_amount_ok"), pl.lit("amount must be a number, got ") + _got(amount)),
        ("amount", ~value.is_finite(), pl.lit("amount must be finite, got ") + _got(amount)),
        ("amount", value < 0, pl.lit("amount must be >= 0, got ") + _got(amount)),
        ("amount", value >= AMOUNT_MAX, pl.lit("amount must be < 1e12, got ") + _got(amount)),
    ]
    currency = pl.col("currency")
    currency_text = pl.col("_t_currency")
    checks += [
        ("currency", currency.is_null(), pl.lit("currency is required")),
        (
            "currency",
            ~currency_text.str.contains(CURRENCY_RE),
            pl.lit("currency must be a 3-letter ISO 4217 code, got ") + _got(currency),
        ),
        (
            "currency",
            ~pl.col("_up_currency").is_in(CURRENCIES),
            pl.lit("currency must be an active ISO 4217 code, got ") + pl.col("_up_currency"),
        ),
    ]
    ts = pl.col("occurred_at")
    ts_text = pl.col("_ts")
    ts_ok = pl.col("_ts_ok")
    checks += [
        ("occurred_at", ts.is_null(), pl.lit("occurred_at is required")),
        (
            "occurred_at",
            ~ts_ok & ts_text.str.contains(TS_NAIVE_RE),
            pl.lit("occurred_at must include a timezone offset (naive timestamps are rejected), got ") + _got(ts),
        ),
        (
            "occurred_at",
            ~ts_ok,
            pl.lit("occurred_at must be an RFC 3339 timestamp, got ") + _got(ts),
        ),
        (
            "occurred_at",
            pl.col("_local").is_null(),
            pl.lit("occurred_at is not a valid date and time, got ") + _got(ts),
        ),
        (
            "occurred_at",
            (pl.col("_utc") < pl.datetime(1970, 1, 1)) | (pl.col("_utc") >= pl.datetime(2100, 1, 1)),
            pl.lit("occurred_at must be in [1970-01-01, 2100-01-01) UTC, got ") + _got(ts),
        ),
        (
            "metadata",
            pl.col("metadata").is_not_null() & ~pl.col("metadata_is_obj"),
            pl.lit("metadata must be an object or null, got ")
            + pl.when(pl.col("metadata").str.starts_with("[")).then(pl.lit("array")).otherwise(pl.lit("scalar")),
        ),
    ]
    return checks


_TRIMMED = ("id", "customer_id", "event_type", "amount", "currency")


def _derive(frame: pl.DataFrame) -> pl.DataFrame:
    """Add the parsed helper columns used by the checks and the normalized output (_amount, _local, _utc)."""
    frame = frame.with_columns(
        *[pl.col(name).str.strip_chars(TRIM_CHARS).alias(f"_t_{name}") for name in _TRIMMED],
        pl.col("occurred_at").str.strip_chars(TRIM_CHARS).alias("_ts"),
    )
    amount_text = pl.col("_t_amount")
    ts = pl.col("_ts")
    frame = frame.with_columns(
        pl.col("_t_id").str.len_chars().alias("_len_id"),
        pl.col("_t_customer_id").str.len_chars().alias("_len_customer_id"),
        pl.col("_t_currency").str.to_uppercase().alias("_up_currency"),
        amount_text.str.contains(AMOUNT_RE).alias("_amount_ok"),
        ts.str.contains(TS_RE).alias("_ts_ok"),
    )
    frame = frame.with_columns(
        pl.when(pl.col("_amount_ok")).then(amount_text.cast(pl.Float64, strict=False)).alias("_amount"),
        pl.when(pl.col("_ts_ok"))
        .then(ts.str.slice(0, 19).str.to_datetime("%Y-%m-%dT%H:%M:%S", strict=False, time_unit="us", cache=False))
        .alias("_local"),
    )
    zone = ts.str.slice(-6)  # "+HH:MM"/"-HH:MM", or the tail of a "...Z" timestamp
    offset_minutes = (
        pl.when(ts.str.ends_with("Z"))
        .then(0)
        .otherwise(
            pl.when(zone.str.starts_with("-")).then(-1).otherwise(1)
            * (
                zone.str.slice(1, 2).cast(pl.Int64, strict=False) * 60
                + zone.str.slice(4, 2).cast(pl.Int64, strict=False)
            )
        )
    )
    micros = (
        pl.when(ts.str.slice(19, 1) == ".")
        .then(ts.str.extract(r"^.{19}\.([0-9]{1,9})", 1).str.pad_end(6, "0").str.slice(0, 6).cast(pl.Int64))
        .otherwise(0)
    )
    return frame.with_columns(
        (pl.col("_local").cast(pl.Int64) + micros - offset_minutes * 60_000_000).cast(pl.Datetime("us")).alias("_utc")
    )


def _rule_expr(checks: list[tuple[str, pl.Expr, pl.Expr]]) -> pl.Expr:
    """Index of the first failing check (contract order) as a small integer; null when every check passes."""
    rule: pl.Expr | None = None
    for k, (_, condition, _) in enumerate(checks):
        cond = condition.fill_null(False)
        label = pl.lit(k, pl.Int16)
        rule = pl.when(cond).then(label) if rule is None else rule.when(cond).then(label)  # type: ignore[union-attr]
    assert rule is not None
    return rule.otherwise(pl.lit(None, pl.Int16))


_NORMALIZED = (
    pl.col("_t_id").alias("id"),
    pl.col("_t_customer_id").alias("customer_id"),
    pl.col("_t_event_type").alias("event_type"),
    pl.col("_amount").alias("amount"),
    pl.col("_up_currency").alias("currency"),
    pl.col("_utc").dt.replace_time_zone("UTC").alias("occurred_at"),
)


def _explain(failing: pl.DataFrame, checks: list[tuple[str, pl.Expr, pl.Expr]]) -> pl.DataFrame:
    """Rows with a ``_rule`` -> the same rows with ``_field`` and the human ``_reason`` (string building runs on
    the failing rows only)."""
    # Only the rules that occur get a branch: Polars evaluates every branch's text over all the given rows.
    present = failing.get_column("_rule").drop_nulls().unique().sort().to_list()
    reason: pl.Expr | None = None
    for k in present:
        hit, text = pl.col("_rule") == k, checks[k][2]
        reason = pl.when(hit).then(text) if reason is None else reason.when(hit).then(text)  # type: ignore[union-attr]
    if reason is None:  # no failing row
        reason = pl.lit(None, pl.String)
    field = pl.col("_rule").replace_strict(
        list(range(len(checks))), [name for name, _, _ in checks], default=None, return_dtype=pl.String
    )
    return failing.with_columns(field.alias("_field"), reason.alias("_reason"))


def _labelled(extracted: pl.DataFrame, checks: list[tuple[str, pl.Expr, pl.Expr]]) -> pl.DataFrame:
    return _derive(extracted.lazy()).with_columns(_rule_expr(checks).alias("_rule")).collect()


def validate_fields(extracted: pl.DataFrame) -> pl.DataFrame:
    """EXTRACT_SCHEMA -> same rows with ``_field``/``_reason`` (null when valid) and normalized VALID_SCHEMA columns.

    The first failing check is found with cheap integer labels over all rows; the human reasons (string
    building) are only computed for the failing rows.
    """
    checks = _checks()
    labelled = _labelled(extracted, checks)
    failing = labelled.get_column("_rule").is_not_null().arg_true()
    fields = pl.repeat(None, labelled.height, dtype=pl.String, eager=True).alias("_field")
    reasons = pl.repeat(None, labelled.height, dtype=pl.String, eager=True).alias("_reason")
    if failing.len():
        explained = _explain(labelled[failing], checks)
        fields.scatter(failing, explained.get_column("_field"))
        reasons.scatter(failing, explained.get_column("_reason"))
    return labelled.with_columns(fields, reasons, *_NORMALIZED)


def reject_rows(frame: pl.DataFrame, field: pl.Expr, reason: pl.Expr) -> pl.DataFrame:
    event_id = pl.when(pl.col("id_is_str")).then(pl.col("id")) if "id_is_str" in frame.columns else pl.col("id")
    return frame.select(
        "_seq", "_page", event_id.alias("event_id"), field.alias("field"), reason.alias("reason"), "payload"
    ).cast(REJECT_SCHEMA)


def validate_chunk(chunk: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The contract check of raw rows: (valid rows in SPOOL_SCHEMA, rejects in REJECT_SCHEMA).

    The window, the de-duplication and the currency rule are week-level rules applied by :func:`transform_week`.
    The outputs may be views that pin the chunk's string buffers: write them out rather than hold many of them.
    """
    checks = _checks()
    labelled = _labelled(extract_fields(chunk), checks)
    failed = pl.col("_rule").is_not_null()
    explained = _explain(labelled.filter(failed), checks)
    rejects = reject_rows(explained, pl.col("_field"), pl.col("_reason"))
    # the id hash is computed here, per chunk, so the de-duplication reads 16 bytes per row back, not the ids
    good = (
        labelled.lazy()
        .filter(~failed)
        .select(*_NORMALIZED, "_seq", "_page", "metadata")
        .select(*VALID_SCHEMA, pl.col("id").hash().alias("_hash"))
        .collect()
    )
    return good, rejects


# --- what decides a check's output ------------------------------------------------------------------


@functools.cache
def validation_fingerprint() -> str:
    """Hash of what decides a contract check's output: this module, the contract, and the Polars version (the
    id hash of the de-duplication is Polars' own). A :class:`ValidatedPart` made with another one is ignored."""
    digest = hashlib.sha256(pl.__version__.encode())
    here = Path(__file__).resolve().parent
    try:
        for name in ("contract.py", "validation.py"):
            digest.update((here / name).read_bytes())
    except OSError:  # installed without sources (e.g. .pyc only): the package version stands in for them
        digest.update(b"version:" + _package_version().encode())
    return digest.hexdigest()[:16]


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("weekly-etl")
    except PackageNotFoundError:
        return "unknown"
