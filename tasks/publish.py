"""Week publishing on the lake: stage a week's data files, commit them with one atomic manifest, read them back.

All storage goes through :class:`tasks.lake.LakeFS` (integrity checks, atomic single files, error translation).

Week publishing layout (no folder renames: blob stores cannot rename folders atomically)::

    <zone_prefix>/week=<YYYY-MM-DD>/_manifest.json                  commit marker: the only thing readers trust
    <zone_prefix>/week=<YYYY-MM-DD>/attempt=<attempt>/<name>        data files of one publish attempt (staging)

:func:`publish_week` copies (or adopts, when the caller already wrote them there) the data files into a fresh
``attempt=<id>`` folder, verifies them, and then writes ``_manifest.json`` in ONE atomic write (local temp +
``os.replace``; one blob put). The manifest lists each file's URL, rows, SHA-256 and bytes plus totals. Readers
(:func:`read_manifest`, :func:`committed_files`, :func:`read_committed`) go through the manifest only, so they see
the previous committed week or the new one, never half: files of a crashed attempt are simply not referenced.
Superseded or stray attempt folders are garbage-collected only after the new manifest is committed (best effort;
a failed clean-up is logged and retried by the next publish). One week must not be published by two writers at the
same time (the deployment's concurrency limit guarantees this): a concurrent publish could collect the other's
staged files.

Idempotent re-runs: when the committed manifest already lists exactly the given files (same names, hashes, rows,
sizes) and the same ``extra``, nothing is written unless a committed file is missing or its hash/size differs; such
a file is re-uploaded from the caller's source FileRef (the local or staged copy; its bytes are checked against the
recorded SHA-256 first) to the URL the manifest already names. :class:`PublishResult` says what was written,
skipped, repaired and deleted.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import IO, Any, Literal
from urllib.parse import urlsplit

import fsspec
import polars as pl
from pydantic import BaseModel, Field

from tasks.errors import ConfigurationError, IntegrityError, PipelineError, redact_url
from tasks.lake import LakeFS, _json_default, sha256_bytes, validate_name, validate_prefix, validate_week_label
from tasks.models import FileRef, Manifest

Logger = logging.Logger | logging.LoggerAdapter
log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"


def _normalise(obj: Any) -> Any:
    """``obj`` as it reads back from JSON written by the lake (same encoder as :meth:`LakeFS.write_json_atomic`)."""
    return json.loads(json.dumps(obj, default=_json_default, sort_keys=True))


class PublishResult(BaseModel):
    """What :func:`publish_week` did, for the flow's report."""

    status: Literal["published", "skipped", "repaired"]
    manifest: Manifest
    written: list[str] = Field(default_factory=list, description="Names copied into a new attempt.")
    skipped: list[str] = Field(default_factory=list, description="Names already committed and intact.")
    repaired: list[str] = Field(default_factory=list, description="Committed names re-uploaded (missing/corrupt).")
    deleted: list[str] = Field(default_factory=list, description="Superseded/stray files garbage-collected.")


def week_prefix(zone_prefix: str, week_label: str | date) -> str:
    return f"{validate_prefix(zone_prefix)}/week={validate_week_label(week_label)}"


def manifest_rel(zone_prefix: str, week_label: str | date) -> str:
    return f"{week_prefix(zone_prefix, week_label)}/{MANIFEST_NAME}"


def staging_rel(zone_prefix: str, week_label: str | date, attempt: str, name: str) -> str:
    """Where a data file of ``attempt`` lives; write there directly to let :func:`publish_week` adopt it."""
    return (
        f"{week_prefix(zone_prefix, week_label)}/attempt={validate_name(attempt, 'attempt')}/{_check_file_name(name)}"
    )


def new_attempt_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _check_file_name(name: str) -> str:
    validate_name(name, "files")
    if name == MANIFEST_NAME:
        raise ConfigurationError("files", f"{name!r} is reserved")
    return name


def read_manifest(lake: LakeFS, zone_prefix: str, week_label: str | date) -> Manifest | None:
    """The committed manifest of a week, or None when the week was never committed."""
    rel = manifest_rel(zone_prefix, week_label)
    try:
        data = lake.read_bytes(rel)
    except FileNotFoundError:
        return None
    try:
        return Manifest.model_validate_json(data)
    except ValueError as exc:
        raise IntegrityError(f"manifest {redact_url(lake.url(rel))} is not a valid manifest") from exc


def committed_files(lake: LakeFS, zone_prefix: str, week_label: str | date) -> dict[str, FileRef]:
    """Name -> FileRef of a committed week ({} when not committed). Staged files of other attempts never appear."""
    manifest = read_manifest(lake, zone_prefix, week_label)
    return dict(manifest.files) if manifest else {}


def committed_weeks(lake: LakeFS, zone_prefix: str) -> list[str]:
    """Week labels of ``zone_prefix`` that have a committed manifest, sorted."""
    prefix = validate_prefix(zone_prefix)
    weeks = []
    for rel in lake.list(prefix):
        parts = rel[len(prefix) + 1 :].split("/")
        if len(parts) == 2 and parts[1] == MANIFEST_NAME and parts[0].startswith("week="):
            weeks.append(parts[0][len("week=") :])
    return sorted(weeks)


def read_committed(lake: LakeFS, zone_prefix: str, week_label: str | date, name: str) -> pl.DataFrame:
    """Read one committed Parquet file, checking its bytes against the manifest's SHA-256."""
    files = committed_files(lake, zone_prefix, week_label)
    if name not in files:
        raise FileNotFoundError(2, "not in the committed manifest", f"{week_prefix(zone_prefix, week_label)}/{name}")
    ref = files[name]
    data = lake.read_bytes(ref.url)
    if sha256_bytes(data) != ref.sha256 or len(data) != ref.bytes:
        raise IntegrityError(f"lake file {redact_url(ref.url)} does not match its manifest (sha256/bytes)")
    return pl.read_parquet(io.BytesIO(data))


def _copy_source(lake: LakeFS, ref: FileRef, source: LakeFS | None, target_url: str) -> FileRef:
    """Copy a caller's FileRef to ``target_url`` on ``lake``, streamed (memory does not grow with the file), and
    checked against the ref's SHA-256 and size: a source that does not match is an IntegrityError and is not
    written."""
    scheme = urlsplit(ref.url).scheme or "file"
    if source is not None:
        reader = source
    elif scheme == lake.scheme:
        reader = lake
    elif scheme == "file":
        reader = None
    else:
        raise ConfigurationError("files", f"cannot read {redact_url(ref.url)}: pass source= for that store")

    def open_source() -> IO[bytes]:
        if reader is not None:
            return reader.open_read(ref.url)
        with lake._guard("read", ref.url):
            try:
                return fsspec.filesystem("file").open(urlsplit(ref.url).path, "rb")
            except FileNotFoundError:
                raise FileNotFoundError(2, "source file not found", redact_url(ref.url)) from None

    return lake.write_stream(
        target_url,
        open_source,
        rows=ref.rows,
        sha256=ref.sha256,
        size=ref.bytes,
        source_name=f"source file {redact_url(ref.url)}",
    )


def _same_content(manifest: Manifest, files: Mapping[str, FileRef], extra: dict[str, Any]) -> bool:
    if set(manifest.files) != set(files):
        return False
    for name, ref in files.items():
        old = manifest.files[name]
        if (old.sha256, old.rows, old.bytes) != (ref.sha256, ref.rows, ref.bytes):
            return False
    return _normalise(manifest.extra) == extra


def publish_week(
    lake: LakeFS,
    zone_prefix: str,
    week_label: str | date,
    files: Mapping[str, FileRef],
    extra: Mapping[str, Any] | None = None,
    *,
    attempt: str | None = None,
    source: LakeFS | None = None,
    deep_verify: bool = False,
    logger: Logger | None = None,
) -> PublishResult:
    """Publish ``files`` (name -> FileRef of a local/staged copy) as the week's committed data set.

    * Week already committed with the same files and ``extra``: each committed file is checked (size and SHA-256:
      blob metadata, or the bytes when local / ``deep_verify``); intact ones are skipped, missing or different
      ones are re-uploaded from ``files[name]`` to the committed URL. No manifest write.
    * Otherwise: copy each file into ``attempt=<attempt>/`` (a ref already there is adopted after a check), then
      commit with one atomic manifest write, then garbage-collect other attempts of that week.

    ``source`` reads FileRefs stored elsewhere (another lake); by default refs on this lake's scheme are read
    through this lake and ``file://`` refs from the local disk. Every source is checked against its own SHA-256.
    """
    logger = logger or log
    zone = validate_prefix(zone_prefix)
    week = validate_week_label(week_label)
    if not files:
        raise ConfigurationError("files", "nothing to publish")
    for name in files:
        _check_file_name(name)
    extra_norm = _normalise(dict(extra or {}))
    prefix = week_prefix(zone, week)

    current = read_manifest(lake, zone, week)
    if current is not None and _same_content(current, files, extra_norm):
        skipped, repaired = [], []
        for name in sorted(current.files):
            ref = current.files[name]
            if lake.file_ok(ref.url, ref.sha256, ref.bytes, deep=deep_verify):
                skipped.append(name)
                continue
            logger.warning("lake: committed %s/%s is missing or differs; re-uploading", prefix, name)
            _copy_source(lake, files[name], source, ref.url)
            repaired.append(name)
        status = "repaired" if repaired else "skipped"
        logger.info("lake: week %s %s (%d intact, %d repaired)", prefix, status, len(skipped), len(repaired))
        return PublishResult(status=status, manifest=current, skipped=skipped, repaired=repaired)

    attempt = validate_name(attempt or new_attempt_id(), "attempt")
    published: dict[str, FileRef] = {}
    for name in sorted(files):
        ref = files[name]
        target_url = lake.url(staging_rel(zone, week, attempt, name))
        if ref.url == target_url and lake.file_ok(target_url, ref.sha256, ref.bytes, deep=deep_verify):
            published[name] = ref
            continue
        published[name] = _copy_source(lake, ref, source, target_url)
    # Guard against a concurrent clean-up having removed what we staged: check right before the commit.
    for ref in published.values():
        if not lake.file_ok(ref.url, ref.sha256, ref.bytes):
            raise IntegrityError(f"staged file {redact_url(ref.url)} vanished or changed before the commit")
    manifest = Manifest(
        zone=zone,
        week=week,
        attempt=attempt,
        committed_at=datetime.now(UTC).isoformat(),
        files=published,
        file_count=len(published),
        total_rows=sum(r.rows for r in published.values()),
        total_bytes=sum(r.bytes for r in published.values()),
        extra=extra_norm,
    )
    lake.write_json_atomic(f"{prefix}/{MANIFEST_NAME}", manifest)  # the commit
    logger.info("lake: committed %s attempt=%s (%d files)", prefix, attempt, len(published))
    deleted = collect_garbage(lake, zone, week, keep_attempt=attempt, logger=logger)
    return PublishResult(status="published", manifest=manifest, written=sorted(published), deleted=deleted)


def collect_garbage(
    lake: LakeFS,
    zone_prefix: str,
    week_label: str | date,
    *,
    keep_attempt: str | None = None,
    logger: Logger | None = None,
) -> list[str]:
    """Delete a week's files that the committed manifest does not reference. Best effort; returns what went.

    Does nothing when the week has no manifest (the previous committed state is unknown, nothing is provably
    garbage). ``keep_attempt`` additionally protects that attempt's folder.
    """
    logger = logger or log
    manifest = read_manifest(lake, zone_prefix, week_label)
    if manifest is None:
        return []
    prefix = week_prefix(zone_prefix, week_label)
    keep = {lake.rel(ref.url) for ref in manifest.files.values() if ref.url.startswith(lake.base_url + "/")}
    keep.add(f"{prefix}/{MANIFEST_NAME}")
    protected = [f"{prefix}/attempt={a}/" for a in {manifest.attempt, keep_attempt} if a]
    deleted = []
    try:
        for rel in lake.list(prefix):
            if rel in keep or any(rel.startswith(p) for p in protected):
                continue
            if lake.delete(rel):
                deleted.append(rel)
    except PipelineError as exc:  # the commit already happened; the next publish retries the clean-up
        logger.warning("lake: garbage collection of %s stopped: %s", prefix, exc)
    if deleted:
        logger.info("lake: removed %d superseded file(s) under %s", len(deleted), prefix)
    return deleted
