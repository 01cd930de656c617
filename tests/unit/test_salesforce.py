"""tasks/salesforce.py against the fake Salesforce (tests/support/fake_salesforce.py) on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import logging
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from tasks.errors import SalesforceAuthError, SalesforceSyncError, SalesforceUnavailableError, is_retryable
from tasks.lake import LakeFS
from tasks.salesforce import SyncResult, connect, sync_metrics
from tests.support.fake_salesforce import DEFAULT_CONSUMER_SECRET, DEFAULT_PASSWORD, DEFAULT_TOKEN

OBJ = "Customer_Weekly_Metric__c"
WEEK = date(2024, 1, 1)
ORDER = [
    "External_Id__c",
    "Add_To_Cart_Count__c",
    "Currency__c",
    "Customer_Id__c",
    "Event_Count__c",
    "Last_Event_At__c",
    "Page_View_Count__c",
    "Purchase_Count__c",
    "Refund_Count__c",
    "Subscription_Renewal_Count__c",
    "Total_Amount__c",
    "Week_Start__c",
]


def metrics(n: int, week: date = WEEK, *, bump: dict[int, float] | None = None) -> pl.DataFrame:
    """Weekly metrics in the stage's input shape (declared in a non-sorted order on purpose)."""
    bump = bump or {}
    ids = [f"C{i:05d}" for i in range(n)]
    last = [datetime(2024, 1, 7, 12, 30, tzinfo=UTC) - timedelta(minutes=i) for i in range(n)]
    return pl.DataFrame(
        {
            "Customer_Id__c": ids,
            "External_Id__c": [f"{c}-{week.isoformat()}" for c in ids],
            "Week_Start__c": [week] * n,
            "Page_View_Count__c": list(range(n)),
            "Add_To_Cart_Count__c": [i % 7 for i in range(n)],
            "Purchase_Count__c": [i % 3 for i in range(n)],
            "Refund_Count__c": [0] * n,
            "Subscription_Renewal_Count__c": [1] * n,
            "Event_Count__c": [i * 2 + 1 for i in range(n)],
            "Total_Amount__c": [round(10.5 + i + bump.get(i, 0.0), 2) for i in range(n)],
            "Currency__c": ["EUR"] * n,
            "Last_Event_At__c": last,
        },
        schema_overrides={
            **{c: pl.Int64 for c in ORDER if c.endswith("_Count__c")},
            "Total_Amount__c": pl.Float64,
            "Last_Event_At__c": pl.Datetime("us", "UTC"),
        },
    )


@pytest.fixture
def lake(tmp_path) -> LakeFS:
    return LakeFS(tmp_path.joinpath("lake").as_uri())


@pytest.fixture
def creds(fake_salesforce):
    return fake_salesforce.credentials("password")


@pytest.fixture
def sf(fake_salesforce, fake_salesforce_session, creds):
    return connect(creds, session=fake_salesforce_session)


def run(lake: LakeFS, frame: pl.DataFrame, sf, *, run_id: str = "r1", **kwargs) -> SyncResult:
    url = lake.write_parquet(frame, f"curated/metrics-{run_id}.parquet").url
    kwargs.setdefault("wait", 0)
    kwargs.setdefault("retry_backoff", 0)
    return sync_metrics(
        lake, url, sf=sf, object_name=OBJ, external_id_field="External_Id__c",
        out_prefix=f"sync/{run_id}", snapshot_rel="state/salesforce-snapshot.parquet", **kwargs,
    )  # fmt: skip


def test_all_rows_succeed_and_the_fake_holds_the_values(lake, sf, fake_salesforce):
    progress: list[tuple[int, int]] = []
    result = run(lake, metrics(25), sf, on_progress=lambda done, total: progress.append((done, total)))

    assert (result.considered, result.sent, result.succeeded, result.created) == (25, 25, 25, 25)
    assert (result.failed, result.unprocessed, result.error_rate_pct) == (0, 0, 0.0)
    assert len(result.job_ids) == 1 and fake_salesforce.counts["create_job"] == 1
    assert progress[-1] == (1, 1)
    store = fake_salesforce.records(OBJ)
    assert len(store) == 25
    rec = store["C00003-2024-01-01"]
    assert rec["Customer_Id__c"] == "C00003"
    assert rec["Week_Start__c"] == "2024-01-01"
    assert rec["Last_Event_At__c"] == "2024-01-07T12:27:00.000Z"
    assert rec["Total_Amount__c"] == "13.5"
    assert rec["Event_Count__c"] == "7"
    assert rec["Currency__c"] == "EUR"
    snap = lake.read_parquet("state/salesforce-snapshot.parquet")
    assert snap.height == 25 and set(snap["job_id"]) == set(result.job_ids)
    assert lake.read_parquet(result.failed_rows.url).height == 0


def test_some_rows_fail_and_land_in_the_failed_rows_file(lake, sf, fake_salesforce):
    bad = {"C00004-2024-01-01": ("FIELD_CUSTOM_VALIDATION_EXCEPTION", "Amount too high")}
    bad["C00011-2024-01-01"] = ("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", "Currency: bad value")
    fake_salesforce.fail_rows(bad)

    result = run(lake, metrics(30), sf)

    assert (result.sent, result.succeeded, result.failed, result.unprocessed) == (30, 28, 2, 0)
    assert result.error_rate_pct == pytest.approx(2 / 30 * 100, abs=1e-3)
    failed = lake.read_parquet(result.failed_rows.url).sort("external_id")
    assert failed["external_id"].to_list() == sorted(bad)
    assert failed["error"][0].startswith("FIELD_CUSTOM_VALIDATION_EXCEPTION:Amount too high")
    assert failed["error"][1].startswith("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST")
    assert failed["kind"].to_list() == ["failed", "failed"]
    assert failed["Customer_Id__c"].to_list() == ["C00004", "C00011"]  # the row's values travel with the error
    assert failed["Total_Amount__c"].to_list() == ["14.5", "21.5"]
    assert set(fake_salesforce.records(OBJ)).isdisjoint(bad)
    snap = lake.read_parquet("state/salesforce-snapshot.parquet")
    assert snap.height == 28 and set(snap["external_id"]).isdisjoint(bad)


def test_error_rate_over_the_threshold_fails_after_writing_failed_rows(lake, sf, fake_salesforce):
    fake_salesforce.fail_rows([f"C{i:05d}-2024-01-01" for i in (1, 2, 3, 4)])

    with pytest.raises(SalesforceSyncError, match=r"20\.00% is over the threshold 10\.00%") as info:
        run(lake, metrics(20), sf)

    assert not is_retryable(info.value)
    result = info.value.result
    assert (result.failed, result.succeeded) == (4, 16)
    assert lake.read_parquet(result.failed_rows.url).height == 4
    # what Salesforce confirmed is recorded even though the sync failed
    assert lake.read_parquet("state/salesforce-snapshot.parquet").height == 16


def test_threshold_is_configurable(lake, sf, fake_salesforce):
    fake_salesforce.fail_rows([f"C{i:05d}-2024-01-01" for i in (1, 2, 3, 4)])
    assert run(lake, metrics(20), sf, error_threshold_pct=25).failed == 4


def test_job_failed_raises_with_salesforces_error_message(lake, sf, fake_salesforce):
    fake_salesforce.fail_next_job("InvalidBatch : Failed to process query: simulated")
    with pytest.raises(SalesforceSyncError, match="ended Failed: InvalidBatch : Failed to process query: simulated"):
        run(lake, metrics(5), sf)
    assert fake_salesforce.records(OBJ) == {}


def test_unknown_column_fails_the_job_like_salesforce(lake, sf, fake_salesforce):
    frame = metrics(3).with_columns(pl.lit("x").alias("Bogus_Field__c"))
    with pytest.raises(SalesforceSyncError, match="Field name not found : Bogus_Field__c") as info:
        run(lake, frame, sf)
    assert info.value.result.unprocessed == 3
    failed = lake.read_parquet(info.value.result.failed_rows.url)
    assert failed["kind"].unique().to_list() == ["unprocessed"]


def test_aborted_job_keeps_confirmed_rows_and_resends_the_rest(lake, sf, fake_salesforce):
    fake_salesforce.abort_next_job(after_rows=6)
    with pytest.raises(SalesforceSyncError, match="ended Aborted"):
        run(lake, metrics(10), sf)
    assert len(fake_salesforce.records(OBJ)) == 6
    assert lake.read_parquet("state/salesforce-snapshot.parquet").height == 6

    again = run(lake, metrics(10), sf, run_id="r2")
    assert (again.unchanged, again.sent, again.succeeded) == (6, 4, 4)
    assert len(fake_salesforce.records(OBJ)) == 10


def test_5xx_while_polling_is_retried(lake, sf, fake_salesforce):
    fake_salesforce.fail_polls(2)
    fake_salesforce.fail_requests("successfulResults", 1, status=502)
    result = run(lake, metrics(4), sf)
    assert result.succeeded == 4
    assert fake_salesforce.counts["get_job"] >= 4  # two 503s, then InProgress, then JobComplete
    assert fake_salesforce.counts["successfulResults"] == 2


def test_5xx_that_does_not_stop_is_retryable_unavailable(lake, sf, fake_salesforce):
    fake_salesforce.fail_polls(10)
    with pytest.raises(SalesforceUnavailableError, match="HTTP 503") as info:
        run(lake, metrics(4), sf, retry_attempts=3)
    assert is_retryable(info.value)
    assert fake_salesforce.counts["get_job"] == 3
    assert not lake.read_parquet("state/salesforce-snapshot.parquet").height  # nothing confirmed


def test_5xx_on_create_job_is_unavailable_without_retrying_the_post(lake, sf, fake_salesforce):
    fake_salesforce.fail_requests("create_job", 1, status=500)
    with pytest.raises(SalesforceUnavailableError):
        run(lake, metrics(4), sf)
    assert fake_salesforce.counts["create_job"] == 1


def test_expired_session_reauthenticates_once(lake, sf, fake_salesforce, fake_salesforce_session, creds):
    logins: list[int] = []

    def reauth():
        logins.append(1)
        return connect(creds, session=fake_salesforce_session)

    fake_salesforce.expire_session(on="get_job")
    result = run(lake, metrics(5), sf, reauth=reauth)
    assert result.succeeded == 5 and len(logins) == 1
    assert fake_salesforce.counts["soap_login"] == 2 and fake_salesforce.counts["401"] == 1


def test_second_401_after_reauth_is_an_auth_error(lake, fake_salesforce, fake_salesforce_session):
    creds = fake_salesforce.credentials("session")
    sf = connect(creds, session=fake_salesforce_session)
    fake_salesforce.expire_session(on="upload")  # the fixed session id stays invalid: re-login cannot help
    with pytest.raises(SalesforceAuthError, match="again after re-authenticating") as info:
        run(lake, metrics(3), sf, reauth=lambda: connect(creds, session=fake_salesforce_session))
    assert creds.session_id.get_secret_value() not in str(info.value)
    assert fake_salesforce.counts["upload"] == 2


def test_expired_session_without_reauth_is_an_auth_error(lake, sf, fake_salesforce):
    fake_salesforce.expire_session()
    with pytest.raises(SalesforceAuthError, match="session expired or invalid"):
        run(lake, metrics(3), sf)


@pytest.mark.parametrize(
    ("mode", "override", "secret"),
    [
        ("password", {"password": "wrong-Pa55word!"}, "wrong-Pa55word!"),
        ("password", {"security_token": "BADTOKEN99"}, "BADTOKEN99"),
        ("client_credentials", {"consumer_secret": "not-the-secret-42"}, "not-the-secret-42"),
    ],
)
def test_wrong_credentials_raise_auth_error_without_the_secret(fake_salesforce, fake_salesforce_session, mode, override,
                                                               secret):  # fmt: skip
    creds = fake_salesforce.credentials(mode, **override)
    with pytest.raises(SalesforceAuthError) as info:
        connect(creds, session=fake_salesforce_session)
    text = str(info.value) + repr(info.value)
    for value in (secret, DEFAULT_PASSWORD, DEFAULT_TOKEN, DEFAULT_CONSUMER_SECRET):
        assert value not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "INVALID_LOGIN" in text or "invalid_client" in text


@pytest.mark.parametrize("mode", ["password", "session", "client_credentials"])
def test_every_auth_mode_logs_in_and_syncs(lake, fake_salesforce, fake_salesforce_session, mode):
    sf = connect(fake_salesforce.credentials(mode), session=fake_salesforce_session)
    assert run(lake, metrics(3), sf).succeeded == 3
    expected = {"password": "soap_login", "client_credentials": "oauth_token", "session": None}[mode]
    if expected:
        assert fake_salesforce.counts[expected] == 1
    else:
        assert fake_salesforce.counts["soap_login"] + fake_salesforce.counts["oauth_token"] == 0


def test_client_credentials_domain_from_instance_url(fake_salesforce, fake_salesforce_session):
    creds = fake_salesforce.credentials(
        "client_credentials", domain="login", instance_url="https://fake-org.my.salesforce.com"
    )
    assert connect(creds, session=fake_salesforce_session).sf_instance == "fake-org.my.salesforce.com"


def test_rerun_of_the_same_week_sends_nothing_and_never_duplicates(lake, sf, fake_salesforce):
    first = run(lake, metrics(12), sf)
    ids = {k: v["Id"] for k, v in fake_salesforce.records(OBJ).items()}
    second = run(lake, metrics(12), sf, run_id="r2")
    assert (second.considered, second.unchanged, second.sent, second.job_ids) == (12, 12, 0, [])
    assert fake_salesforce.counts["create_job"] == 1

    # Without the snapshot everything is sent again: same external ids are updated, not duplicated.
    lake.fs.rm(lake._path("state/salesforce-snapshot.parquet"))
    third = run(lake, metrics(12), sf, run_id="r3")
    assert (third.sent, third.succeeded, third.created) == (12, 12, 0)
    assert {k: v["Id"] for k, v in fake_salesforce.records(OBJ).items()} == ids
    assert first.created == 12


def test_only_changed_rows_are_sent(lake, sf, fake_salesforce):
    run(lake, metrics(10), sf)
    result = run(lake, metrics(10, bump={2: 1.0, 7: 0.25}), sf, run_id="r2")
    assert (result.unchanged, result.sent, result.succeeded) == (8, 2, 2)
    uploaded = fake_salesforce.uploads[-1].decode().splitlines()
    assert [line.split(",")[0] for line in uploaded[1:]] == ["C00002-2024-01-01", "C00007-2024-01-01"]
    assert fake_salesforce.records(OBJ)["C00007-2024-01-01"]["Total_Amount__c"] == "17.75"
    # a new week is all new rows
    assert run(lake, metrics(10, date(2024, 1, 8)), sf, run_id="r3").sent == 10


def test_failed_rows_are_retried_next_run(lake, sf, fake_salesforce):
    fake_salesforce.fail_rows(["C00001-2024-01-01", "C00005-2024-01-01"])
    assert run(lake, metrics(30), sf).failed == 2
    fake_salesforce.row_faults.clear()  # the cause was fixed in Salesforce
    result = run(lake, metrics(30), sf, run_id="r2")
    assert (result.unchanged, result.sent, result.succeeded) == (28, 2, 2)
    assert len(fake_salesforce.records(OBJ)) == 30


def test_dry_run_writes_the_exact_csv_and_touches_nothing_remote(lake, fake_salesforce):
    result = run(lake, metrics(3), None)
    assert result.dry_run and (result.sent, result.succeeded, result.snapshot, result.failed_rows) == (3, 0, None, None)
    assert result.outbox.url.endswith(f"sync/r1/outbox/{OBJ}-1.csv")
    text = lake.read_bytes(result.outbox.url).decode()
    assert text == (
        ",".join(ORDER) + "\n"
        "C00000-2024-01-01,0,EUR,C00000,1,2024-01-07T12:30:00.000Z,0,0,0,1,10.5,2024-01-01\n"
        "C00001-2024-01-01,1,EUR,C00001,3,2024-01-07T12:29:00.000Z,1,1,0,1,11.5,2024-01-01\n"
        "C00002-2024-01-01,2,EUR,C00002,5,2024-01-07T12:28:00.000Z,2,2,0,1,12.5,2024-01-01\n"
    )
    assert "\r" not in text
    for row in csv.reader(io.StringIO(text)):
        assert all(cell != "" for cell in row)
    assert sum(fake_salesforce.counts.values()) == 0
    assert not lake.exists("state/salesforce-snapshot.parquet")
    # the dry run's CSV is what a real run uploads, byte for byte
    sf = connect(fake_salesforce.credentials("password"), session=fake_salesforce.requests_session())
    run(lake, metrics(3), sf, run_id="r2")
    assert fake_salesforce.uploads == [text.encode()]


def test_column_order_does_not_depend_on_input_order(lake):
    frame = metrics(4)
    a = run(lake, frame, None, run_id="a")
    b = run(lake, frame.select(list(reversed(frame.columns))), None, run_id="b")
    assert lake.read_bytes(a.outbox.url) == lake.read_bytes(b.outbox.url)


def test_nulls_are_never_sent_as_empty_cells(lake):
    frame = metrics(3).with_columns(
        pl.when(pl.col("Page_View_Count__c") == 1).then(None).otherwise(pl.col("Currency__c")).alias("Currency__c")
    )
    with pytest.raises(SalesforceSyncError, match="Currency__c"):
        run(lake, frame, None)
    empty = metrics(3).with_columns(pl.lit("").alias("Customer_Id__c"))
    with pytest.raises(SalesforceSyncError, match="Customer_Id__c"):
        run(lake, empty, None)
    # deliberately clearable: null goes out as #N/A
    result = run(lake, frame, None, clear_nulls=["Currency__c"])
    lines = lake.read_bytes(result.outbox.url).decode().splitlines()
    assert lines[2].split(",")[ORDER.index("Currency__c")] == "#N/A"


def test_bad_input_is_named(lake):
    with pytest.raises(SalesforceSyncError, match="duplicate External_Id__c"):
        run(lake, pl.concat([metrics(3), metrics(1)]), None)
    with pytest.raises(SalesforceSyncError, match="External_Id__c.*missing"):
        run(lake, metrics(2).drop("External_Id__c"), None)


def test_quoting_floats_and_naive_datetimes(lake):
    frame = metrics(2).with_columns(
        pl.Series("Customer_Id__c", ['ACME, "Ltd"', "line\nbreak"]),
        pl.Series("Total_Amount__c", [1e20, 1e-7]),
        pl.col("Last_Event_At__c").dt.replace_time_zone(None),
    )
    text = lake.read_bytes(run(lake, frame, None).outbox.url).decode()
    rows = list(csv.reader(io.StringIO(text)))
    col = {name: i for i, name in enumerate(rows[0])}
    assert [r[col["Customer_Id__c"]] for r in rows[1:]] == ['ACME, "Ltd"', "line\nbreak"]
    assert [r[col["Total_Amount__c"]] for r in rows[1:]] == ["100000000000000000000", "0.0000001"]
    assert rows[1][col["Last_Event_At__c"]] == "2024-01-07T12:30:00.000Z"


def test_chunking_makes_several_jobs_and_every_row_arrives_once(lake, sf, fake_salesforce):
    frame = metrics(40).with_columns(  # a quoted cell with an inner quote tests the exact size arithmetic
        pl.when(pl.col("Page_View_Count__c") % 5 == 0)
        .then(pl.lit('say "hi", twice'))
        .otherwise(pl.col("Customer_Id__c"))
        .alias("Customer_Id__c")
    )
    result = run(lake, frame, sf, max_csv_bytes=1_200)
    assert len(result.job_ids) >= 4 and len(result.outbox_files) == len(result.job_ids)
    assert result.succeeded == 40 and fake_salesforce.counts["create_job"] == len(result.job_ids)
    header = ",".join(ORDER)
    seen: list[str] = []
    for data in fake_salesforce.uploads:
        assert len(data) <= 1_200
        rows = list(csv.reader(io.StringIO(data.decode())))
        assert ",".join(rows[0]) == header
        seen += [r[0] for r in rows[1:]]
    assert sorted(seen) == sorted(frame["External_Id__c"]) and len(seen) == 40
    assert len(fake_salesforce.records(OBJ)) == 40
    assert fake_salesforce.records(OBJ)["C00005-2024-01-01"]["Customer_Id__c"] == 'say "hi", twice'


def test_progress_counts_salesforce_10k_record_batches(lake, sf):
    progress: list[tuple[int, int]] = []
    result = run(lake, metrics(20_001), sf, on_progress=lambda d, t: progress.append((d, t)))
    assert result.succeeded == 20_001
    assert progress[-1] == (3, 3) and all(t == 3 for _, t in progress)


def test_no_secret_in_logs(lake, fake_salesforce, fake_salesforce_session, caplog):
    creds = fake_salesforce.credentials("password")
    caplog.set_level(logging.DEBUG)
    sf = connect(creds, session=fake_salesforce_session)
    fake_salesforce.expire_session(on="get_job")
    run(lake, metrics(3), sf, reauth=lambda: connect(creds, session=fake_salesforce_session))
    assert caplog.records  # something was logged
    for secret in (sf.session_id, DEFAULT_PASSWORD, DEFAULT_TOKEN):
        assert secret not in caplog.text


def test_empty_metrics_send_nothing(lake, sf, fake_salesforce):
    result = run(lake, metrics(0), sf)
    assert (result.considered, result.sent, result.job_ids, result.outbox) == (0, 0, [], None)
    assert fake_salesforce.counts["create_job"] == 0
