"""A FAKE Salesforce for tests: SOAP login, OAuth token endpoint and Bulk API 2.0 ingest, on 127.0.0.1.

It is a fake, not Salesforce: it follows the documented protocol closely enough that simple-salesforce runs
unchanged against it, and keeps an in-memory store per object keyed by external id (upsert semantics: created vs
updated, a stable ``sf__Id`` per external id, empty cell = leave unchanged, ``#N/A`` = set null). It checks
``Authorization: Bearer``, rejects unknown columns the way Salesforce does (job Failed, ``InvalidBatch : Field name
not found : X``) and refuses CRLF data in an LF job. Tests can make it fail rows, fail or abort a job, answer 5xx
N times, or expire the session once; it counts requests per endpoint.

Routing: simple-salesforce always builds ``https://`` URLs and logs in at ``https://{domain}.salesforce.com``.
:class:`SalesforceRoutingAdapter` (a requests transport adapter, no library patching) sends https requests for
``*.salesforce.com`` and for the fake's own ``127.0.0.1:<port>`` to ``http://127.0.0.1:<port>``. Note bulk2 keeps
the host:port of ``instance_url`` but forces https, so even session-id mode needs the adapter.

Fixtures: ``fake_salesforce`` (session-scoped server, reset before each test that uses it) and
``fake_salesforce_session`` (a routed ``requests.Session``).
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest
import requests
import uvicorn
from defusedxml import ElementTree
from requests.adapters import HTTPAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

INSTANCE_HOST = "fake-org.my.salesforce.com"
MY_DOMAIN = "fake-org.my"
ORG_ID = "00DFAKE000000001"
USER_ID = "005FAKE000000001"
DEFAULT_USERNAME = "etl@example.com"
DEFAULT_PASSWORD = "pw-Secret-123"
DEFAULT_TOKEN = "TOKEN456xyz"
DEFAULT_CONSUMER_KEY = "fake-consumer-key"
DEFAULT_CONSUMER_SECRET = "fake-consumer-secret-789"
METRIC_FIELDS = [
    "External_Id__c",
    "Customer_Id__c",
    "Week_Start__c",
    "Page_View_Count__c",
    "Add_To_Cart_Count__c",
    "Purchase_Count__c",
    "Refund_Count__c",
    "Subscription_Renewal_Count__c",
    "Event_Count__c",
    "Total_Amount__c",
    "Currency__c",
    "Last_Event_At__c",
]
DEFAULT_OBJECTS = {"Customer_Weekly_Metric__c": METRIC_FIELDS}
INVALID_SESSION = [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
RESULT_KINDS = {"successfulresults": "successfulResults", "failedresults": "failedResults"}
RESULT_KINDS["unprocessedrecords"] = "unprocessedrecords"


# --- routing ----------------------------------------------------------------------------------------------------


class SalesforceRoutingAdapter(HTTPAdapter):
    """Rewrites https://*.salesforce.com and https://127.0.0.1:<port> to the fake's http://127.0.0.1:<port>."""

    def __init__(self, port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.port = port
        self.routed: list[str] = []

    def _target(self, url: str) -> str | None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme == "https" and (
            host.endswith(".salesforce.com") or (host == "127.0.0.1" and parts.port == self.port)
        ):
            return urlunsplit(("http", f"127.0.0.1:{self.port}", parts.path, parts.query, ""))
        return None

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        target = self._target(request.url or "")
        if target is None:
            raise requests.ConnectionError(f"test network: refusing to reach {request.url!r} (not the fake)")
        self.routed.append(urlsplit(request.url or "").hostname or "")
        request.url = target
        return super().send(request, **kwargs)


# --- state ------------------------------------------------------------------------------------------------------


@dataclass
class FakeJob:
    id: str
    object: str
    operation: str
    external_id_field: str | None
    line_ending: str
    state: str = "Open"
    created: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000"))
    data: bytes | None = None
    polls_until_done: int = 1
    final_state: str = "JobComplete"
    error_message: str | None = None
    header: list[str] = field(default_factory=list)
    success: list[list[str]] = field(default_factory=list)
    failed: list[list[str]] = field(default_factory=list)
    unprocessed: list[list[str]] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        done = self.state in ("JobComplete", "Failed", "Aborted")
        out: dict[str, Any] = {
            "id": self.id,
            "operation": self.operation,
            "object": self.object,
            "createdById": USER_ID,
            "createdDate": self.created,
            "systemModstamp": self.created,
            "state": self.state,
            "concurrencyMode": "Parallel",
            "contentType": "CSV",
            "apiVersion": 59.0,
            "jobType": "V2Ingest",
            "lineEnding": self.line_ending,
            "columnDelimiter": "COMMA",
            "contentUrl": f"services/data/v59.0/jobs/ingest/{self.id}/batches",
            "numberRecordsProcessed": (len(self.success) + len(self.failed)) if done else 0,
            "numberRecordsFailed": len(self.failed) if done else 0,
            "retries": 0,
            "totalProcessingTime": 0,
            "apiActiveProcessingTime": 0,
            "apexProcessingTime": 0,
        }
        if self.external_id_field:
            out["externalIdFieldName"] = self.external_id_field
        if self.state == "Failed" and self.error_message:
            out["errorMessage"] = self.error_message
        return out


@dataclass
class _JobFault:
    state: str  # Failed or Aborted
    message: str | None
    after_rows: int


def _api_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse([{"errorCode": code, "message": message}], status_code=status)


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


class FakeSalesforce:
    """State + Starlette app of the fake. Every public method is safe to call from the test thread."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.port = 0
        self._ids = itertools.count(1)
        self.reset()
        self.app = Starlette(
            routes=[
                Route("/services/Soap/u/{ver}", self._soap_login, methods=["POST"]),
                Route("/services/oauth2/token", self._oauth_token, methods=["POST"]),
                Route("/services/data/v{ver}/jobs/ingest", self._create_job, methods=["POST"]),
                Route("/services/data/v{ver}/jobs/ingest/{job_id}", self._job, methods=["GET", "PATCH", "DELETE"]),
                Route("/services/data/v{ver}/jobs/ingest/{job_id}/batches", self._upload, methods=["PUT"]),
                Route("/services/data/v{ver}/jobs/ingest/{job_id}/{kind}", self._results, methods=["GET"]),
            ]
        )

    # --- configuration (tests) -----------------------------------------------------------------------------------

    def reset(self) -> None:
        with self.lock:
            self.users: dict[str, tuple[str, str]] = {DEFAULT_USERNAME: (DEFAULT_PASSWORD, DEFAULT_TOKEN)}
            self.apps: dict[str, str] = {DEFAULT_CONSUMER_KEY: DEFAULT_CONSUMER_SECRET}
            self.objects: dict[str, list[str]] = {k: list(v) for k, v in DEFAULT_OBJECTS.items()}
            self.store: dict[str, dict[str, dict[str, str | None]]] = {}
            self.jobs: dict[str, FakeJob] = {}
            self.sessions: set[str] = set()
            self.counts: Counter[str] = Counter()
            self.row_faults: dict[str, tuple[str, str]] = {}
            self.job_faults: list[_JobFault] = []
            self.request_faults: dict[str, list[int]] = {}
            self.expire_on: str | None = None
            self.polls_until_done = 1
            self.uploads: list[bytes] = []

    def issue_session(self) -> str:
        """A valid session id (as if obtained elsewhere) for session-id mode."""
        token = f"{ORG_ID}!AQ{secrets.token_hex(24)}"
        with self.lock:
            self.sessions.add(token)
        return token

    def fail_rows(
        self,
        external_ids: dict[str, tuple[str, str]] | list[str],
        code: str = "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        message: str = "Rejected by a validation rule",
    ) -> None:
        """Make rows with these external ids fail (every job, until reset) with ``code:message``."""
        with self.lock:
            if isinstance(external_ids, dict):
                self.row_faults.update(external_ids)
            else:
                self.row_faults.update({eid: (code, message) for eid in external_ids})

    def fail_next_job(self, message: str = "InvalidBatch : simulated failure", *, after_rows: int = 0) -> None:
        """The next job processes ``after_rows`` rows, then ends Failed with ``errorMessage=message``."""
        with self.lock:
            self.job_faults.append(_JobFault("Failed", message, after_rows))

    def abort_next_job(self, *, after_rows: int = 0) -> None:
        """The next job processes ``after_rows`` rows, then ends Aborted (as if an admin aborted it)."""
        with self.lock:
            self.job_faults.append(_JobFault("Aborted", None, after_rows))

    def fail_requests(self, endpoint: str, times: int, status: int = 503) -> None:
        """The next ``times`` requests to ``endpoint`` (a name in :attr:`counts`) answer ``status``."""
        with self.lock:
            self.request_faults.setdefault(endpoint, []).extend([status] * times)

    def fail_polls(self, times: int, status: int = 503) -> None:
        self.fail_requests("get_job", times, status)

    def expire_session(self, on: str | None = None) -> None:
        """At the next API request (to endpoint ``on``, or any), invalidate every session and answer 401."""
        with self.lock:
            self.expire_on = on or "*"

    def records(self, object_name: str = "Customer_Weekly_Metric__c") -> dict[str, dict[str, str | None]]:
        with self.lock:
            return {k: dict(v) for k, v in self.store.get(object_name, {}).items()}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_session(self) -> requests.Session:
        session = requests.Session()
        session.mount("https://", SalesforceRoutingAdapter(self.port))
        return session

    def credentials(self, mode: str = "password", **overrides: Any):
        """A SalesforceCredentials block for ``mode`` that logs in against this fake (with requests_session())."""
        from blocks.salesforce import SalesforceCredentials

        values: dict[str, Any] = {
            "password": {"username": DEFAULT_USERNAME, "password": DEFAULT_PASSWORD, "security_token": DEFAULT_TOKEN},
            "session": {"instance_url": self.base_url, "session_id": None},
            "client_credentials": {
                "consumer_key": DEFAULT_CONSUMER_KEY,
                "consumer_secret": DEFAULT_CONSUMER_SECRET,
                "domain": MY_DOMAIN,
            },
        }[mode]
        if mode == "session" and "session_id" not in overrides:
            values["session_id"] = self.issue_session()
        return SalesforceCredentials(auth_mode=mode, **{**values, **overrides})

    # --- helpers -------------------------------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):015d}"[:18]

    def _new_session(self) -> str:
        return self.issue_session()

    def _gate(self, endpoint: str, request: Request) -> Response | None:
        """Count, inject faults, check the bearer token. None = go on."""
        with self.lock:
            self.counts[endpoint] += 1
            faults = self.request_faults.get(endpoint)
            if faults:
                status = faults.pop(0)
                return _api_error(status, "SERVER_UNAVAILABLE", "simulated outage")
            if self.expire_on in ("*", endpoint):
                self.expire_on = None
                self.sessions.clear()
                self.counts["401"] += 1
                return JSONResponse(INVALID_SESSION, status_code=401)
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth.removeprefix("Bearer ") not in self.sessions:
                self.counts["401"] += 1
                return JSONResponse(INVALID_SESSION, status_code=401)
        return None

    # --- login ---------------------------------------------------------------------------------------------------

    async def _soap_login(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            self.counts["soap_login"] += 1
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError:
            return self._soap_fault("INVALID_LOGIN", "Invalid request")
        values = {el.tag.rsplit("}", 1)[-1]: (el.text or "") for el in root.iter()}
        username, password = values.get("username", ""), values.get("password", "")
        with self.lock:
            known = self.users.get(username)
        if known is None or password != known[0] + known[1]:
            return self._soap_fault("INVALID_LOGIN", "Invalid username, password, security token; or user locked out.")
        ver = request.path_params["ver"]
        session_id = self._new_session()
        server_url = f"https://{INSTANCE_HOST}/services/Soap/u/{ver}/{ORG_ID}"
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
            'xmlns="urn:partner.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
            "<soapenv:Body><loginResponse><result>"
            f"<metadataServerUrl>https://{INSTANCE_HOST}/services/Soap/m/{ver}/{ORG_ID}</metadataServerUrl>"
            "<passwordExpired>false</passwordExpired><sandbox>false</sandbox>"
            f"<serverUrl>{server_url}</serverUrl><sessionId>{session_id}</sessionId><userId>{USER_ID}</userId>"
            f"<userInfo><organizationId>{ORG_ID}</organizationId><userName>{username}</userName>"
            "<sessionSecondsValid>7200</sessionSecondsValid></userInfo>"
            "</result></loginResponse></soapenv:Body></soapenv:Envelope>"
        )
        return Response(xml, media_type="text/xml; charset=utf-8")

    @staticmethod
    def _soap_fault(code: str, message: str) -> Response:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
            'xmlns:sf="urn:fault.partner.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
            f"<soapenv:Body><soapenv:Fault><faultcode>sf:{code}</faultcode><faultstring>{code}: {message}</faultstring>"
            f'<detail><sf:LoginFault xsi:type="sf:LoginFault"><sf:exceptionCode>{code}</sf:exceptionCode>'
            f"<sf:exceptionMessage>{message}</sf:exceptionMessage></sf:LoginFault></detail>"
            "</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
        )
        return Response(xml, status_code=500, media_type="text/xml; charset=utf-8")

    async def _oauth_token(self, request: Request) -> Response:
        form = {k: v[-1] for k, v in parse_qs((await request.body()).decode(), keep_blank_values=True).items()}
        with self.lock:
            self.counts["oauth_token"] += 1
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("authorization", "")
        if auth.startswith("Basic "):
            try:
                client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                client_id = client_secret = None
        grant = form.get("grant_type")
        with self.lock:
            app_ok = client_id in self.apps and self.apps[client_id] == client_secret
        if grant not in ("password", "client_credentials"):
            return JSONResponse(
                {"error": "unsupported_grant_type", "error_description": "grant type not supported"}, status_code=400
            )
        if not app_ok:
            return JSONResponse(
                {"error": "invalid_client", "error_description": "invalid client credentials"}, status_code=400
            )
        if grant == "password":
            username, password = str(form.get("username") or ""), str(form.get("password") or "")
            with self.lock:
                known = self.users.get(username)
            if known is None or password not in (known[0], known[0] + known[1]):
                return JSONResponse(
                    {"error": "invalid_grant", "error_description": "authentication failure"}, status_code=400
                )
        return JSONResponse(
            {
                "access_token": self._new_session(),
                "instance_url": f"https://{INSTANCE_HOST}",
                "id": f"https://login.salesforce.com/id/{ORG_ID}/{USER_ID}",
                "token_type": "Bearer",
                "issued_at": str(int(time.time() * 1000)),
                "signature": base64.b64encode(secrets.token_bytes(32)).decode(),
            }
        )

    # --- Bulk API 2.0 ingest -------------------------------------------------------------------------------------

    async def _create_job(self, request: Request) -> Response:
        denied = self._gate("create_job", request)
        if denied:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _api_error(400, "JSON_PARSER_ERROR", "request body is not JSON")
        obj, op = body.get("object"), body.get("operation")
        with self.lock:
            fields = self.objects.get(obj or "")
            if fields is None:
                return _api_error(400, "INVALIDENTITY", f"Entity '{obj}' is not supported by the Bulk API")
            if op not in ("insert", "upsert", "update"):
                return _api_error(400, "FEATURENOTENABLED", f"operation {op!r} is not supported by this fake")
            ext = body.get("externalIdFieldName")
            if op == "upsert" and (not ext or ext.lower() not in {f.lower() for f in fields}):
                return _api_error(400, "INVALIDJOB", f"External ID field '{ext}' not found on {obj}")
            if body.get("contentType", "CSV") != "CSV":
                return _api_error(400, "INVALIDJOB", "contentType must be CSV")
            if body.get("columnDelimiter", "COMMA") != "COMMA":
                return _api_error(400, "INVALIDJOB", "this fake supports COMMA only")
            line_ending = body.get("lineEnding", "LF")
            if line_ending not in ("LF", "CRLF"):
                return _api_error(400, "INVALIDJOB", f"invalid lineEnding {line_ending!r}")
            job = FakeJob(
                id=self._new_id("750"),
                object=obj,
                operation=op,
                external_id_field=ext,
                line_ending=line_ending,
                polls_until_done=self.polls_until_done,
            )
            self.jobs[job.id] = job
            return JSONResponse(job.info())

    async def _upload(self, request: Request) -> Response:
        denied = self._gate("upload", request)
        if denied:
            return denied
        data = await request.body()
        with self.lock:
            job = self.jobs.get(request.path_params["job_id"])
            if job is None:
                return _api_error(404, "NOT_FOUND", "The requested resource does not exist")
            if not request.headers.get("content-type", "").startswith("text/csv"):
                return _api_error(400, "INVALIDCONTENTTYPE", "Content-Type must be text/csv")
            if job.state != "Open" or job.data is not None:
                return _api_error(400, "INVALIDJOBSTATE", f"Job {job.id} does not accept data in state {job.state}")
            job.data = data
            self.uploads.append(data)
        return Response(status_code=201)

    async def _job(self, request: Request) -> Response:
        method = request.method
        endpoint = {"GET": "get_job", "PATCH": "patch_job", "DELETE": "delete_job"}[method]
        denied = self._gate(endpoint, request)
        if denied:
            return denied
        body = await request.body()
        with self.lock:
            job = self.jobs.get(request.path_params["job_id"])
            if job is None:
                return _api_error(404, "NOT_FOUND", "The requested resource does not exist")
            if method == "GET":
                if job.state in ("UploadComplete", "InProgress"):
                    if job.polls_until_done > 0:
                        job.polls_until_done -= 1
                        job.state = "InProgress"
                    else:
                        job.state = job.final_state
                return JSONResponse(job.info())
            if method == "DELETE":
                if job.state not in ("UploadComplete", "JobComplete", "Aborted", "Failed"):
                    return _api_error(400, "INVALIDJOBSTATE", f"Job {job.id} cannot be deleted in state {job.state}")
                del self.jobs[job.id]
                return Response(status_code=204)
            try:
                state = json.loads(body).get("state")
            except ValueError:
                return _api_error(400, "JSON_PARSER_ERROR", "request body is not JSON")
            if state == "UploadComplete" and job.state == "Open":
                self.counts["close_job"] += 1
                self._process(job)
                return JSONResponse(job.info())
            if state == "Aborted" and job.state in ("Open", "UploadComplete", "InProgress"):
                self.counts["abort_job"] += 1
                if job.state == "Open":
                    job.header, job.unprocessed = self._parse_rows(job)[:2] if job.data else ([], [])
                job.state = job.final_state = "Aborted"
                return JSONResponse(job.info())
            return _api_error(400, "INVALIDJOBSTATE", f"Cannot change state from {job.state} to {state}")

    def _parse_rows(self, job: FakeJob) -> tuple[list[str], list[list[str]], str | None]:
        try:
            text = (job.data or b"").decode("utf-8")
        except UnicodeDecodeError:
            return [], [], "InvalidBatch : the data is not valid UTF-8"
        if job.line_ending == "LF" and "\r\n" in text:
            return [], [], "ClientInputError : LineEnding is invalid on user data. Current LineEnding setting is LF"
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if not rows:
            return [], [], "InvalidBatch : no data"
        return rows[0], rows[1:], None

    def _process(self, job: FakeJob) -> None:
        """UploadComplete: apply the rows now; GETs then show InProgress before the final state."""
        job.state = "UploadComplete"
        header, rows, problem = self._parse_rows(job)
        job.header = header
        if problem is None:
            known = {f.lower(): f for f in self.objects[job.object]}
            for name in header:
                if name.lower() not in known:
                    problem = f"InvalidBatch : Field name not found : {name}"
                    break
        ext_name = job.external_id_field or ""
        if problem is None and ext_name.lower() not in [h.lower() for h in header]:
            problem = f"InvalidBatch : The External ID field {ext_name} must be in the header"
        if problem is not None:
            job.final_state, job.error_message, job.unprocessed = "Failed", problem, rows
            return
        fault = self.job_faults.pop(0) if self.job_faults else None
        limit = fault.after_rows if fault else len(rows)
        names = [known[h.lower()] for h in header]
        ext_idx = [n.lower() for n in names].index(ext_name.lower())
        store = self.store.setdefault(job.object, {})
        seen: set[str] = set()
        for n, row in enumerate(rows):
            if n >= limit:
                job.unprocessed.append(row)
                continue
            if len(row) != len(names):
                job.failed.append(["", f"INVALID_ROW:row has {len(row)} fields, header has {len(names)}:--", *row])
                continue
            ext = row[ext_idx]
            existing = store.get(ext)
            sf_id = existing["Id"] if existing else ""
            if not ext:
                job.failed.append(["", f"MISSING_ARGUMENT:{names[ext_idx]} not specified:--", *row])
                continue
            if ext in seen:
                job.failed.append([sf_id, f"DUPLICATE_EXTERNAL_ID:Duplicate external id specified: {ext}:--", *row])
                continue
            seen.add(ext)
            if ext in self.row_faults:
                code, message = self.row_faults[ext]
                job.failed.append([sf_id, f"{code}:{message}:--", *row])
                continue
            created = existing is None
            record = existing if existing is not None else {"Id": self._new_id("a0B")}
            for name, value in zip(names, row, strict=True):
                if value == "":
                    continue  # empty cell: leave unchanged
                record[name] = None if value == "#N/A" else value
            store[ext] = record
            job.success.append([record["Id"] or "", "true" if created else "false", *row])
        if fault is not None:
            job.final_state, job.error_message = fault.state, fault.message

    async def _results(self, request: Request) -> Response:
        kind = RESULT_KINDS.get(request.path_params["kind"].lower())
        if kind is None:
            return _api_error(404, "NOT_FOUND", "The requested resource does not exist")
        denied = self._gate(kind, request)
        if denied:
            return denied
        with self.lock:
            job = self.jobs.get(request.path_params["job_id"])
            if job is None:
                return _api_error(404, "NOT_FOUND", "The requested resource does not exist")
            if job.state not in ("JobComplete", "Failed", "Aborted"):
                return _api_error(400, "INVALIDJOBSTATE", f"Job {job.id} is {job.state}; results are not ready")
            if kind == "successfulResults":
                data = _csv_bytes(["sf__Id", "sf__Created", *job.header], job.success)
            elif kind == "failedResults":
                data = _csv_bytes(["sf__Id", "sf__Error", *job.header], job.failed)
            else:
                data = _csv_bytes(job.header, job.unprocessed) if job.header else b""
        return Response(data, media_type="text/csv; charset=UTF-8")

    # --- server --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-salesforce", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake Salesforce did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="session")
def fake_salesforce() -> Iterator[FakeSalesforce]:
    """The fake Salesforce server (one per test session; state reset before each test that uses it)."""
    fake = FakeSalesforce()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(autouse=True)
def _reset_fake_salesforce(request: pytest.FixtureRequest) -> None:
    if "fake_salesforce" in request.fixturenames:
        request.getfixturevalue("fake_salesforce").reset()


@pytest.fixture
def fake_salesforce_session(fake_salesforce: FakeSalesforce) -> Iterator[requests.Session]:
    """A requests.Session routed to the fake (give it to simple-salesforce / tasks.salesforce.connect)."""
    session = fake_salesforce.requests_session()
    try:
        yield session
    finally:
        session.close()
