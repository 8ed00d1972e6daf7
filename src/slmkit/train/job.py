"""`slm train` as a function: model (loaded, or a preset built from scratch), data, the loop, the trained
checkpoint (its history records the training step) and one run record (schema slmkit.run/1, kind "train").

The run's train state lives beside the output, in OUT.train/ (slmkit.train.state); `resume` continues it.
With an adapter (LoRA, prompt tuning) only the adapter trains, and OUT is a PEFT-format adapter folder that
names its base (slmkit.adapters.files) instead of a whole checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import save_checkpoint
from ..config import preset
from ..errors import require
from ..backends import load
from ..loader import LoadedModel, load_tokenizer
from ..model import Decoder
from ..records import step_record
from . import dist
from .config import TrainConfig
from .data import load_data
from .init import describe_init, init_weights_
from .loop import TrainResult, train
from .step import TrainStep, summary


@dataclass
class TrainJob:
    data: str  # SOURCE: a named corpus, file, folder or hub dataset
    out: Path  # the trained slmkit checkpoint
    model: str | None = None  # MODEL to fine-tune (default: the default model), or ...
    preset: str | None = None  # ... a preset to pretrain from scratch (with `tokenizer`'s vocabulary)
    tokenizer: str | None = None  # presets: the model whose tokenizer to use (default: the default model's)
    format: str | None = None  # text | alpaca | chat (None: detected)
    eval_data: str | None = None  # held-out SOURCE (default: the last 5% of the data)
    force: bool = False
    resume: bool = False
    device: str = "cpu"  # cpu | cuda (under torchrun: the process's LOCAL_RANK device)
    adapter: object | None = None  # a LoRAConfig or PromptTuningConfig: train only it, write an adapter folder
    transform: object | None = None  # e.g. QAT (slmkit.qat.step.QATJob): prepare_(model) before the loop,
    #   finish_(model) after it, record(TrainStep) -> the history record in place of the training step's

    @property
    def state_dir(self) -> Path:
        return Path(f"{self.out}.train")

    def check(self) -> "TrainJob":
        """Refuse, before any work, what would overwrite something or continue the wrong run."""
        require(not (self.model and self.preset), "give MODEL or --preset, not both")
        require(not (self.adapter and self.preset), "adapters fine-tune a model; --preset trains one from scratch")
        require(not (self.transform and (self.adapter or self.preset)), "QAT trains a whole model (not an adapter, "
                "not a --preset from scratch)")
        require(self.device in ("cpu", "cuda"), f"--device must be cpu or cuda, got {self.device!r}")
        require(self.device == "cpu" or torch.cuda.is_available(), "--device cuda: no CUDA device is available")
        require(self.force or not Path(self.out).exists(), f"{self.out} exists; pass --force to replace it")
        require(Path(self.out).parent.is_dir() or not str(Path(self.out).parent), f"{Path(self.out).parent}: no such directory")
        has_state = self.state_dir.is_dir() and any(self.state_dir.iterdir())
        require(self.resume or self.force or not has_state, f"{self.state_dir} holds a run's checkpoints; pass "
                "--resume to continue it or --force to start over")
        return self


def build_model(job: TrainJob, seed: int) -> LoadedModel:
    """The model to train: MODEL as loaded (float32), or `preset` initialised from scratch (init.py) with the
    vocabulary, special tokens and chat template of `tokenizer`'s model."""
    if not job.preset:
        return load(job.model)
    tok = load_tokenizer(job.tokenizer)
    cfg = preset(job.preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LoadedModel(init_weights_(Decoder(cfg), seed), tok, f"preset:{job.preset}", "preset", 0)


def run_train(job: TrainJob, cfg: TrainConfig, command: list[str], show: bool = True) -> tuple[dict | None, Path]:
    """Train as `job` and `cfg` say; returns (the run record, or None on processes other than the main one;
    the output path)."""
    job.check()
    cfg.validate()
    if job.force and not job.resume and job.state_dir.exists():
        shutil.rmtree(job.state_dir)
    lm = build_model(job, cfg.seed)
    history = len(lm.model.compression)  # the base's own steps; an adapter folder records only what follows
    if job.adapter is not None:
        cfg = _adapt(lm.model, job.adapter, cfg)
    if job.transform is not None:
        job.transform.prepare_(lm.model)
    data = load_data(job.data, lm.tokenizer, cfg.seq_len, job.format, job.eval_data)
    room = lm.model.cfg.max_seq_len - lm.model.n_virtual  # prompt tuning's virtual tokens take positions too
    require(cfg.seq_len <= room, f"--seq-len {cfg.seq_len} exceeds the model's context of {room}")
    lm.model.to(_device(job.device))
    result = train(lm.model, data, cfg, job.state_dir, job.resume, show)
    env = dist.setup(cfg.distributed)
    model, run = dist.plain_model(lm.model, env), None
    if env.main:
        model.cpu()
        step = TrainStep(job.data, job.format, job.eval_data, cfg, summary(result, data, lm.source))
        if job.transform is not None:
            job.transform.finish_(model)
        model.compression.append(job.transform.record(step) if job.transform is not None else step_record(step))
        _write(job, model, lm.tokenizer, model.compression[history:])
        run = train_run(LoadedModel(model, lm.tokenizer, str(job.out), "slmkit", _size(job.out)), cfg, data.info,
                        result, command, lm.source)
    env.barrier()
    dist.teardown(env)
    return run, Path(job.out)


def _adapt(model, adapter, cfg: TrainConfig) -> TrainConfig:
    """Put the adapter on the model (recorded as a step) and train its parameters alone."""
    from ..adapters import adapter_parameters

    adapter.apply_(model, None)
    model.compression.append(step_record(adapter))
    return dataclasses.replace(cfg, trainable=adapter_parameters(model), frozen=())


def _write(job: TrainJob, model, tokenizer, steps: list[dict]) -> None:
    if job.adapter is None:
        save_checkpoint(model, tokenizer, Path(job.out), force=job.force)
        return
    from ..adapters import save_adapter

    save_adapter(model, Path(job.out), base_name(job.model), steps, force=job.force)


def base_name(spec: str | None) -> str | None:
    """How an adapter folder names its base: None for the default model, an absolute path for a path, else
    the name or hub id as given."""
    if spec is None:
        return None
    return str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().exists() else spec


def _device(kind: str) -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if kind == "cuda" else torch.device("cpu")


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))  # an adapter folder: the adapter


def train_run(lm: LoadedModel, cfg: TrainConfig, data_info: dict, result: TrainResult, command: list[str],
              base: str) -> dict:
    from ..eval.cost import peak_rss_mb
    from ..eval.report import run_envelope
    from ..eval.run import model_record

    run = run_envelope("train", model_record(lm, "float32"), command)
    run["protocol"] = {"train": cfg.to_dict(), "data": data_info, "base": base, "threads": torch.get_num_threads(),
                       "init": describe_init() if base.startswith("preset:") else "loaded weights",
                       "world_size": dist.setup(cfg.distributed).world}
    run["results"] = {"train": {"final_loss": result.final_loss, "val_loss": result.val_loss,
                                "tokens_per_s": result.tokens_per_s, "steps": result.steps, "tokens": result.tokens,
                                "wall_s": result.wall_s, "stopped": result.stopped, "resumed_from": result.resumed_from,
                                "loss_curve": result.loss_curve, "val_curve": result.val_curve}}
    run["cost"] = {"peak_rss_mb": peak_rss_mb()}
    if result.privacy is not None:
        run["privacy"] = result.privacy
    if result.objective is not None:
        run["objective"] = result.objective
    return run


def print_summary(run: dict, out: Path) -> None:
    r = run["results"]["train"]
    speed = f"{r['tokens_per_s']:,.0f} tok/s" if r["tokens_per_s"] else "–"
    val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "–"
    print(f"[trained {r['steps']} steps, {r['tokens']:,} tokens, {speed}; final loss {r['final_loss']:.4f}, "
          f"val loss {val}; peak RSS {run['cost']['peak_rss_mb']:.0f} MB]", file=sys.stderr)
    if "privacy" in run:
        p = run["privacy"]
        print(f"[DP-SGD: epsilon {p['epsilon']:.3g} at delta {p['delta']:.3g} ({p['accountant']}), noise multiplier "
              f"{p['noise_multiplier']:.4g}, clip {p['clip_norm']:g}, sample rate {p['sample_rate']:.4g}, "
              f"{p['steps']} steps]", file=sys.stderr)
    cache = run.get("objective", {}).get("cache")
    if cache:
        kept = f", top-{cache['k']} keeps {cache['mean_kept_mass']:.1%} of the teacher's mass" if cache["mean_kept_mass"] else ""
        print(f"[teacher cache {cache['folder']}: {cache['bytes'] / 1e6:.1f} MB, {cache['filled']} of "
              f"{cache['sequences']} sequences{kept}]", file=sys.stderr)
