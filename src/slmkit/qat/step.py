"""QAT as a pipeline step: prepare, train through the one loop (any objective: cross-entropy or distillation
from the float model), convert to packed weights; recorded in the model's history like any other step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..records import step_record
from ..train.config import TrainConfig
from ..train.data import TrainData, load_data
from ..train.loop import train
from ..train.step import TrainStep, summary
from .config import QATConfig
from .modules import convert_qat_, prepare_qat_


@dataclass
class QATStep:
    """Its record: {"method": "qat", "qat": the QATConfig, "data", "format", "eval_data", "train": the
    TrainConfig, "result": what the run measured}."""

    method: ClassVar[str] = "qat"
    needs_calibration: ClassVar[bool] = False
    qat: QATConfig = field(default_factory=QATConfig)
    data: str = ""
    format: str | None = None
    eval_data: str | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1))
    result: dict | None = None

    def inputs(self, tokenizer) -> TrainData:
        return load_data(self.data, tokenizer, self.train.seq_len, self.format, self.eval_data)

    def apply_(self, model, data: TrainData) -> None:
        prepare_qat_(model, self.qat)
        self.result = summary(train(model, data, self.train, show=False), data)
        convert_qat_(model)


@dataclass
class QATJob:
    """What `slm train --qat` hands the training job (slmkit.train.job.TrainJob.transform): prepare before the
    loop, convert after it, and the step record that replaces the plain training step."""

    qat: QATConfig

    def prepare_(self, model) -> None:
        prepare_qat_(model, self.qat)

    def finish_(self, model) -> None:
        convert_qat_(model)

    def record(self, step: TrainStep) -> dict:
        return step_record(QATStep(self.qat, step.data, step.format, step.eval_data, step.train, step.result))
