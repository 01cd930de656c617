"""Where the events come from and how to page through them."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

Pagination = Literal["page_number", "offset", "cursor", "link_header"]
AuthKind = Literal["none", "api_key", "bearer"]


class SourceApi(Block):
    """A paginated JSON HTTP API that serves events for a time window."""

    _block_type_name = "Source API"
    _block_type_slug = "weekly-etl-source-api"
    _description = "Paginated JSON HTTP API: base URL, endpoint, pagination strategy, auth and rate limit."
    # Validation errors must not echo inputs: a URL or secret typed into the wrong field would leak.
    model_config = ConfigDict(hide_input_in_errors=True)

    base_url: str = Field(description="Scheme and host of the API, http:// or https:// only.")
    endpoint: str = Field(default="/events", description="Path of the events resource, joined to base_url.")
    records_key: str = Field(default="data", description="Key of the list of records in each JSON page.")
    pagination: Pagination = Field(
        default="page_number",
        description="Paging strategy: page_number, offset, cursor (token in the body) or link_header (RFC 8288).",
    )
    page_size: int = Field(default=1000, ge=1, le=10_000, description="Records asked for per page.")
    page_param: str = Field(default="page", description="Query parameter holding the page number.")
    size_param: str = Field(default="page_size", description="Query parameter holding the page size.")
    offset_param: str = Field(default="offset", description="Query parameter holding the offset.")
    limit_param: str = Field(default="limit", description="Query parameter holding the limit (offset paging).")
    cursor_param: str = Field(default="cursor", description="Query parameter sending the cursor back.")
    cursor_path: str = Field(
        default="next_cursor", description="Dotted path of the next-page token in the body (cursor paging)."
    )
    start_param: str = Field(default="start", description="Query parameter for the window start (ISO date).")
    end_param: str = Field(default="end", description="Query parameter for the window end (ISO date, inclusive).")
    auth: AuthKind = Field(default="none", description="How to authenticate: none, api_key header or bearer token.")
    api_key_header: str = Field(default="X-API-Key", description="Header name for api_key auth.")
    secret: SecretStr | None = Field(default=None, description="API key or bearer token (required unless auth=none).")
    timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="Per-request timeout in seconds.")
    rate_limit_per_second: float | None = Field(
        default=None, gt=0, description="Client-side cap on requests per second (None: no cap)."
    )
    max_attempts: int = Field(default=5, ge=1, le=20, description="Attempts per request on 429/5xx/transport errors.")
    backoff_base_seconds: float = Field(default=0.5, gt=0, description="First backoff delay; doubles per attempt.")
    backoff_max_seconds: float = Field(default=60.0, gt=0, description="Upper bound of one backoff delay.")
    pages_per_file: int = Field(
        default=50, ge=1, le=10_000, description="Pages buffered per raw Parquet part (bounds memory)."
    )

    @field_validator("base_url")
    @classmethod
    def _http_only(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an absolute http:// or https:// URL, got scheme {parts.scheme!r}")
        if parts.username or parts.password:
            raise ValueError("must not embed credentials; put them in the secret field")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _secret_when_needed(self) -> SourceApi:
        if self.auth != "none" and (self.secret is None or not self.secret.get_secret_value()):
            raise ValueError(f"secret is required when auth={self.auth!r}")
        return self

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.endpoint.lstrip('/')}"
