"""The Self-Instruct loop: ask the teacher for a new task from sampled examples, filter it, drop near-duplicates
(ROUGE-L against every instruction kept so far and the seeds), have the teacher answer it (or explain and then
answer it, --rationale), filter the answer, append the record. Every request's sampler seed and example choice
come from (seed, attempt number) alone, so a resumed job writes the same records as an uninterrupted one."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Iterator

from ..errors import SlmError, require
from ..progress import progress
from . import prompts
from .config import SynthConfig
from .filters import rejection
from .rouge import Deduper
from .seeds import Seed, read_seeds
from .state import JobState, append_record, discard, finish, partial_paths, prepare, write_sidecar
from .teacher import Ask, Sampling, Teacher, load_teacher


def derive_seed(seed: int, attempt: int, stage: str) -> int:
    """A 63-bit seed for one stage of one attempt, independent of every other request."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{attempt}/{stage}".encode()).digest()[:8], "big") >> 1


class Synthesizer:
    """One attempt at a time: `attempt(a)` returns the record, or the reason it was rejected."""

    def __init__(self, seeds: list[Seed], cfg: SynthConfig, teacher: Teacher, name: str, state: JobState):
        self.seeds, self.cfg, self.teacher, self.name, self.state = seeds, cfg, teacher, name, state
        pool = [] if cfg.given else [s.instruction for s in seeds]
        self.pool = Deduper(cfg.threshold, pool + state.kept)

    def _ask(self, kind: str, attempt: int, messages: list, prefill: str = "", one_line: bool = False) -> str:
        return self.teacher(Ask(kind, messages, prefill, derive_seed(self.cfg.seed, attempt, kind), one_line))

    def new_task(self, attempt: int) -> tuple[str, str]:
        """(instruction, input): the seed's own in --given mode, else parsed from the teacher's next list item."""
        if self.cfg.given:
            return self.seeds[attempt].instruction, self.seeds[attempt].input
        rng = random.Random(derive_seed(self.cfg.seed, attempt, "examples"))
        examples = rng.sample([s.instruction for s in self.seeds], self.cfg.k)
        examples += rng.sample(self.state.kept, min(self.cfg.machine_examples, len(self.state.kept)))
        rng.shuffle(examples)
        reply = self._ask("task", attempt, prompts.task_messages(), prompts.task_prefill(examples), one_line=True)
        return prompts.parse_task(reply)

    def answer(self, attempt: int, cand: dict) -> None:
        """Fill the candidate's output (and, --rationale, its rationale and answer)."""
        question = prompts.user_content(cand["instruction"], cand["input"])
        if not self.cfg.rationale:
            reply = self._ask("answer", attempt, [{"role": "user", "content": question}])
            cand.update(output=reply.strip(), truncated=not getattr(reply, "finished", True))
            return
        messages = prompts.rationale_messages(cand["instruction"], cand["input"])
        reply = self._ask("rationale", attempt, messages)
        rationale = reply.strip()
        cand.update(rationale=rationale, truncated=not getattr(reply, "finished", True))
        if rejection(cand):
            return  # no final answer for a rationale already rejected
        final = self._ask("final", attempt, messages, f"{rationale}\n\n{prompts.ANSWER_LABEL}", one_line=True)
        cand["answer"] = prompts.parse_answer(final)
        cand["output"] = f"{rationale}\n\n{prompts.ANSWER_LABEL} {cand['answer']}"

    def attempt(self, attempt: int) -> dict | str:
        instruction, input_text = self.new_task(attempt)
        cand = {"instruction": instruction, "input": input_text}
        reason = rejection(cand) or ("similar" if self.pool.is_similar(instruction) else None)
        if reason is None:
            self.answer(attempt, cand)
            reason = rejection(cand)
        if reason is not None:
            return reason
        self.pool.add(instruction)
        return self.record(attempt, cand)

    def record(self, attempt: int, cand: dict) -> dict:
        messages = [{"role": "user", "content": prompts.user_content(cand["instruction"], cand["input"])},
                    {"role": "assistant", "content": cand["output"]}]
        extra = {k: cand[k] for k in ("rationale", "answer") if k in cand}
        return {"messages": messages, "source": "synth", "instruction": cand["instruction"],
                "input": cand["input"], **extra, "attempt": attempt, "teacher": self.name}


def _run(job: Synthesizer, out: Path, settings: dict) -> Iterator[dict]:
    """Attempts until n records are kept or the attempt limit is reached; yields each kept record."""
    cfg, state = job.cfg, job.state
    limit = min(cfg.attempt_limit, len(job.seeds)) if cfg.given else cfg.attempt_limit
    partial, sidecar = partial_paths(out)
    write_sidecar(sidecar, settings, state, cfg.n)  # first: a partial file never exists without its sidecar
    with partial.open("a", encoding="utf-8", newline="\n") as f:
        while len(state.kept) < cfg.n and state.attempts < limit:
            result = job.attempt(state.attempts)
            if isinstance(result, dict):
                append_record(f, result)
                state.kept.append(result["instruction"])
            else:
                state.rejected[result] += 1
            state.attempts += 1
            write_sidecar(sidecar, settings, state, cfg.n)
            if isinstance(result, dict):
                yield result


def synthesize(seeds_path: str | Path, out: str | Path, cfg: SynthConfig, teacher_spec: str | None = None, *,
               force: bool = False, resume: bool = False, teacher: Teacher | None = None, dtype: str = "bfloat16",
               backend: str = "torch") -> dict:
    """Write cfg.n teacher-made chat records to `out` (JSONL) and return the job's summary. Every check (config,
    seeds, OUT, a resumed job's settings) comes before anything is loaded or written. `teacher`: any callable
    Ask -> str instead of loading `teacher_spec` (the default model when None)."""
    cfg.validate()
    seeds, digest = read_seeds(seeds_path)
    require(cfg.given or cfg.k <= len(seeds), f"-k {cfg.k} is more than the {len(seeds)} seed tasks")
    require(not cfg.given or cfg.n <= len(seeds), f"--given: -n {cfg.n} is more than the {len(seeds)} seed tasks")
    out = Path(out)
    name = teacher_spec or getattr(teacher, "name", None) or ("custom" if teacher else "default")
    settings = {**cfg.settings(), "teacher": name, "dtype": dtype, "backend": backend, "seeds_sha256": digest}
    state = prepare(out, settings, force, resume)
    if teacher is None:
        teacher = load_teacher(teacher_spec, Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens), dtype, backend)
    if not resume:
        discard(out)  # --force: an earlier interrupted job's files go
    job = Synthesizer(seeds, cfg, teacher, name, state)
    for _ in progress(_run(job, out, settings), "synth", total=max(0, cfg.n - len(state.kept))):
        pass
    summary = {"out": str(out), "n": cfg.n, "kept": len(state.kept), "attempts": state.attempts,
               "rejected": dict(sorted(state.rejected.items())), "seconds": round(state.elapsed(), 3),
               "complete": len(state.kept) >= cfg.n, "settings": settings}
    if not state.kept:
        discard(out)
        raise SlmError(f"no record kept in {state.attempts} attempts (rejected: {_counts(state.rejected)}); "
                       "nothing written")
    finish(out)
    return summary


def _counts(rejected) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(rejected.items(), key=lambda kv: -kv[1])) or "none"
