"""A global lock on a Prefect concurrency limit, taken directly through the REST client.

Prefect's ``concurrency()`` context manager goes through a per-process singleton service that keeps the API
client of its first caller. When weeks run as concurrent subflows in one process (the backfill), that client is
closed when the first subflow ends and a later acquisition from another thread waits forever (seen in the
integration test). This lock opens its own client per acquisition, so it has no such shared state.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from uuid import UUID

import httpx

LEASE_SECONDS = 60.0  # the server's minimum: a holder killed inside the block frees the slot within ~75 s


@contextlib.contextmanager
def global_lock(name: str, *, timeout_seconds: float = 180.0, lease_seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold one slot of the concurrency limit ``name`` (which must exist with limit 1) for the block.

    The lease is not renewed: keep the block short (well under ``lease_seconds``). Waits with the server's
    Retry-After while the slot is taken; raises TimeoutError after ``timeout_seconds``.
    """
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_seconds
    with get_client(sync_client=True) as client:
        while True:
            try:
                response = client.increment_concurrency_slots_with_lease([name], 1, "concurrency", lease_seconds)
                lease_id = UUID(response.json()["lease_id"])
                break
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"lock {name!r} not acquired within {timeout_seconds:.0f} s") from None
                retry_after = float(exc.response.headers.get("Retry-After") or 1.0)
                time.sleep(max(0.1, min(retry_after, 2.0, deadline - time.monotonic())))
        try:
            yield
        finally:
            client.release_concurrency_slots_with_lease(lease_id)
