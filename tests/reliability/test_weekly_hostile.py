"""Hostile parameters and configuration for the weekly flow: each ends in a clear error naming the field, before
any work starts (the source API's request counter stays 0).

Record-level hostile input (wrong types, NaN/inf, unicode, time zones, duplicates, ...) is covered by the hypothesis
properties of tests/unit/test_contract.py and tests/unit/test_transform.py; lake path validation of names by
tests/unit/test_lake.py. Here: what reaches the flow through its parameters and its saved blocks.
"""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import blocks
from tasks.errors import ConfigurationError
from tasks.weeks import parse_week
from tests.reliability.conftest import save_standard_blocks

pytestmark = pytest.mark.reliability

WEEK = date(2024, 1, 1)
BAD_WEEKS = [
    "2024-01-03",  # a Wednesday
    "2024-13-01",
    "2024-02-30",
    "yesterday",
    "../../etc/passwd",
    "2024-01-01/../../x",
    "2024-01-01\x00",
    "",
    "2024-01-01T00:00:00",
    "1' OR '1'='1",
]
BAD_SOURCE_URLS = ["file:///etc/passwd", "ftp://127.0.0.1/events", "http://", "not a url", "javascript:alert(1)"]


@pytest.mark.parametrize("week", BAD_WEEKS)
def test_cli_refuses_a_bad_week_naming_it_before_any_request(week, rig, pg_url, make_source_api, source_api, figures):
    save_standard_blocks(rig, make_source_api("cursor"), pg_url)
    figures.hostile_inputs["week parameter (CLI)"] += 1
    result = rig.run("--week", week)
    assert result.returncode != 0
    assert "week" in result.stderr.lower()
    assert source_api.stats.requests == 0
    assert not rig.lake_dir.exists() or not any(rig.lake_dir.rglob("*.parquet"))


def test_future_week_is_refused_before_any_request(rig, pg_url, make_source_api, source_api, figures):
    save_standard_blocks(rig, make_source_api("cursor"), pg_url)
    future = date.today() + timedelta(days=7 - date.today().weekday() + 7)  # a Monday in the future
    figures.hostile_inputs["future week"] += 1
    result = rig.run("--week", future.isoformat())
    assert result.returncode == 1 and "week: " in result.stderr and "has not ended" in result.stderr
    assert source_api.stats.requests == 0


@pytest.mark.parametrize("week", ["../../etc", "2024-01-03"])
def test_flow_parameter_route_refuses_a_bad_week(week, prefect_api, make_source_api, source_api, figures, rig):
    """What ``prefect deployment run --param week=...`` reaches: the flow function's own validation."""
    from flows.weekly import weekly_reverse_etl

    rig.save(make_source_api("cursor"), blocks.SOURCE_BLOCK)
    figures.hostile_inputs["week parameter (flow)"] += 1
    with pytest.raises(Exception) as info:
        weekly_reverse_etl(week=week)
    assert "week" in str(info.value).lower()
    assert source_api.stats.requests == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(st.text(max_size=40), st.dates().map(str), st.from_regex(r"\d{4}-\d{2}-\d{2}", fullmatch=True)))
def test_parse_week_returns_a_monday_or_names_the_field(value, figures):
    figures.hostile_inputs["week strings (hypothesis)"] += 1
    try:
        week = parse_week(value)
    except ConfigurationError as exc:
        assert exc.field == "week" and str(exc).startswith("week: ")
        return
    assert week.weekday() == 0
    assert "/" not in week.isoformat() and ".." not in week.isoformat()


@pytest.mark.parametrize("url", BAD_SOURCE_URLS)
def test_source_block_refuses_non_http_urls_naming_the_field_without_echoing(url, figures):
    figures.hostile_inputs["source base_url"] += 1
    with pytest.raises(ValidationError) as info:
        blocks.SourceApi(base_url=url)
    text = str(info.value)
    assert "base_url" in text
    if len(url) > 8:
        assert url not in text


def test_source_block_refuses_credentials_in_the_url_and_missing_secrets(figures):
    figures.hostile_inputs["source credentials in URL / missing secret"] += 2
    with pytest.raises(ValidationError) as info:
        blocks.SourceApi(base_url="http://user:hunter2-pw@127.0.0.1:1/")
    assert "base_url" in str(info.value) and "hunter2-pw" not in str(info.value)
    with pytest.raises(ValidationError, match="secret"):
        blocks.SourceApi(base_url="http://127.0.0.1:1", auth="bearer")


def _corrupt_saved_block(name: str, block_cls, **data) -> None:
    """Overwrite a saved block document's data behind the block class's back (as a hand edit in the UI might)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentUpdate

    with get_client(sync_client=True) as client:
        doc = client.read_block_document_by_name(name, block_cls.get_block_type_slug(), include_secrets=True)
        client.update_block_document(doc.id, BlockDocumentUpdate(data={**doc.data, **data}, merge_existing_data=False))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"base_url": "file:///etc/passwd"}, "base_url"),
        ({"base_url": "ftp://127.0.0.1:21"}, "base_url"),
        ({"auth": "bearer", "secret": None}, "secret"),
    ],
    ids=["file-scheme", "ftp-scheme", "missing-secret"],
)
def test_saved_source_block_made_invalid_fails_naming_the_field_before_any_request(
    data, field, rig, pg_url, make_source_api, source_api, figures
):
    save_standard_blocks(rig, make_source_api("cursor"), pg_url)
    _corrupt_saved_block(blocks.SOURCE_BLOCK, blocks.SourceApi, **data)
    figures.hostile_inputs["saved source block edited to an invalid value"] += 1
    result = rig.run("--week", WEEK.isoformat())
    assert result.returncode == 1
    assert blocks.SOURCE_BLOCK in result.stderr
    assert field in result.stderr, result.stderr[-1500:]
    assert source_api.stats.requests == 0


PATH_LIKE_SETTINGS = [
    ("pipeline_name", "../../evil"),
    ("salesforce_object", "../../../outside"),
    ("external_id_field", "../x"),
    ("checkpoint_variable", "../x"),
]


@pytest.mark.parametrize(("setting", "value"), PATH_LIKE_SETTINGS)
def test_path_like_settings_are_refused_when_saved(setting, value, figures):
    figures.hostile_inputs["path-like settings value"] += 1
    with pytest.raises(ValidationError) as info:
        blocks.PipelineSettings(**{setting: value})
    assert setting in str(info.value) and value not in str(info.value)


@pytest.mark.parametrize(("setting", "value"), PATH_LIKE_SETTINGS)
def test_path_like_settings_edited_into_a_saved_block_fail_before_any_request(
    setting, value, rig, pg_url, make_source_api, source_api, figures
):
    figures.hostile_inputs["saved settings block edited to a path-like value"] += 1
    save_standard_blocks(rig, make_source_api("cursor"), pg_url)
    _corrupt_saved_block(blocks.SETTINGS_BLOCK, blocks.PipelineSettings, **{setting: value})
    result = rig.run("--week", WEEK.isoformat())
    assert result.returncode == 1
    assert blocks.SETTINGS_BLOCK in result.stderr and setting in result.stderr, result.stderr[-1500:]
    assert source_api.stats.requests == 0
    outside = [p for p in rig.tmp_path.parent.rglob("*") if "outside" in p.name or "evil" in p.name]
    assert outside == []
