"""`slm eval` and `slm bench` as functions: load, measure, and assemble one run record (see report.py)."""

from __future__ import annotations

import json

from dataclasses import dataclass, field
from pathlib import Path

from .. import backends
from ..errors import require
from ..loader import LoadedModel
from .data import NAMED_FILES, Text, read_text, resolve_source
from .fidelity import fidelity
from .perplexity import PerplexityProtocol, perplexity
from .report import run_envelope
from .tasks import Question, evaluate_task, load_task

TEXT_TASKS = ("wikitext2", "wikitext2-valid", "tinyshakespeare")


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["wikitext2"])
    limit: int | None = None  # questions per multiple-choice task; windows per perplexity task
    protocol: PerplexityProtocol = field(default_factory=PerplexityProtocol)
    batch_size: int = 8
    reference: str | None = None  # a model to measure fidelity against
    reference_cache: Path | None = None

    def validate(self) -> "EvalConfig":
        require(bool(self.tasks), "no tasks given")
        require(self.limit is None or self.limit > 0, f"--limit must be positive, got {self.limit}")
        require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        self.protocol.validate()
        return self


@dataclass
class Task:
    """One task's data, read before any model is loaded: text to score, or multiple-choice questions."""

    name: str
    text: Text | None = None
    questions: list[Question] | None = None
    source: str = ""


def is_text_task(spec: str) -> bool:
    """Perplexity on text (named corpora, text files, folders, hub datasets) vs multiple-choice questions."""
    if spec in TEXT_TASKS:
        return True
    if spec in NAMED_FILES:
        return False
    path = resolve_source(spec)
    return path is None or path.is_dir() or path.suffix != ".jsonl" or _first_record_has_text(path)


def _first_record_has_text(path: Path) -> bool:
    """Whether a JSON Lines file holds text (field `text`); a malformed line is left for its reader to report."""
    with path.open("rb") as f:
        line = next((line for line in f if line.strip()), b"")
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "text" in record


def task_name(spec: str) -> str:
    return spec if spec in NAMED_FILES or resolve_source(spec) is None else Path(spec).stem


def read_tasks(cfg: EvalConfig) -> list[Task]:
    """Every task's data, read and checked once (bad data fails before minutes are spent loading a model)."""
    tasks = []
    for spec in cfg.tasks:
        if is_text_task(spec):
            text = read_text(spec)
            tasks.append(Task(task_name(spec), text=text, source=text.source))
        else:
            questions, path = load_task(spec)
            tasks.append(Task(task_name(spec), questions=questions[:cfg.limit], source=path))
    return tasks


def _protocol(cfg: EvalConfig) -> PerplexityProtocol:
    p = cfg.protocol
    if cfg.limit and p.max_windows is None:
        return PerplexityProtocol(p.window, p.stride, cfg.limit, p.add_bos)
    return p


def evaluate(lm: LoadedModel, tasks: list[Task], cfg: EvalConfig) -> dict[str, dict]:
    """results.<task> for every task; perplexity tasks record their protocol, MC tasks their file."""
    results = {}
    for task in tasks:
        if task.text is not None:
            results[task.name] = perplexity(lm.model, lm.tokenizer, task.text, _protocol(cfg), 1)
        else:
            res = evaluate_task(lm.model, lm.tokenizer, task.questions, cfg.batch_size)
            results[task.name] = {**res, "source": task.source, "protocol": {"scoring": "sum of continuation "
                                  "log-probabilities; acc_norm divides by the continuation's UTF-8 bytes"}}
    return results


def model_record(lm: LoadedModel, dtype: str) -> dict:
    """The run's model section; "backend" tells engines apart, and a non-torch engine names its own weight type."""
    info = backends.model_info(lm)
    keys = ("source", "format", "architecture", "params", "weight_bytes", "file_bytes", "backend")
    record = {**{k: info[k] for k in keys}, "dtype": info.get("dtype", dtype), "name": Path(lm.source).name}
    steps = getattr(lm.model, "compression", None)  # a torch Decoder's applied steps (slmkit.pipeline)
    return {**record, "compression": steps} if steps else record


def run_eval(model: str | None, cfg: EvalConfig, dtype, command: list[str], backend: str = "torch") -> dict:
    """One `eval` run of MODEL on `backend` (see slmkit.backends); the reference model runs on torch."""
    tasks = read_tasks(cfg.validate())
    lm = backends.load(model, dtype, backend)
    run = run_envelope("eval", model_record(lm, str(dtype).removeprefix("torch.")), command)
    run["results"] = evaluate(lm, tasks, cfg)
    if cfg.reference:
        text = next((t.text for t in tasks if t.text is not None), None) or read_text("wikitext2")
        reference = backends.load(cfg.reference)
        run["fidelity"] = fidelity(lm.model, reference.model, lm.tokenizer, reference.tokenizer, text,
                                   _protocol(cfg), cfg.reference_cache, reference.source)
    return run


def run_bench(model: str | None, cfg, dtype, command: list[str], backend: str = "torch") -> dict:
    """One `bench` run: the cost section (cost.CostConfig) of a model on `backend`, with its analytic floors."""
    from .cost import measure_cost

    cfg.validate()
    lm = backends.load(model, dtype, backend)
    run = run_envelope("bench", model_record(lm, str(dtype).removeprefix("torch.")), command)
    run["cost"] = measure_cost(lm, cfg)
    return run
