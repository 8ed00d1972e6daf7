"""Perplexity against training tokens from `slm train --json` runs: exp(held-out loss) at each evaluation,
x the tokens trained by then (log scale, so the trend shows where more tokens would lead), and each run's
final shared-protocol perplexity (from an `slm eval --json` run) as a marker at its last point.

    python benchmarks/recovery_plot.py RUN.json[:EVAL.json] ... [--baseline PPL:LABEL ...] -o plot.png
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path


def points(run: dict) -> tuple[list[float], list[float]]:
    train = run["results"]["train"]
    tokens_at = {}
    total = 0
    for step, _loss, _lr, _norm, tokens, _s in train["loss_curve"]:
        total += tokens
        tokens_at[int(step)] = total
    xs = [tokens_at[int(step)] for step, _ in train["val_curve"]]
    return xs, [math.exp(v) for _, v in train["val_curve"]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="RUN.json, or RUN.json:EVAL.json to mark the final shared-protocol PPL")
    p.add_argument("--baseline", action="append", default=[], help="PPL:LABEL, a horizontal line")
    p.add_argument("--title", default="held-out perplexity against training tokens")
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for spec in args.runs:
        run_path, _, eval_path = spec.partition(":")
        xs, ys = points(json.loads(Path(run_path).read_text()))
        line, = ax.plot(xs, ys, marker="o", label=f"{Path(run_path).stem} (monitoring windows)")
        if eval_path:
            ppl = json.loads(Path(eval_path).read_text())["results"]["wikitext2"]["perplexity"]
            ax.scatter([xs[-1]], [ppl], marker="*", s=160, color=line.get_color(), zorder=5,
                       label=f"{Path(run_path).stem}: {ppl:.2f} (shared protocol)")
    for spec in args.baseline:
        value, _, label = spec.partition(":")
        ax.axhline(float(value), linestyle="--", linewidth=1, color="gray")
        ax.annotate(f"{label} {float(value):g}", (ax.get_xlim()[0], float(value)), fontsize=8, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(args.title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=110)
    plt.close(fig)
    tmp = Path(f"{args.out}.partial")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
