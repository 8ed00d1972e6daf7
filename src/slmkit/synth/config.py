"""What a synth job is asked for. `settings()` is what decides the records; a resumed job must match it."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from ..errors import require
from . import filters, prompts

SCHEMA = "slmkit.synth/1"
# A digest of the prompts and the filter table: a job written by other prompts or filters is not resumed.
RECIPE = hashlib.sha256(repr((SCHEMA, filters.FILTERS, prompts.TASK_REQUEST, prompts.RATIONALE_REQUEST,
                              prompts.ANSWER_LABEL)).encode()).hexdigest()[:16]


@dataclass
class SynthConfig:
    n: int = 100  # records to keep
    k: int = 3  # seed tasks shown in each request for a new task
    machine_examples: int = 2  # kept (generated) tasks shown too, once there are some
    threshold: float = 0.7  # ROUGE-L F at or above which a new instruction is a near-duplicate
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    rationale: bool = False  # the answer is a step-by-step explanation, then "Answer: ..."
    given: bool = False  # answer the seeds' own instructions (in file order) instead of generating new ones
    max_attempts: int | None = None  # stop after this many requests (default 10 n + 10)

    def validate(self) -> "SynthConfig":
        require(self.n > 0, f"-n must be positive, got {self.n}")
        require(self.k > 0, f"-k must be positive, got {self.k}")
        require(self.machine_examples >= 0, f"machine examples must be >= 0, got {self.machine_examples}")
        require(0 < self.threshold <= 1, f"--threshold must be in (0, 1], got {self.threshold}")
        require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(self.max_new_tokens > 0, f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        require(self.max_attempts is None or self.max_attempts > 0,
                f"--max-attempts must be positive, got {self.max_attempts}")
        return self

    @property
    def attempt_limit(self) -> int:
        return self.max_attempts if self.max_attempts is not None else 10 * self.n + 10

    def settings(self) -> dict:
        """Everything that decides the records; n and max_attempts only say when to stop, so they may change."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("n", "max_attempts")}
        return {**fields, "recipe": RECIPE}
