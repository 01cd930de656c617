"""Where the lake lives: a local folder or an Azure Data Lake / Blob container."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prefect.blocks.core import Block
from prefect_azure import AzureBlobStorageCredentials
from pydantic import ConfigDict, Field, field_validator

SUPPORTED_SCHEMES = ("file", "abfs", "az", "memory")


class Lake(Block):
    """The data lake root. ``file://`` by default; ``abfs://container/prefix`` with Azure credentials."""

    _block_type_name = "Data Lake"
    _block_type_slug = "weekly-etl-lake"
    _description = "Root URL of the data lake (file:// or abfs://) and, for Azure, the credentials block."
    # Validation errors must not echo inputs: a URL or secret typed into the wrong field would leak.
    model_config = ConfigDict(hide_input_in_errors=True)

    base_url: str = Field(description="Lake root as an fsspec URL: file:///abs/path or abfs://container/prefix.")
    azure_credentials: AzureBlobStorageCredentials | None = Field(
        default=None, description="prefect-azure credentials for abfs:// (connection string or account URL)."
    )

    @field_validator("base_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if "://" not in value:
            value = Path(value).expanduser().resolve().as_uri()
        scheme = urlsplit(value).scheme
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(f"scheme {scheme!r} is not supported; use one of {', '.join(SUPPORTED_SCHEMES)}")
        if "@" in urlsplit(value).netloc:
            raise ValueError("must not embed credentials; use azure_credentials")
        return value.rstrip("/")

    def storage_options(self) -> dict[str, Any]:
        """fsspec storage options for ``base_url`` (secrets only ever live in this dict, never in URLs)."""
        scheme = urlsplit(self.base_url).scheme
        if scheme not in ("abfs", "az"):
            return {}
        creds = self.azure_credentials
        if creds is None:
            from tasks.errors import ConfigurationError

            raise ConfigurationError("azure_credentials", f"required for {scheme}:// lake URLs")
        if creds.connection_string is not None:
            return {"connection_string": creds.connection_string.get_secret_value()}
        if creds.account_url:
            account = urlsplit(creds.account_url).hostname.split(".")[0]
            options: dict[str, Any] = {"account_name": account, "anon": False}
            if creds.client_id and creds.tenant_id and creds.client_secret:
                options.update(
                    client_id=creds.client_id,
                    tenant_id=creds.tenant_id,
                    client_secret=creds.client_secret.get_secret_value(),
                )
            return options
        from tasks.errors import ConfigurationError

        raise ConfigurationError("azure_credentials", "needs a connection_string or an account_url")
