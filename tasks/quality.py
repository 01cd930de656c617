"""Quality gate: reject rate against a threshold. Plain logic, no Prefect."""

from __future__ import annotations

from pydantic import BaseModel, Field

from tasks.errors import DataQualityError
from tasks.models import RunStatus


class QualityReport(BaseModel):
    fetched: int = Field(ge=0)
    rejected: int = Field(ge=0)
    duplicates: int = Field(ge=0, default=0)
    rate_pct: float
    threshold_pct: float
    status: RunStatus
    top_reject_reasons: list[tuple[str, int]] = Field(default_factory=list)


def reject_rate_pct(rejected: int, fetched: int) -> float:
    """rejected / fetched * 100; an empty week has a rate of 0."""
    if rejected < 0 or fetched < 0:
        raise ValueError("counts must be >= 0")
    if rejected > fetched:
        raise ValueError(f"rejected ({rejected}) cannot exceed fetched ({fetched})")
    return 0.0 if fetched == 0 else rejected / fetched * 100.0


def evaluate(
    fetched: int,
    rejected: int,
    threshold_pct: float,
    *,
    duplicates: int = 0,
    top_reject_reasons: list[tuple[str, int]] | None = None,
) -> QualityReport:
    """Grade a week: SUCCESS (no rejects), SUCCESS_WITH_REJECTS (rate <= threshold), FAILED (over)."""
    rate = reject_rate_pct(rejected, fetched)
    if rejected == 0:
        status = RunStatus.SUCCESS
    elif rate <= threshold_pct:
        status = RunStatus.SUCCESS_WITH_REJECTS
    else:
        status = RunStatus.FAILED
    return QualityReport(
        fetched=fetched,
        rejected=rejected,
        duplicates=duplicates,
        rate_pct=round(rate, 4),
        threshold_pct=threshold_pct,
        status=status,
        top_reject_reasons=list(top_reject_reasons or []),
    )


def enforce(report: QualityReport) -> QualityReport:
    """Raise DataQualityError when the report failed the gate; return it otherwise."""
    if report.status is RunStatus.FAILED:
        raise DataQualityError(report.rate_pct, report.threshold_pct, rejected=report.rejected, fetched=report.fetched)
    return report
