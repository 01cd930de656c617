import pytest
from pydantic import ValidationError

from blocks import Lake, PipelineSettings, SalesforceCredentials, SourceApi
from tasks.errors import (
    DataQualityError,
    LakeUnavailableError,
    SourceResponseError,
    is_retryable,
    redact_text,
    redact_url,
)


def test_redact_url_hides_userinfo_and_sensitive_query():
    out = redact_url("https://bob:hunter2@api.example.com/v1/events?page=2&api_key=abc123&token=t0k")
    assert "hunter2" not in out and "abc123" not in out and "t0k" not in out
    assert "page=2" in out and "api.example.com/v1/events" in out


def test_redact_text_handles_urls_inside_messages():
    out = redact_text("GET https://x.test/a?sig=SECRET failed; retry http://u:p@h/b")
    assert "SECRET" not in out and "u:p@" not in out


def test_source_error_message_is_redacted():
    err = SourceResponseError("404 Not Found", status_code=404, url="https://h/x?access_token=zzz")
    assert "zzz" not in str(err) and "404" in str(err)


def test_is_retryable_follows_causes():
    try:
        try:
            raise LakeUnavailableError("down")
        except LakeUnavailableError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert is_retryable(outer)
    assert not is_retryable(DataQualityError(10, 5, rejected=10, fetched=100))
    assert not is_retryable(ValueError("x"))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_url": "ftp://h"}, "base_url"),
        ({"base_url": "file:///etc/passwd"}, "base_url"),
        ({"base_url": "not a url"}, "base_url"),
        ({"base_url": "https://user:pw@h"}, "base_url"),
        ({"base_url": "https://h", "page_size": 0}, "page_size"),
        ({"base_url": "https://h", "pagination": "pages"}, "pagination"),
    ],
)
def test_source_block_names_the_bad_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        SourceApi(**kwargs)
    assert field in str(info.value)
    assert "pw" not in str(info.value).replace("password", "")


def test_source_block_requires_secret_for_auth():
    with pytest.raises(ValidationError, match="secret is required"):
        SourceApi(base_url="https://h", auth="bearer")
    block = SourceApi(base_url="https://h/", auth="bearer", secret="s3cr3t-value")
    assert "s3cr3t-value" not in repr(block) and block.url == "https://h/events"


def test_lake_block_schemes():
    assert Lake(base_url="relative/dir").base_url.startswith("file:///")
    with pytest.raises(ValidationError, match="scheme"):
        Lake(base_url="s3://bucket/x")


def test_settings_validate_timezone_and_monday():
    with pytest.raises(ValidationError, match="timezone"):
        PipelineSettings(timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="not a Monday"):
        PipelineSettings(first_week="2024-01-03")


def test_salesforce_block_needs_fields_for_mode():
    with pytest.raises(ValidationError, match="username"):
        SalesforceCredentials(auth_mode="password", password="x")
    with pytest.raises(ValidationError, match="session_id"):
        SalesforceCredentials(auth_mode="session", instance_url="https://x.my.salesforce.com")


def test_redact_text_leaves_a_closing_parenthesis_alone():
    assert redact_text("HTTP 401 (url=http://h/x?page=1&token=abc)") == "HTTP 401 (url=http://h/x?page=1&token=***)"
