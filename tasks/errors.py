"""One place for the library's exceptions.

Each type says what the caller should do with it:

* ``RetryableError`` and its subclasses: a transient fault outside our control; try again later
  (Prefect task retries and tenacity key off this type).
* ``FatalError`` and its subclasses: retrying will not help; fix configuration, input or data.
* ``RecordRejected``: one row is bad; route it to rejects and carry on.

Messages never carry secrets: URLs pass through :func:`redact_url` before they are formatted.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SENSITIVE_QUERY_KEYS = frozenset(
    {
        "access_token",
        "api_key",
        "apikey",
        "auth",
        "client_secret",
        "code",
        "key",
        "password",
        "secret",
        "sig",
        "signature",
        "token",
        "sessionid",
        "session_id",
    }
)
REDACTED = "***"


def redact_url(url: object) -> str:
    """Return ``url`` without user info and with sensitive query values masked.

    Accepts anything with a ``str()`` (``httpx.URL``, ``yarl.URL``); never raises.
    """
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if k.lower() in SENSITIVE_QUERY_KEYS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()]+")


def redact_text(text: object) -> str:
    """``text`` with every URL in it passed through :func:`redact_url`."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))


class PipelineError(Exception):
    """Base of every error this library raises on purpose."""


# --- transient: retry -------------------------------------------------------------------------


class RetryableError(PipelineError):
    """A transient fault; the same call may succeed later."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SourceUnavailableError(RetryableError):
    """The source API answered 5xx, timed out or the connection failed."""


class RateLimitedError(RetryableError):
    """The source API answered 429; ``retry_after`` holds the server's hint in seconds, if any."""


class LakeUnavailableError(RetryableError):
    """The lake (local disk or blob store) could not be reached."""


class DatabaseUnavailableError(RetryableError):
    """The tracking or target database could not be reached or dropped the connection."""


class SalesforceUnavailableError(RetryableError):
    """Salesforce answered 5xx or could not be reached."""


class AlertDeliveryError(RetryableError):
    """An alert sink (Slack webhook, SMTP server) refused or could not be reached. Never carries the URL."""


# --- permanent: fail ---------------------------------------------------------------------------


class FatalError(PipelineError):
    """Retrying will not help."""


class ConfigurationError(FatalError):
    """A block, parameter or setting is invalid. ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SourceResponseError(FatalError):
    """The source answered with a permanent error (4xx other than 429) or a malformed page."""

    def __init__(self, message: str, *, status_code: int | None = None, url: str | None = None) -> None:
        if url is not None:
            message = f"{message} (url={redact_url(url)})"
        super().__init__(message)
        self.status_code = status_code


class MissingRecordsKeyError(SourceResponseError):
    """A page did not contain the configured records key."""


class PaginationLoopError(SourceResponseError):
    """The source handed out a page token it had already handed out."""


class IntegrityError(FatalError):
    """A written file does not match its manifest (row count or SHA-256)."""


class DataQualityError(FatalError):
    """The reject rate is over the configured threshold."""

    def __init__(self, rate_pct: float, threshold_pct: float, *, rejected: int, fetched: int) -> None:
        super().__init__(
            f"reject rate {rate_pct:.2f}% is over the threshold {threshold_pct:.2f}% "
            f"({rejected} of {fetched} records rejected)"
        )
        self.rate_pct = rate_pct
        self.threshold_pct = threshold_pct
        self.rejected = rejected
        self.fetched = fetched


class SalesforceSyncError(FatalError):
    """Salesforce rejected too many rows, or a Bulk job ended Failed/Aborted."""


class SalesforceAuthError(FatalError):
    """Salesforce refused the credentials."""


class DuplicateRunError(FatalError):
    """This pipeline already committed a successful run for the same week."""


class BackfillError(FatalError):
    """Some weeks of a backfill did not complete; ``failed`` lists them (week start -> final state)."""

    def __init__(self, failed: dict[str, str]) -> None:
        listed = ", ".join(f"{week} ({state})" for week, state in sorted(failed.items()))
        super().__init__(f"{len(failed)} week(s) did not complete: {listed}; re-run the backfill for them")
        self.failed = dict(failed)


class SourceFileError(FatalError):
    """A source extract file (or the source itself) holds a value that cannot be read; names file and field."""

    def __init__(self, file: str, field: str, message: str) -> None:
        super().__init__(f"{file}: {field}: {message}")
        self.file = file
        self.field = field


class DataTestError(FatalError):
    """At least one data test failed at error level; nothing was published."""

    def __init__(self, failed: list[str]) -> None:
        super().__init__(f"{len(failed)} data test(s) failed at error level: {', '.join(failed[:10])}")
        self.failed = failed


class ReconciliationError(FatalError):
    """Post-load reconciliation: marts do not match the source (row counts or totals)."""

    def __init__(self, mismatches: list[str]) -> None:
        super().__init__(f"reconciliation failed: {'; '.join(mismatches[:10])}")
        self.mismatches = mismatches


# --- one row -----------------------------------------------------------------------------------


class RecordRejected(PipelineError):
    """One record is invalid; ``field`` and ``reason`` go to the rejects table."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def is_retryable(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what it was raised from) says the caller should try again."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, RetryableError):
            return True
        if isinstance(exc, FatalError):
            return False
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


# --- appended: tracking database -----------------------------------------------------------------


class TrackingError(FatalError):
    """Tracking tables, checkpoint document or a pending replay item is invalid (the message names the field/file)."""


# --- ingestion (issue 6) -------------------------------------------------------------------------


class SourceFormatError(FatalError):
    """A CSV file or RSS/Atom feed cannot be read as a whole (undecodable, unsafe XML, bad header).

    The message names the file or feed (credentials redacted); single bad rows are rejects, not this.
    """

    def __init__(self, location: str, message: str) -> None:
        super().__init__(f"{redact_url(location)}: {message}")
        self.location = redact_url(location)


class SchemaDriftError(FatalError):
    """A source's fields appeared, disappeared or changed type and its drift policy is ``fail``."""

    def __init__(self, source: str, summary: str) -> None:
        super().__init__(f"schema drift in source {source!r}: {summary}")
        self.source = source


# --- appended: transform stage -------------------------------------------------------------------


class RawPartError(FatalError):
    """A raw Parquet part is missing, unreadable or lacks the raw columns (``_seq``, ``_page``, ``payload``)."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{redact_url(url)}: {message}")
        self.url = redact_url(url)


# --- lake (appended by the lake module) ---------------------------------------------------------------------------


class LakeConfigurationError(ConfigurationError):
    """The lake's URL or credentials are wrong: missing container, refused credentials, a request the store rejects.

    Fatal (a ConfigurationError); ``field`` is ``base_url`` or ``azure_credentials``.
    """
