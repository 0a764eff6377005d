"""A model server for Spillway's demo, tests and benchmarks.

Random-weight Llama-shaped decoder (`model`: the `tiny` configuration for CPUs, `llama3-8b`
for a GPU), a fair time-sharing engine that runs each round's batch in one forward and swaps
KV contexts through `spillway.client`'s slot API with prefetch (`engine`), and an
OpenAI-style streaming HTTP API with vLLM-named metrics (`server`). Run it:
`PYTHONPATH=.:examples python -m toy_server --help`.
"""

from .engine import ContextTooLong, Engine, EngineConfig, EngineEvent, SwapStats
from .model import BLOCK_TOKENS, PRESETS, Chunk, Decoder, ModelConfig, decode, encode, preset
from .server import Metrics, ToyServer

__all__ = [
    "BLOCK_TOKENS",
    "PRESETS",
    "Chunk",
    "ContextTooLong",
    "Decoder",
    "Engine",
    "EngineConfig",
    "EngineEvent",
    "Metrics",
    "ModelConfig",
    "SwapStats",
    "ToyServer",
    "decode",
    "encode",
    "preset",
]
