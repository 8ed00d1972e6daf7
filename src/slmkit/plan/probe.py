"""Measure one artifact for the planner in a fresh process (`python -m slmkit.plan.probe ARGS`), so that resident
memory is the artifact's own and nothing the planner has loaded can flatter a figure.

In order: load it on its backend; fill a KV cache of the whole stated context (prefilled in chunks of 128
synthetic tokens, so every cache page is resident and no full-context attention matrix inflates the peak);
time decoding with slmkit's cost machinery (medians of runs, their spread reported as the timing noise);
record the peak resident memory; then the quality figures: KL against the base model's log-probabilities on the
evaluation text (read from the planner's cache: the base is never loaded here), the perplexity increase, and
multiple-choice accuracies. A KV-quantized model is scored through its own cache, as generation reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK = 128


@dataclass
class ProbeSpec:
    artifact: Path
    backend: str
    context: int
    prompt_tokens: int
    windows: int
    reference_cache: Path  # the base's log-probabilities (written by the planner before any probe)
    tasks: tuple[str, ...] = ()
    task_limit: int = 200
    runs: int = 5
    quality: bool = True

    def argv(self, out: Path) -> list[str]:
        return [sys.executable, "-m", "slmkit.plan.probe", str(self.artifact), "--backend", self.backend,
                "--context", str(self.context), "--prompt-tokens", str(self.prompt_tokens), "--windows",
                str(self.windows), "--reference-cache", str(self.reference_cache), "--task-limit",
                str(self.task_limit), "--runs", str(self.runs), "-o", str(out), *(["--no-quality"] if not self.quality
                                                                                else []),
                *[a for t in self.tasks for a in ("--task", t)]]


def artifact_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fill_context(model, context: int) -> None:
    """Prefill a cache of `context` synthetic tokens chunk by chunk (every page of it written)."""
    from ..eval.cost import synthetic_prompt

    ids = torch.tensor([synthetic_prompt(context, model.cfg.vocab_size)])  # [1, context]
    cache = model.new_cache(1, context)
    with torch.no_grad():
        for start in range(0, context, CHUNK):
            model(ids[:, start:start + CHUNK], cache=cache, pos=start, last_only=True)


class ThroughCache:
    """Scores a model through a fresh cache of its own type per call (a quantized KV cache, as decode reads it)."""

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, cache=self.model.new_cache(tokens.shape[0], tokens.shape[1]))


def quality(model, reference_cache: Path) -> dict:
    """KL and perplexity against the base's log-probabilities the planner cached on its evaluation windows."""
    from safetensors.torch import load_file

    from ..eval.fidelity import fidelity_on

    data = json.loads((reference_cache / "windows.json").read_text())
    ref = load_file(str(reference_cache / "reference.safetensors"))
    scored = ThroughCache(model) if getattr(model, "kv_scheme", None) is not None else model
    f = fidelity_on(scored, data["sequences"], data["firsts"], [ref[str(i)].double() for i in range(len(ref))])
    return {"kl": f["kl_divergence"], "ppl": f["perplexity"], "base_ppl": f["reference_perplexity"],
            "ppl_increase_pct": f["delta_perplexity_pct"], "tokens_scored": f["tokens_scored"]}


def accuracies(lm, spec: ProbeSpec) -> dict:
    from ..eval.tasks import evaluate_task, load_task

    out = {}
    for task in spec.tasks:
        questions, _ = load_task(task)
        out[f"acc:{task}"] = evaluate_task(lm.model, lm.tokenizer, questions[:spec.task_limit])["acc"]
    return out


def probe(spec: ProbeSpec) -> dict:
    from ..backends import load
    from ..eval.cost import CostConfig, measure_cost, peak_rss_mb

    lm = load(str(spec.artifact), torch.float32, spec.backend)
    fill_context(lm.model, spec.context)
    cost = measure_cost(lm, CostConfig(prompt_tokens=spec.prompt_tokens, new_tokens=32, runs=spec.runs, warmup=1))
    tps = [r["decode_tokens_per_s"] for r in cost["runs"]]
    fig = {"file_mb": artifact_bytes(spec.artifact) / 1e6, "memory_mb": peak_rss_mb(),
           "decode_tps": cost["decode_tokens_per_s"], "ttft_ms": cost["ttft_ms"],
           "decode_noise": (max(tps) - min(tps)) / cost["decode_tokens_per_s"],
           "energy_j_per_token": cost["energy_j_per_token"], "energy_source": cost["energy_source"],
           "weight_bytes": cost["weight_bytes"]}
    if spec.quality:
        fig.update(quality(lm.model, spec.reference_cache))
        fig.update(accuracies(lm, spec))
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slmkit.plan.probe")
    p.add_argument("artifact", type=Path)
    p.add_argument("--backend", default="torch")
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--reference-cache", type=Path, required=True)
    p.add_argument("--task", action="append", default=[])
    p.add_argument("--task-limit", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("-o", "--out", type=Path, required=True)
    a = p.parse_args(argv)
    spec = ProbeSpec(a.artifact, a.backend, a.context, a.prompt_tokens, a.windows, a.reference_cache,
                     tuple(a.task), a.task_limit, a.runs, not a.no_quality)
    torch.set_grad_enabled(False)
    fig = probe(spec)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(fig, indent=2))
    tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
