"""The teacher: whatever turns a request (`Ask`) into reply text. `ModelTeacher` runs a model through its chat
template and slmkit's sampler; tests and other engines pass any callable `Ask -> str` instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..generate import GenerationConfig, TextStream, generate


@dataclass(frozen=True)
class Ask:
    kind: str  # task | answer | rationale | final (the answer after a rationale)
    messages: list  # the chat so far, rendered with the teacher's template
    prefill: str  # text the assistant's turn already starts with; the reply continues it
    seed: int  # the sampler's seed for this request
    one_line: bool  # stop at the first line break after some text


class Reply(str):
    """Reply text that also says whether the teacher ended it itself (False: cut off at max_new_tokens). A
    teacher may return a plain str, which counts as finished."""

    finished: bool = True

    def __new__(cls, text: str, finished: bool = True):
        reply = super().__new__(cls, text)
        reply.finished = finished
        return reply


Teacher = Callable[[Ask], str]


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256


class ModelTeacher:
    """A loaded model (slmkit.backends.load) as a teacher."""

    def __init__(self, lm, sampling: Sampling):
        self.lm, self.sampling = lm, sampling
        self.stop_ids = lm.tokenizer.stop_ids()

    def __call__(self, ask: Ask) -> str:
        tok, s = self.lm.tokenizer, self.sampling
        ids = tok.encode(tok.render_chat(ask.messages, add_generation_prompt=True) + ask.prefill)
        cfg = GenerationConfig(s.max_new_tokens, s.temperature, 0, s.top_p, self.stop_ids, ask.seed)
        limit = min(s.max_new_tokens, self.lm.model.cfg.max_seq_len - len(ids))
        stream, text, count = TextStream(tok), "", 0
        for count, token in enumerate(generate(self.lm.model, ids, cfg), 1):
            text += stream.push(token)
            if ask.one_line and "\n" in text.lstrip():
                return Reply(text.lstrip().split("\n", 1)[0])
        return Reply(text, finished=count < limit)


def load_teacher(spec: str | None, sampling: Sampling, dtype: str = "bfloat16", backend: str = "torch") -> ModelTeacher:
    """MODEL (a path, known name or hub id; None: the default model) loaded on `backend` as a teacher."""
    from ..backends import load
    from ..loader import DTYPES

    return ModelTeacher(load(spec, DTYPES[dtype], backend), sampling)
