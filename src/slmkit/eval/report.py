"""Run files (versioned JSON + a Markdown twin), comparison reports, quality/size/latency plots and loss curves.

One `slm eval`, `slm bench` or `slm train` invocation produces one run: `run_envelope()` gives the common part (schema,
model, versions, machine), the caller adds "protocol", "results", "fidelity" and "cost", and `write_run()`
stores it. `build_report()` reads several runs and writes `report.md` plus PNG plots with the Pareto front
marked, and the loss curves of train runs. The schema is documented in docs/run-schema.md.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shlex
from datetime import datetime, timezone
from pathlib import Path

from .machine import machine_info
from .plots import (LOWER_IS_BETTER, QUALITY_METRICS, _check_train, _is_curve, _labels, _merge_by_model,
                    _model_label, _ms_per_token, _report_notes, _size_mb, _tasks, plot_runs)
from .plots import CURVES, _train_curves, pareto_front  # noqa: F401  (re-exported: the report API)
from ..errors import SlmError, require
from ..files import write_atomic

SCHEMA = "slmkit.run/1"
KINDS = ("eval", "bench", "train")
OPTIONAL_PACKAGES = ("transformers", "tokenizers", "safetensors", "gguf", "numpy", "llama-cpp-python")
COST_COLUMNS = (("decode_tokens_per_s", "decode tok/s"), ("ttft_ms", "TTFT ms"), ("peak_rss_mb", "peak RSS MB"))
TRAIN_COLUMNS = (("final_loss", "final loss"), ("val_loss", "val loss"), ("tokens_per_s", "train tok/s"))
CURVE_HEADER = ("step", "loss", "lr", "grad norm", "tokens", "seconds")
CURVE_ROWS = 10  # rows of the loss curve shown in a train run's Markdown
SECTIONS = ("model", "protocol", "results", "fidelity", "cost", "versions", "machine")  # objects when present


# ---------------------------------------------------------------------------------------------- envelope


def run_envelope(kind: str, model: dict, command: list[str]) -> dict:
    """The common part of a run; the caller adds "protocol", "results", "fidelity" and "cost"."""
    require(kind in KINDS, f"run kind must be one of {', '.join(KINDS)}, got {kind!r}")
    argv = [str(a) for a in command]
    return {"schema": SCHEMA, "kind": kind, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": argv, "command_line": shlex.join(argv), "model": dict(model),
            "versions": _versions(), "machine": machine_info()}


def _versions() -> dict:
    """Python, torch and slmkit always (None when not installed as a distribution); others when installed.
    Read from package metadata: nothing heavy is imported."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "slmkit") + OPTIONAL_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in ("torch", "slmkit"):
                versions[name] = None
    return versions


# ----------------------------------------------------------------------------------------- files


def validate_run(run: object, where: str = "run") -> dict:
    """The envelope checks shared by write_run and read_run; returns the run."""
    require(isinstance(run, dict), f"{where}: not a slmkit run (top level is {type(run).__name__}, not an object)")
    require("schema" in run, f"{where}: no 'schema' key; not a slmkit run file (expected {SCHEMA!r})")
    require(run["schema"] == SCHEMA, f"{where}: schema {run['schema']!r} is not supported (expected {SCHEMA!r})")
    require(run.get("kind") in KINDS, f"{where}: run kind must be one of {', '.join(KINDS)}, got {run.get('kind')!r}")
    for section in SECTIONS:
        require(isinstance(run.get(section, {}), dict), f"{where}: '{section}' must be an object")
    if run["kind"] == "train":
        _check_train(run, where)
    return run


def write_run(run: dict, path) -> Path:
    """Validate and write `run` as JSON at `path` and as Markdown beside it (same stem, .md), atomically."""
    path = Path(path)
    require(path.suffix != ".md", f"{path}: a run file must not end in .md (the Markdown twin takes that name)")
    validate_run(run, str(path))
    try:
        text = json.dumps(run, indent=2, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as e:  # a non-serialisable value, or a reference cycle
        raise SlmError(f"{path}: run cannot be written as JSON: {e}") from None
    markdown = to_markdown(run)
    write_atomic(path, text.encode("utf-8"))
    write_atomic(path.with_suffix(".md"), markdown.encode("utf-8"))
    return path


def read_run(path) -> dict:
    """A run written by write_run, checked; SlmError (one line) when missing, not JSON or another schema."""
    path = Path(path)
    require(path.is_file(), f"run file not found: {path}")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SlmError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise SlmError(f"{path}: cannot be read as a UTF-8 JSON file ({e.__class__.__name__})") from None
    return validate_run(run, str(path))


# -------------------------------------------------------------------------------------- markdown


def _fmt(value) -> str:
    """A table cell: floats to 4 significant digits, containers as compact JSON, pipes escaped."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    else:
        text = "–" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) for every non-dict leaf of a nested dict."""
    items = []
    for key, value in d.items():
        if isinstance(value, dict) and value:
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def _section(title: str, d: dict | None) -> list[str]:
    if not isinstance(d, dict) or not d:
        return []
    return ["", f"## {title}", ""] + _table(["key", "value"], [[k, v] for k, v in _flatten(d)])


def _results_lines(results: dict | None) -> list[str]:
    """One row per task and scalar metric; nested values (a task's own protocol) go to the protocol section."""
    if not isinstance(results, dict) or not results:
        return []
    rows = []
    for task, metrics in results.items():
        metrics = metrics if isinstance(metrics, dict) else {"value": metrics}
        scalars = [k for k, v in metrics.items() if not isinstance(v, dict)]
        ordered = [k for k in QUALITY_METRICS if k in scalars] + [k for k in scalars if k not in QUALITY_METRICS]
        rows += [[task, k + _direction(k), _cell(k, metrics[k])] for k in ordered]
    return ["", "## Results", ""] + _table(["task", "metric", "value"], rows)


def _direction(metric: str) -> str:
    if metric in LOWER_IS_BETTER:
        return " (lower is better)"
    return " (higher is better)" if metric in ("acc", "acc_norm", "tokens_per_s") else ""


def _cell(key: str, value):
    """A result's table cell; a curve (a `*_curve` list of [step, value, ...] rows) as a one-line summary."""
    if not key.endswith("_curve") or not _is_curve(value):
        return value
    if not value:
        return "0 points"
    first, last = value[0], value[-1]
    return f"{len(value)} points, steps {first[0]:g}–{last[0]:g}, {first[1]:.4g} → {last[1]:.4g}"


def _curve_lines(run: dict) -> list[str]:
    """A train run's loss curve: at most CURVE_ROWS evenly spaced rows, first and last included."""
    train = (run.get("results") or {}).get("train") if run.get("kind") == "train" else None
    curve = train.get("loss_curve") if isinstance(train, dict) else None
    if not _is_curve(curve) or not curve:
        return []
    n = len(curve)
    picks = sorted({round(i * (n - 1) / (CURVE_ROWS - 1)) for i in range(CURVE_ROWS)}) if n > CURVE_ROWS else range(n)
    width = max(len(curve[i]) for i in picks)
    rows = [list(curve[i]) + [None] * (width - len(curve[i])) for i in picks]
    header = list(CURVE_HEADER[:width]) + [f"column {j + 1}" for j in range(len(CURVE_HEADER), width)]
    note = f"{len(rows)} of {n} logged steps; the full curve is in the JSON run file."
    return ["", "## Loss curve", "", note, ""] + _table(header, rows)


def _protocol_lines(run: dict) -> list[str]:
    protocol = dict(run["protocol"]) if isinstance(run.get("protocol"), dict) else {}
    results = run.get("results") if isinstance(run.get("results"), dict) else {}
    for task, metrics in results.items():
        if isinstance(metrics, dict):
            protocol.update({f"{task}.{k}": v for k, v in metrics.items() if isinstance(v, dict)})
    return _section("Protocol", protocol)


def to_markdown(run: dict) -> str:
    """A readable page: model, each task's metrics, fidelity, cost, protocol, versions and machine."""
    model = run.get("model") or {}
    lines = [f"# slmkit {run.get('kind', '?')} run: {_model_label(model)}", "",
             f"- schema: `{run.get('schema')}`", f"- created: {run.get('created', '–')}",
             f"- command: `{run.get('command_line') or shlex.join(map(str, run.get('command') or []))}`"]
    lines += _section("Model", model) + _results_lines(run.get("results")) + _curve_lines(run)
    lines += _section("Fidelity", run.get("fidelity")) + _section("Cost", run.get("cost")) + _protocol_lines(run)
    known = {"schema", "kind", "created", "command", "command_line", "model", "results", "fidelity", "cost",
             "protocol", "versions", "machine"}
    for key, value in run.items():
        if key not in known and isinstance(value, dict):
            lines += _section(key.capitalize(), value)
    lines += _section("Versions", run.get("versions")) + _section("Machine", run.get("machine"))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- report


def _comparison_columns(runs: list[dict]) -> list[tuple[str, callable]]:
    """(header, value getter) for the comparison table; columns no run has a value for are left out."""
    columns = [("params", lambda r: (r.get("model") or {}).get("params")),
               ("weights MB", lambda r: _size_mb({"model": r.get("model") or {}, "cost": r.get("cost") or {}}))]
    entries = _merge_by_model(runs)
    for task in _tasks(entries):
        for metric in QUALITY_METRICS:
            columns.append((f"{task} {metric}", lambda r, t=task, m=metric: _run_metric(r, t, m)))
    columns += [(header, lambda r, k=key: _train_metric(r, k)) for key, header in TRAIN_COLUMNS]
    columns.append(("KL divergence", lambda r: (r.get("fidelity") or {}).get("kl_divergence")))
    columns += [(header, lambda r, k=key: (r.get("cost") or {}).get(k)) for key, header in COST_COLUMNS]
    columns.append(("ms/token", lambda r: _ms_per_token({"cost": r.get("cost") or {}})))
    return [(h, get) for h, get in columns if any(get(r) is not None for r in runs)]


def _run_metric(run: dict, task: str, metric: str):
    metrics = (run.get("results") or {}).get(task)
    return metrics.get(metric) if isinstance(metrics, dict) else None


def _train_metric(run: dict, key: str):
    return _run_metric(run, "train", key) if run.get("kind") == "train" else None


def _protocol_notes(runs: list[dict], names: list[str]) -> list[str]:
    """A note for each task whose recorded protocol differs between runs: their numbers do not compare."""
    notes, seen = [], {}
    for run, name in zip(runs, names):
        for task, metrics in (run.get("results") or {}).items():
            if isinstance(metrics, dict) and isinstance(metrics.get("protocol"), dict):
                seen.setdefault(task, {}).setdefault(json.dumps(metrics["protocol"], sort_keys=True, default=str), []).append(name)
    for task, variants in seen.items():
        if len(variants) > 1:
            groups = "; ".join(", ".join(v) for v in variants.values())
            notes.append(f"{task}: the protocol differs between runs ({groups}); compare these numbers with care")
    return notes


def comparison_markdown(runs: list[dict], names: list[str], plots: list[Path], notes: list[str]) -> str:
    """report.md: one row per run with the key metrics, the plots, and notes (skipped plots, protocol drift)."""
    columns = _comparison_columns(runs)
    labels = _labels([r.get("model") or {} for r in runs])
    rows = [[name, run.get("kind"), label, (run.get("model") or {}).get("format"), (run.get("model") or {}).get("dtype")]
            + [get(run) for _, get in columns] for run, name, label in zip(runs, names, labels)]
    train = " Loss (nats per token): lower is better." if any(h == "final loss" for h, _ in columns) else ""
    lines = ["# slmkit report", "", f"{len(runs)} run(s), schema `{SCHEMA}`. Perplexity, KL divergence, latency "
             f"and memory: lower is better; acc, acc_norm and tok/s: higher is better.{train}", ""]
    lines += _table(["run", "kind", "model", "format", "dtype"] + [h for h, _ in columns], rows)
    if plots:
        lines += ["", "## Plots"] + [line for p in plots for line in ("", f"![{p.stem}]({p.name})")]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def build_report(paths: list[str], out_dir) -> list[Path]:
    """Read the runs at `paths`, write the plots and report.md into `out_dir`; returns the files written
    (report.md last). Skipped plots and protocol differences are listed in report.md and on stderr."""
    require(len(paths) > 0, "report: give at least one run file")
    runs = [read_run(p) for p in paths]
    names = [Path(p).name for p in paths]
    out_dir = Path(out_dir)
    require(not out_dir.exists() or out_dir.is_dir(), f"{out_dir}: exists and is not a folder")
    notes: list[str] = []
    plots = plot_runs(runs, out_dir, notes)
    notes += _protocol_notes(runs, names)
    _report_notes(notes, None)
    report = write_atomic(out_dir / "report.md", comparison_markdown(runs, names, plots, notes).encode("utf-8"))
    return plots + [report]
