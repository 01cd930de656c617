"""Failure notification for the weekly flow: a Slack message to the webhook of a saved SlackWebhook block.

The block (Prefect's own ``SlackWebhook``, named ``weekly-alerts``) is the configuration; the message is
posted as Slack's incoming-webhook JSON by :func:`tasks.alerts.send_slack`, so any compatible receiver works.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.alerts import scrub, send_slack
from tasks.errors import PipelineError

ALERT_BLOCK = "weekly-alerts"
log = logging.getLogger(__name__)


def failure_message(flow_name: str, flow_run_name: str, week: str, stage: str, error: str) -> tuple[str, str]:
    """(subject, body) naming the flow, run, week, failed stage and error."""
    subject = f"{flow_name} failed"
    body = f"flow run: {flow_run_name}\nweek: {week}\nstage: {stage}\nerror: {error}"
    return subject, body


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure hook. Never raises: an alert must not mask the flow's own failure."""
    from prefect.blocks.notifications import SlackWebhook

    from flows.weekly import FAILURES

    failure = FAILURES.pop(str(flow_run.id), None) or FAILURES.pop("local", None) or {}
    params = getattr(flow_run, "parameters", {}) or {}
    week = failure.get("week") or str(params.get("week") or "from checkpoint")
    stage = failure.get("stage", "setup")
    error = failure.get("error") or (state.message if state is not None and state.message else "unknown")
    try:
        block = SlackWebhook.load(ALERT_BLOCK)
    except ValueError:
        log.info("no %r SlackWebhook block saved; failure alert not sent", ALERT_BLOCK)
        return
    url = block.url.get_secret_value()
    subject, body = failure_message(flow.name, flow_run.name, week, stage, error)
    try:
        send_slack(url, subject, scrub(body, [url]))
    except PipelineError as exc:
        log.error("failure alert could not be sent: %s", exc)
