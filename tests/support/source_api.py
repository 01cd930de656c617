"""The demo events API (tasks.demo_source) as a real uvicorn server on 127.0.0.1.

* ``source_api_server`` (session): the running server: ``base_url``, ``config`` (:class:`DemoConfig`),
  ``faults`` (:class:`Faults`), ``stats`` (:class:`Stats`).
* ``source_api`` (function): the same server with config, faults and counters reset to the defaults below.
  Request this one in tests (it is what makes fault flips not leak between tests).
* ``make_source_api`` (function): ``make_source_api("cursor", page_size=50, ...) -> blocks.SourceApi`` pointed at
  ``/{style}/events`` of the server, with fast retry settings (override any field by keyword).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import date

import pytest

from tasks.demo_source import DemoConfig, Faults, Stats, create_app, serve

DEFAULT_TOTAL = 1_000
WEEK = date(2024, 1, 1)  # a Monday


@dataclass
class SourceApiServer:
    base_url: str
    config: DemoConfig

    @property
    def faults(self) -> Faults:
        return self.config.faults

    @property
    def stats(self) -> Stats:
        return self.config.stats

    def url(self, style: str | None = None) -> str:
        return f"{self.base_url}/{style}/events" if style else f"{self.base_url}/events"

    def reset(self) -> None:
        # let requests still running from the previous test (e.g. a slow page the client gave up on) finish first,
        # so they neither consume the next test's faults nor count in its stats
        deadline = time.monotonic() + 10
        while self.config.stats.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        # every setting back to its default, a field added later included (latency_seconds once leaked 0.3 s
        # into every request of the tests after the one that set it)
        fresh = DemoConfig(total=DEFAULT_TOTAL)
        for f in fields(DemoConfig):
            if not f.name.startswith("_") and f.name not in ("faults", "stats"):
                setattr(self.config, f.name, getattr(fresh, f.name))
        self.config.faults.reset()
        self.config.stats.reset()


@pytest.fixture(scope="session")
def source_api_server() -> Iterator[SourceApiServer]:
    config = DemoConfig(total=DEFAULT_TOTAL)
    with serve(create_app(config)) as base_url:
        yield SourceApiServer(base_url=base_url, config=config)


@pytest.fixture
def source_api(source_api_server: SourceApiServer) -> Iterator[SourceApiServer]:
    source_api_server.reset()
    yield source_api_server
    source_api_server.reset()


@pytest.fixture
def make_source_api(source_api: SourceApiServer) -> Callable[..., object]:
    from blocks import SourceApi

    def build(pagination: str = "page_number", **overrides: object) -> SourceApi:
        fields: dict[str, object] = {
            "base_url": source_api.base_url,
            "endpoint": f"/{pagination}/events",
            "pagination": pagination,
            "page_size": 100,
            "timeout_seconds": 5.0,
            "max_attempts": 4,
            "backoff_base_seconds": 0.01,
            "backoff_max_seconds": 0.05,
            "pages_per_file": 5,
        }
        fields.update(overrides)
        return SourceApi(**fields)

    return build
