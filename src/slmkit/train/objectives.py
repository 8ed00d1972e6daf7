"""Objectives are loss objects, not trainer subclasses: each maps (model, micro-batch) to the SUM of its token
losses and the number of tokens that count, so the loop can divide by a whole optimizer step's token count.

Objectives defined above the training package (distillation: slmkit.distill) register themselves in OBJECTIVES
(a name -> a maker from the record); the loop does not change (DP-SGD is not an
objective: it changes how a step's gradient is made, train/privacy.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import SlmError
from ..losses import IGNORE  # noqa: F401  (re-exported: the label of a position that does not count)


@dataclass(frozen=True)
class Batch:
    """One micro-batch: inputs [B, T] and labels [B, T] (the next token, or IGNORE); `index` [B]: which training
    sequences they are (what a teacher cache is keyed by), None for batches made otherwise."""

    inputs: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        if self.inputs.device == device:
            return self
        return Batch(self.inputs.to(device, non_blocking=True), self.labels.to(device, non_blocking=True), self.index)

    @property
    def tokens(self) -> int:
        """Label positions that count toward the loss."""
        return int((self.labels != IGNORE).sum())


class Objective:
    """A loss object: `loss_sum(model, batch) -> (summed loss, counted tokens)`; recorded by `name`."""

    name = "objective"

    def loss_sum(self, model, batch: Batch) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def validate_for(self, cfg) -> None:
        """Refuse training settings this objective cannot serve (TrainConfig.validate asks)."""

    def prepare(self, model, data) -> None:
        """Once before a run's first step: load what the loss needs besides the model (distillation: teachers)."""

    def report(self) -> dict | None:
        """What the run's record should say of this objective beyond its config (e.g. a teacher cache's size)."""
        return None

    def eval_sum(self, model, batch: Batch) -> tuple[torch.Tensor, int]:
        """What held-out evaluation measures: the training loss itself, unless an objective says otherwise
        (distillation reports the plain next-token loss, so its validation perplexity compares across runs)."""
        return self.loss_sum(model, batch)

    def record(self) -> dict:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class NextTokenLoss(Objective):
    """Next-token cross-entropy, summed over the positions whose label is not IGNORE.

    `lm` (pretraining: every position counts) and `sft` (supervised: only the assistant's tokens count,
    the mask coming from slmkit.train.data) are the same mathematics over differently masked labels."""

    name: str = "lm"

    def loss_sum(self, model, batch: Batch) -> tuple[torch.Tensor, int]:
        return model(batch.inputs, labels=batch.labels), batch.tokens  # the logits are never held whole


# name -> maker(record) of the loss object; packages above slmkit.train add theirs (slmkit.distill: "distill")
OBJECTIVES = {"lm": lambda record: NextTokenLoss("lm"), "sft": lambda record: NextTokenLoss("sft")}


def objective(name: str) -> Objective:
    """The plain objective of that name (lm | sft)."""
    return objective_from_record({"name": name})


def objective_from_record(record: dict) -> Objective:
    """The loss object a record (Objective.record) was made from."""
    if not isinstance(record, dict) or record.get("name") not in OBJECTIVES:
        raise SlmError(f"unknown objective record {record!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[record["name"]](record)
