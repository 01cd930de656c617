"""prefect.yaml without a server: it parses, every deployment is complete, crons are valid and fire when we say,
entrypoints import to flows whose signatures take the default parameters, and job variables exist on the worker type.

The commented Docker and ACI variants are checked too: uncommented, they must be valid deployments.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from croniter import croniter
from prefect.client.schemas.schedules import CronSchedule

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "prefect.yaml"
REQUIRED = ("name", "description", "entrypoint", "tags", "parameters", "work_pool", "schedules", "concurrency_limit")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


@pytest.fixture(scope="module")
def deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in config["deployments"]}


def _variant_blocks(text: str) -> list[str]:
    """The commented deployment variants: blocks starting `  # - name:` followed by `  #   ` code lines."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("  # - name:"):
            current = [line.replace("  # ", "  ", 1)]
            blocks.append(current)
        elif current is not None and line.startswith("  #   "):
            current.append(line.replace("  # ", "  ", 1))
        else:
            current = None
    return ["\n".join(b) for b in blocks]


def _variants(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    text = PREFECT_YAML.read_text()
    head = text.split("\ndeployments:", 1)[0]  # keeps the anchors in `definitions`
    parsed = {}
    for block in _variant_blocks(text):
        doc = yaml.safe_load(f"{head}\ndeployments:\n{block}\n")
        [dep] = doc["deployments"]
        parsed[dep["name"]] = dep
    return parsed


def _job_variable_names(pool_type: str) -> set[str]:
    from flows.setup import _default_base_job_template

    return set(_default_base_job_template(pool_type)["variables"]["properties"])


def test_top_level(config: dict[str, Any]) -> None:
    assert config["name"]
    assert config["prefect-version"] == __import__("prefect").__version__
    [pull] = config["pull"]
    assert "directory" in pull["prefect.deployments.steps.set_working_directory"]
    # The pull directory is the output of the build step that records the code directory.
    [build] = config["build"]
    step = build["prefect.deployments.steps.run_shell_script"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == f"{{{{ {step['id']}.stdout }}}}"


def test_deployment_names_are_unique(config: dict[str, Any]) -> None:
    names = [d["name"] for d in config["deployments"]]
    assert len(names) == len(set(names)), names


def test_weekly_deployment(deployments: dict[str, dict[str, Any]]) -> None:
    weekly = deployments["weekly-reverse-etl"]
    assert weekly["entrypoint"] == "flows/weekly.py:weekly_reverse_etl"
    assert weekly["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert weekly["work_pool"]["name"] == "weekly-etl-process"
    assert weekly["parameters"] == {"week": None, "full_refresh": False, "dry_run": None}
    [schedule] = weekly["schedules"]
    assert schedule["cron"] == "0 6 * * 1"
    assert schedule.get("timezone"), "the timezone must be explicit"
    # Every firing is Monday 06:00 in that zone, across a DST change.
    tz = ZoneInfo(schedule["timezone"])
    it = croniter(schedule["cron"], datetime(2024, 3, 1, tzinfo=tz))
    for _ in range(10):
        fire = it.get_next(datetime)
        assert (fire.weekday(), fire.hour, fire.minute) == (0, 6, 0), fire


@pytest.mark.parametrize("source", ["deployments", "variants"])
def test_every_deployment_is_complete_and_valid(
    config: dict[str, Any], deployments: dict[str, dict[str, Any]], source: str
) -> None:
    items = deployments if source == "deployments" else _variants(config)
    if source == "variants":
        assert {"weekly-reverse-etl-docker", "weekly-reverse-etl-aci"} <= set(items), sorted(items)
    for name, dep in items.items():
        missing = [key for key in REQUIRED if key not in dep]
        if source == "variants":
            missing = [key for key in missing if key != "description"]  # variants inherit the flow's docstring
        assert not missing, f"{name}: missing {missing}"
        assert re.fullmatch(r"[\w./-]+\.py:\w+", dep["entrypoint"]), dep["entrypoint"]
        assert dep["concurrency_limit"]["limit"] == 1 and dep["concurrency_limit"]["collision_strategy"] == "ENQUEUE"
        for schedule in dep["schedules"]:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron or zone
        assert dep["tags"] and all(isinstance(t, str) for t in dep["tags"])


def test_job_variables_exist_on_the_worker_type(config: dict[str, Any], deployments: dict[str, dict[str, Any]]) -> None:
    pool_types = {
        "weekly-etl-process": "process",
        "weekly-etl-docker": "docker",
        "weekly-etl-aci": "azure-container-instance",
    }
    everything = {**deployments, **_variants(config)}
    seen = set()
    for name, dep in everything.items():
        pool = dep["work_pool"]
        names = _job_variable_names(pool_types[pool["name"]])
        unknown = set(pool.get("job_variables", {})) - names
        assert not unknown, f"{name}: job variables {unknown} do not exist on {pool_types[pool['name']]} pools"
        seen.add(pool_types[pool["name"]])
    assert seen == {"process", "docker", "azure-container-instance"}


def test_entrypoints_import_and_take_the_parameters(
    config: dict[str, Any], deployments: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import inspect

    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)
    for name, dep in {**deployments, **_variants(config)}.items():
        flow = load_flow_from_entrypoint(dep["entrypoint"])
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(dep.get("parameters", {})) <= accepted, f"{name}: {set(dep['parameters']) - accepted} unknown"


def test_weekly_flow_timeout_and_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # The deployment relies on the flow decorator for these (prefect.yaml cannot set them).
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)
    flow = load_flow_from_entrypoint("flows/weekly.py:weekly_reverse_etl")
    assert flow.timeout_seconds == 4 * 3600
    # Retries are the flow's business (flows/weekly.py retries weeks on transient errors with backoff); if it
    # ever sets Prefect flow retries, the delay must be one number: Prefect 3.9 flows reject a list (TypeError
    # locally, and a 422 on `empirical_policy.retry_delay` that crashes every deployment run).
    if flow.retries:
        assert isinstance(flow.retry_delay_seconds, int | float)


def test_other_flows_are_deployed_once_they_exist(deployments: dict[str, dict[str, Any]]) -> None:
    text = PREFECT_YAML.read_text()
    for module in ("weekly", "ingest", "warehouse", "backfill"):
        path = f"flows/{module}.py:"
        deployed = any(d["entrypoint"].startswith(path) for d in deployments.values())
        if (REPO / "flows" / f"{module}.py").exists():
            assert deployed, f"flows/{module}.py exists but prefect.yaml has no deployment for it"
        else:
            assert path in text, f"keep a commented template for {path}"
