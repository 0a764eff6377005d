"""A real Prometheus (the Debian package's binary, installed by hack/system-deps.sh) on a free
loopback port, scraping targets from a file it re-reads every second: for the tests
(tests/fixtures_prometheus.py) and `make demo`."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from spillway.testing.agentproc import free_port


class PrometheusProcess:
    """`prometheus` on a free loopback port with a 1 s scrape interval and a temporary TSDB."""

    def __init__(self, workdir: Path, *, new_session: bool = False) -> None:
        self.workdir = workdir
        self.new_session = new_session  # its own process group (the demo stops groups)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sd_file = workdir / "targets.json"
        self.log_path = workdir / "prometheus.log"
        self._targets: list[dict[str, object]] = []
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: run hack/system-deps.sh (Debian package prometheus)")
        self.sd_file.write_text("[]")
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: models\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n"
            f"    file_sd_configs:\n      - files: ['{self.sd_file}']\n        refresh_interval: 1s\n"
        )
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=self.new_session,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready in {timeout:.0f} s: {self.log_path.read_text()[-2000:]}")

    def add_target(self, host_port: str, labels: Mapping[str, str] | None = None) -> None:
        self._targets.append({"targets": [host_port], "labels": dict(labels or {})})
        tmp = self.sd_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._targets))
        tmp.replace(self.sd_file)

    def query(self, promql: str) -> list[dict[str, object]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        return list(body["data"]["result"])

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[dict[str, object]]:
        """A range query's matrix: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        url = f"{self.url}/api/v1/query_range?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = json.loads(resp.read())
        return list(body["data"]["result"])

    def wait_for_series(self, promql: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.query(promql):
                return
            time.sleep(0.5)
        raise TimeoutError(f"no series for {promql} after {timeout:.0f} s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None
