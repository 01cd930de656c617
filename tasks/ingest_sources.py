"""Readers for the ingestion sources: CSV (streamed batches), RSS 2.0 / Atom (defusedxml), HTTP JSON API.

Every reader yields :class:`SourceBatch` objects: a raw frame (``ref``, ``payload`` JSON text, ``content_hash``;
see :func:`tasks.ingest_db.raw_frame`), the rows it had to reject before normalization (malformed CSV lines, with
their line number as ``ref``) and the cursor to store once the batch is committed.

The API source reuses the weekly flow's extractor (``tasks.extract.extract_window``): it stages raw Parquet parts
(``_seq``, ``_page``, ``payload``) in the lake; each part becomes one batch here.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx
import orjson
import polars as pl

from tasks.errors import SourceFormatError, SourceResponseError, SourceUnavailableError, redact_url
from tasks.ingest_db import REJECT_SCHEMA, raw_frame
from tasks.lake import LakeFS
from tasks.models import Window

Log = logging.Logger | logging.LoggerAdapter
_log = logging.getLogger(__name__)

MAX_CSV_FIELD = 10_000_000
csv.field_size_limit(MAX_CSV_FIELD)


@dataclass
class SourceBatch:
    """One batch to commit: raw records, pre-normalization rejects, and the cursor valid after it commits."""

    raw: pl.DataFrame
    rejects: pl.DataFrame
    cursor: dict[str, Any]
    last_modified: datetime | None = None
    last_seen_id: str | None = None
    schema: dict[str, str] = field(default_factory=dict)


def _is_url(location: str) -> bool:
    return urlsplit(location).scheme in ("http", "https")


class _IterStream(io.RawIOBase):
    """A read-only binary stream over an iterator of byte chunks (an httpx streamed body)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


@contextmanager
def open_binary(
    location: str, *, timeout: float = 30.0, token: str | None = None, client: httpx.Client | None = None,
    headers: dict[str, str] | None = None,
) -> Iterator[tuple[IO[bytes], httpx.Response | None]]:  # fmt: skip
    """Open a local path or an http(s) URL as a binary stream (streamed, never fully buffered)."""
    if not _is_url(location):
        path = Path(location)
        if not path.is_file():
            raise SourceFormatError(location, "no such file")
        with path.open("rb") as fh:
            yield fh, None
        return
    own = client is None
    client = client or httpx.Client(timeout=timeout, follow_redirects=True)
    req_headers = dict(headers or {})
    if token:
        req_headers["Authorization"] = f"Bearer {token}"
    try:
        with client.stream("GET", location, headers=req_headers) as resp:
            if resp.status_code == 429 or resp.status_code >= 500:
                raise SourceUnavailableError(f"{redact_url(location)} answered {resp.status_code}")
            if resp.status_code >= 400:
                raise SourceResponseError(f"answered {resp.status_code}", status_code=resp.status_code, url=location)
            yield io.BufferedReader(_IterStream(resp.iter_bytes())), resp
    except httpx.TransportError as exc:
        raise SourceUnavailableError(f"{redact_url(location)}: {type(exc).__name__}") from exc
    finally:
        if own:
            client.close()


# --- CSV --------------------------------------------------------------------------------------------------------


class _Lines:
    """Physical lines with their 1-based numbers; lines of a rejected record can be pushed back for re-parsing."""

    def __init__(self, text: Iterator[str]) -> None:
        self._text = text
        self._pending: deque[tuple[int, str]] = deque()
        self._next_no = 1
        self.consumed: list[tuple[int, str]] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self._pending:
            item = self._pending.popleft()
        else:
            line = next(self._text)
            item = (self._next_no, line)
            self._next_no += 1
        self.consumed.append(item)
        return item[1]

    def push_back(self, items: list[tuple[int, str]]) -> None:
        self._pending.extendleft(reversed(items))


def _reject_row(line: int, reason: str, text: str) -> dict[str, Any]:
    return {"ref": line, "field": "line", "reason": reason, "payload": text[:2000]}


def read_csv_batches(
    location: str,
    *,
    batch_size: int = 1000,
    encoding: str = "utf-8",
    delimiter: str = ",",
    start_after_line: int = 0,
    fingerprint: str | None = None,
    timeout: float = 30.0,
    token: str | None = None,
    client: httpx.Client | None = None,
    logger: Log | None = None,
) -> Iterator[SourceBatch]:
    """Stream a CSV file (path or URL) as batches of ``batch_size`` good rows.

    * The header names the fields (BOM stripped, names trimmed; empty or duplicate names are a SourceFormatError).
    * Quoted fields may hold delimiters, quotes (``""``) and newlines.
    * A record with the wrong number of fields (or a csv error) is rejected with its first line number; when it
      spans several physical lines only its first line is rejected and the rest is parsed again, so one stray
      quote cannot swallow the rest of the file.
    * Records starting at or before ``start_after_line`` (the checkpoint) are skipped, unless ``fingerprint``
      (SHA-256 of the header line and the first data line, as stored in the cursor) shows a different file:
      then the file is read from the start (records already loaded are no-ops downstream).
    * Bytes that are not valid ``encoding`` raise SourceFormatError naming the file and the line.
    Each batch's cursor is ``{"location", "line", "fingerprint"}``; ``line`` is the last physical line consumed.
    """
    log = logger or _log
    enc = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    with open_binary(location, timeout=timeout, token=token, client=client) as (stream, _resp):
        text = io.TextIOWrapper(stream, encoding=enc, errors="strict", newline="")
        lines = _Lines(iter(text))
        reader = csv.reader(lines, delimiter=delimiter, strict=True)
        payloads: list[str] = []
        refs: list[int] = []
        rejects: list[dict[str, Any]] = []
        header: list[str] | None = None
        header_text = ""
        fp: str | None = None
        last_line = 0

        def check_file(first_data_line: str) -> None:
            nonlocal fp, start_after_line
            fp = hashlib.sha256((header_text + "\n" + first_data_line).encode("utf-8", "surrogatepass")).hexdigest()
            if start_after_line and fingerprint and fingerprint != fp:
                log.warning("CSV %s changed since the checkpoint: reading it from the start", redact_url(location))
                start_after_line = 0

        def flush() -> SourceBatch:
            batch = SourceBatch(
                raw=raw_frame(payloads.copy(), refs.copy()),
                rejects=pl.DataFrame(rejects.copy(), schema=REJECT_SCHEMA),
                cursor={"location": redact_url(location), "line": last_line, "fingerprint": fp},
            )
            payloads.clear()
            refs.clear()
            rejects.clear()
            return batch

        while True:
            lines.consumed = []
            try:
                row = next(reader)
            except StopIteration:
                break
            except UnicodeDecodeError as exc:
                where = lines.consumed[-1][0] + 1 if lines.consumed else (last_line + 1)
                raise SourceFormatError(location, f"not valid {encoding} text near line {where}: {exc.reason}") from exc
            except csv.Error as exc:
                consumed = lines.consumed
                if not consumed:
                    raise SourceFormatError(location, f"unreadable CSV: {exc}") from exc
                first_no, first_text = consumed[0]
                if header is not None and fp is None:
                    check_file(first_text)
                lines.push_back(consumed[1:])
                reader = csv.reader(lines, delimiter=delimiter, strict=True)
                last_line = first_no
                if header is not None and first_no > start_after_line:
                    rejects.append(_reject_row(first_no, f"malformed CSV: {exc}", first_text))
                continue
            consumed = lines.consumed
            first_no = consumed[0][0] if consumed else last_line + 1
            end_no = consumed[-1][0] if consumed else first_no
            if header is None:
                header = [h.strip() for h in row]
                if not row or any(not h for h in header):
                    raise SourceFormatError(location, "header has an empty column name")
                dupes = sorted({h for h in header if header.count(h) > 1})
                if dupes:
                    raise SourceFormatError(location, f"header repeats column(s) {dupes}")
                header_text = "".join(t for _, t in consumed)
                last_line = end_no
                continue
            if fp is None:
                check_file(consumed[0][1] if consumed else "")
            if not row or (len(row) == 1 and row[0] == ""):
                last_line = end_no
                continue  # blank line
            if len(row) != len(header):
                if len(consumed) > 1:
                    lines.push_back(consumed[1:])
                    reader = csv.reader(lines, delimiter=delimiter, strict=True)
                    end_no = first_no
                last_line = end_no
                if first_no > start_after_line:
                    rejects.append(
                        _reject_row(
                            first_no, f"expected {len(header)} fields, found {len(row)}", consumed[0][1].rstrip("\r\n")
                        )
                    )
            else:
                last_line = end_no
                if first_no > start_after_line:
                    payloads.append(orjson.dumps(dict(zip(header, row, strict=True))).decode())
                    refs.append(first_no)
            if len(payloads) >= batch_size:
                yield flush()
        if header is None:
            log.info("CSV %s is empty", redact_url(location))
        if payloads or rejects:
            yield flush()
        elif last_line > start_after_line:
            yield flush()  # only blank lines or header: still advance the cursor


def observe_csv_schema(raw: pl.DataFrame) -> dict[str, str]:
    """Columns of a CSV batch and their kind: ``number`` when every non-empty value parses as a number."""
    from tasks.ingest_db import observe_json_schema

    if raw.is_empty():
        return {}
    names = observe_json_schema(raw)
    payload = pl.col("payload")
    exprs = []
    for name in names:
        v = payload.str.json_path_match("$['" + name.replace("'", "\\'") + "']")
        v = pl.when(v.str.strip_chars() == "").then(None).otherwise(v)
        exprs.append(
            pl.when(v.is_null().all())
            .then(pl.lit("null"))
            .when((v.is_not_null() & v.cast(pl.Float64, strict=False).is_null()).any())
            .then(pl.lit("string"))
            .otherwise(pl.lit("number"))
            .alias(name)
        )
    row = raw.select(exprs).row(0, named=True)
    return dict(row)


# --- RSS / Atom -------------------------------------------------------------------------------------------------

ATOM = "{http://www.w3.org/2005/Atom}"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1] if "}" in tag else tag.split(":")[-1]


def _item_dict(elem: Any, atom: bool) -> dict[str, Any]:
    """An RSS <item> / Atom <entry> as received: element name -> text (attributes where the value lives)."""
    out: dict[str, Any] = {}
    for child in elem:
        if not isinstance(child.tag, str):
            continue
        name = _local(child.tag)
        if name == "link" and atom:
            rel = child.get("rel", "alternate")
            value = child.get("href")
            if rel != "alternate" and "link" in out:
                continue
        elif name == "category" and child.get("term") is not None:
            value = child.get("term")
        else:
            value = (child.text or "").strip()
            if not value and len(child):
                value = " ".join(t.strip() for t in child.itertext() if t.strip())
        if name in out:  # repeated element (several categories): keep the first as the field, all under name_all
            out.setdefault(f"{name}_all", [out[name]]).append(value)
            continue
        out[name] = value
    return out


def _item_time(item: dict[str, Any]) -> datetime | None:
    for key in ("updated", "pubDate", "published", "date"):
        value = item.get(key)
        if not value or not isinstance(value, str):
            continue
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            try:
                parsed = parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                continue
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def parse_feed(data: bytes, location: str) -> list[dict[str, Any]]:
    """Items of an RSS 2.0 or Atom document, parsed by defusedxml (no DTD entities, no external references).

    Raises SourceFormatError naming the feed for unsafe XML (entity declarations, external entities) or for
    anything that is not well-formed RSS/Atom.
    """
    from xml.etree.ElementTree import ParseError

    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import fromstring

    try:
        root = fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise SourceFormatError(location, f"unsafe XML refused ({type(exc).__name__}: {exc})") from exc
    except ParseError as exc:
        raise SourceFormatError(location, f"not well-formed XML: {exc}") from exc
    tag = _local(root.tag)
    if tag == "feed":
        return [_item_dict(e, atom=True) for e in root.iter(f"{ATOM}entry")]
    if tag in ("rss", "RDF"):
        return [_item_dict(e, atom=False) for e in root.iter() if isinstance(e.tag, str) and _local(e.tag) == "item"]
    raise SourceFormatError(location, f"root element <{tag}> is neither RSS (<rss>) nor Atom (<feed>)")


def read_feed_batches(
    location: str,
    *,
    batch_size: int = 1000,
    since: datetime | None = None,
    etag: str | None = None,
    max_bytes: int = 50_000_000,
    timeout: float = 30.0,
    token: str | None = None,
    client: httpx.Client | None = None,
    logger: Log | None = None,
) -> Iterator[SourceBatch]:
    """Read a feed (path or URL) and yield its items in batches, oldest first.

    Incremental: with ``etag`` a URL is fetched conditionally (304 = nothing new); items dated before ``since``
    are skipped (undated items are always read; identical records are no-ops downstream anyway).
    The cursor of each batch holds the response's ETag and the newest item time it committed.
    """
    log = logger or _log
    headers = {"If-None-Match": etag} if etag else None
    with open_binary(location, timeout=timeout, token=token, client=client, headers=headers) as (stream, resp):
        if resp is not None and resp.status_code == 304:
            log.info("feed %s not modified", redact_url(location))
            return
        data = stream.read(max_bytes + 1)
        new_etag = resp.headers.get("etag") if resp is not None else None
    if len(data) > max_bytes:
        raise SourceFormatError(location, f"feed is larger than max_bytes={max_bytes}")
    items = parse_feed(data, location)
    dated = [(_item_time(it), i, it) for i, it in enumerate(items, start=1)]
    keep = [(t, i, it) for t, i, it in dated if since is None or t is None or t >= since]
    keep.sort(key=lambda x: (x[0] or datetime.min.replace(tzinfo=UTC), x[1]))
    newest = since
    if not keep:
        yield SourceBatch(
            raw=raw_frame([]),
            rejects=pl.DataFrame(schema=REJECT_SCHEMA),
            cursor={"location": redact_url(location), "etag": new_etag},
            last_modified=since,
        )
        return
    for start in range(0, len(keep), batch_size):
        chunk = keep[start : start + batch_size]
        for t, _, _ in chunk:
            if t is not None and (newest is None or t > newest):
                newest = t
        yield SourceBatch(
            raw=raw_frame([orjson.dumps(it).decode() for _, _, it in chunk], [i for _, i, _ in chunk]),
            rejects=pl.DataFrame(schema=REJECT_SCHEMA),
            cursor={"location": redact_url(location), "etag": new_etag if start + batch_size >= len(keep) else None},
            last_modified=newest,
        )


# --- HTTP API (the weekly flow's extractor) ---------------------------------------------------------------------

ExtractFn = Callable[..., Any]


def _default_extract() -> ExtractFn:
    from tasks.extract import extract_window  # the weekly flow's extractor (tasks/extract.py)

    return extract_window


def read_api_batches(
    source: Any,
    window: Window,
    lake: LakeFS,
    prefix: str,
    *,
    parts_done: int = 0,
    client: httpx.Client | None = None,
    logger: Log | None = None,
    extract: ExtractFn | None = None,
) -> Iterator[SourceBatch]:
    """Extract ``window`` with the weekly extractor into ``prefix`` and yield each raw Parquet part as a batch.

    Parts before ``parts_done`` (committed by an earlier, interrupted run of the same window) are skipped.
    Cursor: ``{"window_start", "window_end", "parts_done"}``; the batch of the last part marks the window done.
    """
    extract = extract or _default_extract()
    result = extract(source, window, lake, prefix, client=client, logger=logger)
    files = list(result.files)
    for index, ref in enumerate(files, start=1):
        if index <= parts_done:
            continue
        part = lake.read_parquet(ref.url, columns=["_seq", "payload"])
        yield SourceBatch(
            raw=raw_frame(part["payload"].to_list(), part["_seq"].cast(pl.Int64).to_list()),
            rejects=pl.DataFrame(schema=REJECT_SCHEMA),
            cursor={
                "window_start": window.start.isoformat(),
                "window_end": window.end.isoformat(),
                "parts_done": index,
                "complete": index == len(files),
            },
        )
    if not files or parts_done >= len(files):
        yield SourceBatch(
            raw=raw_frame([]),
            rejects=pl.DataFrame(schema=REJECT_SCHEMA),
            cursor={
                "window_start": window.start.isoformat(),
                "window_end": window.end.isoformat(),
                "parts_done": len(files),
                "complete": True,
            },
        )


def next_api_window(cursor: dict[str, Any] | None, first_date: date | None, today: date) -> Window | None:
    """The window to extract: resume an incomplete one, else the complete days since the last window.

    Windows cover whole past days only (``end`` = yesterday), so they never overlap and a day is read once it
    is over. None when there is no complete day to read yet.
    """
    from datetime import timedelta

    if cursor and not cursor.get("complete", True):
        return Window(start=date.fromisoformat(cursor["window_start"]), end=date.fromisoformat(cursor["window_end"]))
    if cursor and cursor.get("window_end"):
        start = date.fromisoformat(cursor["window_end"]) + timedelta(days=1)
    else:
        start = first_date or (today - timedelta(days=7))
    end = today - timedelta(days=1)
    if start > end:
        return None
    return Window(start=start, end=end)


# --- one source, batch by batch ---------------------------------------------------------------------------------


@dataclass
class SourceOutcome:
    """What one source did in one run (counts are BatchCounts.as_dict())."""

    source: str
    kind: str
    counts: dict[str, int]
    batches: int
    fields: dict[str, str]
    drift: Any = None  # tasks.ingest_db.SchemaDiff | None
    drift_policy: str = "accept"


def ingest_batches(
    engine: Any,
    *,
    kind: str,
    source: str,
    field_map: dict[str, str],
    make_batches: Callable[[Any], Iterator[SourceBatch]],
    run_id: str,
    drift_policy: str = "accept",
    reject_threshold_pct: float = 100.0,
    on_drift: Callable[[str, Any, str], None] | None = None,
    valid_filter: Callable[[Any], pl.Expr | None] | None = None,
    logger: Log | None = None,
) -> SourceOutcome:
    """Ingest one source: each batch (raw + normalized + rejects + checkpoint) commits in its own transaction.

    ``make_batches(checkpoint)`` resumes after the last committed batch. Schema drift versus the source's previous
    run is checked before each batch is loaded (fields added / changed kind) and at the end (fields removed):
    it is recorded in ``etl_schema_drift``, handed to ``on_drift(source, diff, policy)`` and, with policy
    ``fail``, raised as SchemaDriftError (batches already committed stay committed). A reject rate over
    ``reject_threshold_pct`` raises DataQualityError after the source is loaded.
    """
    from tasks.errors import DataQualityError, SchemaDriftError
    from tasks.ingest_db import (
        BatchCounts,
        Checkpoint,
        SchemaDiff,
        diff_schema,
        get_checkpoint,
        load_batch,
        merge_schema,
        observe_json_schema,
        previous_schema,
        record_schema,
    )

    log = logger or _log
    checkpoint = get_checkpoint(engine, source)
    previous = previous_schema(engine, source, run_id)
    observe = observe_csv_schema if kind == "csv" else observe_json_schema
    fields: dict[str, str] = {}
    total = BatchCounts()
    reported = SchemaDiff()
    batches = 0

    def drift_found(diff: SchemaDiff) -> None:
        baseline = fields if drift_policy == "accept" else None
        record_schema(engine, source=source, run_id=run_id, fields=baseline, diff=diff, policy=drift_policy)
        log.warning("schema drift in %s: %s (policy %s)", source, diff.summary(), drift_policy)
        if on_drift is not None:
            on_drift(source, diff, drift_policy)
        if drift_policy == "fail":
            raise SchemaDriftError(source, diff.summary())

    for batch in make_batches(checkpoint):
        if not batch.raw.is_empty():
            fields = merge_schema(fields, observe(batch.raw))
            if previous is not None:
                diff = diff_schema(previous, fields)
                fresh = SchemaDiff(
                    added={k: v for k, v in diff.added.items() if k not in reported.added},
                    changed={k: v for k, v in diff.changed.items() if k not in reported.changed},
                )
                if fresh:
                    reported.added.update(fresh.added)
                    reported.changed.update(fresh.changed)
                    drift_found(fresh)
        cp = Checkpoint(
            source=source,
            kind=kind,
            cursor=batch.cursor,
            last_modified=batch.last_modified,
            last_seen_id=batch.last_seen_id,
        )
        counts = load_batch(
            engine,
            kind=kind,  # type: ignore[arg-type]
            source=source,
            field_map=field_map,
            raw=batch.raw,
            run_id=run_id,
            checkpoint=cp,
            extra_rejects=batch.rejects,
            valid_filter=valid_filter(checkpoint) if valid_filter is not None else None,
        )
        total.add(counts)
        batches += 1
        log.info("%s: batch %d committed %s cursor=%s", source, batches, counts.as_dict(), batch.cursor)
    final = SchemaDiff()
    if previous is not None and fields:
        removed = diff_schema(previous, fields).removed
        final.removed.update(removed)
    if final:
        reported.removed.update(final.removed)
        drift_found(final)  # records the drift (and, when accepted, this run's fields as the next baseline)
    elif fields:
        record_schema(engine, source=source, run_id=run_id, fields=fields, diff=None, policy=drift_policy)
    if total.read and total.rejected * 100.0 / total.read > reject_threshold_pct:
        raise DataQualityError(
            total.rejected * 100.0 / total.read, reject_threshold_pct, rejected=total.rejected, fetched=total.read
        )
    return SourceOutcome(
        source=source,
        kind=kind,
        counts=total.as_dict(),
        batches=batches,
        fields=fields,
        drift=reported if reported else None,
        drift_policy=drift_policy,
    )
