"""The pending-write queue in the lake: tracking writes that could not reach the database, replayed later.

When a tracking write (finish_run / finish_stage of :mod:`tasks.tracking`, advance_checkpoint /
checkpoint_after_week of :mod:`tasks.checkpoint`) fails after the data was loaded, the caller stores the write as
one JSON file under ``_pending/<pipeline>/`` in the lake (:func:`queue_pending` / :func:`apply_or_queue`); the
next run calls :func:`replay_pending` first. The tracking write functions are idempotent, which is what lets
:func:`replay_pending` re-apply a queued write that may already have landed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from tasks import checkpoint, tracking
from tasks.errors import DatabaseUnavailableError, PipelineError, TrackingError, is_retryable

_LOG = logging.getLogger(__name__)
Logger = logging.Logger | logging.LoggerAdapter

PENDING_ROOT = "_pending"


class _PendingStore:
    """Adapter over LakeFS for the queue. Uses the lake's JSON/list/delete methods when it has them; otherwise a
    stop-gap over ``lake.fs`` (write to a temp name then rename on file://; a single blob upload is atomic)."""

    def __init__(self, lake: Any) -> None:
        self.lake = lake

    def write_json(self, rel: str, obj: Mapping[str, Any]) -> None:
        if hasattr(self.lake, "write_json_atomic"):
            self.lake.write_json_atomic(rel, obj)
            return
        data = json.dumps(obj, sort_keys=True).encode()
        if getattr(self.lake, "scheme", "file") == "file":
            tmp = f"{rel}.tmp-{uuid.uuid4().hex}"
            self.lake.write_bytes(tmp, data)
            self.lake.fs.mv(self.lake._path(tmp), self.lake._path(rel))
        else:
            self.lake.write_bytes(rel, data)

    def read_json(self, rel: str) -> Any:
        if hasattr(self.lake, "read_json"):
            return self.lake.read_json(rel)
        return json.loads(self.lake.read_bytes(rel))

    def names(self, prefix: str) -> list[str]:
        """File names (not paths) of ``*.json`` items directly under ``prefix``, sorted."""
        if hasattr(self.lake, "list"):
            entries = self.lake.list(prefix)
        else:
            try:
                entries = self.lake.fs.ls(self.lake._path(prefix), detail=False)
            except FileNotFoundError:
                entries = []
        names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries or []}
        return sorted(n for n in names if n.endswith(".json") and not n.startswith("."))

    def delete(self, rel: str) -> None:
        if hasattr(self.lake, "delete"):
            self.lake.delete(rel)
        else:
            self.lake.fs.rm(self.lake._path(rel))


_DATE_ARGS = {"next_week_start"}
_DATETIME_ARGS = {"now"}


def _finish_run_op(engine: Engine, pipeline: str, args: dict[str, Any], logger: Logger | None) -> bool:
    return tracking.finish_run(engine, logger=logger, **args)


def _finish_stage_op(engine: Engine, pipeline: str, args: dict[str, Any], logger: Logger | None) -> bool:
    return tracking.finish_stage(engine, logger=logger, **args)


def _checkpoint_op(name: str) -> Callable[[Engine, str, dict[str, Any], Logger | None], date]:
    """The checkpoint write ``checkpoint.<name>`` replayed for ``pipeline`` (looked up at call time); an item queued
    for another pipeline is refused."""

    def op(engine: Engine, pipeline: str, args: dict[str, Any], logger: Logger | None) -> date:
        args = dict(args)
        item_pipeline = args.pop("pipeline", pipeline)
        if item_pipeline != pipeline:
            raise TrackingError(f"pipeline: pending item is for {item_pipeline!r}, not {pipeline!r}")
        return getattr(checkpoint, name)(engine, pipeline, logger=logger, **args)

    return op


_advance_op = _checkpoint_op("advance_checkpoint")
_after_week_op = _checkpoint_op("checkpoint_after_week")


_OPS: dict[str, tuple[Callable[..., Any], frozenset[str]]] = {
    "finish_run": (
        _finish_run_op,
        frozenset({"run_id", "status", "counts", "failure_reason", "now", "supersede"}),
    ),
    "finish_stage": (
        _finish_stage_op,
        frozenset({"run_id", "stage", "status", "rows_in", "rows_out", "detail", "now"}),
    ),
    "advance_checkpoint": (_advance_op, frozenset({"pipeline", "next_week_start", "run_id", "force", "now"})),
    "checkpoint_after_week": (_after_week_op, frozenset({"pipeline", "week_start", "run_id", "baseline", "now"})),
}
PENDING_OPS = tuple(_OPS)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return tracking._now(value).isoformat()  # naive datetimes are refused here, not at replay time
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, BaseException):
        return tracking.clean_reason(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _check_args(op: str, args: Mapping[str, Any], where: str) -> None:
    if op not in _OPS:
        raise TrackingError(f"{where}.op: {op!r} is not one of {', '.join(PENDING_OPS)}")
    unknown = set(args) - _OPS[op][1]
    if unknown:
        raise TrackingError(f"{where}.args: unknown argument(s) {', '.join(sorted(unknown))} for {op}")


def pending_prefix(pipeline: str) -> str:
    return f"{PENDING_ROOT}/{tracking._check_pipeline(pipeline)}"


_SEQ_LOCK = threading.Lock()
_LAST_NS = 0


def _ordered_ns() -> int:
    """time.time_ns(), strictly increasing within this process (so names sort in enqueue order)."""
    global _LAST_NS
    with _SEQ_LOCK:
        _LAST_NS = max(time.time_ns(), _LAST_NS + 1)
        return _LAST_NS


def queue_pending(
    lake: Any,
    pipeline: str,
    op: str,
    args: Mapping[str, Any],
    *,
    reason: object | None = None,
    logger: Logger | None = None,
) -> str:
    """Store a tracking write that failed for replay by the next run; returns the item's lake-relative path.

    One JSON file per item, ``_pending/<pipeline>/<UTC timestamp with ns>-<uuid>.json``, written atomically.
    ``args`` are the keyword arguments of ``op`` (finish_run / finish_stage / advance_checkpoint, without the
    engine); dates may be ``date``/``datetime`` or ISO strings. Pass ``now`` to keep the original event time.
    """
    log = logger or _LOG
    prefix = pending_prefix(pipeline)
    args = dict(args)
    _check_args(op, args, "pending item")
    args.setdefault("now", datetime.now(UTC))
    ns = _ordered_ns()
    stamp = datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y%m%dT%H%M%S")
    name = f"{stamp}{ns % 1_000_000_000:09d}Z-{uuid.uuid4().hex}.json"
    item = {
        "version": 1,
        "pipeline": pipeline,
        "op": op,
        "args": json.loads(json.dumps(args, default=_json_default)),
        "queued_at": datetime.now(UTC).isoformat(),
        "reason": tracking.clean_reason(reason, 500),
    }
    rel = f"{prefix}/{name}"
    _PendingStore(lake).write_json(rel, item)
    log.warning("queued %s for %s as %s (replayed at the next run)", op, pipeline, rel)
    return rel


def pending_items(lake: Any, pipeline: str) -> list[str]:
    """Lake-relative paths of the queued items of ``pipeline``, oldest first."""
    prefix = pending_prefix(pipeline)
    return [f"{prefix}/{n}" for n in _PendingStore(lake).names(prefix)]


def _decode_item(item: Any, rel: str, pipeline: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(item, Mapping):
        raise TrackingError(f"{rel}: not a JSON object")
    op = item.get("op")
    args = item.get("args")
    if not isinstance(op, str) or not isinstance(args, Mapping):
        raise TrackingError(f"{rel}: needs 'op' (string) and 'args' (object)")
    if item.get("pipeline", pipeline) != pipeline:
        raise TrackingError(f"{rel}.pipeline: {item.get('pipeline')!r} is not {pipeline!r}")
    _check_args(op, args, rel)
    decoded = dict(args)
    try:
        for key in _DATE_ARGS & decoded.keys():
            decoded[key] = tracking._as_date(decoded[key])
        for key in _DATETIME_ARGS & decoded.keys():
            if decoded[key] is not None and not isinstance(decoded[key], datetime):
                decoded[key] = datetime.fromisoformat(decoded[key])
    except (TypeError, ValueError) as exc:
        raise TrackingError(f"{rel}.args: {exc}") from None
    return op, decoded


def apply_pending_op(
    engine: Engine, pipeline: str, op: str, args: Mapping[str, Any], *, logger: Logger | None = None
) -> Any:
    """Run one queue operation now (the same code path :func:`replay_pending` uses)."""
    _check_args(op, args, "operation")
    return _OPS[op][0](engine, pipeline, dict(args), logger)


def apply_or_queue(
    engine: Engine,
    lake: Any,
    pipeline: str,
    op: str,
    args: Mapping[str, Any],
    *,
    logger: Logger | None = None,
) -> bool:
    """Apply ``op`` now; when the database is unavailable, queue it in the lake instead. True = applied now.

    Only DatabaseUnavailableError is queued: a fatal error (DuplicateRunError, bad arguments) propagates, since
    replaying it later would fail the same way.
    """
    args = dict(args)
    args.setdefault("now", datetime.now(UTC))
    try:
        apply_pending_op(engine, pipeline, op, args, logger=logger)
        return True
    except DatabaseUnavailableError as exc:
        queue_pending(lake, pipeline, op, args, reason=exc, logger=logger)
        return False


@dataclass
class ReplayResult:
    """What :func:`replay_pending` did: items applied (and removed), items still queued, the first failure."""

    applied: int = 0
    remaining: int = 0
    failed_item: str | None = None
    error: str | None = None
    retryable: bool = False
    applied_items: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> None:
        """Raise DatabaseUnavailableError (retryable) or TrackingError (fatal) when an item could not be applied."""
        if self.error is None:
            return
        message = f"pending replay stopped at {self.failed_item} ({self.remaining} item(s) left): {self.error}"
        if self.retryable:
            raise DatabaseUnavailableError(message)
        raise TrackingError(message)


def replay_pending(engine: Engine, lake: Any, pipeline: str, *, logger: Logger | None = None) -> ReplayResult:
    """Apply the queued writes of ``pipeline`` in order, each idempotently, deleting each item only after it was
    applied. Stops at the first item that fails (keeping it and all later ones, so order is preserved) and reports
    it in the result; call ``result.raise_for_error()`` to fail the run. Replaying twice is a no-op.
    """
    log = logger or _LOG
    store = _PendingStore(lake)
    items = pending_items(lake, pipeline)
    result = ReplayResult(remaining=len(items))
    for index, rel in enumerate(items):
        try:
            op, args = _decode_item(store.read_json(rel), rel, pipeline)
            apply_pending_op(engine, pipeline, op, args, logger=logger)
        except (PipelineError, sa_exc.SQLAlchemyError, OSError, ValueError) as exc:
            result.failed_item = rel
            result.retryable = is_retryable(exc) or isinstance(exc, OSError)
            result.error = tracking.clean_reason(exc, 500)
            result.remaining = len(items) - index
            log.error("pending replay of %s stopped at %s: %s", pipeline, rel, result.error)
            return result
        try:
            store.delete(rel)
        except OSError as exc:
            # Applied but not removed: it will be re-applied next time, which is harmless (idempotent).
            log.warning("applied %s but could not delete it (%s); it will be replayed again", rel, type(exc).__name__)
        result.applied += 1
        result.applied_items.append(rel)
        result.remaining = len(items) - index - 1
        log.info("replayed %s (%s)", rel, op)
    return result
