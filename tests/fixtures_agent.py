"""Pytest fixture `agent`: a started AgentProcess (a real agent subprocess, simulated GPUs)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from spillway.testing.agentproc import AgentProcess


@pytest.fixture
def agent() -> Iterator[AgentProcess]:
    proc = AgentProcess()
    proc.start()
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() not in (None, 0, -15):
            print(proc.logs()[-4000:])
        proc.cleanup()
