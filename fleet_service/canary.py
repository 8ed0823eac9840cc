"""The canary gate: judge the new release on the first batch against the release it replaces.

Both sides are read from the stored results stream. The candidate is the results of the new
release from the first batch's devices since that batch was sent; the baseline is every result
of the weights it replaces (any device, any re-signed release of them). The gate waits until
each side has ``min_results``, then fails when the candidate is worse than the baseline by more
than ``margin`` in the metric's own unit; equal or better passes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlmodel import Session

from fleet_service.results import ResultFilter, ResultStats, result_stats
from fleet_service.schemas import CanaryMetric, CanarySpec

__all__ = ["CanaryJudgement", "judge", "metric_value"]

# Whether a larger value of the metric is worse.
_HIGHER_IS_WORSE: dict[CanaryMetric, bool] = {
    "error_rate": True,
    "p95_latency_ms": True,
    "mean_confidence": False,
    "tokens_per_s": False,
}


@dataclass(frozen=True)
class CanaryJudgement:
    """Where the gate stands; ``detail`` says it in a sentence."""

    verdict: Literal["waiting", "passed", "failed"]
    baseline: float | None
    candidate: float | None
    baseline_results: int
    candidate_results: int
    detail: str


def metric_value(stats: ResultStats, metric: CanaryMetric) -> float | None:
    """The value of ``metric`` over ``stats`` (None when no successful result carries it)."""
    if metric == "error_rate":
        return stats.error_rate if stats.count else None
    if metric == "p95_latency_ms":
        return stats.p95_latency_ms
    if metric == "mean_confidence":
        return stats.mean_confidence
    return stats.mean_tokens_per_s


def judge(
    session: Session,
    spec: CanarySpec,
    *,
    model: str,
    candidate_release: int,
    candidate_devices: Collection[str],
    since: datetime,
    baseline_sha256: str,
) -> CanaryJudgement:
    """Judge the candidate release against the baseline weights on ``spec.metric``."""
    candidate_stats = result_stats(
        session,
        ResultFilter(
            model=model, release=candidate_release, device_ids=candidate_devices, since=since
        ),
    )
    baseline_stats = result_stats(
        session,
        ResultFilter(model=model, sha256=baseline_sha256, exclude_release=candidate_release),
    )
    metric = spec.metric
    candidate = metric_value(candidate_stats, metric)
    baseline = metric_value(baseline_stats, metric)

    def judgement(verdict: Literal["waiting", "passed", "failed"], detail: str) -> CanaryJudgement:
        return CanaryJudgement(
            verdict, baseline, candidate, baseline_stats.count, candidate_stats.count, detail
        )

    if candidate_stats.count < spec.min_results or baseline_stats.count < spec.min_results:
        return judgement(
            "waiting",
            f"canary: waiting for {spec.min_results} results on each side "
            f"(new release: {candidate_stats.count}, the release it replaces: "
            f"{baseline_stats.count})",
        )
    if candidate is None:
        return judgement(
            "failed",
            f"canary: every one of {candidate_stats.count} results of the new release failed, "
            f"so it has no {metric}",
        )
    if baseline is None:
        return judgement(
            "waiting",
            f"canary: the release it replaces has no successful result to give a {metric}",
        )
    worse_by = candidate - baseline if _HIGHER_IS_WORSE[metric] else baseline - candidate
    comparison = f"{metric} {candidate:.4g} against {baseline:.4g} for the release it replaces"
    if worse_by > spec.margin:
        return judgement(
            "failed", f"canary failed: {comparison}, worse by more than {spec.margin:g}"
        )
    return judgement("passed", f"canary passed: {comparison} (margin {spec.margin:g})")
