"""Small hand-off objects passed between stages: lake URLs plus counts and hashes, never frames."""

from __future__ import annotations

from datetime import date, timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class RunStatus(StrEnum):
    """Status of a run (and of a stage, which may also be SKIPPED)."""

    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    SUCCESS_WITH_REJECTS = "SUCCESS_WITH_REJECTS"
    FAILED = "FAILED"
    SUPERSEDED = "SUPERSEDED"  # a successful run replaced by a full-refresh run of the same week


class FileRef(BaseModel):
    """One file in the lake: where it is, how many rows, and its content hash."""

    model_config = ConfigDict(frozen=True)

    url: str = Field(description="fsspec URL of the file (no credentials in it).")
    rows: int = Field(ge=0, description="Row count written.")
    sha256: str = Field(description="Hex SHA-256 of the file's bytes.")
    bytes: int = Field(ge=0, description="Size in bytes.")


class Window(BaseModel):
    """A batch week: Monday ``start`` to Sunday ``end``, both inclusive (dates in the pipeline timezone)."""

    model_config = ConfigDict(frozen=True)

    start: date
    end: date

    @classmethod
    def for_week(cls, week_start: date) -> Window:
        return cls(start=week_start, end=week_start + timedelta(days=6))

    @property
    def label(self) -> str:
        return self.start.isoformat()


class ValidatedPart(BaseModel):
    """The contract check of ONE raw part, done while the extract was still fetching (see tasks.part_checks).

    Valid only for the raw part it names (URL and SHA-256) and for the validation code it was made with
    (``fingerprint``); the transform re-validates the raw part when either differs or a file is missing.
    """

    raw: FileRef = Field(description="The raw part this validates, as it was (URL, SHA-256, rows = valid + rejects).")
    valid: FileRef = Field(description="Rows that passed the contract (normalized columns and an id hash).")
    rejects: FileRef = Field(description="Rows that failed the contract, with field, reason and raw payload.")
    fingerprint: str = Field(description="Hash of the validation code (tasks/contract.py + tasks/validation.py).")


class ExtractResult(BaseModel):
    """What the extract stage produced: raw Parquet parts in the lake's raw zone."""

    window: Window
    files: list[FileRef]
    pages: int
    rows: int
    validated: list[ValidatedPart] = Field(
        default_factory=list,
        description="Contract checks of raw parts made as they landed (an optimization: may be partial or empty).",
    )


class TransformResult(BaseModel):
    """Valid events, rejects and weekly metrics, each a Parquet file (not yet published)."""

    window: Window
    fetched: int
    valid: FileRef
    rejects: FileRef
    metrics: FileRef
    rejected: int = Field(ge=0, description="Rows that failed the contract or the window (count toward the rate).")
    duplicates: int = Field(
        ge=0,
        description="Rows superseded by a later record with the same event id (kept in rejects, not in the rate).",
    )
    top_reject_reasons: list[tuple[str, int]] = Field(default_factory=list)


class Manifest(BaseModel):
    """Commit marker of one published lake week (``<zone>/week=<YYYY-MM-DD>/_manifest.json``).

    Written last, in one atomic write; readers trust only the files it lists (see tasks/publish.py).
    """

    model_config = ConfigDict(frozen=True)

    format_version: int = 1
    zone: str = Field(description="Zone prefix relative to the lake root, e.g. 'curated/events'.")
    week: str = Field(description="Week label YYYY-MM-DD (the Monday).")
    attempt: str = Field(description="Publish attempt whose folder holds the data files.")
    committed_at: str = Field(description="UTC ISO-8601 timestamp of the commit.")
    files: dict[str, FileRef] = Field(description="Logical name -> committed file (URL, rows, sha256, bytes).")
    file_count: int = Field(ge=0)
    total_rows: int = Field(ge=0)
    total_bytes: int = Field(ge=0)
    extra: dict[str, object] = Field(default_factory=dict, description="Caller's counts/notes (JSON values).")
