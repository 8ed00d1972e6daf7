"""The plan's report: plan.json (schema below), plan.md and plan.png, and the `--explain` text.

plan.json (schema "slmkit.plan/1"):
  model, command, seconds, budget {limits as given, context, prompt_tokens, backend, objective},
  evaluation {quality text, calibration text, windows},
  space {technique: "searched" | why not},
  calibration {overhead_bytes, runtime_mb, decode_ms_per_byte, ttft_ms_per_weight, kv_kl, proxy_scale, factors,
               measured_factors, gamma, base},
  candidates [{candidate (space.Candidate.record), predicted {figure: value} (after the last refit),
               predicted_when_chosen {figure: value} | null (the prediction it was measured on), measured | null,
               finalist (why measured, "" if not), predicted_feasible}],
  chosen {name, artifact, measured, remeasured, margins {figure: fraction inside the limit}, timing_noise} | null,
  infeasible: one line | null
Figures: file_mb, memory_mb (peak RSS of a fresh process holding a full context), decode_tps, ttft_ms, kl (mean
KL(base || model), nats/token), ppl_increase_pct, acc:TASK, energy_j_per_token (measured only).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

SCHEMA = "slmkit.plan/1"
FIGURES = ("file_mb", "memory_mb", "decode_tps", "ttft_ms", "kl", "ppl_increase_pct")


def make_report(search, chosen, again, source: str, settings, seconds: float, command, calib=None) -> dict:
    from .search import binding

    b = search.budget
    report = {"schema": SCHEMA, "model": source, "command": command, "seconds": seconds,
              "budget": {**asdict(b), "min_task_acc": [list(t) for t in b.min_task_acc]},
              "evaluation": {"quality": f"WikiText-2 test, first {settings.windows} windows of 512 tokens",
                             "calibration": "WikiText-2 validation (sensitivities, AWQ / GPTQ statistics)"},
              "space": search.space.rows, "calibration": asdict(search.cal),
              "candidates": [{"candidate": e.cand.record(), "predicted": e.predicted, "measured": e.measured,
                              "predicted_when_chosen": e.predicted_then,
                              "finalist": e.finalist if e.measured else ("a finalist, not built (--max-builds)"
                                                                         if e.finalist else ""),
                              "predicted_feasible": search.feasible(e)}
                             for e in search.entries],
              "chosen": None, "infeasible": None}
    if chosen is None:
        report["infeasible"] = binding(search)
        return report
    noise = again.get("decode_noise", 0.0)
    between = abs(again["decode_tps"] - chosen.measured["decode_tps"]) / chosen.measured["decode_tps"]
    report["chosen"] = {"name": chosen.cand.name, "candidate": chosen.cand.record(),
                        "artifact": Path(search_artifact(chosen)).name, "measured": chosen.measured,
                        "remeasured": again, "margins": b.margins(again),
                        "timing_noise": {"decode_spread_of_runs": noise, "decode_between_processes": between},
                        "steps": [_record(s) for s in chosen.cand.steps(calib)]}
    return report


def search_artifact(entry) -> str:
    return "model.gguf" if entry.cand.backend == "llamacpp" else "model"


def _record(step) -> dict:
    from ..records import step_record

    return step_record(step)


def write_report(report: dict, search, folder: Path) -> None:
    (folder / "plan.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "plan.md").write_text(markdown(report))
    plot(report, folder / "plan.png")


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    b = report["budget"]
    limits = ", ".join(f"{k} {v}" for k, v in b.items() if v not in (None, [], ()) and k not in
                       ("context", "prompt_tokens", "backend", "objective"))
    lines = [f"# slm plan: {report['model']}", "",
             f"Budget: {limits}; context {b['context']}, prompt {b['prompt_tokens']} tokens, backend {b['backend']}, "
             f"objective {b['objective']}.", f"Quality: {report['evaluation']['quality']}; calibration: "
             f"{report['evaluation']['calibration']}.", ""]
    chosen = report["chosen"]
    if chosen:
        m = chosen["remeasured"]
        lines += [f"**Chosen: {chosen['name']}** (artifact `{chosen['artifact']}`), re-measured in a fresh process:",
                  "", "| figure | re-measured | margin |", "|---|---|---|"]
        lines += [f"| {f} | {_fmt(m.get(f))} | {chosen['margins'][f] * 100:+.1f}% |" for f in chosen["margins"]]
        noise = chosen["timing_noise"]
        lines += ["", f"Timing noise: decode tok/s spread over runs {noise['decode_spread_of_runs'] * 100:.1f}%, "
                  f"between two fresh processes {noise['decode_between_processes'] * 100:.1f}%.", ""]
    else:
        lines += [f"**No model meets the budget.** {report['infeasible']}", ""]
    head = ["candidate", *[f"{f} (pred / meas)" for f in FIGURES], "measured because"]
    lines += ["Predicted figures of a measured candidate are those it was chosen on, before its own measurement "
              "refitted the model.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in sorted(report["candidates"], key=lambda c: (c["measured"] is None, c["predicted"]["file_mb"])):
        meas, then = c["measured"] or {}, c.get("predicted_when_chosen") or c["predicted"]
        cells = [f"{_fmt(then.get(f))} / {_fmt(meas.get(f))}" if meas else _fmt(c["predicted"].get(f))
                 for f in FIGURES]
        lines.append("| " + " | ".join([c["candidate"]["name"], *cells, c["finalist"] or "-"]) + " |")
    lines += ["", "## Techniques", ""] + [f"- {t}: {why}" for t, why in report["space"].items()]
    return "\n".join(lines) + "\n"


def explain(report: dict) -> str:
    """Why each family was kept or dropped, in lines for a terminal."""
    b = report["budget"]
    lines = [f"{t}: {why}" for t, why in report["space"].items()]
    families: dict[str, list[dict]] = {}
    for c in report["candidates"]:
        key = f"{c['candidate']['method']} {'mixed' if c['candidate']['overrides'] else 'uniform'}"
        families.setdefault(key, []).append(c)
    for key, cands in families.items():
        fit = [c for c in cands if c["predicted_feasible"]]
        measured = [c for c in cands if c["measured"]]
        verdict = f"kept: {len(fit)} of {len(cands)} predicted to fit" if fit else \
            "dropped: none predicted to fit (" + _worst(cands, b) + ")"
        lines.append(f"{key}: {verdict}; {len(measured)} measured")
    return "\n".join(lines)


def _worst(cands: list[dict], budget: dict) -> str:
    """The limit the family's best-placed candidate misses by the least."""
    from .budget import Budget

    bud = Budget(**{**budget, "min_task_acc": tuple(tuple(t) for t in budget["min_task_acc"])})
    best = max(cands, key=lambda c: min(bud.margins(c["predicted"]).values(), default=0))
    misses = {f: m for f, m in bud.margins(best["predicted"]).items() if m < 0}
    return ", ".join(f"{f} {abs(m) * 100:.0f}% beyond" for f, m in misses.items()) or "slack exceeded"


def plot(report: dict, path: Path) -> None:
    """Quality vs size and quality vs decode speed: every candidate predicted (hollow), measured (filled), the
    chosen one starred, the budget's limits drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    b = report["budget"]
    for ax, x, label, limit in ((axes[0], "file_mb", "file MB", b.get("max_file_mb")),
                                (axes[1], "decode_tps", "decode tok/s", b.get("min_decode_tps"))):
        for c in report["candidates"]:
            p, m = c.get("predicted_when_chosen") or c["predicted"], c["measured"] or {}
            if p.get(x) is not None:
                ax.scatter(p[x], p["kl"], facecolors="none", edgecolors="tab:gray", s=18)
            if m.get(x) is not None and m.get("kl") is not None:
                ax.scatter(m[x], m["kl"], color="tab:blue", s=30)
                ax.plot([p.get(x) or m[x], m[x]], [p["kl"], m["kl"]], color="tab:blue", lw=0.5, alpha=0.5)
        if report["chosen"]:
            r = report["chosen"]["remeasured"]
            ax.scatter(r[x], r["kl"], marker="*", color="tab:red", s=220, label="chosen (re-measured)", zorder=5)
        if limit:
            ax.axvline(limit, color="tab:red", ls="--", lw=1, label="budget")
        if b.get("max_kl"):
            ax.axhline(b["max_kl"], color="tab:orange", ls="--", lw=1, label="KL budget")
        ax.set_xlabel(label)
        ax.set_ylabel("KL vs base (nats/token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
    axes[0].set_title("quality vs size (hollow: predicted, filled: measured)")
    axes[1].set_title("quality vs decode speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
