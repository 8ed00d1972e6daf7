"""`slm eval` and `slm bench` as functions: load, measure, and assemble one run record (see report.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import require
from ..info import model_info
from ..loader import LoadedModel, load
from .data import NAMED_FILES, read_jsonl, read_text, resolve_source
from .fidelity import fidelity
from .perplexity import PerplexityProtocol, perplexity
from .report import run_envelope
from .tasks import evaluate_task, load_task

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


def is_text_task(spec: str) -> bool:
    """Perplexity on text (named corpora, text files, folders, hub datasets) vs multiple-choice questions."""
    if spec in TEXT_TASKS:
        return True
    if spec in NAMED_FILES:
        return False
    path = resolve_source(spec)
    if path is None or path.is_dir() or path.suffix != ".jsonl":
        return True
    return "text" in read_jsonl(path)[0]


def task_name(spec: str) -> str:
    return spec if spec in NAMED_FILES or resolve_source(spec) is None else Path(spec).stem


def _protocol(cfg: EvalConfig) -> PerplexityProtocol:
    p = cfg.protocol
    if cfg.limit and p.max_windows is None:
        return PerplexityProtocol(p.window, p.stride, cfg.limit, p.add_bos)
    return p


def evaluate(lm: LoadedModel, cfg: EvalConfig) -> dict[str, dict]:
    """results.<task> for every task; perplexity tasks record their protocol, MC tasks their file."""
    results = {}
    for spec in cfg.tasks:
        if is_text_task(spec):
            results[task_name(spec)] = perplexity(lm.model, lm.tokenizer, read_text(spec), _protocol(cfg), 1)
        else:
            questions, path = load_task(spec)
            res = evaluate_task(lm.model, lm.tokenizer, questions[:cfg.limit], cfg.batch_size)
            results[task_name(spec)] = {**res, "source": path, "protocol": {"scoring": "sum of continuation "
                                        "log-probabilities; acc_norm divides by the continuation's UTF-8 bytes"}}
    return results


def model_record(lm: LoadedModel, dtype: str) -> dict:
    info = model_info(lm)
    keys = ("source", "format", "architecture", "params", "weight_bytes", "file_bytes")
    return {**{k: info[k] for k in keys}, "dtype": dtype, "name": Path(lm.source).name}


def run_eval(model: str | None, cfg: EvalConfig, dtype, command: list[str]) -> dict:
    cfg.validate()
    for spec in cfg.tasks:  # fail on bad task data before spending minutes on the model
        if not is_text_task(spec):
            load_task(spec)
    lm = load(model, dtype=dtype)
    run = run_envelope("eval", model_record(lm, str(dtype).removeprefix("torch.")), command)
    run["results"] = evaluate(lm, cfg)
    if cfg.reference:
        run["fidelity"] = _fidelity(lm, cfg)
    return run


def _fidelity(lm: LoadedModel, cfg: EvalConfig) -> dict:
    text_tasks = [t for t in cfg.tasks if is_text_task(t)] or ["wikitext2"]
    reference = load(cfg.reference)
    return fidelity(lm.model, reference.model, lm.tokenizer, reference.tokenizer, read_text(text_tasks[0]),
                    _protocol(cfg), cfg.reference_cache, reference.source)


def run_bench(model: str | None, cfg, dtype, command: list[str]) -> dict:
    """One `bench` run: the cost section (cost.CostConfig) of a model, with its analytic floors."""
    from .cost import measure_cost

    cfg.validate()
    lm = load(model, dtype=dtype)
    run = run_envelope("bench", model_record(lm, str(dtype).removeprefix("torch.")), command)
    run["cost"] = measure_cost(lm, cfg)
    return run
