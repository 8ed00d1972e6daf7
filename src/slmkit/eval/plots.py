"""Plots of runs: quality against weight size and against decode latency (Pareto front marked), and the loss
curves of train runs; plus the per-model merging and labels reports share. Used by slmkit.eval.report."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from pathlib import Path

from ..errors import require
from ..files import write_atomic

QUALITY_METRICS = ("perplexity", "acc", "acc_norm")  # the first one a task has is the one plotted
LOWER_IS_BETTER = {"perplexity", "mean_nll", "bits_per_byte", "kl_divergence", "final_loss", "val_loss"}
MB = 1e6
CURVES = {"loss_curve": "[step, loss, lr, grad_norm, tokens, seconds]", "val_curve": "[step, val_loss]"}


def _check_train(run: dict, where: str) -> None:
    """A train run's results.train is an object, and its curves (when present) are lists of rows of numbers."""
    train = (run.get("results") or {}).get("train")
    if train is None:
        return
    require(isinstance(train, dict), f"{where}: 'results.train' must be an object")
    for key, row in CURVES.items():
        require(key not in train or _is_curve(train[key]),
                f"{where}: results.train.{key} must be a list of {row} rows of numbers")


def _is_curve(value) -> bool:
    """A list of rows, each a list of at least two numbers (step first); non-finite numbers are allowed."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(row, (list, tuple)) and len(row) >= 2 and all(_is_real(x) for x in row) for row in value)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------- pareto


def pareto_front(points: list[tuple[float, float]], minimize_y: bool) -> list[int]:
    """Indices of the points no other point dominates, in order of increasing x (ties: increasing y when
    minimizing, decreasing when maximizing). x is always minimized; y is minimized or maximized. A point
    dominates another when it is at least as good on both axes and better on one, so identical points are
    all on the front. Points with a non-finite coordinate are never on it."""
    sign = 1.0 if minimize_y else -1.0
    finite = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    order = sorted(finite, key=lambda i: (points[i][0], sign * points[i][1]))
    front, best_y, best_x = [], math.inf, None
    for i in order:
        x, y = points[i][0], sign * points[i][1]
        if y < best_y or (y == best_y and x == best_x):
            front.append(i)
            best_y, best_x = y, x
    return front


# ------------------------------------------------------------------------------------------ plots


def _model_label(model: dict) -> str:
    """The model's "label" or "name" if given, else the last part of its source path or hub id."""
    for key in ("label", "name"):
        if model.get(key):
            return str(model[key])
    source = str(model.get("source") or "model").rstrip("/\\")
    return re.split(r"[/\\]", source)[-1] or source


def _model_key(model: dict) -> str:
    """Runs of one model on one engine share a key (runs recorded before "backend" existed ran on torch)."""
    keys = [model.get(k) for k in ("label", "name", "source", "format", "dtype")]
    return json.dumps(keys + [model.get("backend") or "torch"], default=str)


def _merge_by_model(runs: list[dict]) -> list[dict]:
    """One entry per distinct model: an eval run's results and a bench run's cost of the same model combine
    (later runs win on the same key). Entries: label, model, results, fidelity, cost."""
    merged: dict[str, dict] = {}
    for run in runs:
        model = run.get("model") or {}
        entry = merged.setdefault(_model_key(model), {"model": dict(model), "results": {}, "fidelity": {}, "cost": {}})
        entry["model"].update(model)
        for section in ("results", "fidelity", "cost"):
            if isinstance(run.get(section), dict):
                entry[section].update(run[section])
    entries = list(merged.values())
    for entry, label in zip(entries, _labels([e["model"] for e in entries])):
        entry["label"] = label
    return entries


def _labels(models: list[dict]) -> list[str]:
    """Model labels, with format, dtype and backend added where two different models would share one."""
    base = [_model_label(m) for m in models]
    keys_by_label: dict[str, set] = {}
    for label, model in zip(base, models):
        keys_by_label.setdefault(label, set()).add(_model_key(model))
    out = []
    for label, model in zip(base, models):
        extra = [str(model[k]) for k in ("format", "dtype", "backend") if model.get(k)]
        out.append(f"{label} ({', '.join(extra)})" if len(keys_by_label[label]) > 1 and extra else label)
    return out


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _size_mb(entry: dict) -> float | None:
    for value in (entry["model"].get("weight_bytes"), entry["model"].get("file_bytes"), entry["cost"].get("weight_bytes")):
        if _number(value) and value > 0:
            return value / MB
    return None


def _ms_per_token(entry: dict) -> float | None:
    speed = _number(entry["cost"].get("decode_tokens_per_s"))
    return 1000.0 / speed if speed and speed > 0 else None


def _metric(entry: dict, task: str, metric: str) -> float | None:
    metrics = entry["results"].get(task)
    return _number(metrics.get(metric)) if isinstance(metrics, dict) else None


def _quality_metric(entries: list[dict], task: str) -> str | None:
    """The metric plotted for a task: the first of QUALITY_METRICS that some model has a number for."""
    for metric in QUALITY_METRICS:
        if any(_metric(e, task, metric) is not None for e in entries):
            return metric
    return None


def _tasks(entries: list[dict]) -> list[str]:
    tasks: list[str] = []
    for entry in entries:
        tasks += [t for t, m in entry["results"].items() if isinstance(m, dict) and t not in tasks]
    return tasks


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "task"


PLOTS = (("size", "weights (MB)", _size_mb, "model.weight_bytes or model.file_bytes"),
         ("latency", "decode latency (ms/token, = 1000 / decode tok/s)", _ms_per_token, "cost.decode_tokens_per_s"))


def plot_runs(runs: list[dict], out_dir, notes: list[str] | None = None) -> list[Path]:
    """loss-curves.png for train runs with a loss curve, then PNGs of quality against weight size and against
    decode latency, one pair per task, Pareto front marked. A plot without the fields it needs is skipped,
    with the reason appended to `notes` (printed to stderr when no list is given). Returns the paths written."""
    entries = _merge_by_model(runs)
    out_dir, written, reasons = Path(out_dir), [], []
    tasks = [t for t in _tasks(entries) if _quality_metric(entries, t)]
    curves = _train_curves(runs, reasons)
    if curves:
        written.append(_plot_curves(curves, out_dir / "loss-curves.png"))
    if not tasks and (not curves or any(r.get("kind") != "train" for r in runs)):
        reasons.append(f"{'quality' if curves else 'all'} plots skipped: no run has results.<task>.perplexity, "
                       ".acc or .acc_norm")
    written += _quality_plots(entries, tasks, out_dir, reasons)
    _report_notes(reasons, notes)
    return written


def _quality_plots(entries: list[dict], tasks: list[str], out_dir: Path, reasons: list[str]) -> list[Path]:
    written = []
    for task in tasks:
        metric = _quality_metric(entries, task)
        for name, x_title, x_of, needs in PLOTS:
            points = [(x_of(e), _metric(e, task, metric), e["label"]) for e in entries]
            points = [p for p in points if p[0] is not None and p[1] is not None]
            if not points:
                reasons.append(f"{task} vs {name} skipped: no run with {task}.{metric} also has {needs}")
                continue
            path = out_dir / f"{_slug(task)}-vs-{name}.png"
            written.append(_plot(points, path, x_title, task, metric))
    return written


def _train_curves(runs: list[dict], reasons: list[str]) -> list[tuple[str, list, list]]:
    """(label, loss curve, val curve) of each train run with a loss curve, its curves checked (SlmError);
    labels that would repeat get the run's position (#n)."""
    train = [(i, r) for i, r in enumerate(runs) if r.get("kind") == "train"]
    for i, run in train:
        _check_train(run, f"run {i + 1} ({_model_label(run.get('model') or {})})")
    results = [(r.get("results") or {}).get("train") or {} for _, r in train]
    labels = _labels([r.get("model") or {} for _, r in train])
    labels = [f"{label} #{i + 1}" if labels.count(label) > 1 else label for (i, _), label in zip(train, labels)]
    curves = [(label, t["loss_curve"], t.get("val_curve") or []) for label, t in zip(labels, results)
              if t.get("loss_curve")]
    if train and not curves:
        reasons.append("loss curves skipped: no train run has results.train.loss_curve points")
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    return plt


def _save_png(plt, fig, path: Path, draw) -> Path:
    """Call `draw()`, render `fig` to PNG bytes, close it (also on failure), write the bytes atomically."""
    try:
        draw()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def _report_notes(reasons: list[str], notes: list[str] | None) -> None:
    if notes is not None:
        notes.extend(reasons)
    else:
        for reason in reasons:
            print(f"slm report: {reason}", file=sys.stderr)


def _plot(points: list[tuple[float, float, str]], path: Path, x_title: str, task: str, metric: str) -> Path:
    plt = _pyplot()
    minimize = metric in LOWER_IS_BETTER
    front = pareto_front([(x, y) for x, y, _ in points], minimize_y=minimize)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    return _save_png(plt, fig, path, lambda: _draw(ax, points, front, x_title, task, metric, minimize))


def _draw(ax, points, front: list[int], x_title: str, task: str, metric: str, minimize: bool) -> None:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.scatter(xs, ys, s=40, color="tab:blue", alpha=0.7, label="runs", zorder=2)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:orange", lw=1.5, zorder=1)
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=110, color="tab:orange", edgecolors="black",
               label="Pareto front", zorder=3)
    for x, y, label in points:
        ax.annotate(label, (x, y), xytext=(6, 5), textcoords="offset points", fontsize=8)
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    better = "lower is better" if minimize else "higher is better"
    ax.set_xlabel(x_title)
    ax.set_ylabel(f"{task} {metric} ({better})")
    ax.set_title(f"{task}: {metric} vs {x_title.split(' (')[0]} (front: better quality at lower cost)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.margins(0.12)


def _plot_curves(curves: list[tuple[str, list, list]], path: Path) -> Path:
    """Training loss (solid) and validation loss (dashed, same colour) against step; below, the learning
    rate when the curves record it."""
    plt = _pyplot()
    has_lr = any(len(row) > 2 for _, loss, _ in curves for row in loss)
    fig, axes = plt.subplots(2 if has_lr else 1, 1, sharex=True, squeeze=False, figsize=(8, 7 if has_lr else 5),
                             dpi=120, gridspec_kw={"height_ratios": [3, 1] if has_lr else [1]})

    def draw():
        _draw_losses(axes[0, 0], curves)
        if has_lr:
            _draw_lr(axes[1, 0], curves)
        axes[-1, 0].set_xlabel("step")

    return _save_png(plt, fig, path, draw)


def _column(rows: list, j: int) -> list[float]:
    """Column j of a curve as floats; missing or non-finite values as NaN (a gap in the line)."""
    return [float(r[j]) if len(r) > j and math.isfinite(r[j]) else math.nan for r in rows]


def _draw_losses(ax, curves: list[tuple[str, list, list]]) -> None:
    for i, (label, loss, val) in enumerate(curves):
        color, marker = f"C{i % 10}", "o" if len(loss) == 1 else None
        ax.plot(_column(loss, 0), _column(loss, 1), "-", color=color, lw=1.3, marker=marker, label=f"{label} train")
        if val:
            ax.plot(_column(val, 0), _column(val, 1), "--", color=color, lw=1.3, marker="o", ms=4,
                    label=f"{label} val")
    ax.set_ylabel("loss (nats per token, lower is better)")
    ax.set_title("Training loss (solid) and validation loss (dashed) by step")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _draw_lr(ax, curves: list[tuple[str, list, list]]) -> None:
    for i, (label, loss, _) in enumerate(curves):
        ax.plot(_column(loss, 0), _column(loss, 2), "-", color=f"C{i % 10}", lw=1.3, label=label)
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(True, alpha=0.3)
