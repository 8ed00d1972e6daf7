"""Cascades: the small model answers; when its confidence is below a threshold, the larger model answers instead.

Confidence signals (pure functions):
* generation: a low quantile (default the 10th percentile) of the answer's per-token log-probabilities — the
  least certain tokens decide, and unlike a mean or a sum it does not drift with the answer's length;
* multiple choice: the margin between the best and second-best choice (log-likelihood per UTF-8 byte, the
  acc_norm score).

Measured with RouteLLM's definitions (Ong et al., 2024): escalating the least confident share x of requests
gives quality q(x); PGR(x) = (q(x) - q_weak) / (q_strong - q_weak); APGR is the mean PGR over x from 0 to 1
(the area under the PGR curve, trapezoid rule over every possible share).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import require


def quantile_confidence(logprobs: list[float], q: float = 0.1) -> float:
    """The q-quantile of per-token log-probabilities (linear interpolation); -inf for an empty answer."""
    require(0.0 <= q <= 1.0, f"the confidence quantile must be in [0, 1], got {q}")
    if not logprobs:
        return float("-inf")
    xs = sorted(logprobs)
    at = q * (len(xs) - 1)
    lo = math.floor(at)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


def margin_confidence(scores: list[float]) -> float:
    """Best minus second-best choice score (inf with one choice)."""
    top = sorted(scores, reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


@dataclass
class CurvePoint:
    escalated: float  # share of requests sent to the large model
    quality: float  # mean quality of the cascade at that share
    threshold: float  # confidence below which a request escalates (escalates exactly this share here)


def cascade_curve(confidence: list[float], small: list[float], large: list[float]) -> list[CurvePoint]:
    """Quality against share escalated, for every threshold: escalating the k least confident examples
    (k = 0..n). Ties in confidence escalate together, so shares between them are not reachable."""
    n = len(confidence)
    require(n > 0 and len(small) == n and len(large) == n, "confidence, small and large need one value per example")
    order = sorted(range(n), key=lambda i: confidence[i])
    total, points = sum(small), []
    for k in range(n + 1):
        inside_tie = 0 < k < n and confidence[order[k - 1]] == confidence[order[k]]
        if not inside_tie:
            threshold = (float("-inf") if k == 0 else float("inf") if k == n
                         else (confidence[order[k - 1]] + confidence[order[k]]) / 2)
            points.append(CurvePoint(k / n, total / n, threshold))
        if k < n:
            total += large[order[k]] - small[order[k]]
    return points


def apgr(curve: list[CurvePoint], weak: float, strong: float) -> float:
    """Average performance gap recovered: the area under PGR(share escalated), by the trapezoid rule."""
    require(strong != weak, "APGR needs the strong and weak models to differ in quality")
    pgr = [(p.escalated, (p.quality - weak) / (strong - weak)) for p in curve]
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pgr, pgr[1:]))


def choose_threshold(curve: list[CurvePoint], escalate: float | None = None,
                     quality: float | None = None) -> CurvePoint:
    """The point for a target share escalated (the largest share not above it) or a target quality (the
    smallest share reaching it)."""
    require((escalate is None) != (quality is None), "give a target share escalated or a target quality, not both")
    if escalate is not None:
        require(0.0 <= escalate <= 1.0, f"the share escalated must be in [0, 1], got {escalate}")
        return max((p for p in curve if p.escalated <= escalate + 1e-12), key=lambda p: p.escalated)
    reaching = [p for p in curve if p.quality >= quality]
    best = max(curve, key=lambda p: p.quality)
    require(reaching, f"no threshold reaches quality {quality}: the best is {best.quality:.4f} at "
            f"{best.escalated:.0%} escalated")
    return min(reaching, key=lambda p: p.escalated)


def summary(curve: list[CurvePoint], weak: float, strong: float, chosen: CurvePoint) -> dict:
    """What calibration reports: the chosen point, weak/strong quality, APGR and the call share needed for
    50% of the gap (RouteLLM's CPT(50%))."""
    half = (next((p.escalated for p in curve if (p.quality - weak) >= 0.5 * (strong - weak)), None)
            if strong > weak else None)
    return {"threshold": chosen.threshold, "escalated": chosen.escalated, "quality": chosen.quality,
            "weak_quality": weak, "strong_quality": strong,
            "apgr": apgr(curve, weak, strong) if strong != weak else None,  # undefined without a gap
            "random_apgr": 0.5, "cpt50": half, "curve": [asdict(p) for p in curve]}
