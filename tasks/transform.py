"""Validate and transform one week of raw events into valid events, rejects and Salesforce-shaped metrics.

Validation is vectorized in Polars and applies exactly the rules of :class:`tasks.contract.EventRecord`
(the tests use the pydantic model as the oracle on every record). How a raw part is processed:

1. Each part is cut into chunks of ``CHUNK_ROWS``, validated by a small thread pool (Polars releases the
   GIL; most string kernels are single-threaded), results collected in submission order (deterministic).
   Payloads the fast path cannot read unambiguously (not starting with ``{``, containing a raw newline or
   a ``\\u`` escape) are marked for the slow path.
2. Fast path: the chunk's payloads (slow rows blanked to ``{}`` to keep lines aligned) are written as NDJSON
   and read ONCE by ``pl.read_ndjson`` with an all-String schema (``ignore_errors=True``: a field of the wrong
   JSON type reads as its text). Whether ``id`` and ``customer_id`` were JSON strings and ``metadata`` a JSON
   object is read off the raw text with cheap literal checks (``"id":"`` present and ``"id"`` occurring
   once). Rows where that is ambiguous (a nested key of the same name, odd spacing) go to the slow path.
   A chunk Polars refuses (invalid JSON somewhere) is bisected down to small row ranges, which go to the
   slow path.
3. Slow path (rare): :func:`tasks.contract.parse_payload` per row, producing the same columns, scattered
   back into the chunk's columns.
4. The contract rules run as one Polars expression chain giving the first failing check (contract order);
   the human reason strings are built for the failing rows only.

Steps 1-4 depend on nothing but the raw part, so they can run early: the weekly flow's extract hands each raw
part to a :class:`PartValidator` as soon as it is written, which checks it on the cores the fetching leaves idle
and stores the result next to the week's staging files (:class:`tasks.models.ValidatedPart`, bound to the raw
part's SHA-256 and to :func:`validation_fingerprint`). :func:`transform_week` then reuses those checks and only
validates the raw parts that have none (or a stale one).

Then, over the whole week and in this order: window (local date of ``occurred_at`` in ``timezone`` within the
window, else rejected), de-duplication by event id (latest ``occurred_at`` wins, ties -> highest ``_seq``; the
others go to rejects as ``duplicates``), the currency rule (per customer-week the currency with most events
wins, ties -> alphabetical; other currencies' events are rejected), then aggregation.

``Total_Amount__c`` = sum(purchase + subscription_renewal amounts) - sum(refund amounts); summed exactly in
integer micro-units (amount rounded to 6 decimals) and rounded to 2 decimals at the end, so the figure does not
depend on row order. Valid rows of each chunk are spooled (without payload) to a local temporary Parquet
file; the raw payloads of the week are never all in memory at once (the few payloads needed for window,
duplicate and currency rejects are read back from the raw parts), and neither are the week's valid rows: de-duplication,
the currency rule, the valid file (``sink_parquet`` to a local spool file, then one lake write) and the
aggregation scan the spool files lazily, so memory stays flat in the week's size (the de-duplication keeps a
64-bit id hash and ``_seq`` per row). Each chunk's rejects are spooled too (see :func:`_process_chunk`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

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
from tasks.errors import (
    ConfigurationError,
    IntegrityError,
    LakeUnavailableError,
    RawPartError,
    redact_text,
    redact_url,
)
from tasks.lake import LakeFS, sha256_bytes
from tasks.models import FileRef, TransformResult, ValidatedPart, Window

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
COUNT_COLUMNS = {
    "page_view": "Page_View_Count__c",
    "add_to_cart": "Add_To_Cart_Count__c",
    "purchase": "Purchase_Count__c",
    "refund": "Refund_Count__c",
    "subscription_renewal": "Subscription_Renewal_Count__c",
}
METRICS_SCHEMA: dict[str, pl.DataType] = {
    "External_Id__c": pl.String(),
    "Customer_Id__c": pl.String(),
    "Week_Start__c": pl.Date(),
    **{col: pl.Int64() for col in COUNT_COLUMNS.values()},
    "Event_Count__c": pl.Int64(),
    "Total_Amount__c": pl.Float64(),
    "Currency__c": pl.String(),
    "Last_Event_At__c": pl.Datetime("us", "UTC"),
}
DUPLICATE_REASON = "duplicate of a later record"
CHUNK_ROWS = 25_000
"""Rows validated per task. 25k rather than 50k: half the per-chunk working set (parsed strings, helper
columns), and the freed pages the allocator keeps per thread between chunks shrink with it (1M rows: peak
-~100 MB, same time within noise)."""
WORKERS = max(2, min(4, os.cpu_count() or 2))  # Polars releases the GIL; string kernels are single-threaded
MAX_PENDING = WORKERS
"""Chunks submitted and not yet collected: one per worker, none queued (a queued chunk holds its raw slice and,
more costly, spreads the work over more short-lived allocations: peak RSS grew with the number of chunks)."""
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


def _needs_slow_path(raw: pl.DataFrame) -> pl.Series:
    p = pl.col("payload")
    return raw.select(
        (
            p.is_null()
            | ~p.str.strip_chars(" \t").str.starts_with("{")
            | p.str.contains("\n", literal=True)
            | p.str.contains("\r", literal=True)
            | p.str.contains("\\u", literal=True)
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
    frame = pl.concat([raw, decoded], how="horizontal").with_columns(
        pl.lit(None, pl.String).alias("payload_error"),
        _key_checks("id", "s").alias("id_is_str"),
        _key_checks("customer_id", "s").alias("customer_id_is_str"),
        _key_checks("metadata", "o").alias("metadata_is_obj"),
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
    reason: pl.Expr | None = None
    for k, (_, _, text) in enumerate(checks):
        hit = pl.col("_rule") == k
        reason = pl.when(hit).then(text) if reason is None else reason.when(hit).then(text)  # type: ignore[union-attr]
    assert reason is not None
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


def _reject_rows(frame: pl.DataFrame, field: pl.Expr, reason: pl.Expr) -> pl.DataFrame:
    event_id = pl.when(pl.col("id_is_str")).then(pl.col("id")) if "id_is_str" in frame.columns else pl.col("id")
    return frame.select(
        "_seq", "_page", event_id.alias("event_id"), field.alias("field"), reason.alias("reason"), "payload"
    ).cast(REJECT_SCHEMA)


# --- the stage ------------------------------------------------------------------------------------


def _read_raw(lake: LakeFS, url: str, seqs: pl.Series | None = None) -> pl.DataFrame:
    """One raw part in RAW_SCHEMA; only the rows whose ``_seq`` is in ``seqs`` when given."""
    try:
        if seqs is None:
            frame = lake.read_parquet(url)
        else:
            # The predicate goes into the Parquet reader, which then decodes only the wanted rows. Filtering an
            # eager read instead returns String views that pin the whole part's payload buffer (~10 MB a part).
            wanted = pl.col("_seq").is_in(seqs.implode())
            frame = pl.scan_parquet(io.BytesIO(lake.read_bytes(url))).filter(wanted).collect()
    except FileNotFoundError as exc:
        raise RawPartError(url, "raw part does not exist") from exc
    except (ConnectionError, TimeoutError) as exc:
        raise LakeUnavailableError(f"lake unreachable while reading raw part {url}") from exc
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise RawPartError(url, f"raw part is not readable Parquet ({type(exc).__name__})") from exc
    missing = [name for name in RAW_SCHEMA if name not in frame.columns]
    if missing:
        raise RawPartError(url, f"raw part lacks the raw column(s) {', '.join(missing)}")
    try:
        return frame.select(pl.col(name).cast(dtype, strict=True) for name, dtype in RAW_SCHEMA.items())
    except pl.exceptions.PolarsError as exc:
        raise RawPartError(url, f"raw part has wrong column types {dict(frame.schema)}") from exc


def _window_split(scan: pl.LazyFrame, window: Window, timezone: str) -> tuple[pl.LazyFrame, pl.DataFrame]:
    """(rows whose local date of ``occurred_at`` in ``timezone`` is in the window, the others' ``_seq``/``id``/day)."""
    local_day = pl.col("occurred_at").dt.convert_time_zone(timezone).dt.date()
    inside = local_day.is_between(pl.lit(window.start), pl.lit(window.end), closed="both")
    outside = scan.filter(~inside).select("_seq", "id", local_day.cast(pl.String).alias("_day")).collect()
    return (scan.filter(inside) if outside.height else scan), outside


def validate_chunk(chunk: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The contract check of raw rows: (valid rows in SPOOL_SCHEMA, rejects in REJECT_SCHEMA).

    The window, the de-duplication and the currency rule are week-level rules applied by :func:`transform_week`.
    The outputs may be views that pin the chunk's string buffers: write them out rather than hold many of them.
    """
    checks = _checks()
    labelled = _labelled(extract_fields(chunk), checks)
    failed = pl.col("_rule").is_not_null()
    explained = _explain(labelled.filter(failed), checks)
    rejects = _reject_rows(explained, pl.col("_field"), pl.col("_reason"))
    # the id hash is computed here, per chunk, so the de-duplication reads 16 bytes per row back, not the ids
    good = (
        labelled.lazy()
        .filter(~failed)
        .select(*_NORMALIZED, "_seq", "_page", "metadata")
        .select(*VALID_SCHEMA, pl.col("id").hash().alias("_hash"))
        .collect()
    )
    return good, rejects


def _process_chunk(chunk: pl.DataFrame, target: Path, reject_target: Path) -> None:
    """Validate one chunk; spool its valid rows to ``target`` and its rejects to ``reject_target``.

    Rejects are spooled rather than returned: a filtered String column is a view that keeps the whole chunk's
    string buffers alive (payloads and all parsed fields), so holding each chunk's few rejects in memory made the
    transform's RSS grow by ~14 MB per 50,000-row chunk. Written to Parquet, only the rejected rows' bytes remain.
    """
    good, rejects = validate_chunk(chunk)
    good.write_parquet(target, compression="lz4")
    rejects.write_parquet(reject_target, compression="lz4")


def _raw_rows(lake: LakeFS, urls: list[str], seqs: pl.Series) -> pl.DataFrame:
    """Raw rows (with their payload) for the given ``_seq`` values, read back from the raw parts."""
    found = [pl.DataFrame(schema=RAW_SCHEMA)]
    if seqs.len():
        for url in urls:
            found.append(_read_raw(lake, url, seqs))
    return pl.concat(found)


# --- validation while the extract runs ------------------------------------------------------------


@functools.cache
def validation_fingerprint() -> str:
    """Hash of what decides a contract check's output: this module, the contract, and the Polars version (the
    id hash of the de-duplication is Polars' own). A :class:`ValidatedPart` made with another one is ignored."""
    digest = hashlib.sha256(pl.__version__.encode())
    here = Path(__file__).resolve().parent
    try:
        for name in ("contract.py", "transform.py"):
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


class PartValidator:
    """Runs the contract check of each raw part while the extract is still fetching the next ones.

    The extract calls :meth:`submit` with each raw part it has written (from its writer thread, see
    ``tasks.extract.extract_window(on_part=...)``). The part is cut into ``CHUNK_ROWS`` chunks for a pool of
    ``workers`` threads (Polars releases the GIL, so this runs on the cores the fetch leaves idle). A writer thread
    then stores each part's results as two files, ``{prefix}/<part>.valid.parquet`` and ``.rejects.parquet``
    (lz4). :meth:`finish` returns one :class:`ValidatedPart` per part whose files were stored; the transform stage
    uses them instead of validating those raw parts again. This is only an optimization: a part whose files could
    not be stored is left out with a warning, and the transform validates it from the raw part.

    Memory: at most ``workers`` chunks are being validated; :meth:`submit` blocks beyond that, which slows the
    extract down rather than letting results pile up. Use as a context manager (or call :meth:`close`): leaving
    it stops the threads, cancelling what has not started.
    """

    def __init__(
        self,
        lake: LakeFS,
        prefix: str,
        *,
        workers: int = WORKERS,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> None:
        self.lake = lake
        self.prefix = prefix.rstrip("/")
        self.log = logger or _log
        self.fingerprint = validation_fingerprint()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="validate")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="validate-store")
        self._slots = threading.Semaphore(workers)
        self._parts: list[Future[ValidatedPart]] = []

    def __enter__(self) -> PartValidator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, ref: FileRef, frame: pl.DataFrame) -> None:
        """Validate the raw part ``ref`` whose rows are ``frame`` (RAW_SCHEMA); returns once its chunks are queued."""
        chunks: list[Future[tuple[pl.DataFrame, pl.DataFrame]]] = []
        for offset in range(0, frame.height, CHUNK_ROWS):
            self._slots.acquire()
            try:
                future = self._pool.submit(validate_chunk, frame.slice(offset, CHUNK_ROWS))
            except BaseException:
                self._slots.release()
                raise
            future.add_done_callback(lambda _done: self._slots.release())
            chunks.append(future)
        self._parts.append(self._writer.submit(self._store, ref, chunks))

    def _store(self, ref: FileRef, chunks: list[Future[tuple[pl.DataFrame, pl.DataFrame]]]) -> ValidatedPart:
        results = [future.result() for future in chunks]
        valid = pl.concat([good for good, _ in results]) if results else pl.DataFrame(schema=SPOOL_SCHEMA)
        rejects = pl.concat([bad for _, bad in results]) if results else pl.DataFrame(schema=REJECT_SCHEMA)
        stem = f"{self.prefix}/{PurePosixPath(ref.url).name.removesuffix('.parquet')}"
        valid_ref = self.lake.write_parquet(valid, f"{stem}.valid.parquet", compression="lz4")
        rejects_ref = self.lake.write_parquet(rejects, f"{stem}.rejects.parquet", compression="lz4")
        return ValidatedPart(
            raw_url=ref.url,
            raw_sha256=ref.sha256,
            raw_rows=ref.rows,
            valid=valid_ref,
            rejects=rejects_ref,
            fingerprint=self.fingerprint,
        )

    def finish(self) -> list[ValidatedPart]:
        """Wait for every submitted part; the ones stored, in submission order."""
        done: list[ValidatedPart] = []
        try:
            for future in self._parts:
                try:
                    done.append(future.result())
                except Exception as exc:  # noqa: BLE001 - an optimization failed; the transform redoes the part
                    self.log.warning(
                        "could not store the contract check of a raw part (%s: %s); the transform will validate "
                        "that part itself",
                        type(exc).__name__,
                        redact_text(str(exc))[:300],
                    )
        finally:
            self.close()
        return done

    def close(self) -> None:
        """Stop the threads: chunks not started are cancelled, running ones finish (nothing is stored after)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=True)


def _take_validated(lake: LakeFS, part: ValidatedPart, targets: tuple[Path, Path], log: Any) -> bool:
    """Copy a ValidatedPart's two files into the spool; False (and nothing copied) when they are not usable."""
    problem = None
    if part.valid.rows + part.rejects.rows != part.raw_rows:
        problem = f"row counts {part.valid.rows} + {part.rejects.rows} != raw part's {part.raw_rows}"
    else:
        try:
            for ref, target in zip((part.valid, part.rejects), targets, strict=True):
                data = lake.read_bytes(ref.url)
                if sha256_bytes(data) != ref.sha256:
                    problem = f"{redact_url(ref.url)} does not match its SHA-256"
                    break
                target.write_bytes(data)
        except FileNotFoundError:
            problem = "its files are gone"
    if problem is None:
        return True
    for target in targets:
        target.unlink(missing_ok=True)
    log.warning("not using the contract check made during the extract for %s: %s", redact_url(part.raw_url), problem)
    return False


def transform_week(
    lake: LakeFS,
    raw_files: Sequence[FileRef] | Sequence[str],
    window: Window,
    out_prefix: str,
    *,
    timezone: str = "UTC",
    validated: Sequence[ValidatedPart] = (),
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> TransformResult:
    """Validate, de-duplicate and aggregate one week of raw parts; write valid/rejects/metrics Parquet files.

    ``validated``: contract checks already made for some raw parts (:class:`PartValidator`, during the extract).
    One is used when it names a raw part given here with the same SHA-256 and was made by the same validation
    code; every other raw part is read and validated here.
    """
    log = logger or _log
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError("timezone", f"unknown IANA timezone {timezone!r}") from exc
    urls = [ref.url if isinstance(ref, FileRef) else str(ref) for ref in raw_files]
    checked = {part.raw_url: part for part in validated if part.fingerprint == validation_fingerprint()}
    fetched = reused = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transform-") as spool_dir, ThreadPoolExecutor(WORKERS) as pool:
        spool = Path(spool_dir) / "valid"
        reject_spool = Path(spool_dir) / "rejects"
        spool.mkdir()
        reject_spool.mkdir()
        pending: deque[Future[None]] = deque()
        for part_no, (ref, url) in enumerate(zip(raw_files, urls, strict=True)):
            part = checked.get(url)
            name = f"{part_no:06d}-{0:012d}.parquet"
            if (
                part is not None
                and isinstance(ref, FileRef)
                and part.raw_sha256 == ref.sha256
                and _take_validated(lake, part, (spool / name, reject_spool / name), log)
            ):
                fetched += part.raw_rows
                reused += 1
                continue
            raw = _read_raw(lake, url)
            fetched += raw.height
            for offset in range(0, raw.height, CHUNK_ROWS):
                name = f"{part_no:06d}-{offset:012d}.parquet"
                chunk = raw.slice(offset, CHUNK_ROWS)
                pending.append(pool.submit(_process_chunk, chunk, spool / name, reject_spool / name))
                while len(pending) > MAX_PENDING:  # bounded memory: at most a few chunks in flight
                    pending.popleft().result()
            log.info("read raw part %d/%d (%d rows)", part_no + 1, len(urls), raw.height)
            del raw
        while pending:
            pending.popleft().result()
        if reused:
            log.info("used the contract check made during the extract for %d of %d raw parts", reused, len(urls))
        spooled = sorted(spool.glob("*.parquet"))
        reject_files = sorted(reject_spool.glob("*.parquet"))
        contract_rejects = [pl.read_parquet(reject_files, schema=REJECT_SCHEMA)] if reject_files else []
        validated_at = time.perf_counter()
        # The valid rows stay in the spool files: every step below scans them lazily (Polars streams the
        # scans), so memory does not grow with the week beyond 16 bytes per row for the de-duplication keys.
        spool_scan = pl.scan_parquet(spooled, schema=SPOOL_SCHEMA) if spooled else pl.LazyFrame(schema=SPOOL_SCHEMA)

        # Window: the local date of occurred_at (in the settings' timezone) must be in the batch week.
        in_window, outside = _window_split(spool_scan, window, timezone)

        # De-duplicate: latest occurred_at wins, ties -> highest _seq (received last).
        # A 64-bit hash pre-filter keeps the exact string comparison to the (few) candidate rows.
        keys = in_window.select("_seq", "_hash").collect()
        in_seq_order = keys.get_column("_seq").is_sorted()  # raw parts given in receive order (the usual case)
        # Repeated hashes by sorting (8 bytes a row, ~10 MB at 1M rows) rather than is_duplicated(), whose hash
        # table took ~100 MB at 1M rows and so made the transform's peak memory grow with the week.
        hashes = keys.get_column("_hash").sort()
        del keys
        repeated = hashes.filter(hashes == hashes.shift(1)).unique()
        del hashes
        candidates = (
            in_window.filter(pl.col("_hash").is_in(repeated.implode())).select("_seq", "id", "occurred_at")
        ).collect()
        superseded = (
            candidates.sort(["occurred_at", "_seq"]).filter(~pl.col("id").is_last_distinct()).select("_seq", "id")
        )
        kept = in_window
        if superseded.height:
            kept = kept.filter(~pl.col("_seq").is_in(superseded.get_column("_seq").implode()))
        del candidates

        # Currency: per customer-week keep the currency with most events (ties -> alphabetical).
        per_currency = kept.group_by("customer_id", "currency").len().collect()
        if per_currency.height > per_currency.get_column("customer_id").n_unique():
            dominant = (
                per_currency.sort(["customer_id", "len", "currency"], descending=[False, True, False])
                .group_by("customer_id", maintain_order=True)
                .first()
                .select("customer_id", pl.col("currency").alias("_dominant"))
            )
            mixed = (
                kept.join(dominant.lazy(), on="customer_id", how="left")
                .filter(pl.col("currency") != pl.col("_dominant"))
                .select("_seq", "id", "currency", "_dominant")
                .collect()
                .sort("_seq")
            )
            kept = kept.filter(~pl.col("_seq").is_in(mixed.get_column("_seq").implode()))
        else:
            mixed = pl.DataFrame(
                schema={"_seq": pl.Int64(), "id": pl.String(), "currency": pl.String(), "_dominant": pl.String()}
            )
        kept = kept.select(list(VALID_SCHEMA))
        if not in_seq_order:  # raw parts out of receive order: sorting needs the valid rows in memory
            kept = kept.sort("_seq")
        valid_file = Path(spool_dir) / "valid.parquet"
        kept.sink_parquet(valid_file, compression="zstd")
        valid_rows = pl.scan_parquet(valid_file).select(pl.len()).collect().item()

        wanted = pl.concat([superseded.get_column("_seq"), mixed.get_column("_seq"), outside.get_column("_seq")])
        payloads = _raw_rows(lake, urls, wanted)
        outside_rejects = _reject_rows(
            payloads.join(outside, on="_seq", how="inner"),
            pl.lit("occurred_at"),
            pl.lit(f"occurred_at is outside the batch window {window.start}..{window.end} ({timezone}), got ")
            + pl.col("_day"),
        )
        dup_rejects = _reject_rows(
            payloads.join(superseded, on="_seq", how="inner"),
            pl.lit("id"),
            pl.lit(DUPLICATE_REASON),
        )
        currency_rejects = _reject_rows(
            payloads.join(mixed, on="_seq", how="inner"),
            pl.lit("currency"),
            pl.lit("customer mixes currencies in the week, kept the dominant currency ")
            + pl.col("_dominant")
            + pl.lit(" (most events, ties alphabetical), got ")
            + pl.col("currency"),
        )
        counted = pl.concat([*contract_rejects, outside_rejects, currency_rejects], how="vertical")
        rejects = pl.concat([counted, dup_rejects]).sort("_seq")
        rejected, duplicates = counted.height, dup_rejects.height
        if fetched != valid_rows + rejected + duplicates:
            raise IntegrityError(
                f"transform lost or duplicated rows: fetched {fetched} != valid {valid_rows} + rejected {rejected} "
                f"+ duplicates {duplicates}"
            )
        if rejects.get_column("_seq").n_unique() != rejects.height:
            raise IntegrityError("transform rejected the same record twice")

        metrics = aggregate_metrics(pl.scan_parquet(valid_file), window)
        ruled = time.perf_counter()
        top = (
            counted.group_by(pl.col("field") + pl.lit(": ") + pl.col("reason").str.split(", got ").list.first())
            .len()
            .sort(["len", "field"], descending=[True, False])
            .head(10)
        )
        prefix = out_prefix.rstrip("/")
        valid_ref = lake.write_bytes(f"{prefix}/valid.parquet", valid_file.read_bytes(), rows=valid_rows)
        rejects_ref = lake.write_parquet(rejects, f"{prefix}/rejects.parquet")
        metrics_ref = lake.write_parquet(metrics, f"{prefix}/metrics.parquet")
    done = time.perf_counter()
    log.info(
        "transform %s: fetched=%d valid=%d rejected=%d duplicates=%d customers=%d "
        "(validate %.2fs, dedup/currency/aggregate %.2fs, write %.2fs)",
        window.label,
        fetched,
        valid_rows,
        rejected,
        duplicates,
        metrics.height,
        validated_at - started,
        ruled - validated_at,
        done - ruled,
    )
    return TransformResult(
        window=window,
        fetched=fetched,
        valid=valid_ref,
        rejects=rejects_ref,
        metrics=metrics_ref,
        rejected=rejected,
        duplicates=duplicates,
        top_reject_reasons=[(key, int(n)) for key, n in top.iter_rows()],
    )


def aggregate_metrics(valid: pl.DataFrame | pl.LazyFrame, window: Window) -> pl.DataFrame:
    """One row per customer for the week, Salesforce API names, sorted by ``External_Id__c``.

    ``valid`` may be lazy (e.g. a scan of the valid rows' file): the group-by then streams.
    """
    week: date = window.start
    micro = (pl.col("amount") * 1_000_000).round(0).cast(pl.Int128)
    plus = pl.col("event_type").is_in(["purchase", "subscription_renewal"])
    minus = pl.col("event_type") == "refund"
    metrics = (
        valid.lazy()
        .group_by("customer_id")
        .agg(
            *[(pl.col("event_type") == kind).sum().cast(pl.Int64).alias(col) for kind, col in COUNT_COLUMNS.items()],
            pl.len().cast(pl.Int64).alias("Event_Count__c"),
            micro.filter(plus).sum().alias("_plus"),
            micro.filter(minus).sum().alias("_minus"),
            pl.col("currency").first().alias("Currency__c"),
            pl.col("occurred_at").max().alias("Last_Event_At__c"),
        )
        .with_columns(
            (pl.col("customer_id") + pl.lit(f"-{week.isoformat()}")).alias("External_Id__c"),
            pl.col("customer_id").alias("Customer_Id__c"),
            pl.lit(week).alias("Week_Start__c"),
            ((pl.col("_plus") - pl.col("_minus")).cast(pl.Float64) / 1_000_000).round(2).alias("Total_Amount__c"),
        )
    )
    return metrics.select(list(METRICS_SCHEMA)).cast(METRICS_SCHEMA).sort("External_Id__c").collect()
