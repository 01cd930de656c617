"""Resolve what a flow run connects to: saved blocks, or the embedded defaults.

Blocks are the only configuration surface. When a block is not saved the weekly flow falls back to an
embedded default: the bundled demo API (served on 127.0.0.1 by this process), a local lake folder, the
Salesforce dry run, a SQLite tracking file beside the lake and default settings.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prefect.blocks.core import Block

from blocks import (
    DATABASE_BLOCK,
    LAKE_BLOCK,
    SALESFORCE_BLOCK,
    SETTINGS_BLOCK,
    SOURCE_BLOCK,
    Lake,
    PipelineSettings,
    SalesforceCredentials,
    SourceApi,
    SqlAlchemyConnector,
)
from tasks.errors import ConfigurationError
from tasks.lake import LakeFS
from tasks.sql import engine_label, make_engine

DEFAULT_LAKE_DIR = "lake"
DEFAULT_DB_FILE = ".data/weekly.db"


def load_block(cls: type[Block], name: str) -> Block | None:
    """The saved block ``name`` of type ``cls``, or None when none is saved. Invalid blocks raise."""
    try:
        return cls.load(name)
    except ValueError as exc:
        if "Unable to find block document" in str(exc) or "not found" in str(exc).lower():
            return None
        raise ConfigurationError(name, f"saved block could not be loaded: {type(exc).__name__}") from exc


@dataclass
class WeeklyRuntime:
    source: SourceApi
    lake_block: Lake
    settings: PipelineSettings
    salesforce: SalesforceCredentials | None
    engine: sa.Engine
    embedded: list[str] = field(default_factory=list)

    @property
    def lake(self) -> LakeFS:
        return LakeFS(self.lake_block.base_url, self.lake_block.storage_options())

    def describe(self) -> dict[str, Any]:
        """Non-secret description for logs and the summary."""
        return {
            "source": self.source.url,
            "lake": self.lake_block.base_url,
            "salesforce": "dry-run" if self.salesforce is None else self.salesforce.auth_mode,
            "database": engine_label(self.engine),
            "embedded_defaults": self.embedded,
        }


def _engine_from_connector(connector: SqlAlchemyConnector) -> sa.Engine:
    return connector.get_engine(pool_pre_ping=True)


@contextlib.contextmanager
def weekly_runtime(logger: logging.Logger | logging.LoggerAdapter | None = None) -> Iterator[WeeklyRuntime]:
    """Load the weekly flow's blocks; start the demo API when no source block is saved."""
    log = logger or logging.getLogger(__name__)
    embedded: list[str] = []
    settings = load_block(PipelineSettings, SETTINGS_BLOCK)
    if settings is None:
        settings = PipelineSettings()
        embedded.append("settings")
    lake_block = load_block(Lake, LAKE_BLOCK)
    if lake_block is None:
        lake_block = Lake(base_url=DEFAULT_LAKE_DIR)
        embedded.append("lake")
    salesforce = load_block(SalesforceCredentials, SALESFORCE_BLOCK)
    connector = load_block(SqlAlchemyConnector, DATABASE_BLOCK)
    if connector is not None:
        engine = _engine_from_connector(connector)
    else:
        db_path = Path(DEFAULT_DB_FILE).resolve()
        db_path.parent.mkdir(parents=True, exist_ok=True)
        engine = make_engine(f"sqlite:///{db_path}")
        embedded.append("database")
    source = load_block(SourceApi, SOURCE_BLOCK)
    with contextlib.ExitStack() as stack:
        if source is None:
            from tasks.demo_source import create_app, serve

            base_url = stack.enter_context(serve(create_app()))
            source = SourceApi(base_url=base_url)
            embedded.append("source")
            log.info("No %r block saved: serving the bundled demo events API at %s", SOURCE_BLOCK, base_url)
        try:
            yield WeeklyRuntime(
                source=source,
                lake_block=lake_block,
                settings=settings,
                salesforce=salesforce,
                engine=engine,
                embedded=embedded,
            )
        finally:
            engine.dispose()
