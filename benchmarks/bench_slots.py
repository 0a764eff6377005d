"""Slot API host cost: how long `SlotStore.store` / `load` keep the calling thread busy for one
batch of 1,024 blocks, beside the bare torch kernels the call ends in (measured the same way in
the same run). Goal (issue 11): at most 30 us per call.

On a GPU the copies are asynchronous, so the figure is the host time to validate the ids and
queue the kernels (the GPU time is `datapath`'s business); blocks are 16 KiB. On the CPU the
copy itself runs inside the call, so blocks are 64 bytes (the copy is a few microseconds) and
the overhead is reported as ours minus the bare kernels.

    python -m benchmarks slots
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from spillway.client import HostMemory
from spillway.client.arena import Tier
from spillway.client.store import BlockStore

N_BLOCKS = 1024
GOAL_US = 30.0


def _per_call_us(fn: Callable[[], object], dev: torch.device, calls: int, rounds: int) -> float:
    """Median over rounds of (host time of `calls` calls) / calls, synchronizing between rounds."""
    for _ in range(20):
        fn()
    out = []
    for _ in range(rounds):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return statistics.median(out)


def run(calls: int, rounds: int) -> list[tuple[str, float, float]]:
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if gpu else torch.device("cpu")
    block = 16 << 10 if gpu else 64
    slots_total = 4 * N_BLOCKS
    peer = BlockStore(
        Tier("cuda" if gpu else "simulated-cpu", dev, fixed_bytes=slots_total * block + (1 << 20)),
        Tier("host", torch.device("cpu")),
    )
    stores = {"lent (same device)": peer.slots(block, slots_total), "host": HostMemory().slots(block, slots_total)}
    pool = torch.randint(0, 100, (slots_total, block // 8), dtype=torch.int64, device=dev)
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(rng.permutation(slots_total)[:N_BLOCKS].astype(np.int64))  # scattered pool rows
    results = []
    for name, slots in stores.items():
        ids = slots.alloc(N_BLOCKS)  # contiguous, as alloc gives them
        scattered = torch.from_numpy(rng.permutation(slots_total)[:N_BLOCKS].astype(np.int64))
        store_us = _per_call_us(lambda s=slots, i=ids: s.store(pool, rows, i), dev, calls, rounds)
        load_us = _per_call_us(lambda s=slots, i=ids: s.load(pool, rows, i), dev, calls, rounds)
        scat_us = _per_call_us(lambda s=slots, i=scattered: s.store(pool, rows, i), dev, calls, rounds)
        results += [(f"store, {name}", store_us, 0.0), (f"load, {name}", load_us, 0.0),
                    (f"store to scattered slots, {name}", scat_us, 0.0)]
    # the bare kernels the same-device calls end in (rows already on the device)
    target = torch.empty((slots_total, block // 8), dtype=torch.int64, device=dev)
    rows_dev = rows.to(dev)
    bare_store = _per_call_us(lambda: torch.index_select(pool, 0, rows_dev, out=target[:N_BLOCKS]), dev, calls, rounds)
    bare_load = _per_call_us(lambda: pool.index_copy_(0, rows_dev, target[:N_BLOCKS]), dev, calls, rounds)
    results = [(n, us, us - (bare_store if n.startswith("store, lent") else bare_load if n.startswith("load, lent")
                             else float("nan"))) for n, us, _ in results]
    results += [("bare index_select (gather)", bare_store, 0.0), ("bare index_copy_ (scatter)", bare_load, 0.0)]
    return results


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_slots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=200, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (the median is reported)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    label = torch.cuda.get_device_name(0) if gpu else f"CPU only, no GPU ({platform.processor() or platform.machine()})"
    print(f"device: {label}; {N_BLOCKS} blocks of {'16Ki' if gpu else '64'} B per call, pool rows scattered")
    print(f"{'call':<44} {'host us/call':>13} {'over bare kernel':>17}")
    for name, us, over in run(args.calls, args.rounds):
        extra = "" if over == 0.0 or over != over else f"{over:17.1f}"
        print(f"{name:<44} {us:13.1f} {extra}")
    print(f"goal: <= {GOAL_US:.0f} us of host time per call for {N_BLOCKS} blocks "
          f"({'as measured' if gpu else 'on the CPU, read the overhead column: the copy runs inside the call'})")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
