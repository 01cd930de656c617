"""Salesforce sync stage: upsert weekly metrics through Bulk API 2.0 with simple-salesforce, unchanged.

Flow of one :func:`sync_metrics` call::

    metrics Parquet --(format, validate)--> string frame --(row hash, diff against snapshot)--> changed rows
      --(split under max_csv_bytes)--> CSV chunks --(one Bulk 2.0 upsert job per chunk)--> per-row results
      --> failed_rows.parquet, snapshot.parquet (confirmed rows only), SyncResult

CSV contract (what Salesforce receives; the cells are shaped by :mod:`tasks.salesforce_csv`):

* Columns: the external id first, then every other column sorted by name (stable whatever the input order).
* Dates ``YYYY-MM-DD``; datetimes converted to UTC and written ``YYYY-MM-DDTHH:MM:SS.fffZ`` (naive datetimes are
  taken as UTC); floats in plain decimal (never scientific); booleans ``true``/``false``; LF line endings; a field
  is quoted only when it contains a comma, a quote, CR or LF.
* Nulls. In Bulk 2.0 an empty cell means "leave the field unchanged", so an empty cell is never written. Every
  column is REQUIRED (non-null, and a string column non-empty) unless listed in ``clear_nulls``; a null in a
  required column fails the sync naming the column. Columns in ``clear_nulls`` send a null as ``#N/A`` (= set the
  field to null in Salesforce); an empty string there counts as null. For the weekly metrics every column is
  required: ``External_Id__c``, ``Customer_Id__c``, ``Week_Start__c``, the ``*_Count__c`` columns,
  ``Total_Amount__c``, ``Currency__c`` and ``Last_Event_At__c`` are all computed for every customer-week.

Diff sync: the snapshot at ``snapshot_rel`` holds ``external_id, row_hash, job_id, confirmed_at`` for rows
Salesforce CONFIRMED (listed in successfulResults). A row is sent when it is new or its hash changed. The hash is
BLAKE2b over the exact CSV cell strings (plus the header), so it is stable across Polars versions (Polars' own
``hash`` is documented as not stable). Failed or unprocessed rows never enter the snapshot and are re-sent on the
next run. Known limit: an edit made directly in Salesforce is not detected (we diff against what we sent).

simple-salesforce 1.12.10 is used unchanged. Its high-level ``sf.bulk2.<obj>.upsert`` hides job ids on failure and
cannot retry a poll, so this module drives the library's lower-level ``_Bulk2Client`` (create_job, upload_job_data,
close_job, get_job, abort_job) and ``util.call_salesforce`` for result CSVs (read as bytes, decoded UTF-8).
``_Bulk2Client`` is a private name: the version is pinned in the lock; re-check on upgrade.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import polars as pl
import requests
from pydantic import BaseModel, Field
from requests.adapters import HTTPAdapter
from simple_salesforce import Salesforce
from simple_salesforce.bulk2 import _Bulk2Client
from simple_salesforce.exceptions import (
    SalesforceAuthenticationFailed,
    SalesforceBulkV2LoadError,
    SalesforceError,
    SalesforceExpiredSession,
)
from simple_salesforce.util import call_salesforce
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from blocks.salesforce import SalesforceCredentials
from tasks import salesforce_csv
from tasks.errors import (
    ConfigurationError,
    SalesforceAuthError,
    SalesforceSyncError,
    SalesforceUnavailableError,
    redact_url,
)
from tasks.lake import LakeFS
from tasks.models import FileRef

T = TypeVar("T")

DEFAULT_OBJECT = "Customer_Weekly_Metric__c"
DEFAULT_EXTERNAL_ID = "External_Id__c"
SALESFORCE_BATCH_RECORDS = 10_000  # Salesforce splits every ingest job into internal batches of this size
BULK2_MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # simple-salesforce refuses larger uploads (Salesforce: 150 MB base64)
SNAPSHOT_SCHEMA = {
    "external_id": pl.String,
    "row_hash": pl.String,
    "job_id": pl.String,
    "confirmed_at": pl.Datetime("us", "UTC"),
}
_TERMINAL = ("JobComplete", "Failed", "Aborted")

# requests' default is no timeout at all; a hung Salesforce must not hang the flow forever.
DEFAULT_TIMEOUT = (30.0, 300.0)


class SyncResult(BaseModel):
    """What one sync did. Counts are rows (records), not Salesforce batches."""

    dry_run: bool
    object_name: str
    considered: int = Field(ge=0, description="Rows in the metrics file.")
    unchanged: int = Field(ge=0, description="Rows skipped: same hash as the last confirmed sync.")
    sent: int = Field(ge=0, description="Changed rows selected for upload (dry run: rows that would be uploaded).")
    succeeded: int = Field(ge=0, description="Rows Salesforce confirmed (successfulResults).")
    created: int = Field(default=0, ge=0, description="Of the succeeded rows, how many Salesforce created.")
    failed: int = Field(ge=0, description="Rows in failedResults.")
    unprocessed: int = Field(
        ge=0, description="Rows Salesforce did not process, returned no result for, or never received (job stopped)."
    )
    error_rate_pct: float = Field(ge=0, description="(failed + unprocessed) / sent * 100; 0 when nothing was sent.")
    job_ids: list[str] = Field(default_factory=list)
    failed_rows: FileRef | None = None
    outbox: FileRef | None = Field(default=None, description="The first outbox CSV (the only one unless chunked).")
    outbox_files: list[FileRef] = Field(default_factory=list, description="Every CSV uploaded / to upload.")
    snapshot: FileRef | None = None


# --- connecting -------------------------------------------------------------------------------------------------


class _TimeoutAdapter(HTTPAdapter):
    """Gives every request a timeout unless the caller set one (simple-salesforce never does)."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = DEFAULT_TIMEOUT
        return super().send(request, **kwargs)


def _default_session() -> requests.Session:
    session = requests.Session()
    adapter = _TimeoutAdapter()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _secrets_of(creds: SalesforceCredentials) -> list[str]:
    values = [creds.password, creds.security_token, creds.session_id, creds.consumer_secret]
    return [v.get_secret_value() for v in values if v is not None and len(v.get_secret_value()) >= 3]


def _scrub(text: str, secrets: Collection[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _client_credentials_domain(creds: SalesforceCredentials) -> str:
    if creds.domain not in ("login", "test"):
        return creds.domain
    host = urlsplit(creds.instance_url or "").hostname or ""
    if host.endswith(".salesforce.com"):
        return host.removesuffix(".salesforce.com")
    raise ConfigurationError(
        "domain",
        "client_credentials needs a My Domain (e.g. 'acme.my') or an instance_url on *.salesforce.com; "
        "Salesforce does not accept this grant on login/test",
    )


def connect(creds: SalesforceCredentials, *, session: requests.Session | None = None) -> Salesforce:
    """Log in with ``creds`` (password+token SOAP login, session id + instance URL, or OAuth client_credentials).

    ``session`` lets the caller route or configure HTTP (tests route to the fake); by default a session with
    timeouts is used. Raises SalesforceAuthError (no secret in the text) when Salesforce refuses the login,
    SalesforceUnavailableError when it cannot be reached or answers 5xx.
    """
    session = session or _default_session()
    secrets = _secrets_of(creds)
    try:
        if creds.auth_mode == "password":
            return Salesforce(
                username=creds.username,
                password=creds.password.get_secret_value() if creds.password else None,
                security_token=creds.security_token.get_secret_value() if creds.security_token else "",
                domain=creds.domain,
                version=creds.api_version,
                session=session,
            )
        if creds.auth_mode == "session":
            return Salesforce(
                session_id=creds.session_id.get_secret_value() if creds.session_id else None,
                instance_url=creds.instance_url,
                version=creds.api_version,
                session=session,
            )
        return Salesforce(
            consumer_key=creds.consumer_key,
            consumer_secret=creds.consumer_secret.get_secret_value() if creds.consumer_secret else None,
            domain=_client_credentials_domain(creds),
            version=creds.api_version,
            session=session,
        )
    except SalesforceAuthenticationFailed as exc:
        code = getattr(exc, "code", None)
        detail = _scrub(str(getattr(exc, "auth_message", "")), secrets)[:300]
        if isinstance(code, int) and code >= 500:
            raise SalesforceUnavailableError(f"Salesforce login answered HTTP {code}") from None
        raise SalesforceAuthError(
            f"Salesforce refused the login (auth_mode={creds.auth_mode}, domain={creds.domain}): {code}: {detail}"
        ) from None
    except requests.RequestException as exc:
        raise SalesforceUnavailableError(
            f"Salesforce login could not reach the server ({type(exc).__name__}, domain={creds.domain})"
        ) from None


# --- Bulk API 2.0 -----------------------------------------------------------------------------------------------


class _SessionExpired(Exception):
    pass


def _status(exc: SalesforceError) -> int:
    try:
        return int(exc.status)
    except (TypeError, ValueError):
        return 0


class _Bulk:
    """One object's Bulk 2.0 ingest calls, with error mapping, GET retries and one re-login per call."""

    def __init__(
        self,
        sf: Salesforce,
        object_name: str,
        reauth: Callable[[], Salesforce] | None,
        *,
        retry_attempts: int,
        retry_backoff: float,
        logger: logging.Logger | logging.LoggerAdapter,
    ) -> None:
        self.object_name = object_name
        self.reauth = reauth
        self.retry_attempts = max(1, retry_attempts)
        self.retry_backoff = retry_backoff
        self.logger = logger
        self.reauths = 0
        self._use(sf)

    def _use(self, sf: Salesforce) -> None:
        handler = sf.bulk2
        self.client = _Bulk2Client(self.object_name, handler.bulk2_url, handler.headers, handler.session)

    def _once(self, what: str, fn: Callable[[_Bulk2Client], T]) -> T:
        try:
            return fn(self.client)
        except SalesforceExpiredSession:
            raise _SessionExpired() from None
        except SalesforceError as exc:
            status = _status(exc)
            content = str(exc.content)[:500]
            if status >= 500:
                raise SalesforceUnavailableError(f"Salesforce {what}: HTTP {status}: {content}") from None
            raise SalesforceSyncError(f"Salesforce {what}: HTTP {status}: {content}") from None
        except SalesforceBulkV2LoadError as exc:
            raise SalesforceSyncError(f"Salesforce {what}: {exc}") from None
        except requests.RequestException as exc:
            raise SalesforceUnavailableError(f"Salesforce {what}: {type(exc).__name__}") from None

    def call(self, what: str, fn: Callable[[_Bulk2Client], T], *, idempotent: bool = False) -> T:
        """Run ``fn(client)``. GETs (``idempotent``) retry 5xx/connection errors with backoff; a 401 re-logs in
        once through ``reauth`` and repeats the call; a second 401 is SalesforceAuthError."""
        reauthed = False
        while True:
            try:
                if not idempotent:
                    return self._once(what, fn)
                for attempt in Retrying(
                    retry=retry_if_exception_type(SalesforceUnavailableError),
                    stop=stop_after_attempt(self.retry_attempts),
                    wait=wait_exponential(multiplier=self.retry_backoff, max=60),
                    reraise=True,
                    before_sleep=lambda rs: self.logger.warning(
                        "Salesforce %s failed (%s); retry %d", what, rs.outcome.exception(), rs.attempt_number
                    ),
                ):
                    with attempt:
                        return self._once(what, fn)
                raise AssertionError("unreachable")  # pragma: no cover
            except _SessionExpired:
                if self.reauth is None or reauthed:
                    again = " again after re-authenticating" if reauthed else ""
                    raise SalesforceAuthError(f"Salesforce session expired or invalid{again} ({what})") from None
                reauthed = True
                self.reauths += 1
                self.logger.info("Salesforce session expired during %s; logging in again", what)
                self._use(self.reauth())

    # the calls

    def create(self, external_id_field: str) -> str:
        res = self.call(
            "create job",
            lambda c: c.create_job("upsert", external_id_field=external_id_field, line_ending="LF"),
        )
        job_id = res.get("id")
        if not job_id or res.get("state") != "Open":
            raise SalesforceSyncError(f"Salesforce create job: unexpected answer (state={res.get('state')!r})")
        return str(job_id)

    def upload(self, job_id: str, data: str) -> None:
        self.call(f"upload job {job_id}", lambda c: c.upload_job_data(job_id, data))

    def close(self, job_id: str) -> None:
        self.call(f"close job {job_id}", lambda c: c.close_job(job_id))

    def info(self, job_id: str) -> dict[str, Any]:
        return dict(self.call(f"get job {job_id}", lambda c: c.get_job(job_id, False), idempotent=True))

    def abort_quietly(self, job_id: str) -> None:
        try:
            self.call(f"abort job {job_id}", lambda c: c.abort_job(job_id, False))
        except Exception as exc:  # noqa: BLE001 - best effort while another error is on its way up
            self.logger.warning("could not abort Salesforce job %s: %s", job_id, type(exc).__name__)

    def results(self, job_id: str, kind: str) -> pl.DataFrame:
        """One result CSV (successfulResults, failedResults, unprocessedrecords) as an all-String frame."""

        def fetch(c: _Bulk2Client) -> bytes:
            url = f"{c._construct_request_url(job_id, False)}/{kind}"
            headers = c._get_headers(c.JSON_CONTENT_TYPE, c.CSV_CONTENT_TYPE)
            return call_salesforce(url=url, method="GET", session=c.session, headers=headers).content

        data = self.call(f"{kind} of job {job_id}", fetch, idempotent=True)
        if not data.strip():
            return pl.DataFrame()
        return pl.read_csv(io.BytesIO(data), infer_schema=False)


@dataclass
class _JobOutcome:
    job_id: str
    state: str
    error_message: str | None
    sent: pl.DataFrame  # the string frame uploaded, with row_hash
    ok: pl.DataFrame = field(default_factory=pl.DataFrame)  # external_id, row_hash, created
    bad: pl.DataFrame = field(default_factory=pl.DataFrame)  # failed-rows shape


def _failed_frame(frame: pl.DataFrame, external_id_field: str, *, kind: str, job_id: str, error: str | None):
    if frame.height == 0:
        return None
    cols = [c for c in frame.columns if not c.startswith("sf__")]
    return frame.select(
        pl.col(external_id_field).alias("external_id"),
        (pl.col("sf__Error") if error is None else pl.lit(error)).cast(pl.String).alias("error"),
        pl.lit(kind).alias("kind"),
        pl.lit(job_id).alias("job_id"),
        (pl.col("sf__Id") if "sf__Id" in frame.columns else pl.lit(None)).cast(pl.String).alias("sf_id"),
        *[pl.col(c).cast(pl.String) for c in cols],
    )


def _run_job(
    bulk: _Bulk,
    chunk: pl.DataFrame,
    csv_text: str,
    *,
    external_id_field: str,
    wait: float,
    job_timeout_s: float,
    progress: Callable[[int], None],
    logger: logging.Logger | logging.LoggerAdapter,
) -> _JobOutcome:
    job_id = bulk.create(external_id_field)
    try:
        bulk.upload(job_id, csv_text)
        bulk.close(job_id)
    except Exception:
        bulk.abort_quietly(job_id)
        raise
    logger.info("Salesforce job %s: %d rows (%d bytes) uploaded", job_id, chunk.height, len(csv_text))
    time.sleep(max(wait, 0.0))
    interval = wait if wait > 0 else 0.05
    deadline = time.monotonic() + job_timeout_s
    while True:
        info = bulk.info(job_id)
        state = str(info.get("state"))
        processed = int(info.get("numberRecordsProcessed") or 0)
        progress(math.ceil(processed / SALESFORCE_BATCH_RECORDS))
        if state in _TERMINAL:
            break
        if time.monotonic() > deadline:
            raise SalesforceUnavailableError(
                f"Salesforce job {job_id} still {state} after {job_timeout_s:.0f}s (left running)"
            )
        time.sleep(interval)
    outcome = _JobOutcome(job_id=job_id, state=state, error_message=info.get("errorMessage"), sent=chunk)
    success = bulk.results(job_id, "successfulResults")
    failed = bulk.results(job_id, "failedResults")
    unprocessed = bulk.results(job_id, "unprocessedrecords")
    keys = chunk.select(external_id_field, pl.col(salesforce_csv.ROW_HASH).alias("row_hash"))
    ok = pl.DataFrame(schema={"external_id": pl.String, "row_hash": pl.String, "created": pl.Boolean})
    if success.height:
        ok = success.select(
            pl.col(external_id_field).alias("external_id"),
            (pl.col("sf__Created").str.to_lowercase() == "true").alias("created"),
        ).join(keys.rename({external_id_field: "external_id"}), on="external_id", how="inner")
        ok = ok.select("external_id", "row_hash", "created")
    parts = [
        _failed_frame(failed, external_id_field, kind="failed", job_id=job_id, error=None),
        _failed_frame(
            unprocessed,
            external_id_field,
            kind="unprocessed",
            job_id=job_id,
            error=f"unprocessed: job ended {state}" + (f": {outcome.error_message}" if outcome.error_message else ""),
        ),
    ]
    seen = pl.concat(
        [f.select(pl.col(external_id_field).alias("external_id")) for f in (success, failed, unprocessed) if f.height]
        or [pl.DataFrame(schema={"external_id": pl.String})]
    )
    missing = chunk.join(seen, left_on=external_id_field, right_on="external_id", how="anti").drop(
        salesforce_csv.ROW_HASH
    )
    parts.append(
        _failed_frame(
            missing,
            external_id_field,
            kind="unprocessed",
            job_id=job_id,
            error=f"no result returned by Salesforce (job ended {state})",
        )
    )
    present = [p for p in parts if p is not None]
    outcome.ok = ok
    outcome.bad = pl.concat(present, how="diagonal_relaxed") if present else pl.DataFrame()
    logger.info(
        "Salesforce job %s %s: %d succeeded, %d failed, %d unprocessed",
        job_id,
        state,
        ok.height,
        failed.height,
        outcome.bad.height - failed.height,
    )
    return outcome


# --- the stage --------------------------------------------------------------------------------------------------


def _read_snapshot(lake: LakeFS, snapshot_rel: str) -> pl.DataFrame:
    if not lake.exists(snapshot_rel):
        return pl.DataFrame(schema=SNAPSHOT_SCHEMA)
    snap = lake.read_parquet(snapshot_rel)
    missing = set(SNAPSHOT_SCHEMA) - set(snap.columns)
    if missing:
        raise SalesforceSyncError(f"snapshot {lake.url(snapshot_rel)} lacks columns {sorted(missing)}")
    return snap.select(pl.col(k).cast(v) for k, v in SNAPSHOT_SCHEMA.items())


def _failed_schema_frame() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "external_id": pl.String,
            "error": pl.String,
            "kind": pl.String,
            "job_id": pl.String,
            "sf_id": pl.String,
        }
    )


def sync_metrics(
    lake: LakeFS,
    metrics_url: str,
    *,
    sf: Salesforce | None,
    object_name: str = DEFAULT_OBJECT,
    external_id_field: str = DEFAULT_EXTERNAL_ID,
    out_prefix: str,
    snapshot_rel: str,
    error_threshold_pct: float = 10.0,
    max_csv_bytes: int = 100_000_000,
    wait: float = 5,
    reauth: Callable[[], Salesforce] | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    clear_nulls: Collection[str] = (),
    retry_attempts: int = 5,
    retry_backoff: float = 1.0,
    job_timeout_s: float = 6 * 3600,
) -> SyncResult:
    """Upsert the changed rows of ``metrics_url`` into ``object_name`` (Bulk API 2.0), or write them to the outbox
    when ``sf`` is None (dry run).

    Writes ``{out_prefix}/outbox/<object>-<n>.csv`` (the exact CSVs), and for a real run
    ``{out_prefix}/failed_rows.parquet`` (external_id, error, kind, job_id, sf_id, the row's values as sent) and
    the snapshot at ``snapshot_rel``. ``on_progress(done, total)`` counts Salesforce's internal 10,000-record
    batches. ``wait`` is the pause before the first poll and between polls (seconds).

    Raises SalesforceSyncError when the error rate is over ``error_threshold_pct`` or a job ends Failed/Aborted
    (after writing the failed rows and the snapshot of what was confirmed), SalesforceUnavailableError on 5xx or
    connection errors (GETs are retried first), SalesforceAuthError when the session is refused and ``reauth``
    cannot fix it.
    """
    log = logger or logging.getLogger(__name__)
    if not 0 <= error_threshold_pct <= 100:
        raise ConfigurationError("error_threshold_pct", f"must be within 0..100, got {error_threshold_pct}")
    if not 0 < max_csv_bytes <= BULK2_MAX_UPLOAD_BYTES:
        raise ConfigurationError("max_csv_bytes", f"must be within 1..{BULK2_MAX_UPLOAD_BYTES}, got {max_csv_bytes}")
    if not salesforce_csv.FIELD_NAME.match(object_name):
        raise ConfigurationError("object_name", f"{object_name!r} is not a Salesforce API name")
    dry_run = sf is None
    source = redact_url(metrics_url)

    frame = lake.read_parquet(metrics_url)
    text, columns = salesforce_csv.prepare(
        frame, external_id_field=external_id_field, clear_nulls=clear_nulls, source=source
    )
    del frame
    text = text.with_columns(salesforce_csv.row_hashes(text, columns))
    snapshot = _read_snapshot(lake, snapshot_rel)
    joined = text.join(
        snapshot.select(pl.col("external_id").alias(external_id_field), pl.col("row_hash").alias("_prev")),
        on=external_id_field,
        how="left",
    )
    changed = joined.filter(pl.col("_prev").is_null() | (pl.col("_prev") != pl.col(salesforce_csv.ROW_HASH))).drop(
        "_prev"
    )
    considered, unchanged = text.height, text.height - changed.height
    del text, joined
    log.info(
        "Salesforce %s%s: %d rows considered, %d unchanged since the last confirmed sync, %d to send",
        object_name,
        " (dry run)" if dry_run else "",
        considered,
        unchanged,
        changed.height,
    )

    chunks = list(salesforce_csv.chunks(changed, columns, max_csv_bytes)) if changed.height else []
    payloads: list[tuple[pl.DataFrame, str]] = []
    outbox_files: list[FileRef] = []
    for n, chunk in enumerate(chunks, start=1):
        data = salesforce_csv.write_csv(chunk.select(columns))
        if len(data) > max_csv_bytes:  # the size arithmetic above is exact; this guards the invariant
            raise SalesforceSyncError(f"internal: CSV chunk {n} is {len(data)} bytes, over {max_csv_bytes}")
        outbox_files.append(lake.write_bytes(f"{out_prefix}/outbox/{object_name}-{n}.csv", data, rows=chunk.height))
        payloads.append((chunk, data.decode()))
    sent = changed.height
    del chunks, changed

    if dry_run:
        return SyncResult(
            dry_run=True,
            object_name=object_name,
            considered=considered,
            unchanged=unchanged,
            sent=sent,
            succeeded=0,
            failed=0,
            unprocessed=0,
            error_rate_pct=0.0,
            outbox=outbox_files[0] if outbox_files else None,
            outbox_files=outbox_files,
        )

    total_batches = sum(math.ceil(chunk.height / SALESFORCE_BATCH_RECORDS) for chunk, _ in payloads)
    done_batches = 0
    last_reported = -1

    def progress(done_in_job: int) -> None:
        nonlocal last_reported
        value = min(done_batches + done_in_job, total_batches)
        if on_progress is not None and value != last_reported:
            last_reported = value
            on_progress(value, total_batches)

    bulk = _Bulk(sf, object_name, reauth, retry_attempts=retry_attempts, retry_backoff=retry_backoff, logger=log)
    outcomes: list[_JobOutcome] = []
    job_error: SalesforceSyncError | None = None
    # Whatever happens, record what Salesforce confirmed: the snapshot then holds exactly the confirmed rows, and
    # everything else is sent again next run.
    persist = functools.partial(
        _persist,
        lake,
        outcomes,
        snapshot,
        object_name=object_name,
        out_prefix=out_prefix,
        snapshot_rel=snapshot_rel,
        considered=considered,
        unchanged=unchanged,
        sent=sent,
        outbox_files=outbox_files,
        logger=log,
    )
    try:
        for chunk, data in payloads:
            outcome = _run_job(
                bulk,
                chunk,
                data,
                external_id_field=external_id_field,
                wait=wait,
                job_timeout_s=job_timeout_s,
                progress=progress,
                logger=log,
            )
            outcomes.append(outcome)
            done_batches += math.ceil(chunk.height / SALESFORCE_BATCH_RECORDS)
            progress(0)
            if outcome.state != "JobComplete":
                job_error = SalesforceSyncError(
                    f"Salesforce job {outcome.job_id} ended {outcome.state}: "
                    f"{outcome.error_message or 'no errorMessage given'}"
                )
                break
    except BaseException:
        try:
            persist()
        except Exception as exc:  # noqa: BLE001 - keep the original error; this one is secondary
            log.error("could not record the confirmed Salesforce rows: %s: %s", type(exc).__name__, exc)
        raise
    result = persist()
    if job_error is not None:
        job_error.result = result  # type: ignore[attr-defined]
        raise job_error
    if result.error_rate_pct > error_threshold_pct:
        err = SalesforceSyncError(
            f"Salesforce error rate {result.error_rate_pct:.2f}% is over the threshold {error_threshold_pct:.2f}% "
            f"({result.failed} failed, {result.unprocessed} unprocessed of {result.sent} sent; "
            f"failed rows in {result.failed_rows.url if result.failed_rows else '-'})"
        )
        err.result = result  # type: ignore[attr-defined]
        err.rate_pct = result.error_rate_pct  # type: ignore[attr-defined]
        err.threshold_pct = error_threshold_pct  # type: ignore[attr-defined]
        raise err
    return result


def _persist(
    lake: LakeFS,
    outcomes: list[_JobOutcome],
    snapshot: pl.DataFrame,
    *,
    object_name: str,
    out_prefix: str,
    snapshot_rel: str,
    considered: int,
    unchanged: int,
    sent: int,
    outbox_files: list[FileRef],
    logger: logging.Logger | logging.LoggerAdapter,
) -> SyncResult:
    now = datetime.now(UTC)
    ok_parts = [o.ok.with_columns(pl.lit(o.job_id).alias("job_id")) for o in outcomes if o.ok.height]
    bad_parts = [o.bad for o in outcomes if o.bad.height]
    confirmed = (
        pl.concat(ok_parts).with_columns(pl.lit(now).cast(SNAPSHOT_SCHEMA["confirmed_at"]).alias("confirmed_at"))
        if ok_parts
        else pl.DataFrame(schema={**SNAPSHOT_SCHEMA, "created": pl.Boolean})
    )
    bad = pl.concat([_failed_schema_frame(), *bad_parts], how="diagonal_relaxed")
    failed_ref = lake.write_parquet(bad, f"{out_prefix}/failed_rows.parquet")
    snapshot_ref: FileRef | None = None
    if confirmed.height or not lake.exists(snapshot_rel):
        merged = pl.concat(
            [
                snapshot.join(confirmed.select("external_id"), on="external_id", how="anti"),
                confirmed.select(list(SNAPSHOT_SCHEMA)),
            ]
        ).sort("external_id")
        snapshot_ref = lake.write_parquet(merged, snapshot_rel)
    failed = bad.filter(pl.col("kind") == "failed").height
    unprocessed = bad.height - failed
    succeeded = confirmed.height
    # Salesforce accounted for every row we sent, and nothing else: otherwise counts would lie.
    if succeeded + bad.height != sum(o.sent.height for o in outcomes):
        logger.warning(
            "Salesforce results do not add up: %d succeeded + %d failed/unprocessed for %d rows uploaded",
            succeeded,
            bad.height,
            sum(o.sent.height for o in outcomes),
        )
    # Rows of jobs never started (after a failed job) count as unprocessed too.
    not_started = sent - sum(o.sent.height for o in outcomes)
    unprocessed += max(not_started, 0)
    rate = (failed + unprocessed) / sent * 100 if sent else 0.0
    return SyncResult(
        dry_run=False,
        object_name=object_name,
        considered=considered,
        unchanged=unchanged,
        sent=sent,
        succeeded=succeeded,
        created=int(confirmed.get_column("created").sum()) if "created" in confirmed.columns else 0,
        failed=failed,
        unprocessed=unprocessed,
        error_rate_pct=round(rate, 4),
        job_ids=[o.job_id for o in outcomes],
        failed_rows=failed_ref,
        outbox=outbox_files[0] if outbox_files else None,
        outbox_files=outbox_files,
        snapshot=snapshot_ref,
    )
