"""One-time, idempotent setup of a Prefect server or Cloud workspace for this library.

``python -m flows.setup`` (safe to run any number of times) against the API of ``PREFECT_API_URL``:

* creates the ``process`` work pool the deployments in prefect.yaml use (an existing pool is left as is);
* registers this library's block types (the equivalent of ``prefect block register -m blocks``);
* creates the global concurrency limit that serialises checkpoint writes (limit 1);
* creates the Prefect Variables that are missing, with their defaults (existing values are never touched);
* optionally saves the ``weekly-lake`` Lake block (``--lake-url``) and seeds the checkpoint (``--first-week``).

Then ``prefect deploy --all`` and ``prefect worker start --pool weekly-etl-process``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import sys
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

WORK_POOL = "weekly-etl-process"
WORK_POOL_TYPE = "process"
# Global concurrency limit taken around the checkpoint write (flows/weekly.py: CHECKPOINT_LOCK).
CHECKPOINT_LOCK = "weekly-etl-checkpoint"
CHECKPOINT_VARIABLE = "weekly-checkpoint"
BLOCKS_MODULE = "blocks"
# Variables the flows read, with the value created when missing. The checkpoint is not here on purpose: with no
# checkpoint the weekly flow starts at PipelineSettings.first_week or the last complete week; a default written
# at setup time would freeze that choice. Seed it explicitly with --first-week.
VARIABLE_DEFAULTS: dict[str, Any] = {}

logger = logging.getLogger(__name__)


@dataclass
class SetupReport:
    """What one setup run created (``created_*``) and what was already there (``existing``)."""

    created_work_pool: bool = False
    registered_blocks: list[str] = field(default_factory=list)
    created_concurrency_limit: bool = False
    created_variables: list[str] = field(default_factory=list)
    saved_blocks: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"work pool {WORK_POOL!r}: {'created' if self.created_work_pool else 'already exists'}",
            f"block types registered: {', '.join(self.registered_blocks) or 'none'}",
            f"concurrency limit {CHECKPOINT_LOCK!r}: "
            f"{'created' if self.created_concurrency_limit else 'already exists'}",
            f"variables created: {', '.join(self.created_variables) or 'none'}",
        ]
        if self.saved_blocks:
            out.append(f"blocks saved: {', '.join(self.saved_blocks)}")
        return out


async def ensure_work_pool(client: Any, name: str = WORK_POOL, pool_type: str = WORK_POOL_TYPE) -> bool:
    """Create the work pool when missing (default base job template of its worker type). True when created.

    An existing pool is left untouched so edits made in the UI survive a re-run. The template comes from the
    installed worker class, not from Prefect's online collection registry (no network beyond the API).
    """
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        await client.read_work_pool(name)
        return False
    except ObjectNotFound:
        pass
    template = _default_base_job_template(pool_type)
    try:
        await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
    except ObjectAlreadyExists:  # created concurrently by another setup run
        return False
    return True


def _default_base_job_template(pool_type: str) -> dict[str, Any]:
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    if pool_type == "azure-container-instance":
        from prefect_azure.workers.container_instance import AzureContainerWorker

        return AzureContainerWorker.get_default_base_job_template()
    if pool_type == "docker":
        from prefect_docker.worker import DockerWorker

        return DockerWorker.get_default_base_job_template()
    from tasks.errors import ConfigurationError

    raise ConfigurationError("pool_type", f"{pool_type!r} is not one of process, docker, azure-container-instance")


async def register_blocks(client: Any, module_name: str = BLOCKS_MODULE) -> list[str]:
    """Register every block class the module exposes (what ``prefect block register -m`` does). Idempotent."""
    from prefect.blocks.core import Block, InvalidBlockRegistration

    module = importlib.import_module(module_name)
    registered: list[str] = []
    for _, cls in inspect.getmembers(module):
        if cls is None or not Block.is_block_class(cls):
            continue
        try:
            await cls.aregister_type_and_schema(client=client)
        except InvalidBlockRegistration:  # abstract or protected base classes
            continue
        registered.append(cls.get_block_type_slug())
    return sorted(registered)


async def ensure_concurrency_limit(client: Any, name: str = CHECKPOINT_LOCK, limit: int = 1) -> bool:
    """Create the global concurrency limit when missing. True when created; an existing limit is kept."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        await client.read_global_concurrency_limit_by_name(name)
        return False
    except ObjectNotFound:
        pass
    try:
        await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
    except ObjectAlreadyExists:
        return False
    return True


async def ensure_variables(client: Any, defaults: dict[str, Any]) -> list[str]:
    """Create each missing Variable with its default. Never overwrites a value that is already set."""
    from prefect.client.schemas.actions import VariableCreate
    from prefect.exceptions import ObjectAlreadyExists

    created: list[str] = []
    for name, value in defaults.items():
        if await client.read_variable_by_name(name) is not None:
            continue
        try:
            await client.create_variable(VariableCreate(name=name, value=value, tags=["weekly-etl"]))
        except ObjectAlreadyExists:
            continue
        created.append(name)
    return created


def checkpoint_seed(first_week: date, now: datetime | None = None) -> dict[str, Any]:
    """The ``weekly-checkpoint`` document that makes the next run start at ``first_week`` (a Monday)."""
    if first_week.weekday() != 0:
        from tasks.errors import ConfigurationError

        raise ConfigurationError("first_week", f"{first_week.isoformat()} is a {first_week:%A}, not a Monday")
    from tasks.checkpoint import checkpoint_document

    return checkpoint_document(first_week, None, now or datetime.now(UTC))


async def save_lake_block(base_url: str, name: str | None = None) -> str:
    """Save (overwrite) the Lake block the weekly flow loads. Returns its name."""
    from blocks import LAKE_BLOCK, Lake

    block_name = name or LAKE_BLOCK
    await Lake(base_url=base_url).asave(block_name, overwrite=True)
    return block_name


async def setup(
    *,
    pool: str = WORK_POOL,
    lake_url: str | None = None,
    first_week: date | None = None,
    variables: dict[str, Any] | None = None,
) -> SetupReport:
    """Everything above against the configured API. Safe to run twice: the second run creates nothing."""
    from prefect.client.orchestration import get_client

    report = SetupReport()
    defaults = dict(VARIABLE_DEFAULTS if variables is None else variables)
    if first_week is not None:
        defaults[CHECKPOINT_VARIABLE] = checkpoint_seed(first_week)
    async with get_client() as client:
        report.created_work_pool = await ensure_work_pool(client, pool)
        report.registered_blocks = await register_blocks(client)
        report.created_concurrency_limit = await ensure_concurrency_limit(client)
        report.created_variables = await ensure_variables(client, defaults)
        report.existing = [name for name in defaults if name not in report.created_variables]
    if lake_url is not None:
        report.saved_blocks.append(await save_lake_block(lake_url))
    return report


def _monday(text: str) -> date:
    try:
        value = date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--first-week: {text!r} is not a YYYY-MM-DD date") from exc
    if value.weekday() != 0:
        raise argparse.ArgumentTypeError(f"--first-week: {text} is a {value:%A}, not a Monday")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.setup",
        description="Create the work pool, block types, concurrency limit and Variables (idempotent).",
    )
    parser.add_argument("--pool", default=WORK_POOL, help=f"process work pool name (default {WORK_POOL})")
    parser.add_argument(
        "--lake-url",
        help="save the 'weekly-lake' Lake block with this base URL (file:///abs/path or abfs://container/prefix)",
    )
    parser.add_argument(
        "--first-week",
        type=_monday,
        help="seed the 'weekly-checkpoint' Variable (only when it does not exist yet) to start at this Monday",
    )
    args = parser.parse_args(argv)
    from tasks.errors import PipelineError

    try:
        report = asyncio.run(setup(pool=args.pool, lake_url=args.lake_url, first_week=args.first_week))
    except PipelineError as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
