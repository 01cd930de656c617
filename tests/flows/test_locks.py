"""The checkpoint lock against the session's Prefect API: mutual exclusion across threads, bounded waits."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from prefect.client.orchestration import get_client

from flows.locks import global_lock


@pytest.fixture
def lock_name(prefect_harness) -> str:
    name = f"test-lock-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    return name


def test_threads_never_hold_the_lock_together(lock_name):
    inside, most, entered = [0], [0], []
    guard = threading.Lock()

    def worker(i: int) -> None:
        with global_lock(lock_name, timeout_seconds=60):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.2)
            entered.append(i)
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert sorted(entered) == [0, 1, 2] and most[0] == 1


def test_a_held_lock_times_out_clearly_and_is_free_after_release(lock_name):
    with global_lock(lock_name):
        with pytest.raises(TimeoutError, match=lock_name):
            with global_lock(lock_name, timeout_seconds=1):
                pass
    with global_lock(lock_name, timeout_seconds=5):  # released on exit, even after the failed waiter
        pass
