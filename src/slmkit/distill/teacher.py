"""Teachers: models that run without gradients (float32, bfloat16 or packed low-bit) and give the distribution a
student learns, alone or as a weighted mixture of several.

A teacher must share the student's vocabulary: the same size and the same token strings, or the
distributions would not be over the same tokens; anything else is refused with both sizes named.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..errors import require
from ..tokenizer import vocabulary_difference
from .divergence import mixture

TEACHER_DTYPES = ("float32", "bfloat16", "int8", "int4")
PROBE = 32  # tokens of the fixed probe sequence a teacher's fingerprint is measured on


@dataclass
class Teacher:
    model: object  # a slmkit Decoder, in eval, frozen
    source: str
    fingerprint: str  # digest of the teacher's output on a fixed probe: another teacher gives another one


def load_teacher(spec: str | None, dtype: str = "float32") -> tuple[Teacher, object]:
    """(the teacher, its tokenizer): MODEL loaded, frozen, in `dtype` (bfloat16 weights, or int8 / int4 packed
    by round-to-nearest with slmkit's scale search)."""
    from ..loader import load

    require(dtype in TEACHER_DTYPES, f"teacher dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
    lm = load(spec, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    if dtype in ("int8", "int4"):
        from ..quant import QScheme, RTNConfig, quantize_

        quantize_(lm.model, RTNConfig(QScheme(8 if dtype == "int8" else 4, 32, True)))
    model = lm.model.eval().requires_grad_(False)
    return Teacher(model, f"{lm.source} ({dtype})", fingerprint(model)), lm.tokenizer


@torch.no_grad()
def fingerprint(model) -> str:
    """sha256 of the teacher's top token and its log-probability (3 decimals) at each position of a fixed probe."""
    probe = (torch.arange(PROBE) * 7919 % model.cfg.vocab_size)[None]  # [1, PROBE]
    logp = torch.log_softmax(model(probe).float(), -1)[0]  # [PROBE, V]
    top = logp.max(-1)
    data = f"{model.cfg.vocab_size}:{top.indices.tolist()}:{[round(v, 3) for v in top.values.tolist()]}"
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def check_vocabulary(student_tokenizer, student_vocab: int, teacher_tokenizer, teacher_vocab: int,
                     source: str) -> None:
    """Refuse a teacher whose vocabulary is not the student's (size, then the token strings)."""
    differ = vocabulary_difference(teacher_tokenizer, teacher_vocab, student_tokenizer, student_vocab, "the student")
    require(differ is None, f"teacher {source} {differ}: distillation needs the same vocabulary")


@torch.no_grad()
def teacher_hidden(teachers: list[Teacher], inputs: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
    """Each teacher's final hidden states at the counted positions: inputs [B, T], rows [B*T] bool -> [n, C_i]."""
    return [t.model(inputs, hidden=True).flatten(0, 1)[rows] for t in teachers]  # [B*T, C] -> [n, C]


@torch.no_grad()
def teacher_log_probs(teachers: list[Teacher], hidden: list[torch.Tensor], heads: list[torch.Tensor], start: int,
                      end: int, temperature: float, weights=None, confidence: bool = False) -> torch.Tensor:
    """log-probabilities [end - start, V] at `temperature` of rows start:end: one teacher's, or the mixture of
    several (divergence.mixture)."""
    logs = [torch.log_softmax(torch.mm(h[start:end].to(w.dtype), w.T).float() / temperature, -1)
            for h, w in zip(hidden, heads)]  # [n, V] each
    return logs[0] if len(logs) == 1 else mixture(logs, weights, confidence)
