"""What the pipeline tolerates and how it schedules itself."""

from __future__ import annotations

import re
from datetime import date
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, field_validator

# Names that end up in file paths (lake ``_pending/<pipeline>/``, ``salesforce/snapshot/<object>.parquet``), in SQL
# identifiers' company (tracking rows) or in Prefect object names: checked when the block is saved, not at the
# stage that first uses them (which may be after the extract and the load already ran).
_PIPELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # same rule as tasks.tracking
_SALESFORCE_API_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,79}$")
_VARIABLE_NAME = re.compile(r"^[a-z0-9_-]{1,255}$")  # Prefect's rule for Variable names


class PipelineSettings(Block):
    """Thresholds, timezone and Salesforce object mapping for the weekly reverse ETL."""

    _block_type_name = "Pipeline Settings"
    _block_type_slug = "weekly-etl-settings"
    _description = "Quality thresholds, timezone, first week and Salesforce object names of the weekly flow."
    # Validation errors must not echo inputs: a URL or secret typed into the wrong field would leak.
    model_config = ConfigDict(hide_input_in_errors=True)

    pipeline_name: str = Field(default="weekly-customer-metrics", description="Name used in tracking tables.")
    reject_threshold_pct: float = Field(
        default=5.0, ge=0, le=100, description="Quality gate: max rejected/fetched percentage."
    )
    sf_error_threshold_pct: float = Field(
        default=10.0, ge=0, le=100, description="Salesforce sync: max failed/sent percentage."
    )
    timezone: str = Field(default="UTC", description="IANA timezone the batch weeks are cut in.")
    first_week: date | None = Field(
        default=None, description="Week start used when no checkpoint exists (default: last complete week)."
    )
    stale_checkpoint_days: int = Field(default=14, ge=1, description="Warn when the checkpoint is older than this.")
    max_weeks_per_run: int = Field(default=12, ge=1, le=520, description="Catch-up cap: weeks processed per run.")
    checkpoint_variable: str = Field(
        default="weekly-checkpoint", description="Prefect Variable mirroring the next batch week."
    )
    salesforce_object: str = Field(default="Customer_Weekly_Metric__c", description="Target sObject API name.")
    external_id_field: str = Field(default="External_Id__c", description="External id field used for upserts.")
    check_during_extract: bool = Field(
        default=True,
        description=(
            "Run each raw part's contract check while the extract fetches the next pages, and store it under "
            "staging/ for the transform to reuse (overlaps the check with network waits; writes ~45% more bytes "
            "per week to the lake). Off: the transform validates every raw part after the extract."
        ),
    )
    salesforce_poll_seconds: float = Field(
        default=5.0, ge=0, le=300, description="Wait between Bulk API 2.0 job status polls (seconds)."
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA timezone {value!r}") from exc
        return value

    @field_validator("pipeline_name")
    @classmethod
    def _pipeline_name(cls, value: str) -> str:
        if not _PIPELINE_NAME.match(value) or ".." in value:
            raise ValueError("use 1-200 letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'")
        return value

    @field_validator("salesforce_object", "external_id_field")
    @classmethod
    def _api_name(cls, value: str) -> str:
        if not _SALESFORCE_API_NAME.match(value):
            raise ValueError("must be a Salesforce API name (a letter, then letters, digits or '_')")
        return value

    @field_validator("checkpoint_variable")
    @classmethod
    def _variable_name(cls, value: str) -> str:
        if not _VARIABLE_NAME.match(value):
            raise ValueError("must be a Prefect Variable name (lowercase letters, digits, '-' or '_')")
        return value

    @field_validator("first_week")
    @classmethod
    def _monday(cls, value: date | None) -> date | None:
        if value is not None and value.weekday() != 0:
            raise ValueError(f"{value.isoformat()} is a {value.strftime('%A')}, not a Monday")
        return value
