"""Fixtures of the reliability suite: ONE real ``prefect server start`` for the session, and a rig that runs the
weekly flow in child processes (``tests/reliability/driver.py``) against the real test servers.

Why a real server: the flow loads its blocks by name from the Prefect API, and a killed child must leave a
RUNNING flow run behind on a server that outlives it. Two processes starting ephemeral servers on one SQLite file
conflict, so the children and the test process all talk to this one server (temp PREFECT_HOME, free port,
stopped by its PID at the end). The test process points at it per test (``temporary_settings``), so tests of other
folders that use the ephemeral ``prefect_harness`` are not affected.

``figures`` collects what the suite did (kill points, faults injected, hostile inputs, rows lost/duplicated) and
writes it as JSON (path in ``RELIABILITY_FIGURES``, default ``<tmp>/reliability-figures.json``) at session end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import blocks
from tests.support.prefect_harness import delete_blocks

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "driver.py"
PIPELINE = "weekly-customer-metrics"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability: crash/fault/secret tests running the weekly flow in child processes (slow)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.3",
        PYTHONPATH=str(REPO),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


@dataclass
class PrefectServer:
    url: str
    proc: subprocess.Popen
    home: str
    zygote: Any = None

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    home = tempfile.mkdtemp(prefix="reliability-prefect-")
    port = _free_port()
    env = _base_env()
    env.update(
        PREFECT_HOME=home,
        PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="1",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_SERVER_SERVICES_FOREMAN_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    log = open(os.path.join(home, "server.log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(REPO / ".venv/bin/prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = PrefectServer(url=f"http://127.0.0.1:{port}/api", proc=proc, home=home)
    # the zygote's imports (~10 s) overlap the server's start (~10 s); it talks to the server only per run
    server.zygote = Zygote(server.url)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {Path(home, 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("prefect server did not become healthy in 90 s")
            time.sleep(0.2)
        yield server
    finally:
        server.zygote.close()
        server.stop()
        log.close()


@pytest.fixture
def prefect_api(prefect_server: PrefectServer) -> Iterator[str]:
    """Point THIS process's Prefect client at the session server for one test."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        yield prefect_server.url


# --- figures ------------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    kill_points: list[str] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    hostile_inputs: Counter = field(default_factory=Counter)
    rows_served: int = 0
    rows_lost: int = 0
    rows_duplicated: int = 0
    behaviour: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kill_points_tested": len(self.kill_points),
            "kill_points": self.kill_points,
            "faults_injected": sum(self.faults.values()),
            "faults": dict(self.faults),
            "hostile_inputs_generated": sum(self.hostile_inputs.values()),
            "hostile_inputs": dict(self.hostile_inputs),
            "rows_served_in_crash_tests": self.rows_served,
            "rows_lost": self.rows_lost,
            "rows_duplicated": self.rows_duplicated,
            "rerun_behaviour": self.behaviour,
        }


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    fig = Figures()
    yield fig
    path = os.environ.get("RELIABILITY_FIGURES") or os.path.join(tempfile.gettempdir(), "reliability-figures.json")
    Path(path).write_text(json.dumps(fig.as_dict(), indent=2, sort_keys=True))


# --- the rig ------------------------------------------------------------------------------------------------------


@dataclass
class ChildResult:
    returncode: int
    stdout: str
    stderr: str
    killed_at: str | None

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


CHILD_ENV = {
    "WEEKLY_ETL_RETRY_BASE_SECONDS": "0.2",
    "WEEKLY_ETL_FLOW_RETRY_BASE_SECONDS": "0.2",
}


class Zygote:
    """``driver.py --zygote``: forks a fresh child process per run (see the driver's docstring)."""

    def __init__(self, server_url: str) -> None:
        self.home = tempfile.mkdtemp(prefix="reliability-zygote-")
        env = _base_env()
        env.update(CHILD_ENV, PREFECT_API_URL=server_url, PREFECT_HOME=self.home)
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER), "--zygote"],
            cwd=self.home,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"zygote did not start: {line!r}")
        self.ready = True

    def spawn(self, cmd: dict[str, Any]) -> int:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        kind, _, pid = self.proc.stdout.readline().strip().partition(" ")
        assert kind == "pid", f"zygote answered {kind!r}"
        return int(pid)

    def wait(self) -> int:
        kind, _, code = self.proc.stdout.readline().strip().partition(" ")
        assert kind == "exit", f"zygote answered {kind!r}"
        return int(code)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def zygote(prefect_server: PrefectServer) -> Iterator[Zygote]:
    z = prefect_server.zygote or Zygote(prefect_server.url)
    try:
        z.wait_ready()
        yield z
    finally:
        z.close()


@dataclass
class Child:
    pid: int
    started: float


@dataclass
class Rig:
    """One test's world: lake folder, Prefect result storage, saved blocks, and child runs of the weekly flow."""

    tmp_path: Path
    server_url: str
    zygote: Zygote
    sf_port: int | None = None
    saved: list[tuple[type, str]] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    runs: int = 0

    @property
    def lake_dir(self) -> Path:
        return self.tmp_path / "lake"

    def save(self, block: Any, name: str) -> Any:
        block.save(name, overwrite=True)
        self.saved.append((type(block), name))
        return block

    def _env(self, kill_at: str | None) -> dict[str, str]:
        env = {"RELIABILITY_KILL_MARKER": str(self.tmp_path / "killed-at"), "RELIABILITY_KILL_AT": kill_at or ""}
        env["RELIABILITY_SF_PORT"] = str(self.sf_port or "")
        env.update(self.extra_env)
        return env

    def popen(self, *args: str, kill_at: str | None = None) -> Child:
        (self.tmp_path / "killed-at").unlink(missing_ok=True)
        self.runs += 1
        cmd = {
            "args": list(args),
            "env": self._env(kill_at),
            "cwd": str(self.tmp_path),
            "stdout": str(self.tmp_path / f"run{self.runs}.out"),
            "stderr": str(self.tmp_path / f"run{self.runs}.err"),
            "storage": str(self.tmp_path / "prefect-results"),
        }
        return Child(self.zygote.spawn(cmd), time.monotonic())

    def alive(self, child: Child) -> bool:
        try:
            os.kill(child.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self, child: Child) -> None:
        os.killpg(child.pid, signal.SIGKILL)

    def finish(self, child: Child) -> ChildResult:
        code = self.zygote.wait()
        marker = self.tmp_path / "killed-at"
        killed_at = marker.read_text() if marker.exists() else None
        out = (self.tmp_path / f"run{self.runs}.out").read_text()
        err = (self.tmp_path / f"run{self.runs}.err").read_text()
        print(f"child run {self.runs}: rc={code} in {time.monotonic() - child.started:.1f}s")
        return ChildResult(code, out, err, killed_at)

    def run(self, *args: str, kill_at: str | None = None) -> ChildResult:
        return self.finish(self.popen(*args, kill_at=kill_at))

    def cleanup(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.variables import Variable

        delete_blocks(self.saved)
        try:
            Variable.unset("weekly-checkpoint")
        except Exception:  # noqa: BLE001
            pass
        try:  # a child killed inside the checkpoint lock must not hold the slot for the next test
            with get_client(sync_client=True) as client:
                client.delete_global_concurrency_limit_by_name("weekly-etl-checkpoint")
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture
def rig(prefect_api, zygote, tmp_path) -> Iterator[Rig]:
    r = Rig(tmp_path=tmp_path, server_url=prefect_api, zygote=zygote)
    try:
        yield r
    finally:
        r.cleanup()


def save_standard_blocks(
    rig: Rig,
    source_block: Any,
    pg_url: str,
    *,
    salesforce: Any | None = None,
    lake_block: Any | None = None,
    **settings: Any,
) -> None:
    """Save the five weekly blocks under their real names (lake in tmp_path unless given)."""
    from prefect_sqlalchemy import SqlAlchemyConnector

    rig.save(source_block, blocks.SOURCE_BLOCK)
    rig.save(lake_block or blocks.Lake(base_url=rig.lake_dir.as_uri()), blocks.LAKE_BLOCK)
    settings.setdefault("salesforce_poll_seconds", 0)
    rig.save(blocks.PipelineSettings(**settings), blocks.SETTINGS_BLOCK)
    rig.save(SqlAlchemyConnector(connection_info=pg_url), blocks.DATABASE_BLOCK)
    if salesforce is not None:
        rig.save(salesforce, blocks.SALESFORCE_BLOCK)
    else:
        try:
            blocks.SalesforceCredentials.delete(blocks.SALESFORCE_BLOCK)
        except Exception:  # noqa: BLE001 - not saved: dry run
            pass
