"""One ephemeral Prefect API for the whole session (starting one costs 8-12 s)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


def delete_blocks(saved: list[tuple[type, str]]) -> None:
    """Delete the blocks a test saved, newest first; best effort (one already gone does not stop the rest)."""
    for cls, name in reversed(saved):
        try:
            cls.delete(name)
        except Exception:  # noqa: BLE001 - best effort
            pass
