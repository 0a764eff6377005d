"""`python -m toy_server`: serve the toy model on HTTP.

Where swapped KV contexts go:
  --swap env    the lease the device plugin put in the environment (SPILLWAY_LEASE_*), else
                host memory (PeerMemory.from_env with the HostMemory fallback)
  --swap agent  an ELASTIC lease acquired from --agent-socket (--lease-size, --near-gpu)
  --swap host   pinned host memory (HostMemory), the baseline
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import torch

from spillway import logging as slog
from spillway.client import HostMemory, PeerMemory

from . import PRESETS, Decoder, EngineConfig, ToyServer, preset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy_server", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="toy", help="served model name (the model_name metric label)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--kv-blocks", type=int, default=256, help="local KV budget in blocks of 16 tokens")
    p.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens per request per round")
    p.add_argument("--round-blocks", type=int, default=0, help="KV blocks a round's batch may hold (0: half)")
    p.add_argument("--swap-blocks", type=int, default=0, help="swap slots (0: as many as the lease holds)")
    p.add_argument("--model", choices=sorted(PRESETS), default="tiny", help="model shape (random weights)")
    p.add_argument("--d-model", type=int, default=0, help="override the model's d_model")
    p.add_argument("--layers", type=int, default=0, help="override the model's layer count")
    p.add_argument("--swap", choices=("env", "agent", "host"), default="env")
    p.add_argument("--agent-socket", default="/run/spillway/agent.sock")
    p.add_argument("--lease-size", default="1Gi", help="ELASTIC lease size for --swap agent")
    p.add_argument("--near-gpu", default="", help="borrower GPU UUID: lease from an NVLink peer of it")
    return p


def open_swap(args: argparse.Namespace) -> PeerMemory:
    if args.swap == "host":
        return HostMemory()
    if args.swap == "agent":
        return PeerMemory.acquire(
            args.agent_socket, args.lease_size, holder=f"toy-server/{args.model_name}", near_gpu_uuid=args.near_gpu
        )
    return PeerMemory.from_env()  # keeps the holder the operator gave the lease


async def serve(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Decoder(preset(args.model, d_model=args.d_model, n_layers=args.layers), device, dtype)
    swap = open_swap(args)
    server = ToyServer(
        model,
        swap,
        EngineConfig(
            kv_blocks=args.kv_blocks,
            prefill_chunk=args.prefill_chunk,
            round_blocks=args.round_blocks,
            swap_blocks=args.swap_blocks,
        ),
        model_name=args.model_name,
    )
    await server.start(args.port, args.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
        swap.close()


def main() -> None:
    args = build_parser().parse_args()
    slog.setup()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
