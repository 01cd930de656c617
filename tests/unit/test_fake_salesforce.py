"""The fake Salesforce speaks the protocol simple-salesforce (unchanged) expects, and its knobs work."""

from __future__ import annotations

import json

import pytest
import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceAuthenticationFailed,
    SalesforceExpiredSession,
    SalesforceGeneralError,
    SalesforceOperationError,
)

from tests.support.fake_salesforce import (
    DEFAULT_CONSUMER_KEY,
    DEFAULT_CONSUMER_SECRET,
    DEFAULT_PASSWORD,
    DEFAULT_TOKEN,
    DEFAULT_USERNAME,
    INSTANCE_HOST,
    MY_DOMAIN,
)

OBJ = "Customer_Weekly_Metric__c"
EXT = "External_Id__c"


@pytest.fixture
def sf(fake_salesforce_session) -> Salesforce:
    return Salesforce(
        username=DEFAULT_USERNAME,
        password=DEFAULT_PASSWORD,
        security_token=DEFAULT_TOKEN,
        session=fake_salesforce_session,
    )


def upsert(sf: Salesforce, csv_text: str):
    return sf.bulk2.Customer_Weekly_Metric__c._upload_data("upsert", csv_text, external_id_field=EXT, wait=0)


def test_soap_login_returns_session_and_instance(sf, fake_salesforce):
    assert sf.sf_instance == INSTANCE_HOST
    assert sf.session_id in fake_salesforce.sessions
    assert fake_salesforce.counts["soap_login"] == 1


def test_soap_login_fault_is_invalid_login(fake_salesforce_session):
    with pytest.raises(SalesforceAuthenticationFailed) as info:
        Salesforce(username=DEFAULT_USERNAME, password="nope", security_token=DEFAULT_TOKEN,
                   session=fake_salesforce_session)  # fmt: skip
    assert info.value.code == "INVALID_LOGIN"


def test_oauth_grants(fake_salesforce, fake_salesforce_session):
    cc = Salesforce(consumer_key=DEFAULT_CONSUMER_KEY, consumer_secret=DEFAULT_CONSUMER_SECRET, domain=MY_DOMAIN,
                    session=fake_salesforce_session)  # fmt: skip
    pw = Salesforce(username=DEFAULT_USERNAME, password=DEFAULT_PASSWORD + DEFAULT_TOKEN,
                    consumer_key=DEFAULT_CONSUMER_KEY, consumer_secret=DEFAULT_CONSUMER_SECRET,
                    session=fake_salesforce_session)  # fmt: skip
    assert cc.sf_instance == pw.sf_instance == INSTANCE_HOST
    assert {cc.session_id, pw.session_id} <= fake_salesforce.sessions
    assert fake_salesforce.counts["oauth_token"] == 2
    with pytest.raises(SalesforceAuthenticationFailed) as info:
        Salesforce(consumer_key=DEFAULT_CONSUMER_KEY, consumer_secret="bad", domain=MY_DOMAIN,
                   session=fake_salesforce_session)  # fmt: skip
    assert info.value.code == "invalid_client"


def test_upsert_semantics_created_updated_empty_and_na(sf, fake_salesforce):
    first = upsert(sf, "External_Id__c,Customer_Id__c,Currency__c\nA-1,C1,EUR\nB-1,C2,USD\n")
    assert (first["numberRecordsProcessed"], first["numberRecordsFailed"]) == (2, 0)
    ids = {k: v["Id"] for k, v in fake_salesforce.records(OBJ).items()}

    upsert(sf, "External_Id__c,Customer_Id__c,Currency__c\nA-1,#N/A,\n")
    store = fake_salesforce.records(OBJ)
    assert store["A-1"]["Customer_Id__c"] is None  # #N/A clears
    assert store["A-1"]["Currency__c"] == "EUR"  # empty cell leaves unchanged
    assert {k: v["Id"] for k, v in store.items()} == ids  # sf__Id stable per external id, no duplicate
    success = sf.bulk2.Customer_Weekly_Metric__c.get_successful_records(list(fake_salesforce.jobs)[-1])
    assert success.splitlines()[0] == '"sf__Id","sf__Created","External_Id__c","Customer_Id__c","Currency__c"'
    assert f'"{ids["A-1"]}","false"' in success


def test_failed_rows_and_results_shape(sf, fake_salesforce):
    fake_salesforce.fail_rows({"B-1": ("REQUIRED_FIELD_MISSING", "Required fields are missing: [Name]")})
    res = upsert(sf, "External_Id__c,Customer_Id__c\nA-1,C1\nB-1,C2\nA-1,C3\n")
    assert (res["numberRecordsProcessed"], res["numberRecordsFailed"]) == (3, 2)
    failed = sf.bulk2.Customer_Weekly_Metric__c.get_failed_records(res["job_id"]).splitlines()
    assert failed[0] == '"sf__Id","sf__Error","External_Id__c","Customer_Id__c"'
    assert any("REQUIRED_FIELD_MISSING:Required fields are missing: [Name]" in line for line in failed)
    assert any("DUPLICATE_EXTERNAL_ID" in line for line in failed)
    assert set(fake_salesforce.records(OBJ)) == {"A-1"}


def test_unknown_column_fails_the_job(sf, fake_salesforce):
    with pytest.raises(SalesforceOperationError, match="InvalidBatch : Field name not found : Bogus__c"):
        upsert(sf, "External_Id__c,Bogus__c\nA-1,x\n")
    job = next(iter(fake_salesforce.jobs.values()))
    assert job.state == "Failed" and len(job.unprocessed) == 1
    assert fake_salesforce.records(OBJ) == {}


def test_crlf_data_in_an_lf_job_fails(sf, fake_salesforce):
    with pytest.raises(SalesforceOperationError, match="LineEnding is invalid"):
        upsert(sf, "External_Id__c,Customer_Id__c\r\nA-1,C1\r\n")


def test_job_controls_fail_and_abort(sf, fake_salesforce):
    fake_salesforce.fail_next_job("InvalidBatch : boom", after_rows=1)
    with pytest.raises(SalesforceOperationError, match="boom"):
        upsert(sf, "External_Id__c,Customer_Id__c\nA-1,C1\nB-1,C2\n")
    assert set(fake_salesforce.records(OBJ)) == {"A-1"}
    fake_salesforce.abort_next_job()
    with pytest.raises(SalesforceOperationError, match="Aborted"):
        upsert(sf, "External_Id__c,Customer_Id__c\nC-1,C1\n")
    job_id = list(fake_salesforce.jobs)[-1]
    assert sf.bulk2.Customer_Weekly_Metric__c.get_unprocessed_records(job_id).splitlines()[1] == '"C-1","C1"'


def test_job_lifecycle_states_and_delete(sf, fake_salesforce):
    base = sf.bulk2_url.replace("https://", "http://").replace(INSTANCE_HOST, f"127.0.0.1:{fake_salesforce.port}")
    headers = {"Authorization": f"Bearer {sf.session_id}", "Content-Type": "application/json"}
    body = {"object": OBJ, "operation": "upsert", "externalIdFieldName": EXT, "contentType": "CSV", "lineEnding": "LF"}
    job = requests.post(f"{base}ingest", headers=headers, data=json.dumps(body), timeout=5).json()
    assert job["state"] == "Open"
    url = f"{base}ingest/{job['id']}"
    assert requests.get(f"{url}/successfulResults", headers=headers, timeout=5).status_code == 400  # not ready
    put = requests.put(f"{url}/batches", headers={**headers, "Content-Type": "text/csv"}, data=b"External_Id__c\nA\n",
                       timeout=5)  # fmt: skip
    assert put.status_code == 201
    patched = requests.patch(url, headers=headers, data=json.dumps({"state": "UploadComplete"}), timeout=5)
    assert patched.json()["state"] == "UploadComplete"
    states = [requests.get(url, headers=headers, timeout=5).json()["state"] for _ in range(3)]
    assert states == ["InProgress", "JobComplete", "JobComplete"]
    assert requests.get(url, headers=headers, timeout=5).json()["numberRecordsProcessed"] == 1
    assert requests.delete(url, headers=headers, timeout=5).status_code == 204
    assert requests.get(url, headers=headers, timeout=5).status_code == 404


def test_bearer_is_checked_and_session_expiry(sf, fake_salesforce):
    url = f"{fake_salesforce.base_url}/services/data/v59.0/jobs/ingest"
    denied = requests.post(url, headers={"Authorization": "Bearer nope"}, data="{}", timeout=5)
    assert denied.status_code == 401
    assert denied.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    fake_salesforce.expire_session()
    with pytest.raises(SalesforceExpiredSession):
        upsert(sf, "External_Id__c\nA-1\n")
    assert not fake_salesforce.sessions  # the old session stays invalid


def test_5xx_injection_and_request_counts(sf, fake_salesforce):
    fake_salesforce.fail_requests("create_job", 1, status=503)
    with pytest.raises(SalesforceGeneralError) as info:
        upsert(sf, "External_Id__c\nA-1\n")
    assert info.value.status == 503
    upsert(sf, "External_Id__c\nA-1\n")
    assert fake_salesforce.counts["create_job"] == 2
    assert fake_salesforce.counts["upload"] == fake_salesforce.counts["close_job"] == 1


def test_routing_adapter_refuses_other_hosts(fake_salesforce_session):
    with pytest.raises(requests.ConnectionError, match="not the fake"):
        fake_salesforce_session.get("https://example.com/", timeout=5)


def test_reset_between_tests(fake_salesforce):
    assert fake_salesforce.records(OBJ) == {} and sum(fake_salesforce.counts.values()) == 0
