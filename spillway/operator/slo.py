"""SLO feedback: observed latency percentiles and attainment from Prometheus histograms.

The math is pure (`quantile_from_buckets`, `attainment_from_buckets`, `evaluate`,
`peer_memory_step`, `targets_of`, `report`, `unknown`); `PrometheusClient` and `observe` do the
HTTP; `operator/growth.py` applies the verdicts.

Attainment is the share of requests faster than the target. A histogram only knows counts per
bucket, so it is read at the bucket whose upper bound is at or just above the target
(`le >= target`, the smallest such): with buckets ..., 0.25, 0.5, ... and a 0.3 s target, the
share under 0.5 s is reported, and `status.slo.<name>.bucket` says which bound was used.
The observed percentile is Prometheus's own `histogram_quantile` over the same window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from spillway.operator import model

# vLLM's histogram names (the model server's /metrics); InferenceTenant.spec.metrics overrides them.
DEFAULT_TTFT_METRIC = model.DEFAULT_TTFT_METRIC
DEFAULT_TBT_METRIC = model.DEFAULT_TBT_METRIC
# Prometheus's Kubernetes service discovery, relabelled the usual way, gives each model-server
# series `namespace` and `pod` labels; a tenant's pods are `<tenant>-<replica>`.
DEFAULT_SELECTOR = 'namespace="{namespace}",pod=~"{tenant}-[0-9]+"'


class PrometheusError(RuntimeError):
    """Prometheus could not be asked, or refused the query."""


Buckets = Sequence[tuple[float, float]]  # (upper bound `le`, cumulative count), any order


def _sorted(buckets: Buckets) -> list[tuple[float, float]]:
    return sorted((float(le), float(c)) for le, c in buckets)


def quantile_from_buckets(q: float, buckets: Buckets) -> float | None:
    """The q-quantile (0..1) of a cumulative histogram, interpolated linearly inside the bucket
    as Prometheus's `histogram_quantile` does; None without observations."""
    bs = _sorted(buckets)
    if not bs or not math.isinf(bs[-1][0]):
        return None
    total = bs[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in bs:
        if count >= rank:
            if math.isinf(le):
                return prev_le  # the highest finite bound, as Prometheus reports it
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return bs[-2][0] if len(bs) > 1 else None


def attainment_from_buckets(target_s: float, buckets: Buckets) -> tuple[float, float] | None:
    """(share of observations at or under the bucket bound at or just above `target_s`, that bound);
    None without observations."""
    bs = _sorted(buckets)
    if not bs or not math.isinf(bs[-1][0]) or bs[-1][1] <= 0:
        return None
    total = bs[-1][1]
    for le, count in bs:
        if le >= target_s - 1e-12:
            return min(1.0, count / total), le
    return 1.0, math.inf  # pragma: no cover - +Inf always matches


@dataclass(frozen=True)
class SloTarget:
    name: str  # "ttft" or "tbt"
    metric: str  # histogram base name (without _bucket)
    target_s: float


@dataclass(frozen=True)
class SloObservation:
    name: str
    target_s: float
    observed_s: float | None  # the spec's percentile over the window; None without traffic
    attainment: float | None
    bucket_le: float | None  # the bucket bound attainment was read at
    requests: float  # observations in the window (rate * window)

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": format_seconds(self.target_s), "requests": round(self.requests, 3)}
        if self.observed_s is not None:
            out["observed"] = format_seconds(self.observed_s)
            out["observedSeconds"] = str(round(self.observed_s, 6))
        if self.attainment is not None:
            out["attainment"] = str(round(self.attainment, 6))
        if self.bucket_le is not None:
            out["bucket"] = "+Inf" if math.isinf(self.bucket_le) else str(self.bucket_le)
        return out


def format_seconds(seconds: float) -> str:
    """850ms, 1.25s: four significant digits."""
    if seconds < 1:
        return f"{seconds * 1000:.4g}ms"
    return f"{seconds:.4g}s"


@dataclass(frozen=True)
class SloVerdict:
    met: bool | None  # None: no traffic in the window, nothing to judge
    reason: str
    message: str
    slack: bool  # comfortably inside the SLO (observed at most half the target, attainment met)


def evaluate(observations: Sequence[SloObservation], percentile: float, attainment: float) -> SloVerdict:
    """An SLO is met when, for every latency with traffic, the observed percentile is at most
    its target and the attainment at least the spec's."""
    judged = [o for o in observations if o.observed_s is not None and o.attainment is not None]
    if not judged:
        return SloVerdict(None, "NoTraffic", "no requests in the SLO window", False)
    misses = []
    for o in judged:
        assert o.observed_s is not None and o.attainment is not None
        if o.observed_s > o.target_s + 1e-9:
            misses.append(f"{o.name} p{percentile:g} {format_seconds(o.observed_s)} > {format_seconds(o.target_s)}")
        if o.attainment + 1e-9 < attainment:
            misses.append(f"{o.name} attainment {o.attainment:.4f} < {attainment:g}")
    if misses:
        return SloVerdict(False, "SLOMissed", "; ".join(misses), False)
    slack = all(o.observed_s is not None and o.observed_s <= 0.5 * o.target_s for o in judged)
    parts = [
        f"{o.name} p{percentile:g} {format_seconds(o.observed_s or 0)} <= {format_seconds(o.target_s)}" for o in judged
    ]
    return SloVerdict(True, "SLOMet", "; ".join(parts), slack)


GIB = 1 << 30


def peer_memory_step(
    *,
    held_bytes: int,
    elastic_bytes: int,
    limit_bytes: int,
    verdict: SloVerdict,
    pool_wanted: bool,
    step_bytes: int = GIB,
) -> int:
    """Bytes of ELASTIC peer memory to add (> 0) or give back (< 0) this window.

    Grow by one step, up to the spec's limit, while the SLO is missed; shrink by one step (never
    below the reservation) when the SLO is met with slack and other tenants want the pool."""
    if verdict.met is False and held_bytes < limit_bytes:
        return min(step_bytes, limit_bytes - held_bytes)
    if verdict.met and verdict.slack and pool_wanted and elastic_bytes > 0:
        return -min(step_bytes, elastic_bytes)
    return 0


Condition = tuple[str, str, str]  # the SLOMet condition: (status, reason, message)


@dataclass(frozen=True)
class SloReport:
    """One SLO evaluation as the tenant's `status.slo` and SLOMet condition show it."""

    status: dict[str, Any]
    condition: Condition
    missed: bool = False


def targets_of(spec: model.TenantSpec) -> list[SloTarget]:
    """The latency targets a tenant sets (none, ttft, tbt or both)."""
    out = []
    if spec.ttft_s is not None:
        out.append(SloTarget("ttft", spec.ttft_metric, spec.ttft_s))
    if spec.tbt_s is not None:
        out.append(SloTarget("tbt", spec.tbt_metric, spec.tbt_s))
    return out


def unknown(reason: str, condition_message: str, status_message: str, now: str) -> SloReport:
    """No evaluation was possible (no targets, no Prometheus, Prometheus failed)."""
    return SloReport({"state": "Unknown", "message": status_message, "lastEvaluation": now},
                     ("Unknown", reason, condition_message))


def report(observations: Sequence[SloObservation], verdict: SloVerdict, now: str) -> SloReport:
    """`status.slo` and the SLOMet condition for an evaluation."""
    status: dict[str, Any] = {"lastEvaluation": now, "message": verdict.message}
    attainments = []
    for o in observations:
        if o.observed_s is not None:
            status[o.name] = format_seconds(o.observed_s)
            status[f"{o.name}Seconds"] = round(o.observed_s, 6)
        if o.attainment is not None:
            status[f"{o.name}Attainment"] = round(o.attainment, 6)
            attainments.append(o.attainment)
    status["requests"] = round(max((o.requests for o in observations), default=0.0), 3)
    if attainments:
        status["attainment"] = round(min(attainments), 6)
    bucket_notes = [f"{o.name} attainment read at the le={o.bucket_le:g} bucket" for o in observations
                    if o.bucket_le is not None]
    if bucket_notes:
        status["message"] = verdict.message + " (" + "; ".join(bucket_notes) + ")"
    if verdict.met is None:
        status["state"] = "Unknown"
        return SloReport(status, ("Unknown", verdict.reason, verdict.message))
    status["met"] = verdict.met
    status["state"] = "Met" if verdict.met else "Missed"
    return SloReport(status, ("True" if verdict.met else "False", verdict.reason, verdict.message),
                     missed=not verdict.met)


# --- I/O -----------------------------------------------------------------------------------


def selector_for(template: str, namespace: str, tenant: str) -> str:
    return template.format(namespace=namespace, tenant=tenant)


def window_range(window_s: float) -> str:
    """A PromQL range for a window in seconds (whole seconds, at least 1)."""
    return f"{max(1, math.ceil(window_s))}s"


class PrometheusClient:
    """The Prometheus HTTP API (instant queries)."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's vector result as (labels, value) pairs."""
        session = await self._http()
        try:
            async with session.get(f"{self.url}/api/v1/query", params={"query": promql}) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PrometheusError(f"cannot query Prometheus at {self.url}: {exc}") from exc
        if not isinstance(body, Mapping) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, Mapping) else body
            raise PrometheusError(f"Prometheus at {self.url} refused {promql!r}: {error}")
        data = body.get("data") or {}
        if data.get("resultType") == "scalar":
            return [({}, float(data["result"][1]))]
        out = []
        for item in data.get("result") or []:
            out.append((dict(item.get("metric") or {}), float(item["value"][1])))
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def observe(
    prom: PrometheusClient, target: SloTarget, *, selector: str, percentile: float, window_s: float
) -> SloObservation:
    """Observed percentile (Prometheus `histogram_quantile`) and attainment (bucket counts) of one
    latency histogram over the window."""
    rng = window_range(window_s)
    sel = "{" + selector + "}"
    rate = f"sum by (le) (rate({_name(target.metric)}_bucket{sel}[{rng}]))"
    q = percentile / 100.0
    quantile = await prom.query(f"histogram_quantile({q}, {rate})")
    buckets_raw = await prom.query(rate)
    buckets: list[tuple[float, float]] = []
    for labels, value in buckets_raw:
        le = labels.get("le")
        if le is None or math.isnan(value):
            continue
        buckets.append((math.inf if le == "+Inf" else float(le), value))
    observed = None
    if quantile and not math.isnan(quantile[0][1]) and not math.isinf(quantile[0][1]):
        observed = quantile[0][1]
    att = attainment_from_buckets(target.target_s, buckets)
    total = max((c for le, c in buckets if math.isinf(le)), default=0.0)
    if att is None:
        observed = None
    return SloObservation(
        name=target.name,
        target_s=target.target_s,
        observed_s=observed,
        attainment=att[0] if att else None,
        bucket_le=att[1] if att else None,
        requests=total * window_s,
    )


def _name(metric: str) -> str:
    """A metric name usable in PromQL (names with ':' are legal as they are)."""
    return metric
