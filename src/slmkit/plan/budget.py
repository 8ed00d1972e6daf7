"""A device budget: the limits a planned model must meet, parsed from what a user types, checked for sense
before any work, and compared with measured figures as margins.

Units: sizes in MB (10^6 bytes; "60", "60MB", "0.06GB", "512KB", "58MiB"), times in ms ("200", "200ms",
"0.2s"), speeds in tokens/s ("20", "20tok/s"), energy in J/token. Anything else is refused by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import require

BACKENDS = ("torch", "llamacpp")
LIMITS = (("file_mb", "max", "max_file_mb"), ("memory_mb", "max", "max_memory_mb"),  # (figure, direction, field)
          ("decode_tps", "min", "min_decode_tps"), ("ttft_ms", "max", "max_ttft_ms"), ("kl", "max", "max_kl"),
          ("ppl_increase_pct", "max", "max_ppl_increase"), ("energy_j_per_token", "max", "max_energy_j_per_token"))
OBJECTIVES = ("quality", "speed", "size")
UNITS = {"size": {"": 1.0, "b": 1e-6, "kb": 1e-3, "mb": 1.0, "gb": 1e3, "kib": 1024 / 1e6, "mib": 1024 ** 2 / 1e6,
                  "gib": 1024 ** 3 / 1e6},
         "time": {"": 1.0, "ms": 1.0, "s": 1e3, "us": 1e-3},
         "speed": {"": 1.0, "tok/s": 1.0, "tokens/s": 1.0, "tps": 1.0},
         "energy": {"": 1.0, "j": 1.0, "j/tok": 1.0, "j/token": 1.0, "mj": 1e-3, "mj/tok": 1e-3},
         "percent": {"": 1.0, "%": 1.0},
         "kl": {"": 1.0, "nats": 1.0, "nat": 1.0}}


def quantity(text: str | float | None, kind: str, flag: str) -> float | None:
    """A number with an optional unit of `kind` in that kind's base unit (MB, ms, tok/s, J/token, %)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z/%]*)\s*", str(text))
    require(m is not None, f"{flag}: {text!r} is not a number with a unit")
    unit = m.group(2).lower()
    table = UNITS[kind]
    require(unit in table, f"{flag}: unknown unit {m.group(2)!r} (use {', '.join(u for u in table if u)})")
    return float(m.group(1)) * table[unit]


def task_floor(text: str) -> tuple[str, float]:
    """TASK:ACC (accuracy as a fraction, or a percentage with %) -> (task, fraction)."""
    task, sep, acc = text.rpartition(":")
    require(bool(sep and task), f"--min-task-acc: {text!r} is not TASK:ACC (e.g. arc_easy:0.45)")
    value = quantity(acc, "percent", "--min-task-acc")
    value = value / 100 if acc.strip().endswith("%") or value > 1 else value
    require(0 < value <= 1, f"--min-task-acc: accuracy {acc} is not in (0, 1]")
    return task, value


@dataclass(frozen=True)
class Budget:
    max_file_mb: float | None = None
    max_memory_mb: float | None = None  # weights + KV cache at `context` + the runtime, resident
    min_decode_tps: float | None = None
    max_ttft_ms: float | None = None  # for a prompt of `prompt_tokens`
    max_kl: float | None = None  # mean KL(base || model) on the evaluation text, nats per token
    max_ppl_increase: float | None = None  # percent over the base model's perplexity
    min_task_acc: tuple[tuple[str, float], ...] = ()
    max_energy_j_per_token: float | None = None
    context: int = 2048
    prompt_tokens: int = 128
    backend: str = "torch"
    objective: str = "quality"

    def validate(self) -> "Budget":
        for _, _, name in LIMITS:
            value = getattr(self, name)
            require(value is None or value > 0 or (name in ("max_kl", "max_ppl_increase") and value == 0),
                    f"--{name.replace('_', '-')} must be positive, got {value}")
        require(self.max_kl is None or self.max_ppl_increase is None,
                "--max-kl and --max-ppl-increase are two quality budgets for one thing; give one")
        require(self.context >= 1 and self.prompt_tokens >= 1, "--context and the prompt must be positive")
        require(self.prompt_tokens <= self.context, f"a {self.prompt_tokens}-token prompt does not fit a "
                f"{self.context}-token context")
        require(self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        require(self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}")
        require(self.limits(), "no budget given: state at least one limit (--max-file-mb, --max-memory-mb, "
                "--min-decode-tps, --max-ttft-ms, --max-kl, --max-ppl-increase, --min-task-acc)")
        return self

    def limits(self) -> list[tuple[str, str, float]]:
        """(figure, direction, bound) for every stated limit: 'max' means figure <= bound."""
        rows = [(figure, direction, getattr(self, name)) for figure, direction, name in LIMITS]
        rows += [(f"acc:{task}", "min", acc) for task, acc in self.min_task_acc]
        return [(f, d, b) for f, d, b in rows if b is not None]

    def without(self, figure: str) -> "Budget":
        """The same budget less the limit on `figure` (every task floor, for an acc:TASK figure)."""
        if figure.startswith("acc:"):
            return replace(self, min_task_acc=())
        return replace(self, **{name: None for f, _, name in LIMITS if f == figure})

    def margins(self, figures: dict) -> dict[str, float]:
        """Per limit, how far inside it the figures are, as a fraction of the bound (negative: violated).
        A figure the dict lacks counts as violated (margin -inf)."""
        out = {}
        for figure, direction, bound in self.limits():
            value = figures.get(figure)
            if value is None:
                out[figure] = float("-inf")
            elif bound == 0:
                out[figure] = 0.0 if value <= 0 else -float(value)
            else:
                out[figure] = (bound - value) / bound if direction == "max" else (value - bound) / bound
        return out

    def met(self, figures: dict, slack: dict[str, float] | None = None) -> bool:
        """Every limit met; slack (fraction per figure) widens a limit, for predictions' error."""
        slack = slack or {}
        return all(m >= -slack.get(f, 0.0) for f, m in self.margins(figures).items())
