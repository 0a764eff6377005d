#!/usr/bin/env python3
"""The demo's load generator: open-loop completion requests to the example model servers.

    python hack/demo_load.py --control load.json

`load.json` (re-read whenever it changes, so the demo turns the load up and down while this
runs): {"targets": {"<name>": {"url": "http://127.0.0.1:PORT", "rate": <requests per second>}},
"prompt_words": 48, "max_tokens": 16}. Requests arrive as a Poisson process at each target's
rate whether or not earlier ones have finished (open loop, as users do), at most
`--max-in-flight` per target (arrivals beyond it are counted as dropped). The latencies are the
servers' own histograms (vLLM's names), read by Prometheus; this only prints counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

WORDS = ("spill", "way", "lends", "idle", "memory", "to", "the", "tenants", "that", "need", "it", "over", "nvlink")


@dataclass
class Target:
    name: str
    url: str
    rate: float = 0.0
    in_flight: int = 0
    sent: int = 0
    done: int = 0
    failed: int = 0
    dropped: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass
class Control:
    targets: dict[str, tuple[str, float]]
    prompt_words: int = 48
    max_tokens: int = 16


def read_control(path: Path) -> Control:
    """The control file; a clear error names what to fix."""
    try:
        raw: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the load control file: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("targets"), dict):
        raise ValueError(f'{path}: expected {{"targets": {{"<name>": {{"url": ..., "rate": ...}}}}}}')
    targets: dict[str, tuple[str, float]] = {}
    for name, t in raw["targets"].items():
        if not isinstance(t, dict) or not isinstance(t.get("url"), str):
            raise ValueError(f"{path}: target {name!r} needs a url")
        rate = t.get("rate", 0.0)
        if not isinstance(rate, int | float) or not 0 <= rate <= 1000:
            raise ValueError(f"{path}: target {name!r}: rate must be 0..1000 requests per second, not {rate!r}")
        targets[str(name)] = (t["url"], float(rate))
    words, tokens = raw.get("prompt_words", 48), raw.get("max_tokens", 16)
    if not isinstance(words, int) or not 1 <= words <= 2000 or not isinstance(tokens, int) or not 1 <= tokens <= 512:
        raise ValueError(f"{path}: prompt_words must be 1..2000 and max_tokens 1..512")
    return Control(targets, words, tokens)


async def request(session: aiohttp.ClientSession, t: Target, control: Control, rng: random.Random) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(control.prompt_words))
    t.in_flight += 1
    t.sent += 1
    try:
        async with session.post(f"{t.url}/v1/completions",
                                json={"prompt": prompt, "max_tokens": control.max_tokens}) as resp:
            await resp.read()
            if resp.status == 200:
                t.done += 1
            else:
                t.failed += 1
    except (aiohttp.ClientError, TimeoutError):
        t.failed += 1
    finally:
        t.in_flight -= 1


async def drive(session: aiohttp.ClientSession, t: Target, state: dict[str, Control], max_in_flight: int,
                rng: random.Random) -> None:
    pending: set[asyncio.Task[None]] = set()
    while True:
        if t.rate <= 0:
            await asyncio.sleep(0.2)
            continue
        await asyncio.sleep(rng.expovariate(t.rate))
        if t.rate <= 0:
            continue
        if t.in_flight >= max_in_flight:
            t.dropped += 1
            continue
        task = asyncio.create_task(request(session, t, state["control"], rng))
        pending.add(task)
        task.add_done_callback(pending.discard)


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    rng = random.Random(args.seed)
    targets: dict[str, Target] = {}
    state: dict[str, Control] = {}
    mtime = -1.0
    last_print = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        while not stop.is_set():
            try:
                m = args.control.stat().st_mtime
            except OSError:
                m = mtime
            if m != mtime:
                try:
                    control = read_control(args.control)
                except ValueError as exc:
                    print(f"load: {exc}", file=sys.stderr, flush=True)
                else:
                    mtime = m
                    state["control"] = control
                    for name, (url, rate) in control.targets.items():
                        t = targets.get(name)
                        if t is None:
                            t = targets[name] = Target(name, url)
                            t.task = asyncio.create_task(drive(session, t, state, args.max_in_flight, rng))
                        t.url, t.rate = url, rate
                    for name, t in targets.items():
                        if name not in control.targets:
                            t.rate = 0.0
                    print("load: " + ", ".join(f"{n} {t.rate:g}/s" for n, t in sorted(targets.items())), flush=True)
            if time.monotonic() - last_print >= args.report_every:
                last_print = time.monotonic()
                print("load: " + "; ".join(
                    f"{n}: sent {t.sent} done {t.done} failed {t.failed} dropped {t.dropped} in flight {t.in_flight}"
                    for n, t in sorted(targets.items())), flush=True)
            with_timeout = asyncio.create_task(stop.wait())
            await asyncio.wait({with_timeout}, timeout=0.5)
            with_timeout.cancel()
        for t in targets.values():
            if t.task is not None:
                t.task.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--control", type=Path, required=True, help="the JSON file with the targets and their rates")
    p.add_argument("--max-in-flight", type=int, default=256, help="per target; arrivals beyond it are dropped")
    p.add_argument("--report-every", type=float, default=10.0, help="seconds between count lines")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
