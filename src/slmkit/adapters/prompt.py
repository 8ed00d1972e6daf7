"""Prompt tuning: n virtual tokens before every sequence, the only weights that train.

`apply_prompt_tuning_(model, PromptTuningConfig)` gives the model a `prompt` parameter [n, C]; the decoder puts
it before position 0 (slmkit.model.Decoder.forward), after the embedding scale, as PEFT's prompt tuning puts its
`prompt_embeddings` before the scaled token embeddings. The initial rows are embeddings of tokens drawn at
random from the vocabulary (PEFT's SAMPLE_VOCAB), not N(0, 1) noise far from every real token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import require


@dataclass(frozen=True)
class PromptTuningConfig:
    n_virtual: int = 20
    seed: int = 0
    method: ClassVar[str] = "prompt_tuning"
    needs_calibration: ClassVar[bool] = False

    def validate(self) -> "PromptTuningConfig":
        require(isinstance(self.n_virtual, int) and self.n_virtual > 0,
                f"--prompt-tuning takes a positive number of virtual tokens, got {self.n_virtual}")
        return self

    def apply_(self, model: nn.Module, _inputs=None) -> None:
        apply_prompt_tuning_(model, self)


@torch.no_grad()
def apply_prompt_tuning_(model: nn.Module, cfg: PromptTuningConfig) -> nn.Parameter:
    cfg.validate()
    require(model.prompt is None, "the model is already prompt-tuned")
    require(cfg.n_virtual < model.cfg.max_seq_len, f"{cfg.n_virtual} virtual tokens leave no room in a context "
            f"of {model.cfg.max_seq_len}")
    tokens = torch.randint(model.cfg.vocab_size, (cfg.n_virtual,), generator=torch.Generator().manual_seed(cfg.seed))
    rows = model.embed(tokens.to(model.device)).float()  # [n, C]
    for p in model.parameters():
        p.requires_grad_(False)  # the virtual tokens alone train
    model.prompt = nn.Parameter(rows.clone())
    return model.prompt
