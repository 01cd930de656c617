"""CSV reader: streamed batches, malformed lines rejected by line number, BOM, quotes, encodings, URLs."""

from __future__ import annotations

import json

import pytest

from tasks.errors import SourceFormatError, SourceResponseError
from tasks.ingest_sources import observe_csv_schema, read_csv_batches

TRICKY = (
    b"\xef\xbb\xbfid,name,value\r\n"
    b'1,"multi\nline ""quoted""",1.5\r\n'
    b"2,too,many,cols\r\n"
    b'3,"stray quote,2\r\n'
    b"4,ok,4\r\n"
    b"\r\n"
    b'5,"a,b",5\r\n'
    b"6,short\r\n"
)


def _rows(batches):
    return [(ref, json.loads(p)) for b in batches for ref, p in b.raw.select("ref", "payload").iter_rows()]


def test_tricky_csv_loads_good_rows_and_rejects_bad_lines(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(TRICKY)
    batches = list(read_csv_batches(str(path), batch_size=2))
    rows = _rows(batches)
    assert rows == [
        (2, {"id": "1", "name": 'multi\nline "quoted"', "value": "1.5"}),  # BOM gone from the first column name
        (6, {"id": "4", "name": "ok", "value": "4"}),
        (8, {"id": "5", "name": "a,b", "value": "5"}),
    ]
    rejects = [r for b in batches for r in b.rejects.iter_rows(named=True)]
    assert [(r["ref"], r["reason"].split(":")[0]) for r in rejects] == [
        (4, "expected 3 fields, found 4"),
        (5, "malformed CSV"),  # the stray quote only costs its own line
        (9, "expected 3 fields, found 2"),
    ]
    assert rejects[0]["payload"] == "2,too,many,cols"
    assert [b.cursor["line"] for b in batches] == [6, 9]
    assert observe_csv_schema(batches[0].raw) == {"id": "number", "name": "string", "value": "number"}


def test_batches_are_streamed_and_resume_after_the_checkpoint_line(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("id,value\n" + "".join(f"{i},{i}\n" for i in range(2500)))
    batches = list(read_csv_batches(str(path)))
    assert [b.raw.height for b in batches] == [1000, 1000, 500]
    assert [b.cursor["line"] for b in batches] == [1001, 2001, 2501]
    resumed = list(read_csv_batches(str(path), start_after_line=2001))
    assert [json.loads(p)["id"] for p in resumed[0].raw["payload"]][:2] == ["2000", "2001"]
    assert sum(b.raw.height for b in resumed) == 500


def test_other_encodings_and_undecodable_bytes_name_the_file(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,name\n1,Zoë\n".encode("latin-1"))
    assert _rows(read_csv_batches(str(latin), encoding="latin-1"))[0][1]["name"] == "Zoë"
    with pytest.raises(SourceFormatError, match="latin.csv: not valid utf-8"):
        list(read_csv_batches(str(latin)))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"id,,x\n1,2,3\n", "empty column name"), (b"id,id\n1,2\n", "repeats column")],
)
def test_bad_headers_are_file_errors(tmp_path, content, message):
    path = tmp_path / "h.csv"
    path.write_bytes(content)
    with pytest.raises(SourceFormatError, match=message):
        list(read_csv_batches(str(path)))


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(SourceFormatError, match="nope.csv: no such file"):
        list(read_csv_batches(str(tmp_path / "nope.csv")))
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert _rows(read_csv_batches(str(empty))) == []


def test_csv_over_http_from_a_real_server(file_server):
    base, root, requests = file_server
    (root / "data.csv").write_bytes(TRICKY)
    rows = _rows(read_csv_batches(f"{base}/data.csv", token="s3cret"))
    assert [r[1]["id"] for r in rows] == ["1", "4", "5"]
    assert requests[0]["headers"]["Authorization"] == "Bearer s3cret"
    with pytest.raises(SourceResponseError, match="404") as info:
        list(read_csv_batches(f"{base}/missing.csv?token=abc"))
    assert "abc" not in str(info.value)


def test_a_replaced_file_is_read_from_the_start(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("id,v\n1,a\n2,b\n3,c\n")
    first = list(read_csv_batches(str(path)))
    cursor = first[-1].cursor
    assert cursor["line"] == 4 and cursor["fingerprint"]
    path.write_text("id,v\n1,a\n2,b\n3,c\n4,d\n")  # appended: only the new line
    assert [
        r[0] for r in _rows(read_csv_batches(str(path), start_after_line=4, fingerprint=cursor["fingerprint"]))
    ] == [5]
    path.write_text("id,v\n9,z\n8,y\n7,x\n6,w\n")  # a different file at the same place: everything
    again = _rows(read_csv_batches(str(path), start_after_line=4, fingerprint=cursor["fingerprint"]))
    assert [r[1]["id"] for r in again] == ["9", "8", "7", "6"]
