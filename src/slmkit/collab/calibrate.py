"""`slm cascade calibrate`: measure a small and a large model on a labelled set, example by example, and choose
the cascade's threshold from the curve of quality against share escalated.

Tasks: a multiple-choice task (`arc_easy` or a questions JSONL: quality = correct by acc_norm, confidence = the
small model's choice margin) or an instruction set with reference answers (`seed_tasks`: the Self-Instruct seed
tasks, or a JSONL with instruction / input / output: quality = ROUGE-L F of the greedy answer against the
reference, confidence = a quantile of the answer's token log-probabilities). Both models run locally here;
generation goes through the continuous-batching engine.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlmError, require
from ..files import write_atomic
from ..generate import GenerationConfig
from .cascade import cascade_curve, choose_threshold, margin_confidence, quantile_confidence, summary

GEN_TASKS = {"seed_tasks": "alpaca/seed_tasks.jsonl"}


@dataclass
class Measured:
    quality: list[float]
    confidence: list[float]
    answers: list[str] | None = None


def multiple_choice(lm, questions, batch_size: int = 8) -> Measured:
    from ..eval.tasks import loglikelihoods

    pairs = [pair for q in questions for pair in q.pairs]
    lls, quality, confidence = iter(loglikelihoods(lm.model, lm.tokenizer, pairs, batch_size, "multiple choice")), [], []
    for q in questions:
        norm = [next(lls) / max(len(x.encode("utf-8")), 1) for _, x in q.pairs]
        quality.append(float(max(range(len(norm)), key=norm.__getitem__) == q.answer))
        confidence.append(margin_confidence(norm))
    return Measured(quality, confidence)


def generation(lm, records: list[dict], max_new_tokens: int, quantile: float, parallel: int = 8) -> Measured:
    """Greedy answers to every record's instruction (through the chat template when the model has one)."""
    from ..batching import Engine, Request
    from ..synth.rouge import rouge_l

    tok = lm.tokenizer
    engine = Engine(lm.model, tok, max_active=parallel, max_queue=len(records), context=min(lm.model.cfg.max_seq_len, 2048))
    sinks, stop_ids = [], tok.stop_ids()
    for rec in records:
        text = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        prompt = tok.render_chat([{"role": "user", "content": text}]) if tok.chat_template else text + "\n"
        sinks.append(_Answer())
        engine.submit(Request(tok.encode(prompt), GenerationConfig(max_new_tokens, stop_ids=stop_ids)), sinks[-1])
    while engine.step():
        pass
    answers = [s.text for s in sinks]
    return Measured([rouge_l(a, r["output"]) for a, r in zip(answers, records)],
                    [quantile_confidence(s.logprobs, quantile) for s in sinks], answers)


class _Answer:
    def __init__(self):
        self.text, self.logprobs = "", []

    def __call__(self, ev):
        self.text += ev.text
        if ev.logprob is not None:
            self.logprobs.append(ev.logprob)


def read_instructions(spec: str, limit: int | None) -> list[dict]:
    """Records {instruction, input, output}: the Self-Instruct seed-task format (instances[0]) or flat JSONL."""
    from ..eval.data import read_jsonl, shared_data_dir

    path = shared_data_dir() / GEN_TASKS[spec] if spec in GEN_TASKS else Path(spec)
    require(path.is_file(), f"{spec}: no such instruction file (give seed_tasks or a JSONL path)")
    out = []
    for n, rec in enumerate(read_jsonl(path), 1):
        inst = (rec.get("instances") or [rec])[0] if isinstance(rec, dict) else None
        ok = isinstance(inst, dict) and all(isinstance(x, str) for x in (rec.get("instruction"), inst.get("output")))
        require(ok, f"{path}:{n}: expected 'instruction' and 'output' strings (or Self-Instruct 'instances')")
        out.append({"instruction": rec["instruction"], "input": str(inst.get("input") or ""), "output": inst["output"]})
    return out[:limit]


def calibrate(small, large, task: str, limit: int | None = None, escalate: float | None = None,
              quality: float | None = None, quantile: float = 0.1, max_new_tokens: int = 64) -> dict:
    """Measure both models on the task, build the curve, choose the threshold; returns the report dict."""
    from ..eval.tasks import load_task

    if task in GEN_TASKS or task.endswith(".jsonl") and _is_instructions(task):
        records = read_instructions(task, limit)
        s, l = (generation(m, records, max_new_tokens, quantile) for m in (small, large))
        kind, signal = "generation (ROUGE-L F)", f"{quantile:g}-quantile of token log-probabilities"
    else:
        questions = load_task(task)[0][:limit]
        s, l = (multiple_choice(m, questions) for m in (small, large))
        kind, signal = "multiple choice (acc_norm)", "choice margin (log-likelihood per byte)"
    curve = cascade_curve(s.confidence, s.quality, l.quality)
    weak, strong = sum(s.quality) / len(s.quality), sum(l.quality) / len(l.quality)
    report = summary(curve, weak, strong, choose_threshold(curve, escalate, quality))
    return {"task": task, "examples": len(s.quality), "kind": kind, "signal": signal, "small": small.source,
            "large": large.source, "quantile": quantile, **report,
            "per_example": {"small_quality": s.quality, "large_quality": l.quality, "confidence": s.confidence}}


def _is_instructions(path: str) -> bool:
    try:
        first = json.loads(Path(path).read_text(encoding="utf-8").splitlines()[0])
    except (OSError, ValueError, IndexError) as e:
        raise SlmError(f"{path}: not readable as JSONL ({e})") from None
    return isinstance(first, dict) and "instruction" in first


def write_report(report: dict, out: Path) -> list[Path]:
    """OUT/cascade.json, OUT/cascade.md and OUT/cascade.png (quality against share escalated), each atomic."""
    paths = [write_atomic(out / "cascade.json", json.dumps(report, indent=1).encode())]
    md = [f"# Cascade: {report['small']} -> {report['large']}", "",
          f"{report['task']}, {report['examples']} examples, {report['kind']}; signal: {report['signal']}", "",
          "| | value |", "|---|---|",
          f"| small model alone | {report['weak_quality']:.4f} |", f"| large model alone | {report['strong_quality']:.4f} |",
          f"| APGR (random routing: 0.5) | {_num(report['apgr'])} |",
          f"| share escalated for 50% of the gap (CPT50) | {_pct(report['cpt50'])} |",
          f"| chosen threshold | {report['threshold']:.4f} |",
          f"| ... escalates | {report['escalated']:.1%} |", f"| ... quality | {report['quality']:.4f} |"]
    paths.append(write_atomic(out / "cascade.md", ("\n".join(md) + "\n").encode()))
    paths.append(write_atomic(out / "cascade.png", plot(report)))
    return paths


def _num(x) -> str:
    return "undefined (no quality gap)" if x is None else f"{x:.3f}"


def _pct(x) -> str:
    return "never" if x is None else f"{x:.1%}"


def plot(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    xs = [p["escalated"] * 100 for p in report["curve"]]
    ys = [p["quality"] for p in report["curve"]]
    weak, strong = report["weak_quality"], report["strong_quality"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, label=f"cascade (APGR {_num(report['apgr'])})")
    ax.plot([0, 100], [weak, strong], "--", color="grey", label="random routing")
    ax.axhline(weak, color="tab:red", lw=0.8, label="small alone")
    ax.axhline(strong, color="tab:green", lw=0.8, label="large alone")
    ax.plot([report["escalated"] * 100], [report["quality"]], "o", color="black", label="chosen threshold")
    ax.set_xlabel("requests escalated to the large model (%)")
    ax.set_ylabel(report["kind"])
    ax.set_title(f"{report['task']}: {report['examples']} examples", fontsize=10)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
