"""The constraint-first search: a budget in, the best measured model that meets it out, or the exact reason none can.

    enumerate (space.py)  ->  predict (predict.py)  ->  finalists on the predicted front  ->  build + measure for
    real in a fresh process (build.py, probe.py), refitting the quality model as measurements arrive  ->  the best
    measured candidate that meets every limit  ->  re-measured once more in a fresh process as the artifact
    returned  ->  report (report.py)

The naive recipes (uniform RTN Q8_0 and Q4_0, AWQ scales + GPTQ Q4_0) are finalists whenever they are predicted
to fit, so the plan is never worse than them on what it measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import SlmError
from ..progress import note
from .allocate import allocate
from .budget import Budget
from .predict import Calibration, Shapes, learn, predict
from .space import FORMATS, TABLES, Candidate, Space, bytes_per_weight, variants

SLACK = {"file_mb": 0.01, "memory_mb": 0.05, "decode_tps": 0.10, "ttft_ms": 0.10, "kl": 0.30,
         "ppl_increase_pct": 0.30}  # how far outside a limit a prediction may be and still be measured


class Infeasible(SlmError):
    """No candidate meets the budget; `report` holds what was tried."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class Entry:
    cand: Candidate
    predicted: dict
    measured: dict | None = None
    finalist: str = ""  # why it was measured ("" = not measured)
    predicted_then: dict | None = None  # the prediction it was chosen on, before its own measurement refit it


@dataclass
class Search:
    budget: Budget
    shapes: Shapes
    scores: dict
    cal: Calibration
    space: Space
    backends: list[str]
    entries: list[Entry] = field(default_factory=list)

    def enumerate(self, mixed_points: int = 4) -> None:
        cands = []
        for base in self.space.uniform + self.mixed(mixed_points):
            cands += variants(base, self.space.kv_bits, self.backends)
        unique = {}
        for c in cands:  # a mixed choice that came out uniform is that uniform candidate
            unique.setdefault(c.name, c)
        self.entries = [Entry(c, {}) for c in unique.values()]  # predicted by refresh() below
        for e in self.entries:  # the cost calibration's builds are measured candidates: the model learns from them
            if e.cand.name in self.cal.measured:
                e.predicted_then, e.measured, e.finalist = self.predict(e.cand), self.cal.measured[e.cand.name], \
                    "cost calibration build"
                learn(self.cal, e.cand, self.scores, e.measured)
        self.refresh()

    def predict(self, cand: Candidate) -> dict:
        return predict(cand, self.shapes, self.scores, self.cal, self.budget.context)

    def mixed(self, points: int) -> list[Candidate]:
        """Mixed-precision candidates at the budget's size and along a ladder of sizes."""
        if not self.space.mixed_formats or not self.space.mixed_methods:
            return []
        options = self.options()
        low = sum(min(b for b, _ in o) for o in options.values())
        high = sum(max(b for b, _ in o) for o in options.values())
        targets = [low + (high - low) * (i + 1) / (points + 1) for i in range(points)]
        if self.budget.max_file_mb is not None:
            overhead = max(self.cal.overhead_bytes.values(), default=0.0)
            targets.append(self.budget.max_file_mb * 1e6 * (1 - SLACK["file_mb"] / 2) - overhead)
        out = []
        for target in targets:
            choice = allocate(options, target)
            if choice is None:
                continue
            formats = {n: self.space.mixed_formats[i] for n, i in choice.items()}
            for method in self.space.mixed_methods:
                out.append(mixed_candidate(method, formats, f"@ {target / 1e6:.1f} MB of matrices"))
        return out

    def options(self) -> dict[str, list[tuple[float, float]]]:
        fmts = self.space.mixed_formats
        return {n: [(o * i * bytes_per_weight(FORMATS[f], i), self.scores[n].get(f, math.inf)) for f in fmts]
                for n, (o, i) in self.shapes.tensors.items()}

    def feasible(self, e: Entry, slack: bool = True) -> bool:
        figures = e.measured if e.measured is not None and not slack else e.predicted
        return self.budget.met({k: v for k, v in figures.items() if v is not None}, SLACK if slack else None) and \
            all(figures.get(f) is not None for f, _, _ in self.budget.limits() if not f.startswith("acc:"))

    def rank_key(self, figures: dict):
        return {"quality": lambda f: f["kl"], "speed": lambda f: -(f.get("decode_tps") or 0.0),
                "size": lambda f: f["file_mb"]}[self.budget.objective](figures)

    def finalists(self, k: int) -> list[Entry]:
        """The k best predicted-feasible candidates by the objective, and every naive one predicted to fit."""
        fit = sorted((e for e in self.entries if self.feasible(e)), key=lambda e: self.rank_key(e.predicted))
        seen = set()
        for e in fit:  # k different weight choices, each with its best-predicted KV width, not measured yet
            if e.measured is not None:
                continue
            weights = (e.cand.method, e.cand.scheme, e.cand.table, e.cand.overrides, e.cand.backend)
            if weights not in seen and len(seen) < k:
                seen.add(weights)
                e.finalist = e.finalist or "predicted best"
        for e in fit:
            if e.cand.naive and e.measured is None:
                e.finalist = e.finalist or "naive recipe"
        return [e for e in fit if e.finalist == "predicted best"] + [e for e in fit if e.finalist == "naive recipe"]

    def refresh(self) -> None:
        for e in self.entries:
            e.predicted = self.predict(e.cand)

    def best_measured(self) -> list[Entry]:
        done = [e for e in self.entries if e.measured is not None and self.feasible(e, slack=False)]
        return sorted(done, key=lambda e: self.rank_key(e.measured))


def mixed_candidate(method: str, formats: dict[str, str], label: str) -> Candidate:
    """A candidate from a per-tensor format choice: the most common block format as the base scheme, the
    others as exact-name overrides, the table's own format as the table scheme."""
    from ..quant.scheme import LayerScheme

    blocks = [f for n, f in formats.items() if n not in TABLES]
    base = max(sorted(set(blocks)), key=blocks.count)
    overrides = tuple(LayerScheme(n, FORMATS[f]) for n, f in formats.items()
                      if f != base and n not in TABLES)
    table = FORMATS[formats.get("embed", formats.get("lm_head", "Q8_0"))]
    return Candidate(method, FORMATS[base], table, overrides, label=label)


def measure_entry(search: Search, builder, e: Entry) -> None:
    """Build, measure and learn from one finalist (a failure is recorded, not fatal)."""
    note(f"plan: building and measuring {e.cand.name} ({e.finalist})")
    e.predicted_then = dict(e.predicted)
    try:
        e.measured = builder.measure(builder.artifact(e.cand), e.cand.backend)
    except SlmError as err:
        e.measured = {"error": str(err)}
        return
    learn(search.cal, e.cand, search.scores, e.measured)
    search.refresh()


def run_search(search: Search, builder, finalists: int, max_builds: int) -> list[Entry]:
    """Measure the finalists; while an unmeasured candidate is predicted to beat the best measured one, measure
    it too (up to max_builds in all). Returns the measured candidates that meet the budget, best first."""
    queue = search.finalists(finalists)
    measured = 0
    while queue and measured < max_builds:
        measure_entry(search, builder, queue.pop(0))
        measured += 1
        if not queue:
            best = search.best_measured()
            rest = [e for e in search.finalists(finalists) if e.measured is None]
            queue = [e for e in rest if not best or search.rank_key(e.predicted) < search.rank_key(best[0].measured)]
    return search.best_measured()


def binding(search: Search) -> str:
    """One line: the limit that binds and the nearest achievable point (measured figures where there are any)."""
    limits = search.budget.limits()
    best = None
    for figure, direction, bound in limits:
        others = search.budget.without(figure)
        near = []
        for e in search.entries:
            fig = e.measured if e.measured and "error" not in e.measured else e.predicted
            if fig.get(figure) is None:
                continue
            if len(limits) == 1 or others.met({k: v for k, v in fig.items() if v is not None}):
                near.append((search.budget.margins(fig)[figure], e, fig))
        if near:
            margin, e, fig = max(near, key=lambda t: t[0])
            if best is None or margin > best[0]:
                best = (margin, figure, direction, bound, e, fig)
    if best is None:
        return "no candidate meets any combination of all but one of the limits; see the report"
    margin, figure, direction, bound, e, fig = best
    kind = "measured" if e.measured and "error" not in e.measured else "predicted"
    rest = " while meeting the other limits" if len(limits) > 1 else ""
    word = "at most" if direction == "max" else "at least"
    return (f"no model meets every limit: {figure} {word} {bound:g} is binding; the nearest achievable point is "
            f"{e.cand.name} with {figure} {fig[figure]:.4g} ({kind}, {abs(margin) * 100:.1f}% beyond){rest}")

