"""Transform one week of raw events into valid events, rejects and Salesforce-shaped metrics.

Each raw part gets the contract check of :mod:`tasks.validation`: reused from the extract when it made one
(:class:`tasks.models.ValidatedPart`), otherwise done here, chunk by chunk on a small thread pool, results
collected in submission order (deterministic).

Then, over the whole week and in this order: window (local date of ``occurred_at`` in ``timezone`` within the
window, else rejected), de-duplication by event id (latest ``occurred_at`` wins, ties -> highest ``_seq``; the
others go to rejects as ``duplicates``), the currency rule (per customer-week the currency with most events
wins, ties -> alphabetical; other currencies' events are rejected), then aggregation.

``Total_Amount__c`` = sum(purchase + subscription_renewal amounts) - sum(refund amounts); summed exactly in
integer micro-units (amount rounded to 6 decimals) and rounded to 2 decimals at the end, so the figure does not
depend on row order. Valid rows of each chunk are spooled (without payload) to a local temporary Parquet
file; the raw payloads of the week are never all in memory at once (the payloads of the window, duplicate and
currency rejects are read back from the raw parts, one part at a time per worker, and spooled), and neither are
the week's valid rows:
de-duplication, the currency rule, the valid file (``sink_parquet`` to a local spool file, then a streamed lake
write) and the aggregation scan the spool files lazily, so memory stays flat in the week's size (the
de-duplication sorts the 64-bit id hashes of at most :data:`DEDUP_BUCKET_ROWS` rows at a time). Each chunk's
rejects are spooled too (see :func:`_process_chunk`), and the rejects file is their spool merged in ``_seq`` order
with the week-level rejects' spool, so a week that rejects most of its rows does not hold them in memory either
(unless its raw parts come out of receive order, which needs an in-memory sort, as for the valid rows). What does
grow with such a week: the ``_seq`` (and id, day) of each row the week-level rules reject, ~50 bytes a row.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from tasks.errors import ConfigurationError, IntegrityError, LakeUnavailableError, RawPartError, redact_url
from tasks.lake import LakeFS, sha256_bytes
from tasks.models import FileRef, TransformResult, ValidatedPart, Window
from tasks.validation import (
    CHUNK_ROWS,
    RAW_SCHEMA,
    REJECT_SCHEMA,
    SPOOL_SCHEMA,
    VALID_SCHEMA,
    WORKERS,
    reject_rows,
    validate_chunk,
    validation_fingerprint,
)

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

MAX_PENDING = WORKERS
"""Chunks submitted and not yet collected: one per worker, none queued (a queued chunk holds its raw slice and,
more costly, spreads the work over more short-lived allocations: peak RSS grew with the number of chunks)."""

_log = logging.getLogger(__name__)

DEDUP_BUCKET_ROWS = 1_000_000
"""Id hashes sorted at once when looking for repeated ids (8 bytes a row, twice while sorting): a larger week is
split into hash buckets, one scan of the spool each, so the de-duplication's memory stays flat in the week's size."""

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


def _in_seq_order(files: Sequence[Path]) -> bool:
    """True when the ``_seq`` values of the spool files, read in the given file order, strictly increase (raw
    parts given in receive order, the usual case). One streaming pass over the ``_seq`` column."""
    if not files:
        return True
    return not pl.scan_parquet(list(files)).select((pl.col("_seq").diff() <= 0).any()).collect().item()


def _repeated_hashes(scan: pl.LazyFrame, rows: int) -> pl.Series:
    """The ``_hash`` values found more than once in ``scan`` (a frame of about ``rows`` rows), by sorting: 8 bytes a
    row rather than the ~100 bytes a row of ``is_duplicated()``'s hash table. More than
    :data:`DEDUP_BUCKET_ROWS` rows are split by ``_hash`` modulo the number of buckets, one pass per bucket."""
    buckets = max(1, -(-rows // DEDUP_BUCKET_ROWS))
    found = [pl.Series("_hash", [], dtype=pl.UInt64)]
    for bucket in range(buckets):
        part = scan if buckets == 1 else scan.filter(pl.col("_hash") % buckets == bucket)
        hashes = part.select("_hash").collect().get_column("_hash").sort()
        found.append(hashes.filter(hashes == hashes.shift(1)).unique())
        del hashes
    return pl.concat(found)


class _WeekRules(NamedTuple):
    """What the week-level rules decided, by ``_seq`` (small frames, shared read-only by the pool's tasks)."""

    window: Window
    timezone: str
    outside: pl.DataFrame  # _seq, id, _day
    superseded: pl.DataFrame  # _seq, id
    mixed: pl.DataFrame  # _seq, id, currency, _dominant
    wanted: pl.Series  # every _seq above


def _week_level_rejects(lake: LakeFS, url: str, rules: _WeekRules, target: Path) -> tuple[int, int]:
    """The week-level rejects of one raw part with their payloads (read back from it), written to ``target`` in
    ``_seq`` order (no file when there are none). Returns (rejected, duplicates): window and currency rejects
    count as rejected, the superseded records as duplicates (the reason :data:`DUPLICATE_REASON` tells them apart
    in the file)."""
    payloads = _read_raw(lake, url, rules.wanted)
    window = rules.window
    seqs = payloads.get_column("_seq")

    def of_this_part(frame: pl.DataFrame) -> pl.DataFrame:
        # only the rows in this part's _seq range take part in the join: a week whose rows are mostly outside the
        # window must not build a hash table of all of them for every part
        return frame.filter(pl.col("_seq").is_between(seqs.min(), seqs.max())) if seqs.len() else frame.clear()

    outside = reject_rows(
        payloads.join(of_this_part(rules.outside), on="_seq", how="inner"),
        pl.lit("occurred_at"),
        pl.lit(f"occurred_at is outside the batch window {window.start}..{window.end} ({rules.timezone}), got ")
        + pl.col("_day"),
    )
    currency = reject_rows(
        payloads.join(of_this_part(rules.mixed), on="_seq", how="inner"),
        pl.lit("currency"),
        pl.lit("customer mixes currencies in the week, kept the dominant currency ")
        + pl.col("_dominant")
        + pl.lit(" (most events, ties alphabetical), got ")
        + pl.col("currency"),
    )
    dups = reject_rows(
        payloads.join(of_this_part(rules.superseded), on="_seq", how="inner"), pl.lit("id"), pl.lit(DUPLICATE_REASON)
    )
    frame = pl.concat([outside, currency, dups]).sort("_seq")
    if frame.height:
        frame.write_parquet(target, compression="lz4", statistics=False)
    return outside.height + currency.height, dups.height


def _scan_rejects(files: Sequence[Path]) -> pl.LazyFrame:
    return pl.scan_parquet(list(files), schema=REJECT_SCHEMA) if files else pl.LazyFrame(schema=REJECT_SCHEMA)


def _process_chunk(chunk: pl.DataFrame, target: Path, reject_target: Path) -> None:
    """Validate one chunk; spool its valid rows to ``target`` and its rejects to ``reject_target``.

    Rejects are spooled rather than returned: a filtered String column is a view that keeps the whole chunk's
    string buffers alive (payloads and all parsed fields), so holding each chunk's few rejects in memory made the
    transform's RSS grow by ~14 MB per 50,000-row chunk. Written to Parquet, only the rejected rows' bytes remain.
    """
    good, rejects = validate_chunk(chunk)
    good.write_parquet(target, compression="lz4")
    rejects.write_parquet(reject_target, compression="lz4")


def _take_validated(lake: LakeFS, part: ValidatedPart, targets: tuple[Path, Path], log: Any) -> bool:
    """Copy a ValidatedPart's two files into the spool; False (and nothing copied) when they are not usable."""
    problem = None
    if part.valid.rows + part.rejects.rows != part.raw.rows:
        problem = f"row counts {part.valid.rows} + {part.rejects.rows} != raw part's {part.raw.rows}"
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
    log.warning("not using the contract check made during the extract for %s: %s", redact_url(part.raw.url), problem)
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

    ``validated``: contract checks already made for some raw parts (:class:`tasks.part_checks.PartValidator`,
    during the extract).
    One is used when it names a raw part given here with the same SHA-256 and was made by the same validation
    code; every other raw part is read and validated here.
    """
    log = logger or _log
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError("timezone", f"unknown IANA timezone {timezone!r}") from exc
    urls = [ref.url if isinstance(ref, FileRef) else str(ref) for ref in raw_files]
    checked = {part.raw.url: part for part in validated if part.fingerprint == validation_fingerprint()}
    fetched = reused = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transform-") as spool_dir, ThreadPoolExecutor(WORKERS) as pool:
        spool = Path(spool_dir) / "valid"
        reject_spool = Path(spool_dir) / "rejects"
        spool.mkdir()
        reject_spool.mkdir()
        pending: deque[Future[None]] = deque()
        # The checks made during the extract are verified and copied into the spool on the pool, all at once
        # (file reads and hashing release the GIL); parts without a usable one are validated below, in order.
        takes: dict[int, tuple[ValidatedPart, Future[bool]]] = {}
        for part_no, (ref, url) in enumerate(zip(raw_files, urls, strict=True)):
            part = checked.get(url)
            if part is not None and isinstance(ref, FileRef) and part.raw.sha256 == ref.sha256:
                name = f"{part_no:06d}-{0:012d}.parquet"
                targets = (spool / name, reject_spool / name)
                takes[part_no] = (part, pool.submit(_take_validated, lake, part, targets, log))
        for part_no, url in enumerate(urls):
            if part_no in takes and takes[part_no][1].result():
                fetched += takes[part_no][0].raw.rows
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
        # the contract's rejects stay in their spool files too (a bad week can reject most of its rows)
        contract_rejects = _scan_rejects(reject_files)
        validated_at = time.perf_counter()
        # The valid rows stay in the spool files: every step below scans them lazily (Polars streams the
        # scans), so memory does not grow with the week (the de-duplication works in hash buckets).
        spool_scan = pl.scan_parquet(spooled, schema=SPOOL_SCHEMA) if spooled else pl.LazyFrame(schema=SPOOL_SCHEMA)

        # Window: the local date of occurred_at (in the settings' timezone) must be in the batch week.
        in_window, outside = _window_split(spool_scan, window, timezone)

        # De-duplicate: latest occurred_at wins, ties -> highest _seq (received last).
        # A 64-bit hash pre-filter keeps the exact string comparison to the (few) candidate rows.
        in_seq_order = _in_seq_order(spooled)  # raw parts given in receive order (the usual case)
        repeated = _repeated_hashes(in_window, fetched)
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
        # The week-level rejects get their payloads back from the raw parts, one part per task on the pool, each
        # written to a spool file in _seq order, while the valid file is encoded here (the two take about as long,
        # and both run outside the GIL).
        wanted = pl.concat([superseded.get_column("_seq"), mixed.get_column("_seq"), outside.get_column("_seq")])
        rules = _WeekRules(window, timezone, outside, superseded, mixed, wanted)
        week_spool = Path(spool_dir) / "week-level"
        week_spool.mkdir()
        targets = [week_spool / f"{n:06d}.parquet" for n in range(len(urls))]
        reads = (
            [
                pool.submit(_week_level_rejects, lake, url, rules, target)
                for url, target in zip(urls, targets, strict=True)
            ]
            if wanted.len()
            else []
        )
        valid_file = Path(spool_dir) / "valid.parquet"
        kept.sink_parquet(valid_file, compression="zstd")
        valid_rows = pl.scan_parquet(valid_file).select(pl.len()).collect().item()
        counts = [read.result() for read in reads]
        # The rejects file: the contract's rejects and the week-level ones, each spooled in _seq order when the
        # parts are, merged into one _seq-ordered stream by Polars' streaming sink (not held in memory).
        week_files = [target for target in targets if target.exists()]
        week_rejects = _scan_rejects(week_files)
        if _in_seq_order(reject_files) and _in_seq_order(week_files):
            ordered = contract_rejects.merge_sorted(week_rejects, key="_seq")
        else:  # raw parts out of receive order: sorting needs the rejects in memory
            ordered = pl.concat([contract_rejects, week_rejects]).sort("_seq")
        counted = pl.concat([contract_rejects, week_rejects.filter(pl.col("reason") != DUPLICATE_REASON)])
        rejects_file = Path(spool_dir) / "rejects.parquet"
        ordered.sink_parquet(rejects_file, compression="zstd")
        rejected = counted.select(pl.len()).collect().item()
        duplicates = sum(dups for _, dups in counts)
        if fetched != valid_rows + rejected + duplicates:
            raise IntegrityError(
                f"transform lost or duplicated rows: fetched {fetched} != valid {valid_rows} + rejected {rejected} "
                f"+ duplicates {duplicates}"
            )
        written = pl.scan_parquet(rejects_file).select(pl.len(), (pl.col("_seq").diff() <= 0).any()).collect()
        if written.row(0) != (rejected + duplicates, False):  # in _seq order: a record rejected twice is adjacent
            raise IntegrityError("transform rejected the same record twice, or lost the order of the rejects")

        prefix = out_prefix.rstrip("/")
        # the valid file (the big one) is streamed to the lake and verified on the pool while the metrics are
        # aggregated (in 1 MiB chunks: memory does not grow with the file)
        valid_write = pool.submit(lake.write_file, f"{prefix}/valid.parquet", valid_file, rows=valid_rows)
        metrics = aggregate_metrics(pl.scan_parquet(valid_file), window)
        ruled = time.perf_counter()
        top = (
            counted.group_by(pl.col("field") + pl.lit(": ") + pl.col("reason").str.split(", got ").list.first())
            .len()
            .collect()
            .sort(["len", "field"], descending=[True, False])
            .head(10)
        )
        rejects_ref = lake.write_file(f"{prefix}/rejects.parquet", rejects_file, rows=rejected + duplicates)
        metrics_ref = lake.write_parquet(metrics, f"{prefix}/metrics.parquet")
        valid_ref = valid_write.result()
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
