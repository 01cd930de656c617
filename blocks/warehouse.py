"""Warehouse flow configuration: one settings block per environment and an SMTP alert server block.

prefect 3.9 ships no SMTP e-mail block (``prefect-email`` is a separate collection), so :class:`SmtpAlertServer`
holds the SMTP connection; Slack alerts reuse Prefect's own ``SlackWebhook`` block (only its URL is used).
"""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator


class WarehouseSettings(Block):
    """Schemas, business rules, data-test freshness, reconciliation and alerting of the warehouse flow."""

    _block_type_name = "Warehouse Settings"
    _block_type_slug = "weekly-etl-warehouse-settings"
    _description = "Schemas, overlap window, business rules, freshness, reconciliation and alert routing."

    database_block: str | None = Field(
        default=None,
        description="SqlAlchemyConnector block of the warehouse (raw/marts/meta); None: warehouse-database-<env>.",
    )
    source_database_block: str | None = Field(
        default=None, description="SqlAlchemyConnector block of the OLTP source (None: same database)."
    )
    source_schema: str = Field(default="oltp", description="Schema of the OLTP source tables.")
    raw_schema: str = Field(default="raw", description="Schema the source is copied into.")
    marts_schema: str = Field(default="marts", description="Schema of the published marts.")
    overlap_minutes: int = Field(
        default=10, ge=0, le=7 * 24 * 60, description="Re-read window before the watermark (late/boundary rows)."
    )
    budget_below: float = Field(default=20.0, gt=0, description="Pricing tier: unit price below this is budget.")
    premium_from: float = Field(default=100.0, gt=0, description="Pricing tier: unit price from this is premium.")
    freshness_warn_hours: float = Field(
        default=48.0, gt=0, description="Data test: warn when the newest order is older than this."
    )
    freshness_error_hours: float = Field(
        default=720.0, gt=0, description="Data test: fail when the newest order is older than this."
    )
    reconcile_against: Literal["raw", "source"] = Field(
        default="raw",
        description="Reconcile marts with the raw snapshot that was modelled, or with the live source schema.",
    )
    reconcile_tolerance: float = Field(
        default=0.0, ge=0, description="Allowed absolute difference per reconciliation check (rows or currency)."
    )
    alert_window_minutes: float = Field(
        default=60.0, gt=0, description="Throttle: at most one alert per key per window."
    )
    alert_on_warn: bool = Field(default=True, description="Alert on warn-level data test results, not only failures.")
    slack_block: str | None = Field(default=None, description="Prefect SlackWebhook block name (None: no Slack).")
    smtp_block: str | None = Field(default=None, description="SmtpAlertServer block name (None: no e-mail).")
    seed_order_items: int | None = Field(
        default=None, ge=1, description="Dev only: create and fill a sample OLTP source of this size if it is empty."
    )

    @field_validator("source_schema", "raw_schema", "marts_schema")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not value.isidentifier() or value.lower() != value:
            raise ValueError(f"{value!r} must be a lowercase SQL identifier")
        return value


class SmtpAlertServer(Block):
    """An SMTP server and the recipients of warehouse alerts."""

    _block_type_name = "SMTP Alert Server"
    _block_type_slug = "weekly-etl-smtp-alerts"
    _description = "SMTP host, credentials and recipients for pipeline alerts."

    host: str = Field(description="SMTP server host name.")
    port: int = Field(default=587, ge=1, le=65535, description="SMTP port (587 starttls, 465 ssl, 25 none).")
    security: Literal["none", "starttls", "ssl"] = Field(default="starttls", description="Transport security.")
    username: str | None = Field(default=None, description="SMTP login (None: no authentication).")
    password: SecretStr | None = Field(default=None, description="SMTP password.")
    sender: str = Field(description="From address of the alerts.")
    recipients: list[str] = Field(min_length=1, description="To addresses of the alerts.")
    timeout_seconds: float = Field(default=10.0, gt=0, le=120, description="Connect/send timeout in seconds.")

    @field_validator("sender", "recipients")
    @classmethod
    def _addresses(cls, value: str | list[str]) -> str | list[str]:
        for address in [value] if isinstance(value, str) else value:
            if "@" not in address or any(ch.isspace() for ch in address.strip()):
                raise ValueError("every address needs one local part and a domain (user@example.com)")
        return value

    def email_kwargs(self) -> dict:
        """Keyword arguments for :func:`tasks.alerts.send_email` (the password only lives in this dict)."""
        return {
            "host": self.host,
            "port": self.port,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "username": self.username,
            "password": self.password.get_secret_value() if self.password else None,
            "security": self.security,
            "timeout": self.timeout_seconds,
        }
