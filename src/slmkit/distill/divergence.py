"""Distillation's mathematics as pure tensor functions: the divergences between a student's and a teacher's
next-token distributions, the top-k form of a teacher's distribution, and mixtures of teachers.

Every divergence takes log-probabilities over the same bins, [n, V] (the whole vocabulary) or [n, k + 1] (a
teacher's top-k tokens and one remainder bin holding the rest of the mass, see `topk_bins`), and returns one
value per row. P is the teacher, Q the student:

  fkl    forward KL   KL(P || Q) = sum P (log P - log Q)           (mean-seeking; the classic KD loss)
  rkl    reverse KL   KL(Q || P)                                    (mode-seeking, MiniLLM)
  jsd    generalized JSD with beta, as TRL's GKD defines it: beta = 0 is forward KL, beta = 1 reverse KL, and
         in between, with the mixture M = beta P + (1 - beta) Q, beta KL(P || M) + (1 - beta) KL(Q || M)
  skl    skew forward KL  KL(P || a P + (1 - a) Q)                  (DistiLLM, skew a)
  srkl   skew reverse KL  KL(Q || a Q + (1 - a) P)

Terms whose left-hand probability is 0 count 0 (0 log 0 = 0), so a teacher that puts all its mass in its
top-k leaves an empty remainder bin without a NaN.
"""

from __future__ import annotations

import math

import torch

LOSSES = ("fkl", "rkl", "jsd", "skl", "srkl")


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities [n, bins] -> [n]; bins where p = 0 count 0."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def log_mix(a_log: torch.Tensor, b_log: torch.Tensor, a_weight: float) -> torch.Tensor:
    """log(a_weight * a + (1 - a_weight) * b) from log-probabilities, stably."""
    return torch.logaddexp(a_log + math.log(a_weight), b_log + math.log1p(-a_weight))


def divergence(student_log: torch.Tensor, teacher_log: torch.Tensor, loss: str = "fkl", beta: float = 0.5,
               skew: float = 0.1) -> torch.Tensor:
    """The divergence `loss` (see LOSSES) of each row [n, bins] -> [n]."""
    if loss == "fkl" or (loss == "jsd" and beta == 0):
        return kl(teacher_log, student_log)
    if loss == "rkl" or (loss == "jsd" and beta == 1):
        return kl(student_log, teacher_log)
    if loss == "jsd":
        mixture = log_mix(teacher_log, student_log, beta)
        return beta * kl(teacher_log, mixture) + (1 - beta) * kl(student_log, mixture)
    if loss == "skl":
        return kl(teacher_log, log_mix(teacher_log, student_log, skew))
    if loss == "srkl":
        return kl(student_log, log_mix(student_log, teacher_log, skew))
    raise ValueError(f"unknown divergence {loss!r}; known: {', '.join(LOSSES)}")


# ---- top-k teachers ----------------------------------------------------------------------------------------
def rest_log(log_probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log of the mass outside the bins `index` [n, k] of each row of log_probs [n, V] -> [n, 1], computed from
    the bins left (not as log(1 - kept), which loses every digit when the kept mass is near 1)."""
    return torch.logsumexp(log_probs.scatter(-1, index, float("-inf")), -1, keepdim=True)


def topk_target(teacher_log: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A teacher's distribution [n, V] kept as its k likeliest tokens: (index [n, k], their log-probabilities
    [n, k], the log of the remaining mass [n, 1])."""
    values, index = teacher_log.topk(k, dim=-1)  # [n, k] each
    return index, values, rest_log(teacher_log, index)


def topk_bins(student_log: torch.Tensor, index: torch.Tensor, teacher_topk: torch.Tensor,
              teacher_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student [n, V] and teacher over the same k + 1 bins: the teacher's top-k tokens and the rest. The terms
    of the kept tokens are exactly those of the full-vocabulary divergence; the remainder bin replaces the
    rest's terms by one (for KL a lower bound of them, by the log-sum inequality)."""
    student = torch.cat([student_log.gather(-1, index), rest_log(student_log, index)], -1)  # [n, k + 1]
    return student, torch.cat([teacher_topk, teacher_rest], -1)  # [n, k + 1] each


# ---- several teachers --------------------------------------------------------------------------------------
def mixture(teacher_logs: list[torch.Tensor], weights: list[float] | None = None,
            confidence: bool = False) -> torch.Tensor:
    """log of sum_i w_i P_i for teachers' log-probabilities [..., V] each -> [..., V]. Weights fixed (normalised to
    sum 1; None: equal), or with `confidence` chosen per token: each teacher's weight is its top probability
    at that token, normalised over the teachers (the surer teacher leads)."""
    stacked = torch.stack(teacher_logs)  # [M, ..., V]
    if confidence:
        peak = stacked.amax(-1, keepdim=True)  # [M, ..., 1]: log of each teacher's top probability
        log_w = peak - torch.logsumexp(peak, 0, keepdim=True)
    else:
        w = torch.tensor(weights if weights is not None else [1.0] * len(teacher_logs), dtype=stacked.dtype)
        log_w = (w / w.sum()).log().to(stacked.device).view(-1, *[1] * (stacked.dim() - 1))  # [M, 1, ..., 1]
    return torch.logsumexp(stacked + log_w, 0)
