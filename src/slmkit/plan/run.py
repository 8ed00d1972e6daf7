"""`slm plan`: everything before and after the search -- checks, the once-per-model measurements the predictions
need (cached), the guarantee (the returned artifact re-measured in a fresh process) and the report.

Data the planner reads: calibration text (sensitivities, GPTQ / AWQ statistics) is WikiText-2 *validation*
(slmkit.calib's default); quality is measured on WikiText-2 *test* windows of 512 tokens, which nothing
calibrates on; multiple-choice tasks only when a --min-task-acc names them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import SlmError, require
from ..files import atomic_output
from ..progress import note
from .budget import Budget
from .build import Builder
from .predict import Calibration, Shapes, matrix_bytes
from .search import Infeasible, Search, binding, run_search
from .space import METHODS, TABLES, Candidate, read_space

@dataclass
class PlanSettings:
    methods: tuple[str, ...] = METHODS
    backends: tuple[str, ...] | None = None  # None: the budget's backend
    finalists: int = 3
    max_builds: int = 6
    windows: int = 16  # WikiText-2 test windows of 512 tokens for quality
    fisher_samples: int = 16  # calibration sequences of 512 tokens for the sensitivities
    calib_samples: int = 128  # calibration sequences of 512 tokens for AWQ / GPTQ (their default)
    mixed_points: int = 4
    kv_bits: tuple[int, ...] | None = None  # None: the technique table's choices
    task_limit: int = 200
    runs: int = 5
    cache: Path = field(default_factory=lambda: Path(os.environ.get("SLMKIT_CACHE", Path.home() / ".cache/slmkit")))

    def validate(self) -> "PlanSettings":
        require(set(self.methods) <= set(METHODS) and self.methods, f"--methods: choose from {', '.join(METHODS)}")
        require(self.finalists >= 1 and self.max_builds >= 1, "--finalists and --max-builds must be positive")
        require(self.windows >= 1 and self.fisher_samples >= 1, "--eval-windows must be positive")
        require(not self.kv_bits or set(self.kv_bits) <= {16, 8, 4}, "--kv-bits: choose from 16, 8, 4")
        return self


def check_inputs(budget: Budget, settings: PlanSettings, out: Path, force: bool) -> None:
    """Everything that can be refused before any work: limits, backends, energy, task files, the output."""
    budget.validate()
    settings.validate()
    require(force or not out.exists(), f"{out} exists; pass --force to replace it")
    require(out.parent.is_dir(), f"{out.parent}: no such directory")
    for backend in settings.backends or (budget.backend,):
        if backend == "llamacpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                raise SlmError("--backend llamacpp: llama-cpp-python is not installed (pip install "
                               "'slmkit[llamacpp]')") from None
    if budget.max_energy_j_per_token is not None:
        from ..eval.cost import find_meter

        meter, source = find_meter(torch.device("cpu"))
        require(meter is not None, f"--max-energy-j-per-token: this machine has no energy counter ({source}); an "
                "energy budget cannot be measured here, and slmkit does not report estimates as measurements")
    from ..eval.tasks import load_task

    for task, _ in budget.min_task_acc:
        load_task(task)  # a task that does not parse fails here, before the model loads


def model_key(spec: str, settings: PlanSettings) -> str:
    path = Path(spec)
    stat = f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.exists() else spec
    return hashlib.sha256(f"{stat}:{settings.fisher_samples}".encode()).hexdigest()[:16]


def shapes_of(model) -> Shapes:
    from .sensitivity import matrices

    cfg = model.cfg
    return Shapes({n: tuple(w.shape) for n, w in matrices(model).items()}, cfg.n_layers, cfg.kv_heads,
                  cfg.head_size, torch.finfo(model.compute_dtype).bits // 8)


def sensitivities(model, tokenizer, schemes: dict, path: Path, samples: int) -> dict:
    """{tensor: {format: predicted KL}}, measured once per model and kept in the cache."""
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if all(f in next(iter(cached.values()), {}) for f in schemes) and cached:
        return cached
    from ..calib import CalibConfig, calibration_tokens
    from .sensitivity import fisher_diagonal, matrices, scores

    note(f"plan: measuring per-tensor sensitivity on {samples} calibration sequences (once per model)")
    tokens = calibration_tokens(tokenizer, CalibConfig(samples=samples, length=window_of(model)))
    with torch.enable_grad():
        fisher = fisher_diagonal(model, tokens)
    result = scores({n: w.detach() for n, w in matrices(model).items()}, fisher, schemes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def window_of(model) -> int:
    """Evaluation and calibration windows: 512 tokens, or the model's whole context when shorter."""
    return min(512, model.cfg.max_seq_len)


def reference(lm, folder: Path, windows: int) -> Path:
    """The base model's log-probabilities on the evaluation windows (WikiText-2 test), written once."""
    if (folder / "reference.safetensors").is_file():
        return folder
    from ..eval.data import read_text
    from ..eval.perplexity import PerplexityProtocol, window_sequences
    from ..eval.scoring import score

    note(f"plan: base model log-probabilities on {windows} WikiText-2 test windows")
    width = window_of(lm.model)
    _, _, seqs, firsts = window_sequences(lm.tokenizer, read_text("wikitext2"),
                                          PerplexityProtocol(width, max_windows=windows))
    logprobs = {str(i): score(lm.model, [s], 1, first=[f], keep_logprobs=True)[0].logprobs.float()
                for i, (s, f) in enumerate(zip(seqs, firsts))}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder, force=True) as tmp:
        save_file(logprobs, str(tmp / "reference.safetensors"))
        (tmp / "windows.json").write_text(json.dumps({"sequences": seqs, "firsts": firsts, "window": width,
                                                      "text": "wikitext2 test", "windows": windows}))
    return folder


def kv_quality(model, ref: Path, bits: list[int], path: Path) -> dict[int, float]:
    """KL the KV cache's quantization alone causes on the base model, per width, measured once (cached)."""
    cached = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}
    from ..quant import QScheme
    from ..quant.kvcache import use_quantized_cache_
    from .probe import quality

    for b in (b for b in bits if b != 16 and b not in cached):
        note(f"plan: KL of an int{b} KV cache on the base model")
        copy_ = copy.deepcopy(model)
        use_quantized_cache_(copy_, QScheme(b, 0, False))
        cached[b] = quality(copy_, ref)["kl"]
    path.write_text(json.dumps(cached))
    return {16: 0.0, **cached}


def base_figures(lm, budget: Budget, settings: PlanSettings) -> dict:
    from ..eval.tasks import evaluate_task, load_task

    out = {}
    for task, _ in budget.min_task_acc:
        questions, _ = load_task(task)
        out[f"acc:{task}"] = evaluate_task(lm.model, lm.tokenizer, questions[:settings.task_limit])["acc"]
    return out


def calibrate_costs(builder: Builder, shapes: Shapes, cal: Calibration, space, backends: list[str],
                    budget: Budget, path: Path) -> None:
    """Each storage format's decode cost per byte and prefill cost per weight, on each backend, from a uniform RTN
    build of it measured in a fresh process; the artifact's own bytes from the Q8_0 build, the runtime's resident
    memory (peak RSS less weights and KV cache) as the median over the formats' builds. The builds' quality is
    measured too: they are candidates of the space, and the first points the quality model is fitted on.
    Kept per model and machine (a busy machine measures slow: rerun with a fresh cache to re-measure)."""
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if "measured" in cached:  # (a calibration without the builds' quality is measured again)
        for k, v in cached.items():
            getattr(cal, k).update(v)
    from ..quant.rtn import Q8_TABLES
    from .predict import kv_bytes

    for backend in backends:
        formats, runtime = space.storage_formats(backend), []
        for fmt in sorted(formats, key=lambda f: f != "Q8_0"):
            if f"{backend}/{fmt}" in cal.decode_ms_per_byte:
                continue
            cand = Candidate("rtn", formats[fmt], Q8_TABLES, backend=backend, label="uniform", naive=True)
            note(f"plan: calibrating {backend} {fmt} costs on this machine")
            fig = builder.measure(builder.artifact(cand), backend)
            cal.measured[cand.name] = fig
            mb = matrix_bytes(shapes, cand)
            weights, table = sum(mb.values()), sum(v for n, v in mb.items() if n in TABLES)
            if fmt == "Q8_0":
                cal.overhead_bytes[backend] = fig["file_mb"] * 1e6 - weights
            runtime.append(fig["memory_mb"] - (weights + kv_bytes(shapes, cand, budget.context)) / 1e6)
            cal.runtime_mb[backend] = sorted(runtime)[(len(runtime) - 1) // 2]  # the median (lower) of the formats
            ms, k8 = 1e3 / fig["decode_tps"], cal.decode_ms_per_byte.get(f"{backend}/Q8_0", 0.0)
            cal.decode_ms_per_byte[f"{backend}/{fmt}"] = ms / weights if fmt == "Q8_0" else \
                max(ms - table * k8, 0.0) / (weights - table)
            cal.ttft_ms_per_weight[f"{backend}/{fmt}"] = fig["ttft_ms"] / sum(o * i for o, i in shapes.tensors.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: getattr(cal, k) for k in ("overhead_bytes", "runtime_mb", "decode_ms_per_byte",
                                                             "ttft_ms_per_weight", "measured")}))


def guarantee(search: Search, ranked: list, builder: Builder, folder: Path, budget: Budget):
    """Copy the best measured candidate into the output folder and re-measure that copy in a fresh process; the
    first whose re-measurement still meets every limit is returned with its figures (else None)."""
    for e in ranked:
        artifact = builder.artifact(e.cand)  # built already, unless a cached calibration measured it
        target = folder / artifact.name
        shutil.copytree(artifact, target) if artifact.is_dir() else shutil.copy2(artifact, target)
        note(f"plan: re-measuring {e.cand.name} in a fresh process")
        again = builder.measure(target, e.cand.backend, tag="remeasured")
        if budget.met(again):
            return e, again
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        e.finalist += "; failed its re-measurement"
        e.measured["remeasured"] = again
    return None, None


def prepare(spec: str | None, budget: Budget, settings: PlanSettings, work: Path) -> tuple:
    """Everything the search needs, measured or read from the cache: (loaded base, Search with every candidate
    enumerated and predicted, Builder writing artifacts under `work`)."""
    from ..backends import load
    from ..calib import CalibConfig
    from ..eval.machine import machine_info, machine_key

    lm = load(spec, torch.float32)
    require(budget.context <= lm.model.cfg.max_seq_len, f"--context {budget.context}: the model holds at most "
            f"{lm.model.cfg.max_seq_len} tokens")
    folder = settings.cache / "plan" / model_key(lm.source, settings)
    ref = reference(lm, folder / f"reference-{settings.windows}", settings.windows)
    space = read_space(settings.methods)
    space.kv_bits = list(settings.kv_bits or space.kv_bits)
    backends = list(settings.backends or (budget.backend,))
    scores = sensitivities(lm.model, lm.tokenizer, space.storage_formats(), folder / "sensitivity.json",
                           settings.fisher_samples)
    shapes = shapes_of(lm.model)
    cal = Calibration(kv_kl=kv_quality(lm.model, ref, space.kv_bits, folder / f"kv-{settings.windows}.json"),
                      base=base_figures(lm, budget, settings))
    builder = Builder(lm.model, lm.tokenizer, work, dict(
        context=budget.context, prompt_tokens=budget.prompt_tokens, windows=settings.windows, reference_cache=ref,
        tasks=tuple(t for t, _ in budget.min_task_acc), task_limit=settings.task_limit, runs=settings.runs),
        CalibConfig(samples=settings.calib_samples, length=window_of(lm.model)))
    calibrate_costs(builder, shapes, cal, space, backends, budget,
                    folder / f"costs-{machine_key(machine_info())}-p{budget.prompt_tokens}-w{settings.windows}.json")
    search = Search(budget, shapes, scores, cal, space, backends)
    search.enumerate(settings.mixed_points)
    return lm, search, builder


def plan(spec: str | None, budget: Budget, out: Path, settings: PlanSettings | None = None, force: bool = False,
         command: list[str] | None = None) -> dict:
    """Plan, build, measure and return the best model meeting `budget` in folder `out` (see the module docstring);
    raises Infeasible (with the report written to `out`) when none does."""
    from .report import make_report, write_report

    settings = settings or PlanSettings()
    out = Path(out)
    check_inputs(budget, settings, out, force)
    started = time.perf_counter()
    work = out.parent / f".{out.name}.work"
    try:
        lm, search, builder = prepare(spec, budget, settings, work)
        ranked = run_search(search, builder, settings.finalists, settings.max_builds)
        with atomic_output(out, force=force) as tmp:
            chosen, again = guarantee(search, ranked, builder, tmp, budget)
            report = make_report(search, chosen, again, lm.source, settings, time.perf_counter() - started, command,
                                 builder.calib)
            write_report(report, search, tmp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if chosen is None:
        raise Infeasible(f"{binding(search)} (report: {out / 'plan.md'})", report)
    return report
