"""Bit allocation under a size budget as pure functions: a multiple-choice knapsack over per-tensor options.

Each tensor has options (bytes, loss): its formats' sizes and predicted losses. `allocate` picks one option per
tensor to minimise the summed loss with the summed bytes within the budget, two ways, and keeps the better:
a dynamic program over the budget cut into `units` steps (each option's bytes rounded *up* to a step, so its
answer always fits; exact but for that rounding), and the Lagrangian relaxation (every tensor takes the option
minimising loss + lam * bytes, lam found by bisection: optimal on the lower convex hull) followed by a greedy
pass spending what it left on the upgrades with the best loss saved per byte. `exact` solves small instances by
enumeration, for tests.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

Option = tuple[float, float]  # (bytes, loss)


def cheapest(options: dict[str, list[Option]]) -> float:
    return sum(min(b for b, _ in opts) for opts in options.values())


def total(options: dict[str, list[Option]], choice: dict[str, int]) -> tuple[float, float]:
    """(bytes, loss) of a choice."""
    return (sum(options[n][i][0] for n, i in choice.items()), sum(options[n][i][1] for n, i in choice.items()))


def relaxed(options: dict[str, list[Option]], lam: float) -> dict[str, int]:
    """Each tensor's option minimising loss + lam * bytes (ties: fewer bytes)."""
    return {n: min(range(len(o)), key=lambda i: (o[i][1] + lam * o[i][0], o[i][0])) for n, o in options.items()}


def allocate(options: dict[str, list[Option]], budget: float, units: int = 20000) -> dict[str, int] | None:
    """The choice (option index per tensor) with the least loss found within `budget` bytes; None when even the
    smallest options exceed it."""
    if cheapest(options) > budget:
        return None
    found = [c for c in (dynamic(options, budget, units), lagrangian(options, budget)) if c is not None]
    return min(found, key=lambda c: total(options, c)[1])


def dynamic(options: dict[str, list[Option]], budget: float, units: int) -> dict[str, int] | None:
    """Multiple-choice knapsack by dynamic programming over `units` steps of budget / units bytes."""
    unit = budget / units
    steps = {n: [math.ceil(b / unit - 1e-9) for b, _ in o] for n, o in options.items()}
    best = np.zeros(units + 1)  # least loss with at most c steps spent, over the tensors so far
    picks = []
    for n, opts in options.items():
        new, pick = np.full(units + 1, np.inf), np.zeros(units + 1, dtype=np.int16)
        for j, ((_, loss), c) in enumerate(zip(opts, steps[n])):
            if c > units:
                continue
            cand = np.full(units + 1, np.inf)
            cand[c:] = best[:units + 1 - c] + loss
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append(pick)
    if not np.isfinite(best[units]):
        return None
    choice, c = {}, units
    for n, pick in zip(reversed(list(options)), reversed(picks)):
        choice[n] = int(pick[c])
        c -= steps[n][choice[n]]
    return choice


def lagrangian(options: dict[str, list[Option]], budget: float, iters: int = 60) -> dict[str, int]:
    """The relaxation's choice at the smallest lam that fits, then the greedy fill."""
    lo, hi = 0.0, 1.0
    while total(options, relaxed(options, hi))[0] > budget:
        lo, hi = hi, hi * 4
    for _ in range(iters):  # smallest lam whose relaxed choice fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(options, relaxed(options, mid))[0] > budget else (lo, mid)
    return fill(options, relaxed(options, hi), budget)


def fill(options: dict[str, list[Option]], choice: dict[str, int], budget: float) -> dict[str, int]:
    """Spend the bytes left under `budget` greedily: the upgrade saving the most loss per byte that fits."""
    choice = dict(choice)
    left = budget - total(options, choice)[0]
    while True:
        best, best_rate = None, 0.0
        for n, i in choice.items():
            b0, l0 = options[n][i]
            for j, (b, l) in enumerate(options[n]):
                extra = b - b0
                if l < l0 and extra <= left:
                    rate = (l0 - l) / max(extra, 1e-12)
                    if rate > best_rate:
                        best, best_rate = (n, j), rate
        if best is None:
            return choice
        n, j = best
        left -= options[n][j][0] - options[n][choice[n]][0]
        choice[n] = j


def exact(options: dict[str, list[Option]], budget: float) -> dict[str, int] | None:
    """The optimum by enumeration (small instances only)."""
    names = list(options)
    best, best_loss = None, float("inf")
    for pick in itertools.product(*(range(len(options[n])) for n in names)):
        choice = dict(zip(names, pick))
        nbytes, loss = total(options, choice)
        if nbytes <= budget and loss < best_loss:
            best, best_loss = choice, loss
    return best
