"""Weekly pipeline throughput: raw fetch vs. this library vs. dlt, on the same demo API data (not a timed test).

    .venv/bin/python bench/weekly.py [--sizes 100000,1000000] [--quick] [--variants a,b,s,c] [--latency-ms MS]
                                     [--rounds 3] [--json out.json]

For each N the bundled demo events API (``tasks.demo_source``: deterministic synthetic events, ~2% invalid,
~0.2% re-sent ids) runs in ITS OWN PROCESS (``python -m tasks.demo_source --total N --pagination offset
--prerender START:END``), so it does not share the GIL with the client. ``--prerender`` renders the window's
pages once at startup and serves the bytes from memory: generating events per request in Python (~200k rows/s)
would otherwise make the server the bottleneck of every variant (``--server generating`` keeps that mode).
Every variant then runs in its own child process against that same server, so each one's peak RSS
(``ru_maxrss`` from ``os.wait4`` on that child) is not polluted by the others:

(a) ``fetch``: raw fetch only, the ceiling: httpx GET of every 1,000-record page + ``orjson.loads``, records
    counted, nothing validated or written.
(b) ``library``: this library's data path without Prefect, composed as ``flows/stages.py`` composes it:
    ``tasks.extract.extract_window`` (raw Parquet parts, each handed to a ``tasks.part_checks.PartValidator`` that
    runs its contract check while the next pages are fetched) -> ``tasks.transform.transform_week`` (validate,
    reject, de-duplicate, aggregate; valid/rejects/metrics Parquet) -> ``tasks.publish.publish_week`` (copy into the
    week's attempt folder + atomic manifest) on a local ``file://`` lake. The source is passed as a plain attribute
    object with ``blocks.SourceApi``'s defaults (``extract_window`` only reads attributes); importing the Prefect
    block would add ~13 s and ~80 MB of import-time RSS that the data path itself does not need.
(s) ``library, stages in sequence``: (b) without the PartValidator; the transform validates every raw part
    after the extract (what ``b/s`` compares: the gain of the overlap).
(c) ``dlt``: dlt's ``rest_api`` source (the idiomatic dlt way to load a paginated REST API: an ``offset``
    paginator with ``total_path``, ``data_selector: data``) -> ``filesystem`` destination with
    ``loader_file_format="parquet"`` on a local folder, in a fresh pipelines dir (dlt's own extract ->
    normalize -> load; schema inference, nested ``metadata`` flattened, variant columns for mistyped values).

``--latency-ms`` makes the demo API wait before every page (a remote API's round trip; default 0).
All variants page the same window with the offset style (``/events?start&end&offset&limit``, 1,000 per page).
Timed: from the first request to the last file written (imports and setup excluded; import-time RSS is shown
as ``base``). Output: per N a table (rows, seconds, rows/s, CPU seconds of the child, base/peak RSS), then the
ratios b/a and b/c and the RSS growth of (b) between the smallest and the largest N, against the issue's
targets (b/a >= 0.5, b/c >= 8, RSS(b) at the largest N within the smallest N's + 50 MB). Each N runs
``--rounds`` rounds (default 3): every variant once per round, in a rotated order; the table shows each variant's
median run and every round's time, the ratios are of the medians (with b/a and b/c per round too), and the RSS
is the highest of the rounds. Nothing is asserted: the machine is noisy; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WEEK_START = date(2024, 1, 1)  # a Monday
WEEK_END = date(2024, 1, 7)
PAGE_SIZE = 1000
RAW_ZONE = "raw/events"  # the same zones as flows/weekly.py (not imported: it pulls in Prefect)
STAGING_ZONE = "staging/events"
CURATED_ZONE = "curated/events"
VARIANTS = {
    "a": "fetch (httpx+orjson)",
    "b": "library extract->transform->load",
    "s": "library, stages in sequence",
    "c": "dlt rest_api->parquet",
}
TARGET_B_OVER_A = 0.5
TARGET_B_OVER_C = 8.0
TARGET_RSS_GROWTH_MB = 50.0
RESULT_MARK = "BENCH-RESULT "


def _rss_mb() -> float:
    """Peak RSS of this process so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the variants (each runs in a child process) -------------------------------------------------------------


def run_fetch(url: str, n: int, workdir: Path) -> dict[str, Any]:
    import httpx
    import orjson

    base = _rss_mb()
    rows = pages = 0
    t0, c0 = time.perf_counter(), time.process_time()
    with httpx.Client(timeout=30.0) as client:
        offset = 0
        while True:
            params = {
                "start": WEEK_START.isoformat(),
                "end": WEEK_END.isoformat(),
                "offset": offset,
                "limit": PAGE_SIZE,
            }
            response = client.get(url, params=params)
            response.raise_for_status()
            records = orjson.loads(response.content)["data"]
            pages += 1
            rows += len(records)
            if len(records) < PAGE_SIZE:
                break
            offset += PAGE_SIZE
    return {
        "rows": rows,
        "pages": pages,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "base_rss_mb": base,
    }


@dataclass
class BenchSource:
    """The attributes of ``blocks.SourceApi`` that ``tasks.extract`` reads, with the block's defaults.

    (Duck-typed so the child does not import Prefect; the values are the block's defaults except the URL,
    the offset pagination and the 1,000-record page size.)
    """

    base_url: str
    endpoint: str = "/events"
    records_key: str = "data"
    pagination: str = "offset"
    page_size: int = PAGE_SIZE
    page_param: str = "page"
    size_param: str = "page_size"
    offset_param: str = "offset"
    limit_param: str = "limit"
    cursor_param: str = "cursor"
    cursor_path: str = "next_cursor"
    start_param: str = "start"
    end_param: str = "end"
    auth: str = "none"
    api_key_header: str = "X-API-Key"
    secret: Any = None
    timeout_seconds: float = 30.0
    rate_limit_per_second: float | None = None
    max_attempts: int = 5
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 60.0
    pages_per_file: int = 50

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.endpoint.lstrip('/')}"


def run_library(url: str, n: int, workdir: Path, *, overlap: bool = True) -> dict[str, Any]:
    from tasks.lake import LakeFS
    from tasks.models import Window
    from tasks.part_checks import extract_and_check
    from tasks.publish import publish_week
    from tasks.transform import transform_week

    base_url, _, endpoint = url.partition("/events")
    source = BenchSource(base_url=base_url, endpoint="/events" + endpoint)
    window = Window(start=WEEK_START, end=WEEK_END)
    lake_dir = workdir / "lake"
    lake_dir.mkdir()
    lake = LakeFS(lake_dir.as_uri())
    base = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    # as flows/stages.py composes them: parts are validated while the extract fetches the next pages; (s) passes
    # no checks prefix, so the transform validates every raw part after the extract has finished
    checks = f"{STAGING_ZONE}/week={window.label}/parts" if overlap else None
    extracted = extract_and_check(source, window, lake, f"{RAW_ZONE}/week={window.label}", checks)
    t1 = time.perf_counter()
    rss_extract = _rss_mb()
    transformed = transform_week(
        lake,
        extracted.files,
        window,
        f"{STAGING_ZONE}/week={window.label}",
        timezone="UTC",
        validated=extracted.validated,
    )
    t2 = time.perf_counter()
    files = {"valid.parquet": transformed.valid, "rejects.parquet": transformed.rejects}
    files["metrics.parquet"] = transformed.metrics
    extra = {
        "fetched": transformed.fetched,
        "valid": transformed.valid.rows,
        "rejected": transformed.rejected,
        "duplicates": transformed.duplicates,
    }
    published = publish_week(lake, CURATED_ZONE, window.label, files, extra)
    t3 = time.perf_counter()
    return {
        "rows": extracted.rows,
        "pages": extracted.pages,
        "seconds": t3 - t0,
        "cpu_seconds": time.process_time() - c0,
        "base_rss_mb": base,
        "stages": {
            "extract_s": round(t1 - t0, 3),
            "transform_s": round(t2 - t1, 3),
            "load_s": round(t3 - t2, 3),
            "rss_after_extract_mb": round(rss_extract, 1),
        },
        "counts": {
            "fetched": transformed.fetched,
            "valid": transformed.valid.rows,
            "rejected": transformed.rejected,
            "duplicates": transformed.duplicates,
            "customers": transformed.metrics.rows,
            "raw_parts": len(extracted.files),
            "published_rows": published.manifest.total_rows,
        },
    }


def run_dlt(url: str, n: int, workdir: Path) -> dict[str, Any]:
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ["DLT_DATA_DIR"] = str(workdir / "dlt-data")
    os.environ["DLT_PROJECT_DIR"] = str(workdir)
    import dlt
    from dlt.sources.rest_api import rest_api_source

    base_url, _, endpoint = url.partition("/events")
    source = rest_api_source(
        {
            "client": {
                "base_url": base_url + "/",
                "paginator": {
                    "type": "offset",
                    "limit": PAGE_SIZE,
                    "offset_param": "offset",
                    "limit_param": "limit",
                    "total_path": "total",
                },
            },
            "resources": [
                {
                    "name": "events",
                    "endpoint": {
                        "path": "events" + endpoint,
                        "params": {"start": WEEK_START.isoformat(), "end": WEEK_END.isoformat()},
                        "data_selector": "data",
                    },
                }
            ],
        }
    )
    pipeline = dlt.pipeline(
        pipeline_name="bench_weekly",
        pipelines_dir=str(workdir / "pipelines"),
        destination=dlt.destinations.filesystem(bucket_url=(workdir / "dlt-lake").as_uri()),
        dataset_name="events",
    )
    base = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    pipeline.run(source, loader_file_format="parquet")
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    row_counts = dict(pipeline.last_trace.last_normalize_info.row_counts)
    files = list((workdir / "dlt-lake").rglob("*.parquet"))
    return {
        "rows": int(row_counts.get("events", 0)),
        "pages": None,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "base_rss_mb": base,
        "counts": {"row_counts": row_counts, "parquet_files": len(files)},
    }


def run_library_in_sequence(url: str, n: int, workdir: Path) -> dict[str, Any]:
    return run_library(url, n, workdir, overlap=False)


RUNNERS = {"a": run_fetch, "b": run_library, "s": run_library_in_sequence, "c": run_dlt}


def child_main(variant: str, url: str, n: int, workdir: Path) -> None:
    result = RUNNERS[variant](url, n, workdir)
    result["child_peak_rss_mb"] = _rss_mb()
    print(RESULT_MARK + json.dumps(result), flush=True)


# --- orchestration (parent) ----------------------------------------------------------------------------------


class DemoServer:
    """``python -m tasks.demo_source`` in its own process on a free port."""

    def __init__(self, total: int, *, prerender: bool = True, latency_ms: float = 0.0) -> None:
        self.total = total
        self.prerender = prerender
        self.latency_ms = latency_ms
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> DemoServer:
        cmd = [sys.executable, "-m", "tasks.demo_source", "--port", "0", "--total", str(self.total)]
        cmd += ["--pagination", "offset", "--latency-ms", str(self.latency_ms)]
        if self.prerender:  # pages rendered once at startup: the server answers at memory speed
            cmd += [
                "--prerender",
                f"{WEEK_START.isoformat()}:{WEEK_END.isoformat()}",
                "--prerender-limit",
                str(PAGE_SIZE),
            ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "demo events API on http://127.0.0.1:PORT/events (Ctrl-C to stop)"
        words = [w for w in line.split() if w.startswith("http://")]
        if not words:
            self.__exit__()
            raise RuntimeError(f"demo API did not start (said {line!r})")
        self.url = words[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def warm_up(url: str) -> None:
    """One small request so the server's first-request costs are not billed to variant (a)."""
    import httpx

    params = {"start": WEEK_START.isoformat(), "end": WEEK_END.isoformat(), "offset": 0, "limit": 10}
    httpx.get(url, params=params, timeout=30).raise_for_status()


def run_child(variant: str, url: str, n: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-weekly-{variant}-") as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--url", url, "--n", str(n)]
        cmd += ["--workdir", tmp]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env["RUNTIME__DLTHUB_TELEMETRY"] = "false"
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, env=env)
            deadline = time.monotonic() + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    raise RuntimeError(f"variant {variant} timed out after {timeout:.0f}s")
                time.sleep(0.05)
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            text = out.read()
        if proc.returncode != 0:
            raise RuntimeError(f"variant {variant} failed with exit code {proc.returncode}:\n{text[-2000:]}")
        lines = [ln for ln in text.splitlines() if ln.startswith(RESULT_MARK)]
        if not lines:
            raise RuntimeError(f"variant {variant} printed no result:\n{text[-2000:]}")
        result = json.loads(lines[-1][len(RESULT_MARK) :])
        result["variant"] = variant
        result["n"] = n
        result["peak_rss_mb"] = usage.ru_maxrss / 1024  # the child's own peak, as the kernel saw it
        result["rows_per_s"] = result["rows"] / result["seconds"] if result["seconds"] > 0 else 0.0
        return result


def print_table(n: int, results: dict[str, dict[str, Any]]) -> None:
    print(f"\nN = {n:,} events, pages of {PAGE_SIZE:,}")
    head = f"{'variant':<38} {'rows':>10} {'seconds':>8} {'rows/s':>10} {'CPU s':>7} {'base MB':>8} {'peak MB':>8}"
    print(head)
    print("-" * len(head))
    for key, r in results.items():
        print(
            f"{key + ' ' + VARIANTS[key]:<38} {r['rows']:>10,} {r['seconds']:>8.2f} {r['rows_per_s']:>10,.0f} "
            f"{r['cpu_seconds']:>7.2f} {r['base_rss_mb']:>8.0f} {r['peak_rss_mb']:>8.0f}"
            + (f"  rounds: {', '.join(f'{t:.2f}' for t in r['round_seconds'])}" if len(r["round_seconds"]) > 1 else "")
        )
    for key in ("b", "s"):
        if key in results:
            s, c = results[key]["stages"], results[key]["counts"]
            print(
                f"  ({key}) stages: extract {s['extract_s']:.2f}s, transform {s['transform_s']:.2f}s, "
                f"load {s['load_s']:.2f}s; valid {c['valid']:,}, rejected {c['rejected']:,}, "
                f"duplicates {c['duplicates']:,}, customers {c['customers']:,}"
            )
    ratios = ratios_of(results)
    for name, value in ratios.items():
        if name == "a/c":
            continue
        target = {"b/a": TARGET_B_OVER_A, "b/c": TARGET_B_OVER_C}.get(name)
        if target is None:  # b/s: what validating during the extract buys (no target)
            print(f"  {name} = {value:.2f}  (overlapping the contract check with the fetch vs. running it after)")
            continue
        verdict = "meets" if value >= target else "MISSES"
        per_round = ""
        top, bottom = name.split("/")
        if len(results[top]["round_seconds"]) > 1:  # same rows: rows/s ratio = inverse time ratio, round by round
            pairs = zip(results[bottom]["round_seconds"], results[top]["round_seconds"], strict=True)
            per_round = "; per round " + ", ".join(f"{d / u:.2f}" for d, u in pairs)
        print(f"  {name} = {value:.2f}  ({verdict} target >= {target:g}; of the medians{per_round})")
    if "a/c" in ratios:
        # b/c = b/a x a/c: on a machine where the ceiling (a) is only a/c times dlt, b/c >= 8 asks b/a >= 8 / (a/c)
        need = TARGET_B_OVER_C / ratios["a/c"]
        print(f"  a/c = {ratios['a/c']:.2f}  (so b/c >= {TARGET_B_OVER_C:g} needs b/a >= {need:.2f} on this machine)")
    rows = {k: r["rows"] for k, r in results.items()}
    agree = len(set(rows.values())) == 1
    print(f"  rows agree across variants: {'yes' if agree else 'NO ' + str(rows)}")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time (the lower one of an even count), plus every round's seconds; its peak RSS
    is the highest of all rounds (the RSS target is about the worst case)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    result = dict(ordered[(len(ordered) - 1) // 2])
    result["round_seconds"] = [round(r["seconds"], 3) for r in runs]
    result["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return result


def ratios_of(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out = {}
    if "b" in results and "a" in results and results["a"]["rows_per_s"]:
        out["b/a"] = results["b"]["rows_per_s"] / results["a"]["rows_per_s"]
    if "b" in results and "c" in results and results["c"]["rows_per_s"]:
        out["b/c"] = results["b"]["rows_per_s"] / results["c"]["rows_per_s"]
    if "a" in results and "c" in results and results["c"]["rows_per_s"]:
        out["a/c"] = results["a"]["rows_per_s"] / results["c"]["rows_per_s"]
    if "b" in results and "s" in results and results["s"]["rows_per_s"]:
        out["b/s"] = results["b"]["rows_per_s"] / results["s"]["rows_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", default=None, help="comma-separated N values (default 100000,1000000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 5,000 unless --sizes is given")
    parser.add_argument(
        "--variants", default="a,b,c", help="subset of a,b,s,c (default a,b,c; s = (b) with the stages in sequence)"
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="the demo API waits this long before each page (default 0: memory speed; a remote API takes 10-300)",
    )
    parser.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    parser.add_argument(
        "--server",
        choices=("prerendered", "generating"),
        default="prerendered",
        help="demo API mode: pages rendered once at startup (default; the client side is measured) or generated\n"
        "per request (~200k rows/s in Python: the server is then the bottleneck)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds per N (default 3; 1 with --quick): every variant runs once per round, in a rotated order;\n"
        "the table shows each variant's median run and the ratios are of medians (this machine is noisy)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="per-variant timeout in seconds")
    parser.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.url, args.n, Path(args.workdir))
        return 0

    # --quick changes the defaults only: an explicit --sizes/--rounds wins
    sizes_text = args.sizes if args.sizes is not None else ("5000" if args.quick else "100000,1000000")
    sizes = [int(s.replace("_", "")) for s in sizes_text.split(",") if s.strip()]
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in RUNNERS]
    if unknown or not variants or any(n <= 0 for n in sizes) or rounds < 1:
        parser.error(
            f"--variants must be a subset of a,b,s,c, --sizes and --rounds positive "
            f"(got {args.variants!r}, {sizes}, {rounds})"
        )

    print(
        f"bench/weekly.py: sizes {sizes}, variants {variants}, {rounds} round(s); python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; server ({args.server}, latency "
        f"{args.latency_ms:g} ms) and each variant in separate processes"
    )
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "server": args.server,
        "latency_ms": args.latency_ms,
        "rounds": rounds,
        "runs": [],
    }
    for n in sizes:
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        with DemoServer(n, prerender=args.server == "prerendered", latency_ms=args.latency_ms) as server:
            warm_up(server.url)
            for r in range(rounds):
                for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotated each round
                    runs[v].append(run_child(v, server.url, n, args.timeout))
        results = {v: median_run(runs[v]) for v in variants}
        print_table(n, results)
        report["runs"].append({"n": n, "results": results, "ratios": ratios_of(results)})
    if "b" in variants and len(sizes) > 1:
        small, large = report["runs"][0], report["runs"][-1]
        growth = large["results"]["b"]["peak_rss_mb"] - small["results"]["b"]["peak_rss_mb"]
        verdict = "meets" if growth <= TARGET_RSS_GROWTH_MB else "MISSES"
        print(
            f"\npeak RSS of (b): {small['results']['b']['peak_rss_mb']:.0f} MB at N={small['n']:,} -> "
            f"{large['results']['b']['peak_rss_mb']:.0f} MB at N={large['n']:,} "
            f"(+{growth:.0f} MB; {verdict} target <= +{TARGET_RSS_GROWTH_MB:g} MB)"
        )
        report["rss_growth_b_mb"] = growth
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
