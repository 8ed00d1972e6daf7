"""On-policy distillation (GKD): the student continues each sequence's prompt with its own samples, and the
teacher then scores what the student wrote, so the student learns on the distribution it will meet."""

from __future__ import annotations

import torch

from ..generate import GenerationConfig, generate
from ..losses import IGNORE
from ..train.objectives import Batch


def student_batch(model, batch: Batch, stop_ids: set[int], eos: int | None) -> Batch:
    """A batch of the same shape whose counted positions hold the student's samples: for each row, the prompt
    is everything before its first counted label (a text row: its first half), the student samples (at
    temperature 1, from the global RNG, so runs and resumes repeat) as many tokens as the row counted, stopping
    at an end-of-turn token (kept as the last target)."""
    inputs, labels = batch.inputs.clone(), torch.full_like(batch.labels, IGNORE)  # [B, T] each
    was_training = model.training
    model.eval()
    for row in range(len(inputs)):
        counted = (batch.labels[row] != IGNORE).nonzero().flatten()
        if len(counted) == 0:
            continue
        start = int(counted[0]) if int(counted[0]) > 0 else inputs.shape[1] // 2
        end = int(counted[-1]) + 1  # targets at positions start..end-1 predict tokens start+1..end
        _continue_row(model, inputs[row], labels[row], start, end, stop_ids, eos)
    model.train(was_training)
    return Batch(inputs, labels, None)


def _continue_row(model, inputs: torch.Tensor, labels: torch.Tensor, start: int, end: int, stop_ids: set[int],
                  eos: int | None) -> None:
    """Fill inputs[start+1:] / labels[start:] [T] in place with the student's continuation of inputs[:start+1]."""
    seed = int(torch.randint(0, 2 ** 31 - 1, ()))
    cfg = GenerationConfig(max_new_tokens=end - start, temperature=1.0, stop_ids=set(stop_ids), seed=seed)
    tokens = list(generate(model, inputs[:start + 1].tolist(), cfg))
    if len(tokens) < end - start and eos is not None:
        tokens.append(eos)  # the turn ended: the student learns to end it
    new = torch.tensor(tokens, dtype=torch.long)  # [G]
    labels[start:start + len(new)] = new
    inputs[start + 1:start + len(new)] = new[:-1]
