"""Training as a pipeline step (slmkit.pipeline): data and a TrainConfig, applied like a compression step and
recorded in the model's history beside them, so a recipe such as prune -> train -> quantize is one list of
step configs that can be saved, read back (slmkit.steps.step_from_record) and run again."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .config import TrainConfig
from .data import TrainData, load_data
from .loop import TrainResult, train


@dataclass
class TrainStep:
    """Its record (slmkit.pipeline.step_record): {"method": "train", "data", "format", "eval_data", "train": the
    TrainConfig's fields with the objective as its record, "result": steps, tokens, losses, data info}."""

    method: ClassVar[str] = "train"
    needs_calibration: ClassVar[bool] = False
    data: str = ""  # SOURCE (see slmkit.train.data.load_data)
    format: str | None = None
    eval_data: str | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1))
    result: dict | None = None  # what the run measured, filled in when applied (not an input)

    def inputs(self, tokenizer) -> TrainData:
        return load_data(self.data, tokenizer, self.train.seq_len, self.format, self.eval_data)

    def apply_(self, model, data: TrainData) -> None:
        self.result = summary(train(model, data, self.train, show=False), data)


def summary(result: TrainResult, data: TrainData, base: str | None = None) -> dict:
    """The measured part of a training step's record."""
    out = {"base": base, "data": data.info, "steps": result.steps, "tokens": result.tokens,
           "final_loss": result.final_loss, "val_loss": result.val_loss}
    extra = {"privacy": result.privacy, "objective": result.objective}
    return {**out, **{k: v for k, v in extra.items() if v is not None}}
