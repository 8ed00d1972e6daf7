"""DistillLoss: knowledge distillation as an objective of the one training loop (a loss object, not a trainer).

Per counted token: kd_ratio * T^2 * D(teacher || student at temperature T) + (1 - kd_ratio) * cross-entropy on
the hard label, summed over the micro-batch's counted tokens like every objective, so the loop's token-exact
normalisation holds. D is one of divergence.LOSSES. The teacher is one model or a weighted mixture of several
(fixed weights, or per token by confidence). Its distribution is the full vocabulary, computed live, or its
top-k plus a remainder bin, live or from a TeacherCache on disk. With on_policy = lambda, that fraction of
micro-batches is replaced by the student's own samples (GKD): the student continues each sequence's prompt,
the teacher scores the continuation live. The [N, V] logits of student and teacher are never held whole
(losses.chunked_linear_loss). Held-out evaluation reports the plain next-token loss (eval_sum), so validation
perplexities compare across distillation and fine-tuning runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..errors import require
from ..losses import CHUNK_ROWS, IGNORE, chunked_linear_loss
from ..train.objectives import Batch, NextTokenLoss, Objective
from .cache import open_cache
from .divergence import LOSSES, divergence, topk_bins, topk_target
from .onpolicy import student_batch
from .teacher import TEACHER_DTYPES, check_vocabulary, load_teacher, teacher_hidden, teacher_log_probs


@dataclass
class DistillLoss(Objective):
    teachers: tuple[str, ...] = (None,)  # MODEL specs (None: the default model)
    weights: tuple[float, ...] | None = None  # mixture weights of several teachers (None: equal)
    confidence: bool = False  # weigh teachers per token by their top probability instead
    loss: str = "fkl"  # fkl | rkl | jsd | skl | srkl (divergence.LOSSES)
    beta: float = 0.5  # jsd: 0 = forward KL, 1 = reverse KL (TRL's GKD)
    skew: float = 0.1  # skl / srkl: the skew a
    temperature: float = 1.0
    kd_ratio: float = 1.0  # weight of the distillation term; 1 - kd_ratio goes to the hard-label cross-entropy
    topk: int = 0  # keep the teacher's k likeliest tokens + a remainder bin (0: the whole vocabulary)
    cache: str | None = None  # TeacherCache folder (needs topk)
    on_policy: float = 0.0  # GKD's lambda: fraction of micro-batches the student generates
    teacher_dtype: str = "float32"  # float32 | bfloat16 | int8 | int4
    name: str = "distill"

    def __post_init__(self) -> None:
        self.live: dict = {}  # the run's loaded teachers and open cache: not part of the record

    def validate(self) -> "DistillLoss":
        require(len(self.teachers) >= 1, "distillation needs a teacher")
        require(self.loss in LOSSES, f"--kd-loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        require(0 <= self.beta <= 1 and 0 < self.skew < 1, "--kd-beta must be in [0, 1] and the skew in (0, 1)")
        require(self.temperature > 0 and 0 <= self.kd_ratio <= 1, "--kd-temperature must be > 0 and --kd-ratio in [0, 1]")
        require(self.topk >= 0 and (self.cache is None or self.topk > 0), "--teacher-cache needs --kd-topk K > 0")
        require(0 <= self.on_policy <= 1, f"--on-policy must be in [0, 1], got {self.on_policy}")
        require(self.teacher_dtype in TEACHER_DTYPES, f"--teacher-dtype must be one of {', '.join(TEACHER_DTYPES)}")
        require(self.weights is None or (len(self.weights) == len(self.teachers) and all(w > 0 for w in self.weights)),
                f"--teacher-weights needs one positive weight per teacher ({len(self.teachers)})")
        require(not (self.weights and self.confidence), "give fixed --teacher-weights or per-token confidence, not both")
        return self

    def record(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_record(cls, record: dict) -> "DistillLoss":
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(record) - known - {"name"})
        require(not unknown, f"distillation record has unknown field(s) {', '.join(unknown)}")
        values = {k: v for k, v in record.items() if k in known}
        for key in ("teachers", "weights"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values).validate()

    # ---- the loop's hooks --------------------------------------------------------------------------------
    def validate_for(self, cfg) -> None:
        self.validate()
        require(cfg.distributed == "none", "distillation runs in one process (--distributed is not supported with "
                "--distill)")
        require(cfg.privacy is None, "DP-SGD with distillation is not supported (the teacher would see private data "
                "outside the accountant)")

    def prepare(self, model, data) -> None:
        """Load the teachers (vocabulary checked against the student's) and open the cache, once per run."""
        if self.live.get("student") is model:
            return
        require(data.tokenizer is not None, "distillation needs the training data's tokenizer")
        teachers = []
        for spec in self.teachers:
            teacher, tokenizer = load_teacher(spec, self.teacher_dtype)
            check_vocabulary(data.tokenizer, model.cfg.vocab_size, tokenizer, teacher.model.cfg.vocab_size,
                             teacher.source)
            teachers.append(teacher)
        require(self.topk <= model.cfg.vocab_size, f"--kd-topk {self.topk} exceeds the vocabulary ({model.cfg.vocab_size})")
        self.live.update(student=model, teachers=teachers, heads=[t.model.head_matrix() for t in teachers],
                         stop_ids=data.tokenizer.stop_ids(), eos=data.tokenizer.eos_token_id)
        if self.cache:
            key = {"teachers": [t.fingerprint for t in teachers], "weights": self.weights, "confidence": self.confidence,
                   "temperature": self.temperature, "k": self.topk, "data": data.info.get("digest"),
                   "seq_len": data.info.get("seq_len")}
            self.live["cache"] = open_cache(self.cache, key, len(data.train), data.info["seq_len"], self.topk,
                                            model.cfg.vocab_size)

    def report(self) -> dict | None:
        """What the run's record says of its teachers and cache."""
        out = {"teachers": [t.source for t in self.live.get("teachers", [])]}
        return {**out, "cache": self.live["cache"].report()} if "cache" in self.live else out

    def eval_sum(self, model, batch: Batch) -> tuple[torch.Tensor, int]:
        return NextTokenLoss().loss_sum(model, batch)

    # ---- the loss -------------------------------------------------------------------------------------------
    def loss_sum(self, model, batch: Batch) -> tuple[torch.Tensor, int]:
        require("teachers" in self.live, "DistillLoss.prepare(model, data) must run before its loss")
        generated = self.on_policy > 0 and float(torch.rand(())) < self.on_policy
        if generated:
            batch = student_batch(model, batch, self.live["stop_ids"], self.live["eos"])
        rows = (batch.labels != IGNORE).flatten()  # [B*T]
        hidden = model(batch.inputs, hidden=True).flatten(0, 1)[rows]  # [B*T, C] -> [n, C]
        labels = batch.labels.flatten()[rows]  # [n]
        target = self._targets(batch, rows, use_cache=not generated)
        loss = chunked_linear_loss(hidden, model.head_matrix(),
                                   lambda z, a, b: self._row_loss(z, target(a, b), labels[a:b]))
        return loss, int(rows.sum())

    def _row_loss(self, logits: torch.Tensor, target, labels: torch.Tensor) -> torch.Tensor:
        """The summed loss of rows of student logits [n, V] against the teacher's rows (full or top-k)."""
        T = self.temperature
        student = torch.log_softmax(logits / T, -1)  # [n, V]
        if isinstance(target, tuple):
            student, target = topk_bins(student, *target)  # [n, k + 1] each
        kd = divergence(student, target, self.loss, self.beta, self.skew).sum() * T * T
        if self.kd_ratio == 1:
            return kd
        return self.kd_ratio * kd + (1 - self.kd_ratio) * F.cross_entropy(logits, labels, reduction="sum")

    def _targets(self, batch: Batch, rows: torch.Tensor, use_cache: bool):
        """A function (start, end) -> the teacher's rows start:end of the counted positions: log-probs [n, V], or
        (index, log-probs, rest) of its top-k."""
        cache = self.live.get("cache") if use_cache else None
        if cache is not None and batch.index is not None:
            ids, logp, rest = self._cached(cache, batch)  # [B, T, k], [B, T, k], [B, T, 1]
            flat = [t.flatten(0, 1)[rows] for t in (ids, logp, rest)]  # [n, k], [n, k], [n, 1]
            return lambda a, b: tuple(t[a:b] for t in flat)
        hidden = teacher_hidden(self.live["teachers"], batch.inputs, rows)
        def rows_of(a, b):
            logp = self._teacher_logp(hidden, a, b)
            return topk_target(logp, self.topk) if self.topk else logp
        return rows_of

    def _teacher_logp(self, hidden: list[torch.Tensor], a: int, b: int) -> torch.Tensor:
        return teacher_log_probs(self.live["teachers"], hidden, self.live["heads"], a, b, self.temperature,
                                 self.weights, self.confidence)

    def _cached(self, cache, batch: Batch):
        """The batch's top-k rows from the cache, the teacher run first on the sequences it does not hold."""
        missing = cache.missing(batch.index)
        if missing:
            inputs = batch.inputs[missing]  # [b, T]
            every = torch.ones(inputs.numel(), dtype=torch.bool)
            hidden = teacher_hidden(self.live["teachers"], inputs, every)  # [b*T, C] each
            parts = [topk_target(self._teacher_logp(hidden, a, a + CHUNK_ROWS), self.topk)
                     for a in range(0, inputs.numel(), CHUNK_ROWS)]
            ids, logp, rest = (torch.cat([p[i] for p in parts]).view(*inputs.shape, -1) for i in range(3))
            cache.store(batch.index[missing].tolist(), ids, logp, rest[..., 0])
        return cache.lookup(batch.index, batch.inputs.shape[1])
