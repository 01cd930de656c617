"""The contract checks of raw parts, run while the extract is still fetching (the weekly flow's extract stage).

:class:`PartValidator` takes each raw part's rows as soon as they are buffered, checks them with
:func:`tasks.validation.validate_chunk` on a small thread pool (Polars releases the GIL, so this runs on the
cores the fetching leaves idle) and stores each part's result next to the week's staging files, as a
:class:`tasks.models.ValidatedPart` bound to the raw part's SHA-256 and to
:func:`tasks.validation.validation_fingerprint`. :func:`extract_and_check` is the extract with that overlap;
``tasks.transform.transform_week`` reuses the stored checks and validates only the raw parts that have none.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import polars as pl

from tasks.errors import redact_text
from tasks.extract import extract_window
from tasks.lake import LakeFS
from tasks.models import ExtractResult, FileRef, ValidatedPart, Window
from tasks.validation import (
    CHUNK_ROWS,
    REJECT_SCHEMA,
    SPOOL_SCHEMA,
    WORKERS,
    validate_chunk,
    validation_fingerprint,
)

if TYPE_CHECKING:
    from blocks.source import SourceApi

_log = logging.getLogger(__name__)


class PartValidator:
    """Runs the contract check of each raw part while the extract is still fetching the next ones.

    The extract calls :meth:`start` with each raw part's rows as soon as they are buffered, in slices of
    ``CHUNK_ROWS`` (``on_frame``, ``frame_rows``), then :meth:`submit` with the written part (from its writer
    thread, ``on_part``; see ``tasks.extract.extract_window``), which binds the part to the checks of its slices;
    :meth:`submit` alone also works. Rows are checked in ``CHUNK_ROWS`` chunks on a pool of ``workers`` threads
    (Polars releases the GIL, so this runs on the cores the fetch leaves idle). A writer thread then stores each
    part's results as two files, ``{prefix}/<part>.valid.parquet`` and ``.rejects.parquet`` (lz4). :meth:`finish`
    returns one :class:`ValidatedPart` per part whose files were stored; the transform stage uses them instead of
    validating those raw parts again. This is only an optimization: a part whose files could not be stored is
    left out with a warning, and the transform validates it from the raw part.

    Memory: at most ``workers`` chunks are being validated; :meth:`start` and :meth:`submit` block beyond that,
    which slows the extract down rather than letting results pile up. Use as a context manager (or call
    :meth:`close`): leaving it stops the threads, cancelling what has not started.
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
        # frames started and not yet bound to a written part, in start order: (first _seq, rows, chunk futures)
        self._started: deque[tuple[int | None, int, list[Future[tuple[pl.DataFrame, pl.DataFrame]]]]] = deque()
        self._lock = threading.Lock()  # start() runs in the extract's thread, submit() in its writer thread

    def __enter__(self) -> PartValidator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, frame: pl.DataFrame) -> None:
        """Start checking rows of a raw part before the part is written (``extract_window(on_frame=...)``): the
        whole part's frame, or consecutive slices of it (``frame_rows``). The :meth:`submit` of the part then only
        binds the written part to these checks."""
        futures = self._check(frame)
        with self._lock:
            self._started.append((_first_seq(frame), frame.height, futures))

    def submit(self, ref: FileRef, frame: pl.DataFrame) -> None:
        """Validate the raw part ``ref`` whose rows are ``frame`` (RAW_SCHEMA), unless :meth:`start` already
        did (the frames started first, in order, that hold exactly these rows); returns once its chunks are
        queued."""
        chunks = self._bind(frame)
        if chunks is None:
            chunks = self._check(frame)
        self._parts.append(self._writer.submit(self._store, ref, chunks))

    def _bind(self, frame: pl.DataFrame) -> list[Future[tuple[pl.DataFrame, pl.DataFrame]]] | None:
        """The started checks of ``frame``'s rows: the oldest started frames, as long as they begin at its first
        ``_seq`` and add up to its rows; None (and those left started) when they do not."""
        with self._lock:
            if not self._started or self._started[0][0] != _first_seq(frame):
                return None
            taken, rows = 0, 0
            for _, height, _ in self._started:
                if rows >= frame.height:
                    break
                taken, rows = taken + 1, rows + height
            if rows != frame.height:
                return None
            chunks: list[Future[tuple[pl.DataFrame, pl.DataFrame]]] = []
            for _ in range(taken):
                chunks += self._started.popleft()[2]
            return chunks

    def _check(self, frame: pl.DataFrame) -> list[Future[tuple[pl.DataFrame, pl.DataFrame]]]:
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
        return chunks

    def _store(self, ref: FileRef, chunks: list[Future[tuple[pl.DataFrame, pl.DataFrame]]]) -> ValidatedPart:
        results = [future.result() for future in chunks]
        valid = pl.concat([good for good, _ in results]) if results else pl.DataFrame(schema=SPOOL_SCHEMA)
        rejects = pl.concat([bad for _, bad in results]) if results else pl.DataFrame(schema=REJECT_SCHEMA)
        stem = f"{self.prefix}/{PurePosixPath(ref.url).name.removesuffix('.parquet')}"
        valid_ref = self.lake.write_parquet(valid, f"{stem}.valid.parquet", compression="lz4", statistics=False)
        rejects_ref = self.lake.write_parquet(rejects, f"{stem}.rejects.parquet", compression="lz4", statistics=False)
        return ValidatedPart(
            raw=ref,
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


def _first_seq(frame: pl.DataFrame) -> int | None:
    return frame.item(0, "_seq") if frame.height else None


def extract_and_check(
    source: SourceApi,
    window: Window,
    lake: LakeFS,
    prefix: str,
    checks_prefix: str | None,
    *,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    **kwargs: Any,
) -> ExtractResult:
    """``tasks.extract.extract_window`` with each raw part's contract check run while the next pages are fetched
    and stored under ``checks_prefix`` (``ExtractResult.validated``); ``checks_prefix=None``: the plain extract.

    ``kwargs`` go to the extract (``on_progress``, ``client``, ...).
    """
    if checks_prefix is None:
        return extract_window(source, window, lake, prefix, logger=logger, **kwargs)
    with PartValidator(lake, checks_prefix, logger=logger) as validator:
        result = extract_window(
            source,
            window,
            lake,
            prefix,
            logger=logger,
            on_frame=validator.start,
            on_part=validator.submit,
            frame_rows=CHUNK_ROWS,
            **kwargs,
        )
        result.validated = validator.finish()
    return result
