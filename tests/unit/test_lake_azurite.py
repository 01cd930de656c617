"""Blob-only lake behaviour against a real Azurite: metadata hashes, outages, bad containers and credentials."""

from __future__ import annotations

import traceback

import polars as pl
import pytest

from tasks.errors import (
    ConfigurationError,
    IntegrityError,
    LakeConfigurationError,
    LakeUnavailableError,
    is_retryable,
)
from tasks.lake import LakeFS
from tasks.publish import publish_week, read_committed, read_manifest
from tests.support.azurite import ACCOUNT_KEY

WEEK = "2024-01-01"
ZONE = "curated/events"


def _no_secret(exc: BaseException, connection_string: str) -> None:
    """Neither the message nor the whole formatted chain (what Prefect logs) carries the key."""
    text = str(exc)
    assert ACCOUNT_KEY not in text and "AccountKey" not in text and connection_string not in text
    chain = "".join(traceback.format_exception(exc))
    assert ACCOUNT_KEY not in chain and "AccountKey=" not in chain


def _blob(lake: LakeFS, url: str):
    container, blob = lake.fs._strip_protocol(url).split("/", 1)
    return container, blob


def test_from_block_writes_sha256_and_rows_as_blob_metadata(azurite, azurite_lake: LakeFS) -> None:
    df = pl.DataFrame({"a": [1, 2, 3]})
    ref = azurite_lake.write_parquet(df, "raw/part-0.parquet")
    assert ref.url.startswith("abfs://") and "lake/raw/part-0.parquet" in ref.url
    container, blob = _blob(azurite_lake, ref.url)
    with azurite.service_client() as svc:
        props = svc.get_blob_client(container, blob).get_blob_properties()
    assert props.metadata["sha256"] == ref.sha256
    assert props.metadata["rows"] == "3"
    assert props.size == ref.bytes
    assert azurite_lake.remote_sha256("raw/part-0.parquet") == ref.sha256
    assert azurite_lake.read_parquet(ref.url).equals(df)
    assert "AccountKey" not in repr(azurite_lake)


def test_forged_metadata_is_caught_by_deep_verify(azurite, azurite_lake: LakeFS, tmp_path) -> None:
    staging = LakeFS(tmp_path.as_uri())
    refs = {"valid.parquet": staging.write_parquet(pl.DataFrame({"x": [1, 2]}), "valid.parquet")}
    m = publish_week(azurite_lake, ZONE, WEEK, refs, attempt="run1").manifest
    ref = m.files["valid.parquet"]
    container, blob = _blob(azurite_lake, ref.url)
    # Same size, same claimed hash in metadata, different bytes: only reading the bytes can tell.
    with azurite.service_client() as svc:
        svc.get_blob_client(container, blob).upload_blob(
            b"\0" * ref.bytes, overwrite=True, metadata={"sha256": ref.sha256, "rows": str(ref.rows)}
        )
    assert publish_week(azurite_lake, ZONE, WEEK, refs).status == "skipped"
    result = publish_week(azurite_lake, ZONE, WEEK, refs, deep_verify=True)
    assert result.status == "repaired" and result.repaired == ["valid.parquet"]
    assert read_committed(azurite_lake, ZONE, WEEK, "valid.parquet").equals(pl.DataFrame({"x": [1, 2]}))


def test_write_is_verified_against_the_store(azurite_lake: LakeFS, monkeypatch) -> None:
    monkeypatch.setattr(azurite_lake, "_remote_state", lambda path, url, deep=False: (1, "0" * 64))
    with pytest.raises(IntegrityError, match="does not match what was written"):
        azurite_lake.write_bytes("x.bin", b"hello")


def test_azurite_down_is_retryable_without_secrets(azurite, azurite_lake: LakeFS, tmp_path) -> None:
    staging = LakeFS(tmp_path.as_uri())
    refs = {"valid.parquet": staging.write_parquet(pl.DataFrame({"x": [1]}), "valid.parquet")}
    azurite_lake.write_bytes("before.bin", b"ok")
    cs = azurite.connection_string
    with azurite.down():
        with pytest.raises(LakeUnavailableError) as err:
            azurite_lake.write_parquet(pl.DataFrame({"x": [1, 2]}), "raw/part-1.parquet")
        assert is_retryable(err.value)
        assert "write" in str(err.value) and "raw/part-1.parquet" in str(err.value)
        _no_secret(err.value, cs)
        for call in (
            lambda: azurite_lake.read_bytes("before.bin"),
            lambda: azurite_lake.exists("before.bin"),
            lambda: azurite_lake.list("raw"),
            lambda: azurite_lake.read_json("state.json", default={}),
            lambda: azurite_lake.put_if_absent("lock.json", {"a": 1}),
            lambda: publish_week(azurite_lake, ZONE, WEEK, refs),
        ):
            with pytest.raises(LakeUnavailableError) as err:
                call()
            _no_secret(err.value, cs)
    # Back up (in-memory storage starts empty): the container is gone, which is a configuration problem.
    with pytest.raises(LakeConfigurationError):
        azurite_lake.write_bytes("after.bin", b"x")
    azurite_lake.create_container()
    assert azurite_lake.write_bytes("after.bin", b"x").bytes == 1


def test_outage_mid_publish_is_retryable(azurite, azurite_lake: LakeFS, tmp_path, monkeypatch) -> None:
    staging = LakeFS(tmp_path.as_uri())
    v1 = {"valid.parquet": staging.write_parquet(pl.DataFrame({"x": [1]}), "v1.parquet")}
    v2 = {
        "valid.parquet": staging.write_parquet(pl.DataFrame({"x": [2]}), "v2.parquet"),
        "zmetrics.parquet": staging.write_parquet(pl.DataFrame({"n": [1]}), "m2.parquet"),
    }
    publish_week(azurite_lake, ZONE, WEEK, v1, attempt="run1")
    real = azurite_lake.write_stream
    calls = []

    def flaky(rel, open_source, **kw):  # the store goes away after the first data file of run2 is written
        calls.append(rel)
        if len(calls) == 2:
            azurite.stop()
        return real(rel, open_source, **kw)

    monkeypatch.setattr(azurite_lake, "write_stream", flaky)
    try:
        with pytest.raises(LakeUnavailableError):
            publish_week(azurite_lake, ZONE, WEEK, v2, attempt="run2")
    finally:
        azurite.stop()
    assert calls[-1].endswith("attempt=run2/zmetrics.parquet")  # died on the second data file, before the commit
    azurite.start()  # empty again: in-memory persistence


@pytest.mark.parametrize("name", ["ab", "Upper-case", "has_underscore", "-leading", "double--dash", "x" * 64])
def test_bad_container_name_names_the_field(azurite, name: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        LakeFS(f"abfs://{name}/lake", {"connection_string": azurite.connection_string})
    assert err.value.field == "base_url"
    assert "container name" in str(err.value)


def test_bad_container_name_from_block(azurite) -> None:
    from prefect_azure import AzureBlobStorageCredentials

    from blocks.lake import Lake

    block = Lake(
        base_url="abfs://ab/lake",
        azure_credentials=AzureBlobStorageCredentials(connection_string=azurite.connection_string),
    )
    with pytest.raises(ConfigurationError) as err:
        LakeFS.from_block(block)
    assert err.value.field == "base_url"


def test_missing_container_is_fatal(azurite) -> None:
    lake = LakeFS("abfs://no-such-container/lake", {"connection_string": azurite.connection_string}, retries=0)
    assert lake.container_exists() is False
    for call in (
        lambda: lake.write_bytes("a.bin", b"x"),
        lambda: lake.read_bytes("a.bin"),
        lambda: lake.read_json("a.json"),
        lambda: lake.list("pending"),
        lambda: read_manifest(lake, ZONE, WEEK),
    ):
        with pytest.raises(LakeConfigurationError) as err:
            call()
        assert err.value.field == "base_url"
        assert not is_retryable(err.value)


def test_refused_credentials_are_fatal_without_the_key(azurite, azurite_container: str) -> None:
    wrong_key = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk="
    cs = azurite.connection_string.replace(ACCOUNT_KEY, wrong_key)
    lake = LakeFS(f"abfs://{azurite_container}/lake", {"connection_string": cs}, retries=0)
    with pytest.raises(LakeConfigurationError) as err:
        lake.write_bytes("a.bin", b"x")
    assert err.value.field == "azure_credentials"
    assert wrong_key not in str(err.value) and wrong_key not in "".join(traceback.format_exception(err.value))
    assert not is_retryable(err.value)
