"""RSS 2.0 / Atom: parsing, unsafe XML refused with the feed named, HTTP + ETag, incremental by item time."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from blocks.ingest import RSS_FIELD_MAP
from tasks.errors import SourceFormatError
from tasks.ingest_db import normalize
from tasks.ingest_sources import parse_feed, read_feed_batches

RSS = b"""<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0" xmlns:dc="http://purl.org/dc/elements/1.1/"><channel><title>t</title>
<item><title>First &amp; best</title><link>http://x/1</link><guid>g1</guid>
  <description><![CDATA[<p>html</p>]]></description><category>news</category><category>tech</category>
  <pubDate>Tue, 10 Jun 2003 04:00:00 GMT</pubDate></item>
<item><title>Second</title><link>http://x/2</link><pubDate>Wed, 11 Jun 2003 09:30:00 +0200</pubDate></item>
<item><title>Undated</title><guid>g3</guid></item>
</channel></rss>"""

ATOM = b"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>a</title>
<entry><title>Atom one</title><id>urn:uuid:1</id><link rel="alternate" href="http://a/1"/>
  <updated>2024-05-01T10:00:00Z</updated><summary>sum</summary><category term="cat-a"/></entry>
<entry><title>Atom two</title><id>urn:uuid:2</id><updated>2024-05-02T10:00:00+02:00</updated></entry>
</feed>"""

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<rss version="2.0"><channel><item><title>&lol3;</title></item></channel></rss>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<rss version="2.0"><channel><item><title>&xxe;</title></item></channel></rss>"""

FETCHED = datetime(2025, 1, 1, tzinfo=UTC)


def _items(batches):
    return [json.loads(p) for b in batches for p in b.raw["payload"]]


def test_rss_items_normalize_with_the_default_map(tmp_path):
    path = tmp_path / "feed.xml"
    path.write_bytes(RSS)
    batches = list(read_feed_batches(str(path)))
    items = _items(batches)
    # oldest first, undated first of all; the record is the item as received
    assert [i["title"] for i in items] == ["Undated", "First & best", "Second"]
    assert items[1]["category_all"] == ["news", "tech"] and items[1]["description"] == "<p>html</p>"
    valid, rejects = normalize(batches[0].raw, source="feed", field_map=RSS_FIELD_MAP, fetched_at=FETCHED)
    assert rejects.is_empty()
    rows = {r["name"]: r for r in valid.iter_rows(named=True)}
    assert rows["First & best"]["source_id"] == "g1" and rows["First & best"]["category"] == "news"
    assert rows["Second"]["source_id"] == "http://x/2"  # no guid: the link identifies it
    assert rows["Second"]["created_at"] == datetime(2003, 6, 11, 7, 30, tzinfo=UTC)
    assert rows["Undated"]["created_at"] == FETCHED
    assert batches[-1].last_modified == datetime(2003, 6, 11, 7, 30, tzinfo=UTC)


def test_atom_entries():
    items = parse_feed(ATOM, "atom.xml")
    assert items[0] == {
        "title": "Atom one",
        "id": "urn:uuid:1",
        "link": "http://a/1",
        "updated": "2024-05-01T10:00:00Z",
        "summary": "sum",
        "category": "cat-a",
    }
    valid, _ = normalize(
        read_feed_batches.__globals__["raw_frame"]([json.dumps(i) for i in items]),
        source="a",
        field_map=RSS_FIELD_MAP,
        fetched_at=FETCHED,
    )
    assert valid["source_id"].to_list() == ["urn:uuid:1", "urn:uuid:2"]
    assert valid["updated_at"].to_list()[1] == datetime(2024, 5, 2, 8, tzinfo=UTC)


@pytest.mark.parametrize(("doc", "kind"), [(BILLION_LAUGHS, "EntitiesForbidden"), (XXE, "EntitiesForbidden")])
def test_unsafe_xml_is_refused_naming_the_feed(doc, kind):
    with pytest.raises(SourceFormatError, match=rf"evil\.xml: unsafe XML refused \({kind}"):
        parse_feed(doc, "evil.xml")


@pytest.mark.parametrize(
    ("doc", "message"),
    [(b"<rss><channel><item>", "not well-formed"), (b"<html><body/></html>", "neither RSS")],
)
def test_broken_feeds_name_the_feed(doc, message):
    with pytest.raises(SourceFormatError, match=f"broken.xml: .*{message}"):
        parse_feed(doc, "broken.xml")


def test_feed_over_http_is_incremental(file_server):
    base, root, requests = file_server
    (root / "feed.xml").write_bytes(RSS)
    url = f"{base}/feed.xml"
    first = list(read_feed_batches(url, batch_size=2))
    assert [b.raw.height for b in first] == [2, 1]
    etag = first[-1].cursor["etag"]
    assert etag and first[0].cursor["etag"] is None  # only the last batch may claim the whole response
    assert list(read_feed_batches(url, etag=etag)) == []  # 304: nothing to do
    assert requests[-1]["headers"]["If-None-Match"] == etag
    newer = list(read_feed_batches(url, since=datetime(2003, 6, 11, tzinfo=UTC)))
    assert [i["title"] for i in _items(newer)] == ["Undated", "Second"]
    (root / "big.xml").write_bytes(RSS.replace(b"<title>t</title>", b"<title>" + b"t" * 5000 + b"</title>"))
    with pytest.raises(SourceFormatError, match="big.xml: feed is larger than max_bytes=1024"):
        list(read_feed_batches(f"{base}/big.xml", max_bytes=1024))
