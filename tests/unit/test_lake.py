"""The lake's behaviour, the same on a local folder (file://) and on Azurite (abfs://)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import polars as pl
import pytest

from tasks.errors import ConfigurationError, IntegrityError
from tasks.lake import LakeFS
from tasks.models import FileRef
from tasks.publish import (
    MANIFEST_NAME,
    committed_files,
    committed_weeks,
    publish_week,
    read_committed,
    read_manifest,
    staging_rel,
)

ROOT = Path(__file__).resolve().parents[2]
WEEK = "2024-01-01"
ZONE = "curated/events"


@pytest.fixture(params=["file", "abfs"])
def lake(request, tmp_path: Path) -> LakeFS:
    if request.param == "file":
        return LakeFS(tmp_path.joinpath("lake").as_uri())
    azurite = request.getfixturevalue("azurite")
    container = request.getfixturevalue("azurite_container")
    return LakeFS(
        f"abfs://{container}/lake",
        {"connection_string": azurite.connection_string},
        retries=1,
        retry_backoff=0.1,
    )


@pytest.fixture
def staging(tmp_path: Path) -> LakeFS:
    """A local work area standing in for the stage outputs that get published."""
    return LakeFS(tmp_path.joinpath("work").as_uri())


def overwrite_behind_back(lake: LakeFS, url: str, data: bytes, request) -> None:
    """Replace a stored file's bytes without going through LakeFS (blob metadata is dropped, as a raw put does)."""
    if lake.is_local:
        Path(lake.fs._strip_protocol(url)).write_bytes(data)
        return
    azurite = request.getfixturevalue("azurite")
    container, blob = lake.fs._strip_protocol(url).split("/", 1)
    with azurite.service_client() as svc:
        svc.get_blob_client(container, blob).upload_blob(data, overwrite=True)


def frames(seed: int = 0) -> dict[str, pl.DataFrame]:
    return {
        "valid.parquet": pl.DataFrame({"id": [seed, seed + 1, seed + 2], "v": ["a", "b", "c"]}),
        "metrics.parquet": pl.DataFrame({"k": ["n"], "n": [3 + seed]}),
    }


def stage(staging: LakeFS, seed: int = 0) -> dict[str, FileRef]:
    return {name: staging.write_parquet(df, f"s{seed}/{name}") for name, df in frames(seed).items()}


# --- files -------------------------------------------------------------------------------------------------------


def test_parquet_round_trip_with_verified_hash(lake: LakeFS) -> None:
    df = pl.DataFrame({"id": list(range(100)), "name": [f"n{i}" for i in range(100)]})
    ref = lake.write_parquet(df, "raw/2024-01-01/part-00000.parquet")
    assert ref.url == lake.url("raw/2024-01-01/part-00000.parquet")
    assert ref.rows == 100
    data = lake.read_bytes(ref.url)
    assert hashlib.sha256(data).hexdigest() == ref.sha256
    assert len(data) == ref.bytes
    assert lake.remote_sha256("raw/2024-01-01/part-00000.parquet") == ref.sha256
    assert lake.read_parquet(ref.url).equals(df)
    assert lake.exists(ref.url)
    assert not lake.exists("raw/nope.parquet")
    with pytest.raises(FileNotFoundError):
        lake.read_bytes("raw/nope.parquet")


class _Recording(io.BytesIO):
    """A source that records the size of every read asked of it."""

    def __init__(self, data: bytes, reads: list[int]) -> None:
        super().__init__(data)
        self.reads = reads

    def read(self, size: int | None = -1) -> bytes:
        self.reads.append(-1 if size is None else size)
        return super().read(size)


def test_write_file_streams_in_chunks_and_verifies(lake: LakeFS, tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 123)  # more than three chunks
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    ref = lake.write_file("big/one.bin", local, rows=7)
    assert (ref.sha256, ref.bytes, ref.rows) == (hashlib.sha256(data).hexdigest(), len(data), 7)
    assert lake.read_bytes(ref.url) == data
    assert lake.file_ok(ref.url, ref.sha256, ref.bytes, deep=True)

    reads: list[int] = []
    again = lake.write_stream("big/two.bin", lambda: _Recording(data, reads), sha256=ref.sha256, size=ref.bytes)
    assert again.sha256 == ref.sha256 and lake.read_bytes(again.url) == data
    assert reads and all(0 < size <= 1 << 20 for size in reads)  # never the whole file at once


def test_write_stream_refuses_a_source_that_does_not_match_and_writes_nothing(lake: LakeFS) -> None:
    data = b"x" * 1000
    good = hashlib.sha256(data).hexdigest()
    for sha256, size in ((hashlib.sha256(b"other").hexdigest(), 1000), (good, 999)):
        with pytest.raises(IntegrityError, match="staged copy does not match its FileRef"):
            lake.write_stream(
                "w/file.bin", lambda: io.BytesIO(data), sha256=sha256, size=size, source_name="staged copy"
            )
        assert not lake.exists("w/file.bin")
        assert not lake.fs.find(lake.fs._strip_protocol(lake.url("w")))  # not even a temporary file
    ref = lake.write_stream("w/file.bin", lambda: io.BytesIO(data), sha256=good, size=1000)
    assert lake.read_bytes(ref.url) == data


def test_parquet_without_statistics_for_intermediate_files(lake: LakeFS) -> None:
    import io

    import pyarrow.parquet as pq

    df = pl.DataFrame({"_seq": [1, 2], "payload": ['{"id":"a"}', '{"id":"b"}']})
    with_stats = lake.write_parquet(df, "a.parquet")
    without = lake.write_parquet(df, "b.parquet", compression="lz4", statistics=False)

    def stats(ref: FileRef) -> list:
        meta = pq.ParquetFile(io.BytesIO(lake.read_bytes(ref.url))).metadata.row_group(0)
        return [meta.column(i).statistics for i in range(meta.num_columns)]

    assert all(s is not None and s.has_min_max for s in stats(with_stats))
    assert all(s is None or not s.has_min_max for s in stats(without))
    assert lake.read_parquet(without.url).equals(df)


def test_json_list_delete(lake: LakeFS) -> None:
    assert lake.read_json("state/checkpoint.json") is None
    assert lake.read_json("state/checkpoint.json", default={"x": 0}) == {"x": 0}
    lake.write_json_atomic("state/checkpoint.json", {"next_week_start": "2024-01-08", "n": 1})
    lake.write_json_atomic("state/checkpoint.json", {"next_week_start": "2024-01-15", "n": 2})
    assert lake.read_json("state/checkpoint.json") == {"next_week_start": "2024-01-15", "n": 2}
    lake.write_json_atomic("pending/0002.json", {"op": "b"})
    lake.write_json_atomic("pending/0001.json", {"op": "a"})
    assert lake.list("pending") == ["pending/0001.json", "pending/0002.json"]
    assert lake.list("nothing-here") == []
    assert lake.delete("pending/0001.json") is True
    assert lake.delete("pending/0001.json") is False
    assert lake.list("pending/") == ["pending/0002.json"]
    assert "state/checkpoint.json" in lake.list()


def test_bad_json_is_an_integrity_error(lake: LakeFS) -> None:
    lake.write_bytes("state/broken.json", b"{not json")
    with pytest.raises(IntegrityError, match="broken.json"):
        lake.read_json("state/broken.json")


def test_put_if_absent_race_has_one_winner(lake: LakeFS) -> None:
    writers = 6
    barrier = threading.Barrier(writers)
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = lake.put_if_absent("locks/week.json", {"owner": i})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert lake.read_json("locks/week.json") == {"owner": winners[0]}
    assert lake.put_if_absent("locks/week.json", b"again") is False
    assert lake.list("locks") == ["locks/week.json"]


@pytest.mark.parametrize(
    "rel", ["../escape.json", "a/../../b.json", "a/./b.json", "a\\b.json", "ok/../x"], ids=lambda s: repr(s)
)
def test_path_like_relative_paths_are_refused(lake: LakeFS, rel: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        lake.write_bytes(rel, b"x")
    assert err.value.field == "path"


# --- publishing --------------------------------------------------------------------------------------------------


def test_publish_commits_a_manifest_readers_trust(lake: LakeFS, staging: LakeFS) -> None:
    refs = stage(staging)
    result = publish_week(lake, ZONE, WEEK, refs, {"fetched": 10, "rejected": 1}, attempt="run1")
    assert result.status == "published"
    assert result.written == sorted(refs)
    m = read_manifest(lake, ZONE, WEEK)
    assert m is not None and m == result.manifest
    assert (m.zone, m.week, m.attempt, m.file_count) == (ZONE, WEEK, "run1", 2)
    assert m.total_rows == sum(r.rows for r in refs.values())
    assert m.total_bytes == sum(r.bytes for r in refs.values())
    assert m.extra == {"fetched": 10, "rejected": 1}
    files = committed_files(lake, ZONE, WEEK)
    for name, ref in files.items():
        assert ref.url == lake.url(staging_rel(ZONE, WEEK, "run1", name))
        assert ref.sha256 == refs[name].sha256
        assert lake.remote_sha256(ref.url) == ref.sha256
    assert read_committed(lake, ZONE, WEEK, "valid.parquet").equals(frames()["valid.parquet"])
    assert committed_weeks(lake, ZONE) == [WEEK]
    assert lake.exists(f"{ZONE}/week={WEEK}/{MANIFEST_NAME}")
    assert read_manifest(lake, ZONE, "2024-01-08") is None
    assert committed_files(lake, ZONE, "2024-01-08") == {}


def test_crash_before_the_manifest_leaves_the_previous_week(lake: LakeFS, staging: LakeFS, monkeypatch) -> None:
    v1 = publish_week(lake, ZONE, WEEK, stage(staging, 0), attempt="run1").manifest
    refs2 = stage(staging, 1)

    class Crash(RuntimeError):
        pass

    real = lake.write_json_atomic

    def crash_on_manifest(rel, obj):
        if rel.endswith(MANIFEST_NAME):
            raise Crash("killed between the data files and the manifest")
        return real(rel, obj)

    monkeypatch.setattr(lake, "write_json_atomic", crash_on_manifest)
    with pytest.raises(Crash):
        publish_week(lake, ZONE, WEEK, refs2, attempt="run2")
    monkeypatch.setattr(lake, "write_json_atomic", real)

    # The data files of run2 are there, but readers still see run1 only, intact.
    stray = lake.list(f"{ZONE}/week={WEEK}/attempt=run2")
    assert len(stray) == 2
    assert read_manifest(lake, ZONE, WEEK) == v1
    files = committed_files(lake, ZONE, WEEK)
    assert {r.url for r in files.values()} == {r.url for r in v1.files.values()}
    assert read_committed(lake, ZONE, WEEK, "valid.parquet").equals(frames(0)["valid.parquet"])

    # The retry commits run3 and only then removes run1 and the stray run2 files.
    result = publish_week(lake, ZONE, WEEK, refs2, attempt="run3")
    assert result.status == "published"
    assert read_committed(lake, ZONE, WEEK, "valid.parquet").equals(frames(1)["valid.parquet"])
    left = lake.list(f"{ZONE}/week={WEEK}")
    assert sorted(left) == sorted(
        [f"{ZONE}/week={WEEK}/{MANIFEST_NAME}"] + [staging_rel(ZONE, WEEK, "run3", n) for n in refs2]
    )
    assert len(result.deleted) == 4


def test_rerun_with_the_same_files_is_skipped_without_writes(lake: LakeFS, staging: LakeFS, monkeypatch) -> None:
    refs = stage(staging)
    first = publish_week(lake, ZONE, WEEK, refs, {"fetched": 3}, attempt="run1")
    writes: list[str] = []
    real = lake.write_bytes
    monkeypatch.setattr(lake, "write_bytes", lambda rel, data, **kw: writes.append(rel) or real(rel, data, **kw))
    again = publish_week(lake, ZONE, WEEK, refs, {"fetched": 3}, attempt="run2")
    assert again.status == "skipped"
    assert again.skipped == sorted(refs)
    assert again.repaired == [] and again.written == []
    assert writes == []
    assert again.manifest == first.manifest
    assert lake.list(f"{ZONE}/week={WEEK}/attempt=run2") == []


def test_changed_content_publishes_a_new_attempt(lake: LakeFS, staging: LakeFS) -> None:
    publish_week(lake, ZONE, WEEK, stage(staging, 0), {"fetched": 3}, attempt="run1")
    # Same files, different extra: a new commit (no silent reuse of a stale manifest).
    r2 = publish_week(lake, ZONE, WEEK, stage(staging, 0), {"fetched": 4}, attempt="run2")
    assert r2.status == "published" and r2.manifest.attempt == "run2"
    r3 = publish_week(lake, ZONE, WEEK, stage(staging, 5), {"fetched": 4}, attempt="run3")
    assert r3.status == "published"
    assert read_committed(lake, ZONE, WEEK, "metrics.parquet").equals(frames(5)["metrics.parquet"])
    assert lake.list(f"{ZONE}/week={WEEK}/attempt=run1") == []


def test_deleted_remote_file_is_reuploaded(lake: LakeFS, staging: LakeFS) -> None:
    refs = stage(staging)
    m = publish_week(lake, ZONE, WEEK, refs, attempt="run1").manifest
    assert lake.delete(m.files["valid.parquet"].url)
    result = publish_week(lake, ZONE, WEEK, refs, attempt="run2")
    assert result.status == "repaired"
    assert result.repaired == ["valid.parquet"]
    assert result.skipped == ["metrics.parquet"]
    assert result.manifest == m
    assert lake.remote_sha256(m.files["valid.parquet"].url) == refs["valid.parquet"].sha256
    assert read_committed(lake, ZONE, WEEK, "valid.parquet").equals(frames()["valid.parquet"])


def test_corrupted_remote_file_is_replaced(lake: LakeFS, staging: LakeFS, request) -> None:
    refs = stage(staging)
    m = publish_week(lake, ZONE, WEEK, refs, attempt="run1").manifest
    target = m.files["metrics.parquet"].url
    overwrite_behind_back(lake, target, b"PAR1 garbage that is not the file", request)
    with pytest.raises(IntegrityError):
        read_committed(lake, ZONE, WEEK, "metrics.parquet")
    result = publish_week(lake, ZONE, WEEK, refs)
    assert result.status == "repaired" and result.repaired == ["metrics.parquet"]
    assert hashlib.sha256(lake.read_bytes(target)).hexdigest() == refs["metrics.parquet"].sha256
    assert read_committed(lake, ZONE, WEEK, "metrics.parquet").equals(frames()["metrics.parquet"])


def test_repair_refuses_a_source_that_does_not_match(lake: LakeFS, staging: LakeFS) -> None:
    refs = stage(staging)
    m = publish_week(lake, ZONE, WEEK, refs, attempt="run1").manifest
    lake.delete(m.files["valid.parquet"].url)
    # The staged copy changed since its FileRef was made: never publish bytes that don't match the hash.
    Path(staging.fs._strip_protocol(refs["valid.parquet"].url)).write_bytes(b"changed")
    with pytest.raises(IntegrityError, match="source file"):
        publish_week(lake, ZONE, WEEK, refs)


def test_staged_files_in_place_are_adopted(lake: LakeFS) -> None:
    refs = {name: lake.write_parquet(df, staging_rel(ZONE, WEEK, "run7", name)) for name, df in frames(2).items()}
    result = publish_week(lake, ZONE, WEEK, refs, attempt="run7")
    assert result.status == "published"
    assert {n: r.url for n, r in result.manifest.files.items()} == {n: r.url for n, r in refs.items()}


@pytest.mark.parametrize(
    ("week", "name", "zone", "field"),
    [
        ("../2024-01-01", "valid.parquet", ZONE, "week_label"),
        ("2024-01-01/..", "valid.parquet", ZONE, "week_label"),
        ("2024-02-30", "valid.parquet", ZONE, "week_label"),
        (WEEK, "../valid.parquet", ZONE, "files"),
        (WEEK, "a/valid.parquet", ZONE, "files"),
        (WEEK, "..", ZONE, "files"),
        (WEEK, MANIFEST_NAME, ZONE, "files"),
        (WEEK, "valid.parquet", "curated/../../etc", "zone_prefix"),
        (WEEK, "valid.parquet", "/", "zone_prefix"),
    ],
)
def test_path_like_publish_values_are_refused(lake: LakeFS, staging: LakeFS, week, name, zone, field) -> None:
    ref = stage(staging)["valid.parquet"]
    with pytest.raises(ConfigurationError) as err:
        publish_week(lake, zone, week, {name: ref})
    assert err.value.field == field
    assert lake.list() == []


def test_bad_attempt_id_is_refused(lake: LakeFS, staging: LakeFS) -> None:
    with pytest.raises(ConfigurationError) as err:
        publish_week(lake, ZONE, WEEK, stage(staging), attempt="../x")
    assert err.value.field == "attempt"


def test_a_local_lake_does_not_load_the_azure_sdk(tmp_path: Path) -> None:
    """Errors are translated through the Azure SDK's types only when one of them was raised: a local lake's
    missing file and a publish (which probes for absent files) never import ``azure.core``."""
    script = f"""
import sys
import polars as pl
from tasks.lake import LakeFS
from tasks.publish import publish_week
lake = LakeFS({tmp_path.joinpath("lake").as_uri()!r})
work = LakeFS({tmp_path.joinpath("work").as_uri()!r})
try:
    lake.read_bytes("no/such/file.parquet")
except FileNotFoundError:
    pass
else:
    raise SystemExit("a missing file was read")
ref = work.write_parquet(pl.DataFrame({{"a": [1]}}), "s/valid.parquet")
publish_week(lake, "curated/events", "2024-01-01", {{"valid.parquet": ref}})
print(sorted(m for m in sys.modules if m.startswith("azure")))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
