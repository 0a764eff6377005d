"""`make demo` end to end (hack/demo.py, a short version: 10 s SLO windows).

The demo runs the SLO loop for real: the loaded tenant goes from SLO met to missed and back,
its ELASTIC peer memory rises and falls, and the PNG is written. Then it is interrupted the way
a terminal does it (SIGINT to its process group for Ctrl-C; SIGHUP when the terminal closes;
SIGTERM from a supervisor), and no process it started is left: every one of them is found by a
marker in its environment (inherited by every descendant, whatever process group or session it
put itself in) as well as by the process tree seen while it ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import pytest

from spillway.testing.cluster import ensure_binaries

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack"))

from demo_chart import BLUE, ORANGE, RED, demo_chart  # noqa: E402
from demo_procs import descendants  # noqa: E402

GIB = 1 << 30


class DemoRun:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.mark = uuid.uuid4().hex
        self.log = tmp_path / "demo.out"
        env = dict(os.environ, PYTHONPATH=str(REPO), SPILLWAY_DEMO_DIR=str(tmp_path / "demo"),
                   SPILLWAY_DEMO_TEST_MARK=self.mark)
        with self.log.open("wb") as f:
            # Its own session, as a shell gives a foreground job its own process group.
            self.proc = subprocess.Popen([sys.executable, str(REPO / "hack" / "demo.py"), *args], stdout=f,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(REPO),
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None:
                pytest.fail(f"the demo exited ({self.proc.returncode}) before {text!r}:\n{out[-6000:]}")
            time.sleep(1)
        self.proc.kill()
        pytest.fail(f"no {text!r} in {timeout:.0f} s:\n{self.output()[-6000:]}")

    def marked(self) -> set[int]:
        """Live processes that carry this run's marker in their environment."""
        needle = f"SPILLWAY_DEMO_TEST_MARK={self.mark}".encode()
        found = set()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in Path(entry.path, "environ").read_bytes() and \
                        Path(entry.path, "stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
                    found.add(int(entry.name))
            except OSError:
                continue
        return found

    def close(self) -> None:
        """After a failed check: stop the demo all the same (it would outlive the test); never
        after a passed one, where it would hide what the demo left behind."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.marked():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def interrupt(self, sig: signal.Signals, *, group: bool) -> tuple[set[int], str]:
        """Sends `sig` (to the demo's process group, as a terminal does, or to the demo alone),
        waits for the demo to exit; returns what was running just before, and the output."""
        running = set(descendants(self.proc.pid)) | self.marked()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"the demo did not stop in 180 s after {sig.name}:\n{self.output()[-6000:]}")
        return running, self.output()


def assert_nothing_left(run: DemoRun, running: set[int], out: str) -> None:
    assert running, "saw none of the demo's processes while it ran"
    time.sleep(0.5)
    left = run.marked()
    alive = {p for p in running if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"}
    details = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:200] for p in left | alive
               if Path(f"/proc/{p}").exists()}
    assert not left and not alive, f"left running after the demo stopped: {details}\n{out[-3000:]}"
    assert "stopping everything the demo started" in out, out[-3000:]
    assert "processes of the demo left: 0" in out, out[-3000:]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_runs_the_slo_loop_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    ensure_binaries()
    png = tmp_path / "slo-loop.png"
    run = DemoRun(tmp_path, "--slo-window", "10s", "--png", str(png))
    try:
        check_the_loop(run, png)
        running, out = run.interrupt(signal.SIGINT, group=True)  # Ctrl-C
    except BaseException:
        run.close()  # a failed check must not leave the demo running
        raise
    assert len(running) >= 8, running  # control plane, agent, operator, Prometheus, 3 model servers, load
    assert "SIGINT received" in out
    assert_nothing_left(run, running, out)


def tenant_tables(out: str, tenant: str) -> list[list[str]]:
    """The tenant's row of every `kubectl get inferencetenants` table the demo printed."""
    rows = []
    for chunk in out.split("$ kubectl get inferencetenants -n default\n")[1:]:
        table = chunk.split("\n\n", 1)[0].splitlines()
        rows += [line.split() for line in table if line.split()[:1] == [tenant]]
    return rows


def check_the_loop(run: DemoRun, png: Path) -> None:
    out = run.wait_for("Press Ctrl-C", timeout=1200)
    line = next(x for x in out.splitlines() if x.startswith("demo-timeline: "))
    timeline = json.loads(line.split(": ", 1)[1])["timeline"]
    states = [r["state"] for r in timeline]
    met = states.index("Met")
    missed = states.index("Missed", met)
    met_again = states.index("Met", missed)
    assert met < missed < met_again, timeline
    elastic = [r["elasticBytes"] for r in timeline]
    peak = max(elastic)
    assert elastic[met] == 0 and peak >= 2 * GIB, timeline
    assert elastic.index(peak) >= missed and elastic[-1] == 0, timeline
    assert all(r["ttft"] and r["tbt"] for r in timeline[met:]), timeline  # kubectl get columns filled
    assert "PeerMemoryGrown" in out and "PeerMemoryShrunk" in out, out[-6000:]
    # NAME REPLICAS READY PHASE PEER-MEM TTFT-P99 TBT-P99 SLO AGE
    rows = tenant_tables(out.split("==> light load", 1)[1], "chat")  # the loop's tables
    assert [r[7] for r in rows] == ["Met", "Missed", "Met"], rows
    assert all(r[5][-1] == "s" and r[6][-1] == "s" for r in rows), rows
    assert rows[1][4] != rows[0][4] == rows[2][4], rows  # PEER-MEM grew, then went back
    assert f"{png}" in out
    # The DRA driver's slice beside the pool; the operator (allocation auto) placed chat through a
    # ResourceClaim that kube-scheduler allocated on a lender GPU; the claims table beside the tenants.
    assert "allocation dra" in out
    slices = out.split("$ kubectl get resourceslices -o wide", 1)[1].split("$ ", 1)[0]
    assert len([line for line in slices.strip().splitlines()[1:] if "peer-hbm.spillway.dev" in line]) == 1, slices
    table = out.split("$ kubectl get resourceclaims -A -o custom-columns=", 1)[1].split("$ ", 1)[0]
    assert re.search(r"chat-0-peer-hbm\s+chat\s+\S+\s+gpu-[0-9a-f-]+\s+8589934592\s+chat-0", table), table
    claims = out.split("$ kubectl get resourceclaims -A\n", 1)[1].split("$ ", 1)[0]
    assert re.search(r"chat-0-peer-hbm\s+allocated,reserved", claims), claims
    allocation = out.split("$ kubectl get resourceclaim chat-0-peer-hbm", 1)[1].split("$ ", 1)[0]
    assert '"consumedCapacity":{"memory":"8589934592"}' in allocation, allocation
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1200, 760)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("sig", "group"), [(signal.SIGHUP, True), (signal.SIGTERM, False)],
                         ids=["terminal-closed", "sigterm"])
def test_an_interrupt_while_starting_stops_everything(tmp_path: Path, sig: signal.Signals, group: bool) -> None:
    ensure_binaries()
    run = DemoRun(tmp_path, "--slo-window", "10s", "--png", str(tmp_path / "x.png"))
    try:
        run.wait_for("starting Prometheus", timeout=300)  # control plane, node and agent up
        running, out = run.interrupt(sig, group=group)
    except BaseException:
        run.close()
        raise
    assert run.proc.returncode == 130, out[-3000:]
    assert f"{sig.name} received" in out
    assert_nothing_left(run, running, out)


SPAWNER = r"""
import os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from demo_procs import become_subreaper, descendants, stop_tree
assert become_subreaper()
# A child in a session of its own that starts a child, daemonises a grandchild (double fork and
# setsid: it leaves the child's process group and is re-parented) and exits.
code = (
    "import os, subprocess, time\n"
    "subprocess.Popen(['sleep', '300'])\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(300)\n"
    "    os._exit(0)\n"
    "time.sleep(0.5)\n"
)
subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
# And one that ignores SIGTERM.
subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 300 & wait"], start_new_session=True)
time.sleep(2)
print(sorted(descendants(os.getpid())), flush=True)
groups, left = stop_tree(grace=1.0)
print(groups, left, sorted(descendants(os.getpid())), flush=True)
"""


@pytest.mark.timeout(60)
def test_stop_tree_stops_every_process_group_below_it() -> None:
    res = subprocess.run([sys.executable, "-c", SPAWNER, str(REPO / "hack")], capture_output=True, text=True,
                         timeout=50)
    assert res.returncode == 0, res.stderr
    before, after = res.stdout.strip().splitlines()
    pids = json.loads(before)
    assert len(pids) >= 4, pids  # two sleeps, the daemon, bash (the first child has exited)
    groups, left, rest = after.split(" ", 2)
    assert int(groups) >= 3 and int(left) == 0 and json.loads(rest) == []
    assert not [p for p in pids if Path(f"/proc/{p}").exists()
                and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"]


def test_the_picture_is_a_png_of_the_points_given(tmp_path: Path) -> None:
    t0 = 1_000.0
    ttft = [(t0 + i, 0.2 if i < 50 or i > 100 else 3.0) for i in range(150)]
    reserved = [(t0 + i, 8.0 * GIB) for i in range(150)]
    elastic = [(t0 + i, (2.0 * GIB if 60 < i < 120 else 0.0)) for i in range(150)]
    path = demo_chart(tmp_path / "x.png", tenant="chat", ttft=ttft, objective=1.0, reserved=reserved,
                      elastic=elastic, phases=[(t0 + 50, "LOAD UP")], t0=t0, t1=t0 + 150, note="TEST")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    raw = zlib.decompress(data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8])
    assert len(raw) == h * (1 + 3 * w)
    row = 1 + 3 * w
    pixels = {bytes(raw[y * row + 1 + 3 * x:y * row + 4 + 3 * x]) for y in range(h) for x in range(w)}
    for color in (BLUE, RED, ORANGE):  # the TTFT line, the objective, the ELASTIC line
        assert bytes(color) in pixels
