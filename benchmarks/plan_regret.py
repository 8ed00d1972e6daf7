"""The planner's regret: on five budgets (size-, memory-, speed-, quality-bound and mixed), `slm plan`'s choice
against the best of an exhaustive grid over the same candidate space, measured the same way (every grid
candidate built and measured by the same fresh-process probe), with both times.

Per budget: the planner runs as `slm plan` would (its once-per-model caches warm: sensitivities, base
log-probabilities, per-format cost calibration -- their one-time cost is printed first), then the grid's best is
the best measured candidate meeting the budget by the same objective, among every candidate the planner's
enumeration held for that budget. Grid measurements are shared between budgets (a candidate is measured once);
the grid time of a budget is the build + measure time of all its candidates (a candidate the planner measured
joins the grid with the planner's measurement and its build + measure seconds, as the grid would have spent). The planner's quality (KL on
WikiText-2 test) should be within 2% of the grid's best (regret = planner KL / grid KL - 1, on the objective
"quality"; for "size" and "speed" the objective figure is compared).

    python benchmarks/plan_regret.py [MODEL] [--methods rtn] [--kv-bits 16] [--finalists 1] [--eval-windows 8]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from slmkit.plan.budget import Budget
from slmkit.plan.run import PlanSettings, guarantee, prepare
from slmkit.plan.search import run_search

def budgets(search) -> dict[str, dict]:
    """The five budgets, the cost limits placed between the uniform candidates' predicted figures on this machine
    (so that each binds: half the uniform formats are outside it), the KL limits fixed."""
    uni = {e.cand.name: e.predicted for e in search.entries if not e.cand.overrides and e.cand.kv_bits == 16}
    q4, q8 = uni["rtn Q4_0 [torch]"], uni["rtn Q8_0 [torch]"]
    tps = sorted(f["decode_tps"] for f in uni.values())
    mem = sorted(f["memory_mb"] for f in uni.values())
    return {"size-bound": dict(max_file_mb=round((q4["file_mb"] + q8["file_mb"]) / 2, 1)),
            "memory-bound": dict(max_memory_mb=round(mem[len(mem) // 2], 1)),
            "speed-bound": dict(min_decode_tps=round(tps[len(tps) // 2], 1)),
            "quality-bound": dict(max_kl=0.05, objective="size"),
            "mixed": dict(max_file_mb=round(q8["file_mb"] * 0.9, 1), min_decode_tps=round(tps[len(tps) // 3], 1),
                          max_kl=0.1, objective="speed")}


def objective_value(budget: Budget, fig: dict) -> float:
    return {"quality": fig["kl"], "size": fig["file_mb"], "speed": -fig["decode_tps"]}[budget.objective]


def planner(spec, budget: Budget, settings: PlanSettings, work: Path, measured: dict) -> tuple[dict | None, float, list]:
    """The planner's re-measured choice, its wall time, and its enumerated candidates; what it measured joins the
    grid's measurements (the same probe, the same settings), with its build + measure seconds."""
    start = time.perf_counter()
    lm, search, builder = prepare(spec, budget, settings, work)
    ranked = run_search(search, builder, settings.finalists, settings.max_builds)
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    chosen, again = guarantee(search, ranked, builder, out, budget)
    seconds = time.perf_counter() - start
    for e in search.entries:
        if e.measured and "error" not in e.measured and e.cand.name not in measured and e.cand.name in builder.built:
            path = str(builder.built[e.cand.name])
            measured[e.cand.name] = (e.measured, builder.seconds[e.cand.name] + builder.probe_seconds.get(path, 0.0))
    return (None if chosen is None else {"name": chosen.cand.name, **again}), seconds, [e.cand for e in search.entries]


def grid(spec, budget: Budget, settings: PlanSettings, cands: list, work: Path, measured: dict) -> tuple[dict | None, float]:
    """Every candidate built and measured (shared across budgets in `measured`); the best meeting the budget."""
    _, search, builder = prepare(spec, budget, settings, work)
    seconds = 0.0
    for cand in cands:
        if cand.name not in measured:
            start = time.perf_counter()
            try:
                fig = builder.measure(builder.artifact(cand), cand.backend)
            except Exception as exc:  # a candidate that cannot be built is recorded, not fatal
                fig = {"error": str(exc)}
            measured[cand.name] = (fig, time.perf_counter() - start)
            shutil.rmtree(builder.built[cand.name].parent, ignore_errors=True) if cand.name in builder.built else None
        seconds += measured[cand.name][1]
    fits = [(n, f) for n, (f, _) in ((c.name, measured[c.name]) for c in cands) if "error" not in f and budget.met(f)]
    if not fits:
        return None, seconds
    name, fig = min(fits, key=lambda t: objective_value(budget, t[1]))
    return {"name": name, **fig}, seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--methods", default="rtn")
    p.add_argument("--kv-bits", default="16")
    p.add_argument("--finalists", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--budgets", default="size-bound,memory-bound,speed-bound,quality-bound,mixed")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    settings = PlanSettings(methods=tuple(a.methods.split(",")), kv_bits=tuple(int(b) for b in a.kv_bits.split(",")),
                            finalists=a.finalists, max_builds=2 * a.finalists + 3, windows=a.eval_windows)
    rows, measured = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, warm, wb = prepare(a.model, Budget(max_file_mb=1e9).validate(), settings, Path(tmp) / "warm")  # caches
        for e in warm.entries:  # the cost calibration's uniform RTN builds: measured once, the grid's too
            if e.measured is not None:
                path = str(wb.built.get(e.cand.name))
                measured[e.cand.name] = (e.measured, wb.seconds.get(e.cand.name, 0.0) + wb.probe_seconds.get(path, 0.0))
        table = budgets(warm)
        print(f"once per model and machine (sensitivities, reference, cost calibration): "
              f"{time.perf_counter() - start:.0f} s (a few when the cache was warm)", flush=True)
        print("budgets: " + "; ".join(f"{k}: {v}" for k, v in table.items()), flush=True)
        print("| budget | planner's choice | grid's best | planner KL | grid KL | regret | planner s | grid s |")
        print("|---|---|---|---:|---:|---:|---:|---:|", flush=True)
        for name in a.budgets.split(","):
            budget = Budget(**table[name]).validate()
            chose, t_plan, cands = planner(a.model, budget, settings, Path(tmp) / f"plan-{name}", measured)
            best, t_grid = grid(a.model, budget, settings, cands, Path(tmp) / "grid", measured)
            regret = None if not chose or not best else \
                objective_value(budget, chose) / objective_value(budget, best) - 1 if budget.objective == "quality" \
                else (objective_value(budget, chose) - objective_value(budget, best)) / abs(objective_value(budget, best))
            rows.append({"budget": name, "limits": table[name], "planner": chose, "grid": best, "regret": regret,
                         "planner_s": t_plan, "grid_s": t_grid, "candidates": len(cands)})
            kl = lambda f: "" if f is None else f"{f['kl']:.4f}"  # noqa: E731
            print(f"| {name} | {chose and chose['name']} | {best and best['name']} | {kl(chose)} | {kl(best)} | "
                  f"{'' if regret is None else f'{regret * 100:+.1f}%'} | {t_plan:.0f} | {t_grid:.0f} "
                  f"({len(cands)} candidates) |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
