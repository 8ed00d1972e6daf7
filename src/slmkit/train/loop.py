"""The one training loop. Pretraining, supervised fine-tuning, adapters (LoRA, QLoRA, prompt tuning) and (later)
distillation and QAT differ only in their objective (a loss object), their trainable parameters and their data;
DP-SGD changes how a step's gradient is made (train/privacy.py: per-sample clipping and noise on Poisson
batches), not the loop. There is no trainer class, no callbacks and no global state.

The loss of an optimizer step is the sum of the token losses of all its micro-batches (on every process)
divided by the step's total number of counted tokens, so gradient accumulation and data parallelism give the
gradient of one big batch, whatever the masks.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import SlmError, require
from . import dist, privacy as dp, state
from .memory import large_buffers_released
from .config import TrainConfig, lr_at
from .data import TrainData
from .meter import Meter
from .objectives import Batch, Objective


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken in all (resumed runs included)
    tokens: int  # counted (trained) tokens in all
    final_loss: float | None
    val_loss: float | None
    tokens_per_s: float | None  # trained tokens of every step after the first, over their wall time
    wall_s: float  # this process's training time (a resumed run: since the resume)
    stopped: str  # steps | time
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, loss, lr, grad_norm, tokens, seconds]
    val_curve: list[list[float]] = field(default_factory=list)  # [step, val_loss]
    resumed_from: int | None = None
    privacy: dict | None = None  # DP runs: epsilon, delta, noise multiplier, ... (privacy.Privacy.record)
    objective: dict | None = None  # what the objective reports beyond its config (Objective.report)


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint."""

    step: int = 0
    consumed: int = 0  # sequences taken from the data order (all processes)
    tokens: int = 0
    loss_curve: list = field(default_factory=list)
    val_curve: list = field(default_factory=list)
    secret: int | None = None  # DP runs: the seed of their sampling and noise (train state only)


def train(model, data: TrainData, cfg: TrainConfig, state_dir: Path | None = None, resume: bool = False,
          show: bool = True) -> TrainResult:
    """Train `model` in place on `data` as `cfg` says; with state_dir, checkpoints every cfg.save_every steps
    and at the end, and resume=True continues from the newest one bit for bit."""
    cfg.validate()
    env = dist.setup(cfg.distributed)
    total = total_steps(cfg, data, env.world)
    _seed(cfg.seed)
    set_trainable_(model, cfg)
    model.train()
    model.checkpoint_blocks = cfg.checkpointing
    privacy = _privacy(cfg, data, total)
    cfg.objective.prepare(model, data)
    runner = dp.wrap(model) if privacy else dist.wrap(model, env)
    optimizer = make_optimizer(model, cfg)
    scaler = _scaler(cfg, model)
    prog, resumed = Progress(secret=privacy.secret if privacy else None), None
    if resume:
        resumed = _resume(model, optimizer, env, state_dir, _fingerprint(model, data, cfg, env), prog)
    try:
        with large_buffers_released(cfg.release_memory):
            result = _run(runner, model, optimizer, scaler, data, cfg, env, total, prog, state_dir, show,
                          _resumed_privacy(privacy, prog))
    finally:
        model.checkpoint_blocks = False
        if privacy:
            runner._close()  # Opacus's hooks and per-sample attributes leave the model
    result.resumed_from, result.objective = resumed, cfg.objective.report()
    model.eval()
    return result


def _privacy(cfg: TrainConfig, data: TrainData, total: int) -> dp.Privacy | None:
    if cfg.privacy is None:
        return None
    mean_tokens = data.train.target_tokens() / len(data.train)
    return dp.plan(cfg.privacy, len(data.train), cfg.micro_batch * cfg.grad_accum, total, mean_tokens)


def _resumed_privacy(privacy: dp.Privacy | None, prog: Progress) -> dp.Privacy | None:
    """A resumed DP run continues with the secret of the run it resumes (its sampling and noise go on)."""
    if privacy is not None and prog.secret is not None:
        privacy.secret = prog.secret
    return privacy


def _run(runner, model, optimizer, scaler, data, cfg, env, total, prog, state_dir, show, privacy) -> TrainResult:
    meter = Meter(total, prog.step, show and env.main, cfg.log_every)
    start, times, stopped = time.perf_counter(), [], "steps"
    with meter:
        while prog.step < total:
            if cfg.max_time_s is not None and time.perf_counter() - start >= cfg.max_time_s:
                stopped = "time"
                break
            t0 = time.perf_counter()
            if privacy:
                batches = privacy.batches(data.train, prog.step, cfg.micro_batch)
            else:
                batches = data.step_batches(prog.consumed, cfg.micro_batch, cfg.grad_accum, env.world, env.rank,
                                            cfg.seed)
            lr = lr_at(prog.step, total, cfg)
            loss, tokens, norm = optimizer_step(runner, optimizer, cfg, batches, env, lr, scaler, privacy, prog.step)
            _check_finite(loss, prog.step)
            times.append(time.perf_counter() - t0)
            prog.step, prog.consumed = prog.step + 1, prog.consumed + cfg.micro_batch * cfg.grad_accum * env.world
            prog.tokens += tokens
            prog.loss_curve.append([prog.step, loss, lr, norm, tokens, times[-1]])
            meter.update(prog.step, loss, lr, tokens / times[-1])
            if cfg.eval_every and prog.step % cfg.eval_every == 0 and prog.step < total:
                prog.val_curve.append([prog.step, evaluate(runner, data, cfg, env)])
                meter.note(f"step {prog.step}: val loss {prog.val_curve[-1][1]:.4f}")
            if state_dir and cfg.save_every and prog.step % cfg.save_every == 0:
                _save(model, optimizer, env, state_dir, _fingerprint(model, data, cfg, env), prog)
    if data.val is not None and (not prog.val_curve or prog.val_curve[-1][0] != prog.step):
        prog.val_curve.append([prog.step, evaluate(runner, data, cfg, env)])
    if state_dir:
        _save(model, optimizer, env, state_dir, _fingerprint(model, data, cfg, env), prog)
    return _result(prog, times, time.perf_counter() - start, stopped, privacy)


def _result(prog: Progress, times: list[float], wall: float, stopped: str, privacy=None) -> TrainResult:
    later = prog.loss_curve[-len(times):][1:] if len(times) > 1 else []  # this process's steps, after the first
    speed = sum(r[4] for r in later) / sum(r[5] for r in later) if later else None
    return TrainResult(prog.step, prog.tokens, prog.loss_curve[-1][1] if prog.loss_curve else None,
                       prog.val_curve[-1][1] if prog.val_curve else None, speed, wall, stopped,
                       prog.loss_curve, prog.val_curve, privacy=privacy.record(prog.step) if privacy else None)


def total_steps(cfg: TrainConfig, data: TrainData, world: int = 1) -> int:
    """Optimizer steps the run takes: the least of the step, token and epoch limits (tokens and epochs are
    converted with the data's mean counted tokens per sequence), so the schedule knows its length."""
    per_step = cfg.micro_batch * cfg.grad_accum * world
    limits = [cfg.max_steps] if cfg.max_steps else []
    if cfg.max_epochs:
        limits.append(math.ceil(cfg.max_epochs * len(data.train) / per_step))
    if cfg.max_tokens:
        per_seq = data.train.target_tokens() / len(data.train)
        limits.append(math.ceil(cfg.max_tokens / (per_seq * per_step)))
    return max(1, min(limits))


# ---- one optimizer step ------------------------------------------------------------------------
def optimizer_step(runner, optimizer, cfg: TrainConfig, batches: list[Batch], env, lr: float,
                   scaler=None, privacy: dp.Privacy | None = None, step: int = 0) -> tuple[float, int, float]:
    """Backward over the step's micro-batches (DP-SGD's per-sample clipping and noise with `privacy`), clip,
    update; returns (step loss, counted tokens, grad norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if privacy is not None:
        with autocast(cfg.precision, _device(runner)):
            loss, tokens = dp.dp_backward_step(runner, cfg.objective, batches, privacy, step)
    else:
        loss, tokens = backward_step(runner, cfg.objective, batches, env, cfg.precision, scaler)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip else math.inf)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, tokens, float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def backward_step(runner, objective: Objective, batches: list[Batch], env=None, precision: str = "float32",
                  scaler=None) -> tuple[float, int]:
    """Accumulate the gradient of (sum of token losses over every micro-batch on every process) / (the step's
    counted tokens) and return (that loss, the tokens). DDP and FSDP average gradients over the processes,
    so each process's share is scaled by the world size."""
    env = env or dist.DistEnv()
    total = int(env.all_sum(float(sum(b.tokens for b in batches))))
    require(total > 0, "a training step has no token to learn from (every label is masked)")
    loss_sum, device = 0.0, _device(runner)
    for i, batch in enumerate(batches):
        with dist.grad_sync(runner, env, i == len(batches) - 1):
            with autocast(precision, device):
                part, _ = objective.loss_sum(runner, batch.to(device))
            scaled = part * (env.world / total)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += part.item()
    return env.all_sum(loss_sum) / total, total


@torch.no_grad()
def evaluate(runner, data: TrainData, cfg: TrainConfig, env=None) -> float | None:
    """Mean held-out loss per counted token over the first cfg.eval_batches micro-batches of the held-out data."""
    env = env or dist.DistEnv()
    if data.val is None:
        return None
    n, mb = len(data.val), cfg.micro_batch
    chunks = [list(range(i, min(i + mb, n))) for i in range(0, n, mb)][:cfg.eval_batches]
    loss_sum, tokens = 0.0, 0
    was_training = runner.training
    runner.eval()
    for chunk in chunks[env.rank::env.world]:
        batch = data.val.batch(chunk).to(_device(runner))
        with autocast(cfg.precision, batch.inputs.device):
            part, count = cfg.objective.eval_sum(runner, batch)
        loss_sum, tokens = loss_sum + part.item(), tokens + count
    runner.train(was_training)
    return env.all_sum(loss_sum) / max(env.all_sum(float(tokens)), 1.0)


def autocast(precision: str, device: torch.device):
    """bf16 autocast (CPU or CUDA; weights stay fp32 masters), fp16 autocast on CUDA, or nothing for fp32."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bfloat16" else torch.float16)


def _device(runner) -> torch.device:
    return next(runner.parameters()).device


def _scaler(cfg: TrainConfig, model):
    if cfg.precision != "float16":
        return None
    require(model.device.type == "cuda", "--dtype float16 trains on CUDA only (loss scaling); use bfloat16 on CPU")
    return torch.amp.GradScaler("cuda")


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise SlmError(f"the loss became {loss} at step {step + 1}; lower --lr or raise --warmup")


# ---- parameters and optimizer -----------------------------------------------------------------
def set_trainable_(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """requires_grad on the parameters cfg.trainable matches (minus cfg.frozen, and under DP the embedding and
    output tables: privacy.FROZEN_UNDER_DP); returns their names."""
    names, frozen = [], cfg.frozen + (dp.FROZEN_UNDER_DP if cfg.privacy else ())
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in cfg.trainable)
                         and not any(fnmatch.fnmatchcase(name, pat) for pat in frozen))
        if p.requires_grad:
            names.append(name)
    require(bool(names), f"no parameter matches the trainable patterns {list(cfg.trainable)}")
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: the weight matrices of linear layers decay; norms, biases, embedding tables and everything
    else (prompt-tuning tokens, QAT's scales) never do."""
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            matrix = p.dim() >= 2 and name.rpartition(".")[2] == "weight" and id(p) not in embedding
            (decay if matrix else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---- checkpoints ------------------------------------------------------------------------------
def _fingerprint(model, data: TrainData, cfg: TrainConfig, env) -> dict:
    """What a resumed run must share with its checkpoint, as JSON data (the checkpoint holds it as JSON)."""
    return json.loads(json.dumps({"model_config": model.cfg.to_dict(), "train_config": cfg.fingerprint(), "data_digest": data.info.get("digest"),
            "global_batch": cfg.micro_batch * cfg.grad_accum * env.world}))


def _save(model, optimizer, env, state_dir: Path, fingerprint: dict, prog: Progress) -> None:
    model_state, optim_state = dist.full_states(model, optimizer, env)
    if env.main:
        meta = {**fingerprint, "step": prog.step, "consumed": prog.consumed, "tokens": prog.tokens,
                "loss_curve": prog.loss_curve, "val_curve": prog.val_curve, "dp_secret": prog.secret}
        state.save_state(state_dir, prog.step, model_state, optim_state, meta)
    env.barrier()


def _resume(model, optimizer, env, state_dir: Path | None, fingerprint: dict, prog: Progress) -> int | None:
    require(state_dir is not None, "--resume needs the run's output (its train state is kept beside it)")
    folder = state.latest_state(state_dir) if Path(state_dir).is_dir() else None
    if folder is None:  # killed before its first checkpoint: nothing is lost by starting over
        if env.main:
            print(f"[--resume: no complete checkpoint in {state_dir} yet; starting at step 0]", file=sys.stderr)
        return None
    model_state, optim_state, meta = state.load_state(folder)
    for key, value in fingerprint.items():
        require(meta.get(key) == value, f"--resume: {folder} was written by another {key.replace('_', ' ')} "
                f"({_difference(meta.get(key), value)})")
    dist.load_full_states(model, optimizer, env, model_state, optim_state)
    state.restore_rng(meta)
    prog.step, prog.consumed, prog.tokens = meta["step"], meta["consumed"], meta["tokens"]
    prog.loss_curve, prog.val_curve = meta["loss_curve"], meta["val_curve"]
    prog.secret = meta.get("dp_secret")
    return prog.step


def _difference(saved, now) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        return ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in keys[:3])
    return f"{saved!r} there, {now!r} now"
