"""Throttled alerts to a Slack-compatible webhook and to e-mail over SMTP.

* :func:`send_slack` / :func:`send_email` are plain functions over httpx / smtplib; they raise
  :class:`~tasks.errors.AlertDeliveryError` with a message that never contains the webhook URL (its path is the
  secret) or SMTP credentials.
* :class:`Alerter` sends one alert per key per window (``window_seconds``) to every sink. Every decision
  (sent / suppressed / failed) is logged and recorded in a :class:`ThrottleStore`: in memory, or in
  ``meta.alert_log`` (:class:`SqlThrottleStore`) so throttling holds across flow runs. The clock is injectable.
  A delivery failure is recorded but not counted as "sent": the next alert for the key is tried again.
* :func:`scrub` removes known secret values and credentials in URLs from alert text before it leaves.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Protocol
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine, text

from tasks.errors import AlertDeliveryError, redact_url

Logger = logging.Logger | logging.LoggerAdapter
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()]+")
_KV_SECRET = re.compile(r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key)\s*[=:]\s*[^\s,;&'\"]+")


def scrub(message: str, secrets: Iterable[str] = ()) -> str:
    """``message`` without the given secret values, URL credentials/sensitive query values or ``password=..``."""
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        message = message.replace(secret, "***")
    message = _URL.sub(lambda m: redact_url(m.group(0)), message)
    return _KV_SECRET.sub(lambda m: f"{m.group(1)}=***", message)


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def send_slack(
    webhook_url: str,
    subject: str,
    body: str,
    *,
    timeout: float = 10.0,
    client: httpx.Client | None = None,
) -> None:
    """POST ``{"text": ...}`` to a Slack incoming webhook (or any compatible receiver)."""
    payload = {"text": f"*{subject}*\n{body}"}
    try:
        if client is not None:
            response = client.post(webhook_url, json=payload, timeout=timeout)
        else:
            with httpx.Client(timeout=timeout) as own:
                response = own.post(webhook_url, json=payload)
    except httpx.HTTPError as exc:
        raise AlertDeliveryError(f"slack webhook at {_host(webhook_url)} unreachable: {type(exc).__name__}") from None
    if response.status_code >= 300:
        raise AlertDeliveryError(f"slack webhook at {_host(webhook_url)} answered HTTP {response.status_code}")


def send_email(
    *,
    host: str,
    port: int,
    sender: str,
    recipients: list[str],
    subject: str,
    body: str,
    username: str | None = None,
    password: str | None = None,
    security: str = "none",
    timeout: float = 10.0,
) -> None:
    """Send a plain-text e-mail. ``security``: ``none``, ``starttls`` or ``ssl``."""
    if not recipients:
        raise AlertDeliveryError("smtp: no recipients configured")
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    msg.set_content(body)
    try:
        if security == "ssl":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=timeout, context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(host, port, timeout=timeout)
        with smtp:
            if security == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if username:
                smtp.login(username, password or "")
            smtp.send_message(msg)
    except smtplib.SMTPResponseException as exc:
        raise AlertDeliveryError(f"smtp {host}:{port} answered {exc.smtp_code}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise AlertDeliveryError(f"smtp {host}:{port} failed: {type(exc).__name__}") from None


@dataclass(frozen=True)
class Sink:
    """A named alert destination: ``send(subject, body)`` raises AlertDeliveryError on failure."""

    name: str
    send: Callable[[str, str], None]


def slack_sink(webhook_url: str, **kwargs) -> Sink:
    return Sink("slack", lambda subject, body: send_slack(webhook_url, subject, body, **kwargs))


def email_sink(**kwargs) -> Sink:
    return Sink("email", lambda subject, body: send_email(subject=subject, body=body, **kwargs))


# --- throttling -----------------------------------------------------------------------------------------


class ThrottleStore(Protocol):
    def last_sent(self, key: str) -> float | None: ...

    def record(self, key: str, at: float, decision: str, reason: str) -> None: ...


class MemoryThrottleStore:
    """Throttle state for one process (tests, ad-hoc runs)."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.log: list[tuple[str, float, str, str]] = []

    def last_sent(self, key: str) -> float | None:
        return self.sent.get(key)

    def record(self, key: str, at: float, decision: str, reason: str) -> None:
        self.log.append((key, at, decision, reason))
        if decision == "sent":
            self.sent[key] = at


class SqlThrottleStore:
    """Throttle state and decision log in ``meta.alert_log`` (survives across flow runs and processes)."""

    DDL = (
        "create table if not exists meta.alert_log (id bigserial primary key, alert_key text not null, "
        "decided_at timestamptz not null, decision text not null, reason text not null)"
    )

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with engine.begin() as conn:
            conn.execute(text("create schema if not exists meta"))
            conn.execute(text(self.DDL))
            conn.execute(text("create index if not exists alert_log_key_idx on meta.alert_log (alert_key, decided_at)"))

    def last_sent(self, key: str) -> float | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                text("select max(decided_at) from meta.alert_log where alert_key = :k and decision = 'sent'"),
                {"k": key},
            ).scalar_one()
        return value.timestamp() if value else None

    def record(self, key: str, at: float, decision: str, reason: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                text("insert into meta.alert_log (alert_key, decided_at, decision, reason) values (:k, :t, :d, :r)"),
                {"k": key, "t": datetime.fromtimestamp(at, UTC), "d": decision, "r": reason},
            )


@dataclass
class AlertDecision:
    key: str
    decision: str  # sent | suppressed | failed
    reason: str
    delivered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Alerter:
    """One alert per key per window, fanned out to every sink; never raises for a delivery failure."""

    def __init__(
        self,
        sinks: list[Sink],
        *,
        window_seconds: float = 3600.0,
        store: ThrottleStore | None = None,
        clock: Callable[[], float] = time.time,
        secrets: Iterable[str] = (),
        logger: Logger | None = None,
    ) -> None:
        self.sinks = sinks
        self.window = window_seconds
        self.store = store or MemoryThrottleStore()
        self.clock = clock
        self.secrets = [s for s in secrets if s]
        self.log = logger or logging.getLogger(__name__)

    def alert(self, key: str, subject: str, body: str) -> AlertDecision:
        now = self.clock()
        last = self.store.last_sent(key)
        if last is not None and now - last < self.window:
            reason = f"last sent {now - last:.0f}s ago, window {self.window:.0f}s"
            self.store.record(key, now, "suppressed", reason)
            self.log.info("alert %s suppressed (%s)", key, reason)
            return AlertDecision(key, "suppressed", reason)
        if not self.sinks:
            self.store.record(key, now, "failed", "no sinks configured")
            self.log.warning("alert %s not sent: no sinks configured", key)
            return AlertDecision(key, "failed", "no sinks configured")
        subject, body = scrub(subject, self.secrets), scrub(body, self.secrets)
        decision = AlertDecision(key, "sent", "")
        for sink in self.sinks:
            try:
                sink.send(subject, body)
                decision.delivered.append(sink.name)
            except AlertDeliveryError as exc:
                decision.failed.append(sink.name)
                self.log.warning("alert %s: %s delivery failed: %s", key, sink.name, scrub(str(exc), self.secrets))
        if not decision.delivered:
            decision.decision = "failed"
        decision.reason = f"delivered to {decision.delivered or 'none'}" + (
            f", failed {decision.failed}" if decision.failed else ""
        )
        self.store.record(key, now, decision.decision, decision.reason)
        self.log.info("alert %s %s (%s)", key, decision.decision, decision.reason)
        return decision
