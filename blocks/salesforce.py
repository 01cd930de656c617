"""Who we are in Salesforce. Absent block = dry run."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, model_validator

AuthMode = Literal["password", "session", "client_credentials"]


class SalesforceCredentials(Block):
    """Credentials for simple-salesforce: username/password/token, session id + instance URL, or OAuth client."""

    _block_type_name = "Salesforce Credentials"
    _block_type_slug = "weekly-etl-salesforce"
    _description = "Salesforce login for the Bulk API 2.0 upsert of weekly customer metrics."
    # Validation errors must not echo inputs: a URL or secret typed into the wrong field would leak.
    model_config = ConfigDict(hide_input_in_errors=True)

    auth_mode: AuthMode = Field(
        default="password",
        description="password (username+password+security token), session (instance_url+session_id) "
        "or client_credentials (OAuth consumer key+secret against instance_url or domain).",
    )
    username: str | None = Field(default=None, description="Salesforce username (password mode).")
    password: SecretStr | None = Field(default=None, description="Salesforce password (password mode).")
    security_token: SecretStr | None = Field(default=None, description="Security token (password mode).")
    domain: str = Field(default="login", description="Login domain: login, test, or a My Domain prefix.")
    instance_url: str | None = Field(default=None, description="https://<instance>.my.salesforce.com.")
    session_id: SecretStr | None = Field(default=None, description="An existing session id (session mode).")
    consumer_key: str | None = Field(default=None, description="Connected app consumer key (client_credentials).")
    consumer_secret: SecretStr | None = Field(
        default=None, description="Connected app consumer secret (client_credentials)."
    )
    api_version: str = Field(default="59.0", description="REST API version used for Bulk API 2.0.")

    @model_validator(mode="after")
    def _complete_for_mode(self) -> SalesforceCredentials:
        needed = {
            "password": ("username", "password"),
            "session": ("instance_url", "session_id"),
            "client_credentials": ("consumer_key", "consumer_secret"),
        }[self.auth_mode]
        missing = [name for name in needed if not getattr(self, name)]
        if missing:
            raise ValueError(f"auth_mode={self.auth_mode!r} needs {', '.join(missing)}")
        return self
