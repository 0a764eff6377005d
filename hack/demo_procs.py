"""Process groups for `make demo`: whatever the demo starts is stopped when it stops.

The demo makes itself a *child subreaper* (Linux prctl PR_SET_CHILD_SUBREAPER): a process it
starts, however deep, that loses its parent is re-parented to the demo instead of to init, so
every process the demo started stays in its process tree until it is gone. Each child runs in
a process group of its own (`start_new_session=True`), and at the end `stop_tree` signals the
process group of every process found in that tree (read from /proc, not from a list kept on
the side, which misses grandchildren and anything started by a library): SIGTERM, a grace
period, then SIGKILL, until nothing is left.

`Signals` turns SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed) into an exception in
the main thread, so the demo's `finally` runs whichever arrives and whenever; a second signal
while stopping is noted and ignored, so an impatient Ctrl-C cannot cut the cleanup short.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def become_subreaper() -> bool:
    """Orphaned descendants become our children (Linux 3.4+); False where that is not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class Signals:
    """SIGINT, SIGTERM, SIGHUP -> `Interrupted` while running; noted and ignored while stopping."""

    def __init__(self, note: Callable[[str], None]) -> None:
        self.note = note
        self.received: list[str] = []
        self.stopping = False

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if self.stopping:
            self.note(f"{name} received: already stopping everything, please wait")
            return
        self.stopping = True
        raise Interrupted(signum)


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) for every live process."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = stat.rsplit(")", 1)[-1].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendants(root: int) -> dict[int, int]:
    """pid -> process group of every live (not zombie) process below `root`."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        ppid, pgid, state = table[pid]
        if state != "Z":
            out[pid] = pgid
        todo.extend(children.get(pid, []))
    return out


def _reap() -> None:
    """Collect exited children (orphans re-parented to us included), so they leave /proc."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_tree(grace: float = 10.0, root: int | None = None) -> tuple[int, int]:
    """Stops every process below `root` (default: this one) by process group: SIGTERM, then
    SIGKILL after `grace` seconds. Returns (process groups signalled, processes left: 0)."""
    root = os.getpid() if root is None else root
    own = os.getpgrp()
    groups: set[int] = set()
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while True:
        _reap()
        procs = descendants(root)
        if not procs:
            return len(groups), 0
        if time.monotonic() >= deadline:
            sig = signal.SIGKILL
        for pid, pgid in procs.items():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if pgid != own:
                    groups.add(pgid)
                    os.killpg(pgid, sig)
                else:  # a child that stayed in our own group: signal it alone
                    os.kill(pid, sig)
        if sig == signal.SIGKILL:
            time.sleep(0.2)
            _reap()
            left = descendants(root)
            if not left or time.monotonic() > deadline + 5:
                return len(groups), len(left)
        else:
            time.sleep(0.25)
