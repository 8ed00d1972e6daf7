"""Running a recipe: load the model, apply each step through the pipeline (recorded in the model's history),
save the checkpoint atomically, export if the recipe says so. The model after every step is saved under
OUT.steps/ (a failed or interrupted run resumes from there); with `measure` it is also measured (file size,
WikiText-2 perplexity, KL against the recipe's input model, decode speed), and the table is written as
OUT/recipe.json and OUT/recipe.md."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlmError, require
from ..records import step_record
from ..files import write_atomic
from .parse import Recipe


@dataclass
class Measure:
    windows: int = 40  # WikiText-2 test windows (the shared protocol: 40 of 512 tokens)
    window: int = 512
    prompt_tokens: int = 128  # decode speed: new_tokens generated after this prompt, median of `runs` runs
    new_tokens: int = 64
    runs: int = 3
    cache: Path | None = None  # the input model's log-probabilities, computed once for every step's KL


def run_recipe(recipe: Recipe, out: Path, force: bool = False, measure: Measure | None = None,
               show: bool = True, resume: bool = False) -> dict:
    """Run the recipe; returns {"checkpoint", "export", "rows"} (rows: one per measured state).

    Every finished step but the last is saved under OUT.steps/ with a state file (what ran, the rows measured
    so far), so a run that fails or is interrupted after an hour of distillation loses nothing: `resume`
    continues after the last saved step (refused if the recipe's steps up to there differ). OUT.steps/ is
    removed once OUT is written."""
    out = Path(out)
    targets = [out] + ([export_path(recipe, out)] if recipe.export else [])
    for path in targets:
        require(force or not path.exists(), f"{path} exists; pass --force to replace it")
    steps_dir = Path(f"{out}.steps")
    require(resume or force or not steps_dir.exists(), f"{steps_dir} holds the steps an interrupted run "
            f"finished: pass --resume to continue it, or --force to start over")
    require(not resume or (steps_dir / STATE).is_file(), f"--resume: {steps_dir / STATE} not found (nothing to "
            f"resume)")
    if force and not resume:
        shutil.rmtree(steps_dir, ignore_errors=True)
    try:
        result = _run(recipe, out, force, measure, show, steps_dir, resume)
    except BaseException:
        if (steps_dir / STATE).is_file():
            _say(show, f"[recipe: the finished steps are kept in {steps_dir}; rerun with --resume to continue]")
        raise
    shutil.rmtree(steps_dir, ignore_errors=True)
    return result


STATE = "state.json"


def _run(recipe: Recipe, out: Path, force: bool, measure: Measure | None, show: bool, steps_dir: Path,
         resume: bool) -> dict:
    from ..backends import load
    from ..checkpoint import save_checkpoint
    from ..loader import resolve
    from ..pipeline import _plain_first, apply_step_, step_inputs

    lm = load(recipe.model)
    steps = _plain_first(lm, recipe.steps)
    keys = [json.loads(json.dumps(step_record(c), default=str)) for c in steps]  # what each step is, as data
    steps_dir.mkdir(exist_ok=True)
    if measure:
        measure.cache = steps_dir / "reference-logprobs"
    reference = recipe.model or str(resolve(None))  # KL is measured against the input: a path, never None
    done, rows = _resume(steps_dir, keys) if resume else (0, [])
    if done:
        lm = load(str(_step_dir(steps_dir, done, steps[done - 1])))
        _say(show, f"[recipe: resuming after step {done}/{len(steps)} ({steps[done - 1].method})]")
    elif measure:
        rows = [measure_state(reference, reference, "input", measure)]
    for i, cfg in enumerate(steps[done:], done + 1):
        _say(show, f"[recipe step {i}/{len(steps)}: {cfg.method}]")
        apply_step_(lm.model, cfg, step_inputs(cfg, lm.tokenizer))
        if i < len(steps):
            state = save_checkpoint(lm.model, lm.tokenizer, _step_dir(steps_dir, i, cfg), force=True)
            if measure:
                rows.append(measure_state(str(state), reference, cfg.method, measure))
            write_atomic(steps_dir / STATE, json.dumps({"done": i, "steps": keys[:i], "rows": rows}).encode())
    checkpoint = save_checkpoint(lm.model, lm.tokenizer, out, force=force)
    if measure:
        rows.append(measure_state(str(checkpoint), reference, steps[-1].method, measure))
    exported = _export(recipe, lm, out, force) if recipe.export else None
    result = {"recipe": recipe.source, "model": recipe.model, "checkpoint": str(checkpoint),
              "export": None if exported is None else str(exported), "rows": rows}
    if measure:
        write_atomic(out / "recipe.json", (json.dumps(result, indent=1) + "\n").encode())
        write_atomic(out / "recipe.md", markdown(rows).encode())
    return result


def _step_dir(steps_dir: Path, i: int, cfg) -> Path:
    return steps_dir / f"{i:02d}-{cfg.method}"


def _resume(steps_dir: Path, keys: list) -> tuple[int, list]:
    """(steps already done, rows measured) from the state file, checked against this recipe's steps."""
    try:
        state = json.loads((steps_dir / STATE).read_text())
        done, ran, rows = int(state["done"]), state["steps"], list(state["rows"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SlmError(f"{steps_dir / STATE}: unreadable ({e}); pass --force to start over") from None
    require(0 < done < len(keys) and ran == keys[:done], f"{steps_dir} was made by another recipe (its first "
            f"{done} steps differ from this one's); pass --force to start over")
    return done, rows


def export_path(recipe: Recipe, out: Path) -> Path:
    if recipe.export.out:
        return Path(recipe.export.out)
    return Path(f"{out}.gguf") if recipe.export.format == "gguf" else Path(f"{out}-hf")


def _export(recipe: Recipe, lm, out: Path, force: bool) -> Path:
    from ..export import export_model

    return export_model(lm.model, lm.tokenizer, export_path(recipe, out), recipe.export.format, recipe.export.type,
                        force)


def measure_state(spec: str | None, reference: str | None, label: str, m: Measure) -> dict:
    """Size, perplexity, KL against the input and decode speed of the model at `spec`."""
    import torch

    from ..eval.cost import CostConfig
    from ..eval.perplexity import PerplexityProtocol
    from ..eval.run import EvalConfig, run_bench, run_eval

    cfg = EvalConfig(["wikitext2"], None, PerplexityProtocol(m.window, None, m.windows, False), 8,
                     None if spec == reference else reference, m.cache)
    ev = run_eval(spec, cfg, torch.float32, [])
    bench = run_bench(spec, CostConfig(m.prompt_tokens, m.new_tokens, m.runs), torch.float32, [])
    fidelity = ev.get("fidelity") or {}
    return {"step": label, "model": spec, "bytes": ev["model"].get("file_bytes"),
            "ppl": ev["results"]["wikitext2"]["perplexity"], "kl": fidelity.get("kl_divergence", 0.0),
            "decode_tps": bench["cost"]["decode_tokens_per_s"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| after | weights MB | WikiText-2 PPL | KL vs input (nats/token) | decode tok/s |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['bytes'] / 1e6:.1f}" if r.get("bytes") else "–"
        lines.append(f"| {r['step']} | {size} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['decode_tps']:.1f} |")
    return "\n".join(lines) + "\n"


def _say(show: bool, text: str) -> None:
    if show:
        print(text, file=sys.stderr, flush=True)
