"""A small generative model server for Spillway's demo, tests and benchmarks.

Random-weight decoder (`model`), fair time-sharing engine that swaps KV contexts through
`spillway.client` (`engine`), OpenAI-style streaming HTTP API with vLLM-named metrics
(`server`). Run it: `PYTHONPATH=.:examples python -m toy_server --help`.
"""

from .engine import ContextTooLong, Engine, EngineConfig
from .model import BLOCK_TOKENS, ModelConfig, TinyDecoder, decode, encode
from .server import Metrics, ToyServer

__all__ = [
    "BLOCK_TOKENS",
    "ContextTooLong",
    "Engine",
    "EngineConfig",
    "Metrics",
    "ModelConfig",
    "TinyDecoder",
    "ToyServer",
    "decode",
    "encode",
]
