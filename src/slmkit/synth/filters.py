"""Which generated records to drop, as data: FILTERS is a table of (reason, field, check, argument), tried in
order; the first that matches names the rejection, and the job counts rejections by reason.

The instruction filters follow Self-Instruct (Wang et al. 2023, `self_instruct/bootstrap_instructions.py`): at
most 3 or more than 150 words, words a text-only model cannot act on, "Write a program", a leading punctuation
mark or non-ASCII character. The output filters drop empty answers and answers that only restate the task.
A filter whose field a candidate does not have (the answer before it is generated; `answer` outside rationale
mode) is skipped. `truncated` is set when the teacher's answer (or rationale) ran into --max-new-tokens.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from .rouge import rouge_l

# Self-Instruct's list, plus photo(s): tasks about things a text model can neither see nor produce.
UNACTIONABLE_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "photo", "photos", "file",
                      "files", "map", "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart",
                      "diagram")


@dataclass(frozen=True)
class Filter:
    reason: str  # the name a rejection is counted under
    field: str  # instruction | input | output | rationale | answer | truncated
    check: str  # a key of CHECKS
    arg: object = None


FILTERS: tuple[Filter, ...] = (
    Filter("empty_instruction", "instruction", "empty"),
    Filter("instruction_too_short", "instruction", "min_words", 4),
    Filter("instruction_too_long", "instruction", "max_words", 150),
    Filter("leading_non_ascii", "instruction", "leading_non_ascii"),
    Filter("leading_punctuation", "instruction", "leading_punctuation"),
    Filter("garbled_instruction", "instruction", "min_letter_share", 0.7),
    Filter("unactionable_word", "instruction", "any_word", UNACTIONABLE_WORDS),
    Filter("program_request", "instruction", "prefix", ("write a program",)),
    Filter("input_too_long", "input", "max_words", 300),
    Filter("empty_output", "output", "empty"),
    Filter("empty_rationale", "rationale", "empty"),
    Filter("output_truncated", "truncated", "is_true"),
    Filter("output_leading_non_ascii", "output", "leading_non_ascii"),
    Filter("output_repeats_instruction", "output", "repeats_instruction", 0.8),
    Filter("empty_answer", "answer", "empty"),
)
REASONS = tuple(f.reason for f in FILTERS) + ("similar",)  # "similar": the ROUGE-L deduplication


def _any_word(text: str, words) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) for w in words)


def _letter_share(text: str) -> float:
    """Share of the non-space characters that are ASCII letters, digits or common punctuation."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isascii() and (c.isalnum() or c in string.punctuation) for c in chars) / max(1, len(chars))


CHECKS = {  # check name -> (value, arg, candidate) -> True to reject
    "empty": lambda v, arg, c: not v.strip(),
    "is_true": lambda v, arg, c: bool(v),
    "min_words": lambda v, arg, c: len(v.split()) < arg,
    "max_words": lambda v, arg, c: len(v.split()) > arg,
    "leading_non_ascii": lambda v, arg, c: not v.lstrip()[:1].isascii(),
    "leading_punctuation": lambda v, arg, c: v.lstrip()[:1] in string.punctuation,
    "min_letter_share": lambda v, arg, c: _letter_share(v) < arg,
    "any_word": lambda v, arg, c: _any_word(v, arg),
    "prefix": lambda v, arg, c: v.lstrip().lower().startswith(tuple(arg)),
    "repeats_instruction": lambda v, arg, c: rouge_l(v, f"{c['instruction']} {c.get('input', '')}") >= arg,
}


def rejection(candidate: dict, filters: tuple[Filter, ...] = FILTERS) -> str | None:
    """The reason of the first filter that rejects `candidate` (fields: instruction, input, output, answer), or
    None to keep it."""
    for f in filters:
        if f.field in candidate and CHECKS[f.check](candidate[f.field], f.arg, candidate):
            return f.reason
    return None
