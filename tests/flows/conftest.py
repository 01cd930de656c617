"""Fixtures for running the weekly flow against the session's Prefect harness and real local services."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import pytest
import sqlalchemy as sa

import blocks
from tasks import checkpoint
from tasks.lake import LakeFS
from tests.support.prefect_harness import delete_blocks

WEEK = date(2024, 1, 1)  # a Monday well in the past


@dataclass
class WeeklyEnv:
    """Saves the weekly flow's blocks under their real names and removes them afterwards."""

    tmp_path: Any
    saved: list[tuple[type, str]] = field(default_factory=list)

    def save(self, block: Any, name: str) -> Any:
        block.save(name, overwrite=True)
        self.saved.append((type(block), name))
        return block

    @property
    def lake(self) -> LakeFS:
        return LakeFS((self.tmp_path / "lake").as_uri())

    def lake_block(self) -> blocks.Lake:
        return self.save(blocks.Lake(base_url=(self.tmp_path / "lake").as_uri()), blocks.LAKE_BLOCK)

    def settings(self, **values: Any) -> blocks.PipelineSettings:
        values.setdefault("salesforce_poll_seconds", 0)
        return self.save(blocks.PipelineSettings(**values), blocks.SETTINGS_BLOCK)

    def database(self, url: str) -> sa.Engine:
        from prefect_sqlalchemy import SqlAlchemyConnector

        self.save(SqlAlchemyConnector(connection_info=url), blocks.DATABASE_BLOCK)
        return sa.create_engine(url)

    def cleanup(self) -> None:
        from prefect.variables import Variable

        delete_blocks(self.saved)
        Variable.unset("weekly-checkpoint")


@pytest.fixture
def weekly_env(prefect_harness, tmp_path, monkeypatch) -> Iterator[WeeklyEnv]:
    monkeypatch.chdir(tmp_path)  # embedded defaults (./lake, ./.data) land in the test's folder
    env = WeeklyEnv(tmp_path=tmp_path)
    try:
        yield env
    finally:
        env.cleanup()


@pytest.fixture
def routed_salesforce(fake_salesforce, monkeypatch):
    """Route the flow's Salesforce HTTP to the fake (simple-salesforce itself is not touched)."""
    from tasks import salesforce as salesforce_mod

    monkeypatch.setattr(salesforce_mod, "_default_session", fake_salesforce.requests_session)
    return fake_salesforce


def checkpoint_variable() -> dict | None:
    from prefect.variables import Variable

    value = Variable.get("weekly-checkpoint", default=None)
    return json.loads(value) if isinstance(value, str) else value


def db_checkpoint(engine: sa.Engine, pipeline: str = "weekly-customer-metrics") -> date | None:
    return checkpoint.get_checkpoint(engine, pipeline)
