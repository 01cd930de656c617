"""Failure notification: a Slack message through Prefect's SlackWebhook block, when one is saved."""

from __future__ import annotations

import logging
from typing import Any

from tasks.errors import redact_text

ALERT_BLOCK = "weekly-alerts"
log = logging.getLogger(__name__)


def failure_message(flow_name: str, flow_run_name: str, week: str, stage: str, error: str) -> str:
    return (
        f":rotating_light: Flow *{flow_name}* run `{flow_run_name}` failed\n"
        f"week: {week}\nstage: {stage}\nerror: {redact_text(error)}"
    )


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure hook: names the flow, week, failed stage and error type; never a secret or a URL."""
    from prefect.blocks.notifications import SlackWebhook

    from flows.weekly import FAILURES

    failure = FAILURES.pop(str(flow_run.id), None) or FAILURES.pop("local", None) or {}
    params = getattr(flow_run, "parameters", {}) or {}
    week = failure.get("week") or str(params.get("week") or "from checkpoint")
    stage = failure.get("stage", "setup")
    error = failure.get("error") or (state.type.value if state is not None else "unknown")
    try:
        block = SlackWebhook.load(ALERT_BLOCK)
    except ValueError:
        log.info("no %r SlackWebhook block saved; failure alert not sent", ALERT_BLOCK)
        return
    message = failure_message(flow.name, flow_run.name, week, stage, error)
    try:
        with block.raise_on_failure():
            block.notify(message, subject=f"{flow.name} failed")
    except Exception as exc:  # noqa: BLE001 - an alert must never mask the flow's own failure
        log.error("failure alert could not be sent: %s", type(exc).__name__)
