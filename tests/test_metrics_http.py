import aiohttp
from prometheus_client import CollectorRegistry, Counter

from spillway.metrics import HttpEndpoint


async def test_metrics_health_and_readiness_on_a_real_socket() -> None:
    registry = CollectorRegistry()
    Counter("spillway_test_things", "things", registry=registry).inc(3)
    reason = "agent unreachable"
    endpoint = HttpEndpoint(registry, ready=lambda: reason)
    port = await endpoint.start(0, "127.0.0.1")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200
                assert "spillway_test_things_total 3.0" in await r.text()
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503
                assert "agent unreachable" in await r.text()
            reason = ""
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 200
    finally:
        await endpoint.stop()
