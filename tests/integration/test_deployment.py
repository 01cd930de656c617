"""The deployment path for real: `prefect server start`, setup, `prefect deploy`, a worker, `prefect deployment run`.

Everything runs as separate processes on 127.0.0.1 with a temporary PREFECT_HOME and SQLite database, exactly as
an operator would type it. The deployment comes from the repository's prefect.yaml; the code directory it runs
from is a temporary "checkout" (symlinks to the repository's packages) so the embedded defaults it writes
(./.data) stay in tmp. The lake goes to a folder configured through a saved Lake block (`flows.setup --lake-url`).

Measured here: server healthy ~9 s, setup ~5 s, deploy ~3 s, worker ready ~7 s, one run ~19 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PREFECT = str(VENV_BIN / "prefect")
DEPLOYMENT = "weekly-reverse-etl"
POOL = "weekly-etl-process"
CODE_DIRS = ("flows", "tasks", "blocks", "api")
WEEK = date(2024, 1, 8)  # a Monday

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    """Processes this test started (by PID) plus the environment they share."""

    root: Path
    env: dict[str, str]
    api: str
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def mark(self, what: str) -> None:
        """Phase timings, shown with the output of a failing test (no assertion on time)."""
        print(f"{time.monotonic() - self.t0:6.1f}s {what}")

    def start(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, cwd=cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append((name, proc, log))
        return proc

    def run(self, name: str, args: list[str], cwd: Path, timeout: float = 60) -> str:
        """Run a CLI command to completion; fail the test with its output when it fails."""
        done = subprocess.run(args, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        output = done.stdout + done.stderr
        (self.root / f"{name}.log").write_text(output)
        assert done.returncode == 0, f"{name} exited {done.returncode}:\n{output[-4000:]}"
        return output

    def logs(self) -> str:
        parts = []
        for name, _, log in self.procs:
            text = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"----- {name} (last 3000 chars)\n{text[-3000:]}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        # The worker ignores SIGTERM for 15+ s; a second SIGINT ends it. The server stops on SIGTERM.
        for name, proc, _ in reversed(self.procs):
            if proc.poll() is not None:
                continue
            if name.startswith("worker"):
                _signal_and_wait(proc, [signal.SIGINT, signal.SIGINT], wait=5)
            else:
                _signal_and_wait(proc, [signal.SIGTERM], wait=10)


def _signal_and_wait(proc: subprocess.Popen[bytes], signals: list[signal.Signals], wait: float) -> None:
    for sig in signals:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    # Last resort: the process group this test created for it (its own children included).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _wait_healthy(stack: Stack, server: subprocess.Popen[bytes], deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited {server.returncode}\n{stack.logs()}"
        try:
            if httpx.get(f"{stack.api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"prefect server not healthy after {deadline_s} s\n{stack.logs()}")


def _make_checkout(dest: Path) -> Path:
    """A code directory like a user's checkout: the packages (symlinked) and the repository's prefect.yaml."""
    dest.mkdir()
    for name in CODE_DIRS:
        if (REPO / name).is_dir():
            (dest / name).symlink_to(REPO / name, target_is_directory=True)
    shutil.copy2(REPO / "prefect.yaml", dest / "prefect.yaml")
    return dest


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    port = _free_port()
    home = tmp_path / "prefect-home"
    home.mkdir()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",  # no cron runs needed: the test triggers its own
        # A run held back by the deployment's concurrency limit is retried after this (default 30 s).
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="2",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.3",
        PREFECT_CLI_PROMPT="false",
        PYTHONPATH=str(REPO),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    st = Stack(root=tmp_path, env=env, api=api)
    try:
        yield st
    finally:
        st.stop_all()


def _api(stack: Stack, method: str, path: str, **kwargs: Any) -> Any:
    # The server answers 503 for retryable faults (SQLite busy under a worker's load); Prefect's client retries
    # those, and so does this helper.
    for _ in range(20):
        resp = httpx.request(method, f"{stack.api}{path}", timeout=10, **kwargs)
        if resp.status_code not in (429, 503):
            break
        time.sleep(0.5)
    resp.raise_for_status()
    return resp.json() if resp.content else None


def _states(stack: Stack, run_id: str) -> list[dict[str, Any]]:
    states = _api(stack, "GET", "/flow_run_states/", params={"flow_run_id": run_id})
    return sorted(states, key=lambda s: s["timestamp"])


def _wait_final(stack: Stack, run_ids: list[str], deadline_s: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + deadline_s
    runs: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        runs = {rid: _api(stack, "GET", f"/flow_runs/{rid}") for rid in run_ids}
        if all(run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for run in runs.values()):
            return runs
        time.sleep(0.5)
    summary = {rid: (run["state"]["type"], run["state"]["name"]) for rid, run in runs.items()}
    pytest.fail(f"flow runs not finished after {deadline_s} s: {summary}\n{stack.logs()}")


def _wait_for(stack: Stack, run_id: str, types: set[str], deadline_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = _api(stack, "GET", f"/flow_runs/{run_id}")
        if run["state"]["type"] in types:
            return run
        time.sleep(0.2)
    pytest.fail(f"flow run {run_id} never reached {types}: {run.get('state')}\n{stack.logs()}")


def _setup_in_process(stack: Stack, lake_dir: Path) -> Any:
    import asyncio

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.setup import setup

    with temporary_settings({PREFECT_API_URL: stack.api}):
        return asyncio.run(setup(lake_url=lake_dir.as_uri()))


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _run_id_from_cli(output: str) -> str:
    for line in output.splitlines():
        if "UUID:" in line:
            return line.split("UUID:", 1)[1].strip()
    raise AssertionError(f"no flow run UUID in `prefect deployment run` output:\n{output}")


def test_deploy_run_concurrency_limit_and_backfill(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = _make_checkout(tmp_path / "checkout")
    lake_dir = tmp_path / "lake"
    server = stack.start("server", [PREFECT, "server", "start"], cwd=tmp_path)
    _wait_healthy(stack, server)
    stack.mark("server healthy")

    # One-time setup as an operator runs it, then again in-process: the second run must create nothing.
    first = stack.run("setup", [sys.executable, "-m", "flows.setup", "--lake-url", lake_dir.as_uri()], cwd=checkout)
    assert f"work pool '{POOL}': created" in first
    assert "concurrency limit 'weekly-etl-checkpoint': created" in first
    assert "blocks saved: weekly-lake" in first
    stack.mark("setup")
    # The worker boots (~7 s) while `prefect deploy` runs; it only needs the pool.
    worker = stack.start(
        "worker", [PREFECT, "worker", "start", "--pool", POOL, "--name", "test-worker", "--limit", "4"], cwd=tmp_path
    )
    deploy = stack.start("deploy", [PREFECT, "--no-prompt", "deploy", "--name", DEPLOYMENT], cwd=checkout)
    again = _setup_in_process(stack, lake_dir)
    assert not again.created_work_pool and not again.created_concurrency_limit and not again.created_variables
    assert "weekly-etl-lake" in again.registered_blocks
    pool = _api(stack, "GET", f"/work_pools/{POOL}")
    assert pool["type"] == "process"
    assert "working_dir" in pool["base_job_template"]["variables"]["properties"]
    assert deploy.wait(timeout=90) == 0, stack.logs()
    stack.mark("deployed")
    # The documented CLI registration works too (the checkout is importable through PYTHONPATH here).
    registered = stack.run("block-register", [PREFECT, "block", "register", "-m", "blocks"], cwd=checkout)
    for name in ("Source API", "Data Lake", "Salesforce Credentials", "Pipeline Settings"):
        assert name in registered, registered
    [deployment] = _api(stack, "POST", "/deployments/filter", json={"deployments": {"name": {"any_": [DEPLOYMENT]}}})
    flow_name = _api(stack, "GET", f"/flows/{deployment['flow_id']}")["name"]
    assert deployment["work_pool_name"] == POOL
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    [schedule] = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "0 6 * * 1"
    assert schedule["schedule"]["timezone"]
    assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(checkout)

    # Run A: the CLI path with a parameter override.
    out = stack.run(
        "run-a",
        [PREFECT, "deployment", "run", f"{flow_name}/{DEPLOYMENT}", "--param", f"week={WEEK.isoformat()}"],
        cwd=tmp_path,
    )
    run_a = _run_id_from_cli(out)
    stack.mark("run A triggered")
    _wait_for(stack, run_a, {"PENDING", "RUNNING"}, deadline_s=45)
    stack.mark("run A pending/running")
    assert worker.poll() is None, stack.logs()
    # Meanwhile, two backfills. B: the same week again, as a deployment run (`mode="deployment"`, full refresh)
    # created while A holds the deployment's only slot (taken at PENDING, held until A ends), from a thread.
    # And the next two weeks as subflow runs in this process (both in flight at once), from the checkout, as an
    # operator would run `python -m flows.backfill` there: same embedded tracking database as the deployment runs
    # (the checkpoint's source of truth; the Variable mirrors it).
    subflow_weeks = [WEEK + timedelta(weeks=1), WEEK + timedelta(weeks=2)]
    with ThreadPoolExecutor(max_workers=1) as executor:
        by_deployment_future = executor.submit(_backfill, stack, WEEK, WEEK, "deployment", True)
        monkeypatch.chdir(checkout)
        by_subflow = _backfill(stack, subflow_weeks[0], subflow_weeks[-1], "subflow", False)
        stack.mark("backfill (subflows) done")
        by_deployment = by_deployment_future.result(timeout=180)
        stack.mark("backfill (deployment run B) done")
    [run_b] = [w.flow_run_id for w in by_deployment.weeks]
    runs = _wait_final(stack, [run_a, run_b], deadline_s=30)
    for rid, run in runs.items():
        assert run["state"]["type"] == "COMPLETED", f"{rid}: {run['state']}\n{stack.logs()}"
    assert runs[run_a]["parameters"]["week"] == WEEK.isoformat()

    # B was held back while A ran (AwaitingConcurrencySlot), then ran after A finished: never two Running at once.
    states_b = _states(stack, run_b)
    assert any(s["name"] == "AwaitingConcurrencySlot" for s in states_b), [s["name"] for s in states_b]
    (_, a_end), (b_start, _) = _running_interval(stack, run_a), _running_interval(stack, run_b)
    assert b_start >= a_end, (b_start, a_end)

    # Backfill results: every week completed, each linked to its backfill run, the deployment one on the deployment.
    assert [w.week_start for w in by_subflow.weeks] == subflow_weeks
    assert [w.week_start for w in by_deployment.weeks] == [WEEK]
    for week_run in [*by_subflow.weeks, *by_deployment.weeks]:
        assert week_run.state == "COMPLETED", week_run
        run = _api(stack, "GET", f"/flow_runs/{week_run.flow_run_id}")
        assert run["parameters"]["week"] == week_run.week_start.isoformat()
        assert run["parent_task_run_id"], "each week is linked to the backfill run"
    assert _api(stack, "GET", f"/flow_runs/{run_b}")["deployment_id"] == deployment["id"]
    assert runs[run_b]["parameters"]["full_refresh"] is True

    # Outputs: Parquet for every week under the saved Lake block's folder, and the checkpoint Variable advanced
    # past the last week (it only moves forward).
    files = [p for p in lake_dir.rglob("*.parquet")]
    for week in [WEEK, *subflow_weeks]:
        assert any(f"week={week.isoformat()}" in str(p) for p in files), (week, sorted(map(str, files)))
    checkpoint = _api(stack, "GET", "/variables/name/weekly-checkpoint")["value"]
    assert checkpoint["next_week_start"] == (subflow_weeks[-1] + timedelta(days=7)).isoformat(), checkpoint
    assert checkpoint["last_run_id"] and checkpoint["updated_at"], checkpoint
    # The pull step ran the deployment's flows in the checkout: the embedded SQLite tracking file landed there.
    assert (checkout / ".data" / "weekly.db").is_file()
    assert not (checkout / "lake").exists(), "the saved Lake block must win over the ./lake default"


def _running_interval(stack: Stack, run_id: str) -> tuple[datetime, datetime]:
    states = _states(stack, run_id)
    started = min(_ts(s["timestamp"]) for s in states if s["type"] == "RUNNING")
    ended = max(_ts(s["timestamp"]) for s in states if s["type"] == "COMPLETED")
    return started, ended


def _backfill(stack: Stack, start: date, end: date, mode: str, full_refresh: bool) -> Any:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.backfill import weekly_backfill

    with temporary_settings({PREFECT_API_URL: stack.api}):
        return weekly_backfill(
            start=start,
            end=end,
            full_refresh=full_refresh,
            max_concurrency=2,
            mode=mode,
            deployment=f"weekly-reverse-etl/{DEPLOYMENT}",
            week_timeout_seconds=150,
        )
