"""Azurite (Azure Blob emulator, npm azurite@3.35.0 from package-lock.json) for the lake tests.

One server per session on 127.0.0.1 and a free port, started from ``node_modules/.bin/azurite-blob`` (node is
spawned directly, in its own process group, and stopped by its own PID). Storage is in memory
(``--inMemoryPersistence``; Azurite refuses ``--location`` together with it, so the process just runs in a temp
folder): ``stop()`` + ``start()`` keeps the port but LOSES every container and blob. Tests that stop the server
should use ``with azurite.down(): ...`` so it comes back for the next test.

Fixtures: ``azurite`` (session server), ``azurite_container`` (fresh container name per test, created),
``azurite_lake_block`` (a ``blocks.Lake`` with ``AzureBlobStorageCredentials(connection_string=...)`` and
``base_url="abfs://<container>/lake"``) and ``azurite_lake`` (its :class:`tasks.lake.LakeFS`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AZURITE_BIN = REPO / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class AzuriteServer:
    """A controllable Azurite blob server: ``port``, ``connection_string``, ``stop()``/``start()``."""

    def __init__(self, port: int | None = None) -> None:
        if not AZURITE_BIN.exists():
            raise RuntimeError(
                f"{AZURITE_BIN} is missing: run `npm ci` in {REPO} (scripts/test.sh does it) to install Azurite"
            )
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not on PATH: Azurite needs Node.js 20")
        self.node = node
        self.script = str(AZURITE_BIN.resolve())
        self.port = port or _free_port()
        self.workdir = tempfile.mkdtemp(prefix="azurite-")
        self.log_path = os.path.join(self.workdir, "azurite.log")
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        args = [
            self.node,
            self.script,
            "--blobHost",
            HOST,
            "--blobPort",
            str(self.port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--silent",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Azurite exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Azurite did not listen on {HOST}:{self.port} within {timeout}s: {self._log_tail()}")

    def stop(self) -> None:
        """Stop the server by its own PID (process group). In-memory data is gone afterwards."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    @contextmanager
    def down(self) -> Iterator[None]:
        """Take Azurite away for the block, then bring it back (same port, empty storage)."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def _log_tail(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-2000:]
        except OSError:
            return "<no log>"

    # -- helpers -------------------------------------------------------------------------------------------------

    def service_client(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def new_container(self, prefix: str = "t") -> str:
        """Create a fresh, uniquely named container and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        with self.service_client() as svc:
            svc.create_container(name)
        return name

    def delete_container(self, name: str) -> None:
        if not self.running:
            return
        from azure.core.exceptions import ResourceNotFoundError

        with self.service_client() as svc:
            try:
                svc.delete_container(name)
            except ResourceNotFoundError:
                pass

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def azurite() -> Iterator[AzuriteServer]:
    """One Azurite blob server for the session (fails with a hint when node_modules is missing)."""
    try:
        server = AzuriteServer()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def azurite_container(azurite: AzuriteServer) -> Iterator[str]:
    """A fresh container for one test, deleted afterwards (if the server is up)."""
    if not azurite.running:
        azurite.start()
    name = azurite.new_container()
    yield name
    azurite.delete_container(name)


@pytest.fixture
def azurite_lake_block(azurite: AzuriteServer, azurite_container: str):
    """A ``blocks.Lake`` on the test's container (imports Prefect lazily: only tests that ask pay for it)."""
    from prefect_azure import AzureBlobStorageCredentials

    from blocks.lake import Lake

    return Lake(
        base_url=f"abfs://{azurite_container}/lake",
        azure_credentials=AzureBlobStorageCredentials(connection_string=azurite.connection_string),
    )


@pytest.fixture
def azurite_lake(azurite_lake_block):
    """The LakeFS of ``azurite_lake_block``, with short SDK retries so outages surface quickly."""
    from tasks.lake import LakeFS

    return LakeFS.from_block(azurite_lake_block, retries=1, retry_backoff=0.1, connect_timeout=5, read_timeout=30)
