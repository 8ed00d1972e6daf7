"""TrainConfig: every choice of a training run in one validated dataclass, and the learning-rate schedule.

The config is plain data (saved in the run JSON, in every train-state checkpoint and in the trained model's
history); the objective is a loss object (slmkit.train.objectives) that records itself by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import require
from .objectives import NextTokenLoss, Objective, objective_from_record
from .privacy import DPConfig

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("float32", "bfloat16", "float16")
DISTRIBUTED = ("none", "ddp", "fsdp")
# Fields that may differ between a run and its resumption: they change what is logged or kept, or where a
# run stops on the clock, never the weights a step produces. (The step, token and epoch limits set the
# schedule's length, and so every step's learning rate: they must match.)
RESUMABLE_CHANGES = ("max_time_s", "eval_every", "eval_batches", "save_every", "log_every")


@dataclass
class TrainConfig:
    objective: Objective = field(default_factory=NextTokenLoss)  # a loss object: NextTokenLoss("lm" | "sft"), ...
    trainable: tuple[str, ...] = ("*",)  # glob patterns on parameter names that train; the rest are frozen
    frozen: tuple[str, ...] = ()  # patterns excluded from `trainable`
    optimizer: str = "adamw"  # adamw | adafactor | sgd
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.0  # decoupled; never applied to norms, biases or embeddings
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    schedule: str = "cosine"  # cosine | linear (decay to min_lr_ratio * lr after warmup) | constant
    warmup_steps: int = 0  # linear warmup from lr / (warmup_steps + 1)
    min_lr_ratio: float = 0.1
    seq_len: int = 512  # tokens per training sequence (inputs; labels are shifted by one)
    micro_batch: int = 4  # sequences per forward/backward (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # stop after this many optimizer steps ...
    max_tokens: int | None = None  # ... or once this many tokens have been trained on ...
    max_epochs: float | None = None  # ... or after this many passes over the training sequences ...
    max_time_s: float | None = None  # ... or at the first step boundary after this much wall time
    clip: float | None = 1.0  # max global gradient norm; None: no clipping
    precision: str = "float32"  # float32 | bfloat16 (autocast, fp32 master weights) | float16 (CUDA, loss scaling)
    seed: int = 0
    eval_every: int = 0  # optimizer steps between held-out evaluations (0: at the end only)
    eval_batches: int = 8  # micro-batches of held-out data per evaluation
    save_every: int = 0  # optimizer steps between train-state checkpoints (0: none until the end)
    log_every: int = 10  # steps between log lines when stderr is not a terminal
    distributed: str = "none"  # none | ddp | fsdp (FSDP2 fully_shard per block); needs torchrun
    checkpointing: bool = False  # recompute each block's activations in the backward (less memory, ~1/3 more time)
    release_memory: bool = False  # hand large buffers back to the OS when freed (train/memory.py): peak RSS
    #                               tracks live memory, at ~1.5x the step time on glibc
    privacy: DPConfig | None = None  # DP-SGD (slmkit.train.privacy): per-sample clipping, noise, Poisson sampling

    def validate(self) -> "TrainConfig":
        require(isinstance(self.objective, Objective), f"objective must be a loss object, got {self.objective!r}")
        require(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        require(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        require(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        require(self.distributed in DISTRIBUTED, f"distributed must be one of {', '.join(DISTRIBUTED)}")
        _finite_positive("learning rate", self.lr)
        for name in ("seq_len", "micro_batch", "grad_accum"):
            require(_is_int(getattr(self, name)) and getattr(self, name) > 0,
                    f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        require(self.weight_decay >= 0 and self.eps > 0 and 0 <= self.min_lr_ratio <= 1 and self.momentum >= 0,
                "weight decay and momentum must be >= 0, eps > 0, min_lr_ratio in [0, 1]")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)")
        require(self.warmup_steps >= 0 and self.eval_every >= 0 and self.save_every >= 0 and self.log_every > 0
                and self.eval_batches > 0, "warmup, eval and save intervals must be >= 0 (log_every, eval_batches > 0)")
        require(self.clip is None or self.clip > 0, f"clip must be positive, got {self.clip}")
        self._validate_limits()
        self.objective.validate_for(self)
        if self.privacy is not None:
            require(isinstance(self.privacy, DPConfig), f"privacy must be a DPConfig, got {self.privacy!r}")
            self.privacy.validate()
            require(self.distributed == "none", "DP-SGD runs in one process (its sampling is per step, not per rank)")
            require(self.clip is None, "under DP every per-sample gradient is clipped (--dp-clip); --clip does not apply")
            require(not self.checkpointing, "DP-SGD's per-sample hooks cannot see recomputed activations; drop "
                    "--checkpointing")
        return self

    def _validate_limits(self) -> None:
        limits = {"steps": self.max_steps, "tokens": self.max_tokens, "epochs": self.max_epochs,
                  "time": self.max_time_s}
        require(any(v is not None for v in (self.max_steps, self.max_tokens, self.max_epochs)),
                "give a length: --steps, --tokens or --epochs (a time limit only cuts a run short)")
        for name, value in limits.items():
            require(value is None or (math.isfinite(value) and value > 0), f"{name} limit must be positive, got {value}")

    # ---- records ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["objective"] = self.objective.record()
        data["privacy"] = None if self.privacy is None else dataclasses.asdict(self.privacy)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        data["objective"] = objective_from_record(data.get("objective", {"name": "lm"}))
        if isinstance(data.get("privacy"), dict):
            data["privacy"] = DPConfig.from_dict(data["privacy"])
        for name in ("trainable", "frozen", "betas"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data).validate()

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run it resumes (see RESUMABLE_CHANGES)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_positive(name: str, value) -> None:
    require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
            f"{name} must be positive, got {value}")


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total_steps`: linear warmup over warmup_steps,
    then cosine or linear decay to min_lr_ratio * lr at the last step, or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(total_steps - 1 - cfg.warmup_steps, 1)
    t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)
