"""WarehouseSettings and SmtpAlertServer blocks: validation, secrets, and the e-mail keyword arguments."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

import blocks
from blocks import SmtpAlertServer, WarehouseSettings


def test_blocks_are_exported_and_every_field_is_described():
    assert {"WarehouseSettings", "SmtpAlertServer"} <= set(blocks.__all__)
    for cls in (WarehouseSettings, SmtpAlertServer):
        undocumented = [name for name, f in cls.model_fields.items() if not f.description]
        assert not undocumented, (cls.__name__, undocumented)


def test_settings_defaults_and_validation():
    s = WarehouseSettings()
    assert (s.source_schema, s.raw_schema, s.marts_schema, s.overlap_minutes) == ("oltp", "raw", "marts", 10)
    with pytest.raises(ValidationError, match="raw_schema"):
        WarehouseSettings(raw_schema="raw; drop table x")
    with pytest.raises(ValidationError, match="overlap_minutes"):
        WarehouseSettings(overlap_minutes=-1)


def test_smtp_block_keeps_the_password_secret():
    smtp = SmtpAlertServer(
        host="smtp.x.io", sender="etl@x.io", recipients=["ops@x.io"], username="etl", password=SecretStr("pw-123456")
    )
    assert "pw-123456" not in repr(smtp) and "pw-123456" not in smtp.model_dump_json()
    kwargs = smtp.email_kwargs()
    assert kwargs["password"] == "pw-123456" and kwargs["security"] == "starttls" and kwargs["port"] == 587
    with pytest.raises(ValidationError, match="recipients"):
        SmtpAlertServer(host="h", sender="etl@x.io", recipients=[])
    with pytest.raises(ValidationError, match="domain"):
        SmtpAlertServer(host="h", sender="etl@x.io", recipients=["not an address"])
