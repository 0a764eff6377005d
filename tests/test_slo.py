"""SLO math (pure) and the Prometheus side of SLO feedback against a real Prometheus."""

from __future__ import annotations

import math

import pytest

from spillway.operator import slo
from tests.fixtures_prometheus import HistogramServer, PrometheusProcess, expected_quantile

BUCKETS = [(0.1, 50.0), (0.25, 80.0), (0.5, 95.0), (1.0, 99.0), (math.inf, 100.0)]


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    assert slo.quantile_from_buckets(0.5, BUCKETS) == pytest.approx(0.1)
    assert slo.quantile_from_buckets(0.65, BUCKETS) == pytest.approx(0.1 + 0.15 * 15 / 30)
    assert slo.quantile_from_buckets(0.99, BUCKETS) == pytest.approx(1.0)
    # Above the last finite bucket Prometheus reports that bound.
    assert slo.quantile_from_buckets(0.999, BUCKETS) == pytest.approx(1.0)
    assert slo.quantile_from_buckets(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert slo.quantile_from_buckets(0.5, []) is None


def test_attainment_reads_the_bucket_at_or_just_above_the_target() -> None:
    assert slo.attainment_from_buckets(0.25, BUCKETS) == (pytest.approx(0.8), 0.25)
    assert slo.attainment_from_buckets(0.3, BUCKETS) == (pytest.approx(0.95), 0.5)
    assert slo.attainment_from_buckets(0.05, BUCKETS) == (pytest.approx(0.5), 0.1)
    assert slo.attainment_from_buckets(5.0, BUCKETS) == (pytest.approx(1.0), math.inf)
    assert slo.attainment_from_buckets(0.3, [(math.inf, 0.0)]) is None


def _obs(name: str, target: float, observed: float | None, att: float | None) -> slo.SloObservation:
    return slo.SloObservation(name, target, observed, att, 0.5 if att is not None else None, 100.0)


def test_evaluate_met_missed_and_no_traffic() -> None:
    met = slo.evaluate([_obs("ttft", 0.5, 0.2, 0.999), _obs("tbt", 0.05, 0.02, 1.0)], 99, 0.99)
    assert met.met is True and met.slack is True and met.reason == "SLOMet"
    tight = slo.evaluate([_obs("ttft", 0.5, 0.4, 0.995)], 99, 0.99)
    assert tight.met is True and tight.slack is False
    missed = slo.evaluate([_obs("ttft", 0.5, 0.8, 0.9), _obs("tbt", 0.05, 0.02, 1.0)], 99, 0.99)
    assert missed.met is False and "ttft p99 800ms > 500ms" in missed.message and "attainment 0.9000" in missed.message
    assert slo.evaluate([_obs("ttft", 0.5, None, None)], 99, 0.99).met is None


def test_peer_memory_step_grows_to_the_limit_and_shrinks_only_with_slack_and_demand() -> None:
    gib = slo.GIB
    missed = slo.SloVerdict(False, "SLOMissed", "", False)
    slack = slo.SloVerdict(True, "SLOMet", "", True)
    tight = slo.SloVerdict(True, "SLOMet", "", False)
    assert slo.peer_memory_step(held_bytes=4 * gib, elastic_bytes=0, limit_bytes=8 * gib, verdict=missed,
                                pool_wanted=False) == gib
    assert slo.peer_memory_step(held_bytes=int(7.5 * gib), elastic_bytes=0, limit_bytes=8 * gib, verdict=missed,
                                pool_wanted=False) == gib // 2
    assert slo.peer_memory_step(held_bytes=8 * gib, elastic_bytes=4 * gib, limit_bytes=8 * gib, verdict=missed,
                                pool_wanted=True) == 0
    assert slo.peer_memory_step(held_bytes=6 * gib, elastic_bytes=2 * gib, limit_bytes=8 * gib, verdict=slack,
                                pool_wanted=True) == -gib
    assert slo.peer_memory_step(held_bytes=6 * gib, elastic_bytes=2 * gib, limit_bytes=8 * gib, verdict=slack,
                                pool_wanted=False) == 0
    assert slo.peer_memory_step(held_bytes=6 * gib, elastic_bytes=2 * gib, limit_bytes=8 * gib, verdict=tight,
                                pool_wanted=True) == 0
    assert slo.peer_memory_step(held_bytes=4 * gib, elastic_bytes=0, limit_bytes=8 * gib, verdict=slack,
                                pool_wanted=True) == 0


TTFT_SHARES = {0.05: 0.30, 0.1: 0.40, 0.25: 0.20, 0.5: 0.07, 1.0: 0.02, 2.5: 0.01}
TBT_SHARES = {0.01: 0.50, 0.025: 0.45, 0.05: 0.05}


@pytest.mark.slow
async def test_observe_against_real_prometheus(
    prometheus: PrometheusProcess, histogram_server: HistogramServer
) -> None:
    histogram_server.set_histogram(slo.DEFAULT_TTFT_METRIC, TTFT_SHARES, per_second=200)
    histogram_server.set_histogram(slo.DEFAULT_TBT_METRIC, TBT_SHARES, per_second=1000)
    prometheus.add_target(histogram_server.address, {"namespace": "team-a", "pod": "chat-0"})
    # A second tenant's series must not leak into the first one's figures.
    other = HistogramServer()
    other.start()
    try:
        other.set_histogram(slo.DEFAULT_TTFT_METRIC, {5.0: 1.0}, per_second=500)
        prometheus.add_target(other.address, {"namespace": "team-a", "pod": "other-0"})
        sel = slo.selector_for(slo.DEFAULT_SELECTOR, "team-a", "chat")
        prometheus.wait_for_series(
            f'count_over_time({slo.DEFAULT_TTFT_METRIC}_count{{{sel}}}[30s]) >= 12', timeout=60
        )
        client = slo.PrometheusClient(prometheus.url)
        try:
            ttft = await slo.observe(client, slo.SloTarget("ttft", slo.DEFAULT_TTFT_METRIC, 0.2), selector=sel,
                                     percentile=99, window_s=10)
            tbt = await slo.observe(client, slo.SloTarget("tbt", slo.DEFAULT_TBT_METRIC, 0.025), selector=sel,
                                    percentile=90, window_s=10)
            with pytest.raises(slo.PrometheusError, match="refused"):
                await client.query("sum(rate(")
        finally:
            await client.close()
    finally:
        other.stop()
    assert ttft.observed_s == pytest.approx(expected_quantile(0.99, TTFT_SHARES), rel=0.02)
    assert ttft.attainment == pytest.approx(0.90, abs=0.005)  # 0.2 s target: read at 0.25 s, 30+40+20 %
    assert ttft.bucket_le == 0.25
    assert ttft.requests == pytest.approx(2000, rel=0.15)
    assert tbt.observed_s == pytest.approx(expected_quantile(0.90, TBT_SHARES), rel=0.02)
    assert tbt.attainment == pytest.approx(0.95, abs=0.005)
    assert tbt.bucket_le == 0.025
    verdict = slo.evaluate([ttft, tbt], 99, 0.99)
    assert verdict.met is False


async def test_prometheus_unreachable_is_a_clear_error() -> None:
    client = slo.PrometheusClient("http://127.0.0.1:9", timeout_s=2)
    try:
        with pytest.raises(slo.PrometheusError, match="cannot query Prometheus"):
            await client.query("up")
    finally:
        await client.close()
