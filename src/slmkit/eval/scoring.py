"""Log-likelihoods of token sequences: the one primitive perplexity, fidelity, tasks and lm-eval share.

Sequences are batched by length and right-padded; with causal attention, padding after a sequence cannot
change its scores. Log-softmax runs in float64 over the full vocabulary, one sequence at a time, so memory
stays at one batch of float32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Decoder
from ..progress import progress


@dataclass
class Scored:
    logprobs: torch.Tensor  # [n] float64: log p(token i+1 | tokens <= i) for the scored positions
    greedy: torch.Tensor  # [n] bool: the scored token was the argmax


@torch.inference_mode()
def score(model: Decoder, sequences: list[list[int]], batch_size: int = 8, first: list[int] | None = None,
          keep_logprobs: bool = False, description: str | None = None) -> list[Scored]:
    """Score every token of each sequence from position first[i] (default 1) on, given all tokens before it.

    With keep_logprobs, Scored.logprobs is instead the full [n, V] float64 log-softmax (for fidelity)."""
    first = first or [1] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[Scored | None] = [None] * len(sequences)
    starts = range(0, len(order), batch_size)
    for start in progress(starts, description) if description else starts:
        batch = order[start:start + batch_size]
        width = len(sequences[batch[0]])
        tokens = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T], right-padded
        for row, i in enumerate(batch):
            tokens[row, :len(sequences[i])] = torch.tensor(sequences[i])
        logits = model(tokens)  # [B, T, V]
        for row, i in enumerate(batch):
            results[i] = _score_row(logits[row], sequences[i], first[i], keep_logprobs)
    return results


def _score_row(logits: torch.Tensor, seq: list[int], first: int, keep: bool) -> Scored:
    """logits [T, V] of one sequence -> the scores of positions first..len(seq)-1."""
    preds = logits[first - 1:len(seq) - 1].double().log_softmax(-1)  # [n, V]: position p predicts token p+1
    targets = torch.tensor(seq[first:])  # [n]
    greedy = preds.argmax(-1) == targets
    return Scored(preds if keep else preds.gather(-1, targets[:, None])[:, 0], greedy)
