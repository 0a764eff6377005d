"""HTTP front of the toy server: OpenAI-style `/v1/completions` (streaming SSE or not),
`/v1/models`, and vLLM-named metrics on `/metrics`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from spillway.client import PeerMemory

from .engine import ContextTooLong, Engine, EngineConfig, Sequence
from .model import Decoder, decode, encode

log = logging.getLogger("toy_server")

# Bucket edges in the spirit of vLLM's own (seconds).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class Metrics:
    """vLLM's metric names (so dashboards, alerts and the operator's SLO feedback read this
    server like a vLLM one), plus Spillway's swap counters."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, lbl = self.registry, ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token in seconds.", lbl, buckets=TTFT_BUCKETS, registry=r
        ).labels(model_name)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive output tokens in seconds.",
            lbl,
            buckets=ITL_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token in seconds (the older name of the inter-token latency).",
            lbl,
            buckets=ITL_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End to end request latency in seconds.",
            lbl,
            buckets=E2E_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.running = Gauge("vllm:num_requests_running", "Requests being time-shared.", lbl, registry=r).labels(
            model_name
        )
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests not yet admitted.", lbl, registry=r).labels(
            model_name
        )
        self.swapped = Gauge(
            "vllm:num_requests_swapped", "Requests whose KV context is swapped out.", lbl, registry=r
        ).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", lbl, registry=r).labels(
            model_name
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens produced.", lbl, registry=r
        ).labels(model_name)
        self.success = Counter(
            "vllm:request_success", "Requests finished.", ["model_name", "finished_reason"], registry=r
        )
        self.swap_bytes = Counter(
            "spillway_client_swap_bytes",
            "KV bytes swapped, by direction and tier.",
            ["model_name", "direction", "tier"],
            registry=r,
        )
        self.swap_seconds = Histogram(
            "spillway_client_swap_duration_seconds",
            "Time to swap one context out or in.",
            ["model_name", "direction", "tier"],
            registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.model_name = model_name

    def on_swap(self, direction: str, tier: str, nbytes: int, seconds: float) -> None:
        self.swap_bytes.labels(self.model_name, direction, tier).inc(nbytes)
        self.swap_seconds.labels(self.model_name, direction, tier).observe(seconds)


@dataclass
class _Token:
    token: int | None
    finish: str
    error: str
    at: float


class ToyServer:
    def __init__(self, model: Decoder, swap: PeerMemory, cfg: EngineConfig, *, model_name: str = "toy") -> None:
        self.model_name = model_name
        self.metrics = Metrics(model_name)
        self.engine = Engine(model, swap, cfg, on_swap=self.metrics.on_swap)
        self.swap = swap
        self._wake = asyncio.Event()
        self._open = asyncio.Event()  # rounds run while set (see `hold`)
        self._open.set()
        self._submitted = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._round: asyncio.Future[int] | None = None  # the round running in a worker thread
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- engine loop -------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self.engine.has_work:
                self._wake.clear()
                await self._wake.wait()
            await self._open.wait()
            self.metrics.waiting.set(self.engine.waiting)
            self._round = asyncio.ensure_future(asyncio.to_thread(self.engine.run_round))
            produced = await asyncio.shield(self._round)
            self.metrics.generation_tokens.inc(produced)
            self.metrics.running.set(len(self.engine.active))
            self.metrics.swapped.set(self.engine.swapped_count)

    def hold(self) -> None:
        """Stop starting rounds (requests queue up) until `release`: a benchmark submits every
        request first, so each run admits them in the same round and order."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def queued(self, n: int) -> None:
        """Return once `n` requests wait for admission (while held: every request sent so far)."""
        async with self._submitted:
            await self._submitted.wait_for(lambda: self.engine.waiting >= n)

    # ---- HTTP --------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> int:
        self._task = asyncio.create_task(self._loop())
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("toy server listening", extra={"port": self.port, "swap_tier": self.swap.device_kind})
        return self.port

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._round is not None:  # a thread cannot be cancelled: let its round finish
            await asyncio.gather(self._round, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        self.engine.close()

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "spillway-toy"}]}
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._error(400, "the body must be a JSON object")
        if not isinstance(body, dict):
            return self._error(400, "the body must be a JSON object")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            return self._error(400, "'prompt' must be a non-empty string")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return self._error(400, "'max_tokens' must be a positive integer")
        model = body.get("model", self.model_name)
        if model != self.model_name:
            return self._error(404, f"model {model!r} is not served here; this server serves {self.model_name!r}")
        stream = bool(body.get("stream", False))
        seed = body.get("seed")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Token] = asyncio.Queue()

        def emit(token: int | None, finish: str, error: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, _Token(token, finish, error, time.monotonic()))

        tokens = encode(prompt)
        try:
            seq = self.engine.submit(tokens, max_tokens, emit, seed=seed if isinstance(seed, int) else None)
        except (ContextTooLong, ValueError) as exc:
            return self._error(400, str(exc))
        self.metrics.prompt_tokens.inc(len(tokens))
        self._wake.set()
        async with self._submitted:
            self._submitted.notify_all()
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not stream:
            text: list[int] = []
            finish = ""
            async for tok in self._tokens(seq, queue):
                if tok.error:
                    return self._error(500, tok.error)
                if tok.token is not None:
                    text.append(tok.token)
                finish = tok.finish or finish
            return web.json_response(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": self.model_name,
                    "choices": [{"index": 0, "text": decode(text), "logprobs": None, "finish_reason": finish}],
                    "usage": {
                        "prompt_tokens": len(tokens),
                        "completion_tokens": len(text),
                        "total_tokens": len(tokens) + len(text),
                    },
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            async for tok in self._tokens(seq, queue):
                if tok.error:
                    await resp.write(f"data: {json.dumps({'error': {'message': tok.error}})}\n\n".encode())
                    break
                chunk: dict[str, Any] = {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": self.model_name,
                    "choices": [
                        {
                            "index": 0,
                            "text": decode([tok.token]) if tok.token is not None else "",
                            "logprobs": None,
                            "finish_reason": tok.finish or None,
                        }
                    ],
                }
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            seq.cancelled = True
            raise
        await resp.write_eof()
        return resp

    async def _tokens(self, seq: Sequence, queue: asyncio.Queue[_Token]) -> Any:
        """Yield the request's tokens as the engine makes them, observing TTFT and ITL."""
        last = 0.0
        try:
            while True:
                tok = await queue.get()
                if tok.token is not None:
                    if not last:
                        self.metrics.ttft.observe(tok.at - seq.arrival)
                    else:
                        self.metrics.itl.observe(tok.at - last)
                        self.metrics.tpot.observe(tok.at - last)
                    last = tok.at
                yield tok
                if tok.finish or tok.error:
                    if not tok.error:
                        self.metrics.e2e.observe(tok.at - seq.arrival)
                        self.metrics.success.labels(self.model_name, tok.finish).inc()
                    return
        finally:
            if not (seq.generated and len(seq.generated) >= seq.max_tokens):
                seq.cancelled = True
