"""The teacher's prompts, made for a small instruct model, and the parsing of its replies.

A new task is asked for the way Self-Instruct asks a base model: the assistant's turn is started with a numbered
list of example tasks and the teacher continues it with the next item (one line). Small instruct models follow a
list they are already writing far better than an instruction to "write one new task", which they answer with
preambles, several tasks or a reply to the examples. The parser still expects junk: list numbers, bullets,
"Task:" labels, quotes, a preamble line ending in ':', an "Input:" part.
"""

from __future__ import annotations

import re

TASK_REQUEST = "Write a list of different tasks, one per line, that a user could ask an AI assistant to do."
RATIONALE_REQUEST = "Explain your answer step by step."
ANSWER_LABEL = "Answer:"

_NUMBER = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022])\s*")
_LABEL = re.compile(r"^\s*(?:(?:a|one|my|the|your)\s+)?(?:new\s+|next\s+)?(?:task|instruction|question|prompt)"
                    r"\s*\d*\s*[:\-]\s*", re.IGNORECASE)
_INPUT = re.compile(r"\s*\binput\s*:\s*", re.IGNORECASE)


def one_line(text: str) -> str:
    return " ".join(text.split())


def task_prefill(examples: list[str]) -> str:
    """The start of the assistant's turn: the examples numbered 1..k, then the number of the task to write."""
    lines = [f"{i}. {one_line(e)}" for i, e in enumerate(examples, 1)]
    return "\n".join(lines) + f"\n{len(examples) + 1}."


def task_messages() -> list[dict]:
    return [{"role": "user", "content": TASK_REQUEST}]


def user_content(instruction: str, input_text: str = "") -> str:
    """The user turn of a record: the instruction, then its input after a blank line (as Alpaca records read)."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def rationale_messages(instruction: str, input_text: str = "") -> list[dict]:
    return [{"role": "user", "content": f"{user_content(instruction, input_text)}\n\n{RATIONALE_REQUEST}"}]


def _clean(line: str) -> str:
    line = _LABEL.sub("", _NUMBER.sub("", line))
    line = line.strip().strip("*_`").strip()
    if len(line) >= 2 and line[0] in "\"'\u201c" and line[-1] in "\"'\u201d":
        line = line[1:-1].strip()
    return line


def parse_task(reply: str) -> tuple[str, str]:
    """(instruction, input) from the teacher's continuation of the task list; ("", "") when there is none.
    The first line with content is the task, or the line after it when it is a preamble ending in ':';
    an "Input:" part, on the task's line or the next one, is the input."""
    lines = [_clean(line) for line in reply.splitlines()]
    lines = [line for line in lines if line]
    if len(lines) > 1 and lines[0].endswith(":") and not _INPUT.search(lines[0]):
        lines = lines[1:]
    if not lines:
        return "", ""
    parts = _INPUT.split(lines[0], maxsplit=1)
    instruction, input_text = parts[0].strip(), parts[1].strip() if len(parts) > 1 else ""
    if not input_text and len(lines) > 1 and _INPUT.match(lines[1]):
        input_text = _INPUT.sub("", lines[1], count=1).strip()
    return instruction, input_text


def parse_answer(reply: str) -> str:
    """The final answer after the forced "Answer:": its first line with content, any repeated label removed."""
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first[len(ANSWER_LABEL):].strip() if first.lower().startswith(ANSWER_LABEL.lower()) else first
