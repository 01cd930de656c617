"""Ingestion blocks: every field documented, secrets masked, bad configuration named by field; CLIs answer --help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from blocks import ApiIngestSource, CsvIngestSource, IngestSettings, RssIngestSource, SourceApi


@pytest.mark.parametrize("cls", [CsvIngestSource, RssIngestSource, ApiIngestSource, IngestSettings])
def test_every_field_is_described(cls):
    assert all(f.description for f in cls.model_fields.values()), cls


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "Bad Name", "location": "/x.csv"}, "name"),
        ({"name": "ok", "location": "ftp://host/x.csv"}, "location"),
        ({"name": "ok", "location": "https://user:pw@host/x.csv"}, "location"),
        ({"name": "ok", "location": "/x.csv", "encoding": "klingon"}, "encoding"),
        ({"name": "ok", "location": "/x.csv", "field_map": {"name": "n"}}, "field_map"),
        ({"name": "ok", "location": "/x.csv", "field_map": {"source_id": "id", "colour": "c"}}, "field_map"),
        ({"name": "ok", "location": "/x.csv", "drift_policy": "maybe"}, "drift_policy"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        CsvIngestSource(**kwargs)
    assert field in {e["loc"][0] for e in info.value.errors()}
    assert "pw@" not in str(info.value)  # inputs are never echoed (they may hold credentials)


def test_secrets_are_masked():
    src = CsvIngestSource(name="ok", location="https://host/x.csv", secret="t0ken")
    assert "t0ken" not in repr(src) and "t0ken" not in src.model_dump_json()
    api = ApiIngestSource(name="ev", api=SourceApi(base_url="http://127.0.0.1:1", auth="bearer", secret="s3"))
    assert "s3" not in repr(api)


@pytest.mark.parametrize("module", ["flows.ingest", "api"])
def test_clis_answer_help(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout
