"""Zero-shot multiple choice by log-likelihood, with acc and length-normalised acc_norm as
lm-evaluation-harness defines them (acc_norm divides each choice's log-likelihood by its length in UTF-8 bytes).

A task is a name (`arc_easy`) or a JSONL file path. The generic schema is one object per line with `context`
(string), `choices` (strings, each scored as a continuation after one space) and `answer` (index); files in
the ARC, HellaSwag, PIQA and WinoGrande formats are recognised by their fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlmError, require
from .data import read_jsonl, resolve_source
from .scoring import score


@dataclass
class Question:
    pairs: list[tuple[str, str]]  # (context, continuation) for each choice
    answer: int


def _generic(rec: dict) -> Question:
    require(isinstance(rec["choices"], list) and rec["choices"], "choices must be a non-empty list")
    return Question([(rec["context"], " " + str(c)) for c in rec["choices"]], int(rec["answer"]))


def _arc(rec: dict) -> Question:
    choices = rec["question"]["choices"]
    labels = [c["label"] for c in choices]
    context = f"Question: {rec['question']['stem']}\nAnswer:"
    return Question([(context, " " + c["text"]) for c in choices], labels.index(rec["answerKey"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(rec: dict) -> Question:
    context = _hellaswag_clean(f"{rec['activity_label']}: {rec['ctx_a']} {rec['ctx_b'].capitalize()}")
    return Question([(context, " " + _hellaswag_clean(e)) for e in rec["endings"]], int(rec["label"]))


def _piqa(rec: dict) -> Question:
    context = f"Question: {rec['goal']}\nAnswer:"
    return Question([(context, " " + rec["sol1"]), (context, " " + rec["sol2"])], int(rec["label"]))


def _winogrande(rec: dict) -> Question:
    """Partial scoring: each option fills the blank in the context; the rest of the sentence is scored."""
    before, after = rec["sentence"].split("_", 1)
    pairs = [(before + rec[f"option{i}"], " " + after.strip()) for i in (1, 2)]
    return Question(pairs, int(rec["answer"]) - 1)


# (fields that identify the format, reader), tried in order
FORMATS = [({"context", "choices", "answer"}, _generic), ({"question", "answerKey"}, _arc),
           ({"ctx_a", "ctx_b", "endings", "label"}, _hellaswag), ({"goal", "sol1", "sol2", "label"}, _piqa),
           ({"sentence", "option1", "option2", "answer"}, _winogrande)]


def load_task(spec: str) -> tuple[list[Question], str]:
    """Questions of a task name or JSONL path, and the path read; malformed records name their line."""
    path = resolve_source(spec)
    if path is None or path.is_dir() or path.suffix != ".jsonl":
        raise SlmError(f"unknown task {spec!r}: give wikitext2, arc_easy, or a .jsonl file of questions")
    records = read_jsonl(path)
    reader = next((r for fields, r in FORMATS if fields <= set(records[0])), None)
    require(reader is not None, f"{path}:1: unrecognised record; expected fields context, choices, answer")
    return [_parse(reader, rec, path, n) for n, rec in enumerate(records, 1)], str(path)


def _parse(reader, rec: dict, path: Path, line: int) -> Question:
    try:
        q = reader(rec)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SlmError(f"{path}:{line}: malformed record ({type(exc).__name__}: {exc})") from None
    except SlmError as exc:
        raise SlmError(f"{path}:{line}: {exc}") from None
    require(0 <= q.answer < len(q.pairs), f"{path}:{line}: answer {q.answer} is not a choice index")
    return q


def encode_pair(tokenizer, context: str, continuation: str, max_len: int) -> tuple[list[int], int]:
    """(token sequence, index of the first continuation token), lm-evaluation-harness style: the
    continuation's tokens are those of context+continuation past the context's own tokens."""
    if context.endswith(" "):  # trailing spaces belong to the continuation
        stripped = context.rstrip(" ")
        context, continuation = stripped, context[len(stripped):] + continuation
    ctx = tokenizer.encode(context, add_bos=False) or [tokenizer.eos_token_id or 0]
    whole = tokenizer.encode(context + continuation, add_bos=False)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else tokenizer.encode(continuation, add_bos=False)
    seq = (ctx + cont)[-max_len:]
    return seq, len(seq) - len(cont)


def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8,
                   description: str | None = None) -> list[float]:
    """Sum of log-probabilities of each continuation after its context."""
    encoded = [encode_pair(tokenizer, c, x, model.cfg.max_seq_len) for c, x in pairs]
    scored = score(model, [s for s, _ in encoded], batch_size, first=[f for _, f in encoded], description=description)
    return [float(s.logprobs.sum()) for s in scored]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def evaluate_task(model, tokenizer, questions: list[Question], batch_size: int = 8) -> dict:
    """acc and acc_norm over the questions (acc_norm: log-likelihood per UTF-8 byte of the continuation)."""
    pairs = [pair for q in questions for pair in q.pairs]
    lls = iter(loglikelihoods(model, tokenizer, pairs, batch_size, description="multiple choice"))
    correct = correct_norm = 0
    for q in questions:
        ll = [next(lls) for _ in q.pairs]
        norm = [v / max(len(x.encode("utf-8")), 1) for v, (_, x) in zip(ll, q.pairs)]
        correct += int(_argmax(ll) == q.answer)
        correct_norm += int(_argmax(norm) == q.answer)
    n, acc = len(questions), correct / len(questions)
    return {"acc": acc, "acc_norm": correct_norm / n, "acc_stderr": (acc * (1 - acc) / max(n - 1, 1)) ** 0.5,
            "questions": n, "choices_scored": len(pairs)}
