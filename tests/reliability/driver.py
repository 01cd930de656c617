"""Child-process driver of the reliability tests: runs ``python -m flows.weekly`` unchanged, optionally routing
Salesforce HTTP to the fake and SIGKILLing ITSELF at a chosen point.

The product has no test hooks. The kill points are chosen here, from the outside of the code under test:

* ``stage:<name>``: when the flow records the start of stage ``<name>`` (``tracking.start_stage``), i.e. at the
  boundary between the previous stage and this one.
* ``op:<op>``: when the flow is about to apply the tracking write ``<op>`` (``finish_run`` /
  ``checkpoint_after_week``) through ``pending.apply_or_queue``.
* ``mirror``: after the checkpoint was written to the database, before the Prefect Variable mirror is set
  (inside the checkpoint lock).
* ``rename:<glob>``: an ``os.replace``/``os.rename`` whose target matches ``<glob>`` (Python audit hook): the file
  is fully written under its temp name, not yet in place.
* ``open:<glob>[#n]``: the ``n``-th (default 1st) open of a path matching ``<glob>``: a temp file is created and
  empty, i.e. the process dies in the middle of writing a file.
* ``call:<module>.<function>[#n]``: the ``n``-th call of a module-level function (looked up at call time by the code
  under test), before it runs, e.g. ``call:tasks.ingest_db.load_batch#3`` = after two committed batches.

``RELIABILITY_MODULE`` picks the flow module whose ``main(argv)`` runs (default ``flows.weekly``).

Two modes:

* ``python tests/reliability/driver.py --week 2024-01-01``: one run in this process.
* ``python tests/reliability/driver.py --zygote``: import everything once (~8-10 s on this machine), then for each
  JSON command line on stdin fork a FRESH child process that runs the flow once and exits; answer ``pid <n>`` when
  it started and ``exit <code>`` (negative = signal) when it ended. The zygote itself never runs a flow and has no
  threads when it forks (checked), so a child starts with no state of any earlier run: what a restarted process
  would have, minus the import time. Command: ``{"args": [...], "env": {...}, "cwd": "...", "stdout": path,
  "stderr": path, "storage": path}`` (``storage`` = PREFECT_LOCAL_STORAGE_PATH of the run).

Environment: ``RELIABILITY_KILL_AT`` (one spec above), ``RELIABILITY_SF_PORT`` (route https Salesforce calls to
the fake on this port), ``RELIABILITY_KILL_MARKER`` (a file written just before the kill, so the test can tell
"killed where intended" from "died for another reason").
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys


def _die(spec: str) -> None:
    marker = os.environ.get("RELIABILITY_KILL_MARKER")
    if marker:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, spec.encode())
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(spec: str) -> None:
    kind, _, arg = spec.partition(":")
    if kind == "stage":
        from tasks import tracking

        original = tracking.start_stage

        def start_stage(engine, run_id, stage, **kwargs):
            if stage == arg:
                _die(spec)
            return original(engine, run_id, stage, **kwargs)

        tracking.start_stage = start_stage
    elif kind == "op":
        from tasks import pending

        original_apply = pending.apply_or_queue

        def apply_or_queue(engine, lake, pipeline, op, args, **kwargs):
            if op == arg:
                _die(spec)
            return original_apply(engine, lake, pipeline, op, args, **kwargs)

        pending.apply_or_queue = apply_or_queue
    elif kind == "mirror":
        import flows.weekly as weekly

        def mirror(*args, **kwargs):
            _die(spec)

        weekly._mirror_checkpoint = mirror
    elif kind == "call":
        import importlib

        target, _, nth = arg.partition("#")
        module_name, _, func_name = target.rpartition(".")
        module = importlib.import_module(module_name)
        original_func = getattr(module, func_name)
        wanted_call = int(nth or 1)
        calls = 0

        def wrapper(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == wanted_call:
                _die(spec)
            return original_func(*args, **kwargs)

        setattr(module, func_name, wrapper)
    elif kind in ("rename", "open"):
        pattern, _, nth = arg.partition("#")
        wanted = int(nth or 1)
        seen = 0
        event_name = "os.rename" if kind == "rename" else "open"

        def hook(event: str, args: tuple) -> None:
            nonlocal seen
            if event != event_name or not args:
                return
            target = args[1] if kind == "rename" else args[0]
            if not isinstance(target, str | bytes | os.PathLike):
                return
            path = os.fsdecode(target)
            if fnmatch.fnmatch(path, pattern):
                seen += 1
                if seen == wanted:
                    _die(spec)

        sys.addaudithook(hook)
    else:
        raise SystemExit(f"unknown RELIABILITY_KILL_AT spec {spec!r}")


def _route_salesforce(port: int) -> None:
    from tasks import salesforce as salesforce_mod
    from tests.support.fake_salesforce import SalesforceRoutingAdapter

    def session():
        import requests

        s = requests.Session()
        s.mount("https://", SalesforceRoutingAdapter(port))
        return s

    salesforce_mod._default_session = session


def _run_once(argv: list[str], storage: str | None = None) -> int:
    if os.environ.get("RELIABILITY_SF_PORT"):  # empty = not routed
        _route_salesforce(int(os.environ["RELIABILITY_SF_PORT"]))
    if os.environ.get("RELIABILITY_KILL_AT"):
        _install_kill(os.environ["RELIABILITY_KILL_AT"])
    import importlib

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    flow_main = importlib.import_module(os.environ.get("RELIABILITY_MODULE") or "flows.weekly").main

    updates: dict = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if storage:
        from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

        updates[PREFECT_LOCAL_STORAGE_PATH] = storage
    with temporary_settings(updates):
        return flow_main(argv)


def _zygote() -> int:
    import json
    import threading

    # everything a run imports, so children start at once
    import polars  # noqa: F401
    import prefect_sqlalchemy  # noqa: F401
    import psycopg  # noqa: F401
    from prefect.client.orchestration import get_client  # noqa: F401
    from prefect.concurrency.sync import concurrency  # noqa: F401
    from prefect.variables import Variable  # noqa: F401

    import flows.ingest  # noqa: F401
    import flows.warehouse  # noqa: F401
    import flows.weekly  # noqa: F401
    import tasks.extract  # noqa: F401
    import tasks.part_checks  # noqa: F401
    import tasks.salesforce  # noqa: F401
    import tasks.transform  # noqa: F401
    import tasks.validation  # noqa: F401
    import tests.support.fake_salesforce  # noqa: F401

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        if threading.active_count() != 1:
            raise SystemExit("zygote: threads appeared; refusing to fork")
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: a fresh process for one run
            code = 70
            try:
                os.setsid()
                os.chdir(cmd["cwd"])
                for fd, path in ((1, cmd["stdout"]), (2, cmd["stderr"])):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                sys.stdin.close()
                os.environ.update(cmd.get("env", {}))
                code = _run_once(cmd["args"], cmd.get("storage"))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - report and exit
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                import atexit

                atexit._run_exitfuncs()  # what a normal exit does: Prefect drains its API log queue here
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        out.write(f"pid {pid}\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(f"exit {os.waitstatus_to_exitcode(status)}\n")
        out.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        sys.exit(_zygote())
    sys.exit(_run_once(sys.argv[1:]))
