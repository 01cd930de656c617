"""Alerts against real local servers: aiosmtpd on 127.0.0.1 and an HTTP webhook receiver; injectable clock."""

from __future__ import annotations

import json
import socket
import threading
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, text

from tasks.alerts import (
    Alerter,
    MemoryThrottleStore,
    SqlThrottleStore,
    email_sink,
    scrub,
    send_email,
    send_slack,
    slack_sink,
)
from tasks.errors import AlertDeliveryError

SECRET = "s3cr3t-Pa55word"


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def webhook():
    received: list[dict] = []
    state = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "json": json.loads(body)})
            self.send_response(state["status"])
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/services/T000/B000/{SECRET}"
    yield url, received, state
    server.shutdown()
    server.server_close()


class _Inbox:
    def __init__(self) -> None:
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"


@pytest.fixture
def smtp():
    inbox = _Inbox()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield "127.0.0.1", port, inbox
    controller.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slack_and_email_deliver_to_real_local_servers(webhook, smtp):
    url, received, _ = webhook
    host, port, inbox = smtp
    send_slack(url, "Warehouse failed", "run 42: boom")
    assert received[0]["json"] == {"text": "*Warehouse failed*\nrun 42: boom"}
    send_email(host=host, port=port, sender="etl@x.io", recipients=["a@x.io", "b@x.io"], subject="S", body="B")
    rcpts, msg = inbox.messages[0]
    assert rcpts == ["a@x.io", "b@x.io"] and msg["Subject"] == "S" and msg.get_payload().strip() == "B"


def test_delivery_errors_never_show_the_webhook_path(webhook):
    url, _, state = webhook
    state["status"] = 500
    with pytest.raises(AlertDeliveryError, match="answered HTTP 500") as info:
        send_slack(url, "s", "b")
    assert SECRET not in str(info.value) and "/services" not in str(info.value)
    with pytest.raises(AlertDeliveryError, match="unreachable") as info:
        send_slack(f"http://127.0.0.1:{_free_port()}/hook/{SECRET}", "s", "b")
    assert SECRET not in str(info.value)
    with pytest.raises(AlertDeliveryError, match=r"smtp 127\.0\.0\.1:\d+ failed"):
        send_email(host="127.0.0.1", port=_free_port(), sender="a@x.io", recipients=["b@x.io"], subject="s", body="b")


def test_one_alert_per_key_per_window_with_an_injected_clock(webhook, smtp):
    url, received, _ = webhook
    host, port, inbox = smtp
    clock = Clock()
    store = MemoryThrottleStore()
    alerter = Alerter(
        [slack_sink(url), email_sink(host=host, port=port, sender="etl@x.io", recipients=["ops@x.io"])],
        window_seconds=600,
        store=store,
        clock=clock,
    )
    assert alerter.alert("warehouse:failed", "failed", "one").decision == "sent"
    clock.t += 599
    assert alerter.alert("warehouse:failed", "failed", "two").decision == "suppressed"
    assert alerter.alert("warehouse:warn:fct_sales", "warn", "other key").decision == "sent"
    clock.t += 1
    d = alerter.alert("warehouse:failed", "failed", "three")
    assert d.decision == "sent" and d.delivered == ["slack", "email"]
    assert [r["json"]["text"].split("\n")[1] for r in received] == ["one", "other key", "three"]
    assert len(inbox.messages) == 3
    assert [entry[2] for entry in store.log] == ["sent", "suppressed", "sent", "sent"]
    assert "window 600s" in store.log[1][3]


def test_failed_delivery_is_not_counted_as_sent(webhook):
    url, received, state = webhook
    clock = Clock()
    alerter = Alerter([slack_sink(url)], window_seconds=600, clock=clock)
    state["status"] = 503
    assert alerter.alert("k", "s", "b").decision == "failed"
    state["status"] = 200
    clock.t += 5
    assert alerter.alert("k", "s", "b").decision == "sent"  # retried, not throttled
    assert len(received) == 2


def test_no_secret_in_any_alert_text(webhook, smtp):
    url, received, _ = webhook
    host, port, inbox = smtp
    alerter = Alerter(
        [slack_sink(url), email_sink(host=host, port=port, sender="etl@x.io", recipients=["ops@x.io"])],
        secrets=[SECRET, "tok-abcdef"],
    )
    body = (
        f"connect failed: postgresql+psycopg://etl:{SECRET}@db:5432/wh; header token=tok-abcdef; "
        "https://api.x.io/v1?api_key=k123&page=2 password=hunter22"
    )
    alerter.alert("k", f"fail {SECRET}", body)
    texts = [received[0]["json"]["text"], inbox.messages[0][1].get_payload(), inbox.messages[0][1]["Subject"]]
    for t in texts:
        for leaked in (SECRET, "tok-abcdef", "k123", "hunter22", "etl:"):
            assert leaked not in t, (leaked, t)
    assert "db:5432/wh" in texts[0] and "page=2" in texts[0]
    assert scrub("nothing secret here") == "nothing secret here"


def test_sql_store_throttles_across_alerter_instances(pg_url, webhook):
    url, received, _ = webhook
    engine = create_engine(pg_url)
    clock = Clock()
    first = Alerter([slack_sink(url)], window_seconds=3600, store=SqlThrottleStore(engine), clock=clock)
    assert first.alert("warehouse:failed", "s", "b").decision == "sent"
    clock.t += 60
    second = Alerter([slack_sink(url)], window_seconds=3600, store=SqlThrottleStore(engine), clock=clock)
    assert second.alert("warehouse:failed", "s", "b").decision == "suppressed"
    with engine.connect() as conn:
        rows = conn.execute(text("select decision from meta.alert_log order by id")).scalars().all()
    engine.dispose()
    assert rows == ["sent", "suppressed"] and len(received) == 1
