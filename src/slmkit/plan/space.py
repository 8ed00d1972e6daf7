"""The planner's search space, read from the technique table: each searched row has a generator here that turns
its knobs into candidates; a candidate is a pipeline (an ordered list of step configs) plus where it runs.

Families searched: uniform weight quantization (RTN, GPTQ, AWQ scales + GPTQ; every scheme the row's knobs
name), per-tensor mixed precision (formats GGUF and the packed runtime both hold, allocated at a size by
slmkit.plan.allocate), the KV-cache bits and the backend. A row with knobs but no generator is reported by
`explain` as listed-not-searched, with the reason.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from ..calib import CalibConfig
from ..quant import AWQConfig, GPTQConfig, KVCacheConfig, QScheme, RTNConfig
from ..quant.ggml import TYPES
from ..quant.rtn import Q8_TABLES
from ..quant.scheme import LayerScheme
from .techniques import TECHNIQUES, Technique

TABLES = ("embed", "lm_head")  # the embedding table and an untied output matrix, as sensitivity.matrices names them
FORMATS = {t.name: t.scheme for t in TYPES.values() if t.scheme is not None}  # GGUF-exact: Q8_0, Q4_0, ...
METHODS = ("rtn", "gptq", "awq+gptq")
NOT_SEARCHED = {  # rows with knobs the planner does not turn yet, and why
    "unstructured pruning (magnitude, Wanda, SparseGPT)": "saves storage only with sparse storage, which neither "
    "GGUF nor the packed runtime reads at decode; no size or speed gain to search for",
    "N:M sparsity": "no CPU kernel runs 2:4 faster here (the CUDA path is unbuilt); nothing to gain on a budget",
    "structured pruning (heads, MLP, hidden, layers)": "without distillation it loses too much (25% structured: "
    "PPL 28.7 -> 105, README pruning table); with distillation it needs training data and an hour here",
    "layer dropping": "as structured pruning: the quality it costs needs distillation to win back",
    "AWQ": "AWQ's own RTN codes lose to AWQ scales + GPTQ on this model (README quantization table); that row is "
    "searched instead",
    "SmoothQuant W8A8": "no int8-activation kernel in either runtime here: W8A8 runs as fake quantization, slower",
    "knowledge distillation": "a training step (data, a teacher, an hour on this machine): use a recipe "
    "(slm compress recipes/prune-distill-q4_0.yaml) and plan from its result",
    "quantization-aware training": "a training step, as distillation: plan from the QAT model",
    "teacher-made data (Self-Instruct)": "makes training data; moves no inference budget",
    "LoRA / QLoRA": "fine-tuning; moves no inference budget (merge, then plan from the merged model)",
    "prompt tuning": "fine-tuning; moves no inference budget",
    "activation checkpointing": "training memory only",
    "DP-SGD": "a training-time privacy guarantee; no inference budget",
    "continuous batching": "a serving setting (slm serve --parallel), not a property of the model file",
    "speculative decoding": "a serving setting with a second model (slm serve --draft / --prompt-lookup)",
    "small -> large cascade": "needs a second, larger model (slm cascade calibrate, slm serve --cascade)",
}


def format_name(scheme: QScheme) -> str:
    """The GGUF type that stores the scheme exactly, else its description (int3 sym g32)."""
    return next((n for n, s in FORMATS.items() if s == scheme), scheme.describe())


def bytes_per_weight(scheme: QScheme, width: int) -> float:
    """Stored bytes per weight: codes plus a float16 scale (and offset) per group."""
    group = scheme.width(width)
    return (scheme.bits * group + 16 * (1 if scheme.symmetric else 2)) / 8 / group


@dataclass(frozen=True)
class Candidate:
    method: str  # rtn | gptq | awq+gptq
    scheme: QScheme  # every block linear's, unless overridden
    table: QScheme = Q8_TABLES  # the embedding (and tied output) table
    overrides: tuple[LayerScheme, ...] = ()  # per-tensor schemes: mixed precision
    kv_bits: int = 16
    backend: str = "torch"
    label: str = ""  # what made it: "uniform", "mixed @ 95.0 MB"
    naive: bool = False  # a plain recipe a user would try first; always a finalist when predicted to fit

    @property
    def name(self) -> str:
        weights = f"mixed({format_name(self.scheme)} base)" if self.overrides else format_name(self.scheme)
        kv = f" kv{self.kv_bits}" if self.kv_bits != 16 else ""
        table = f" table {format_name(self.table)}" if self.table != Q8_TABLES and not self.overrides else ""
        return f"{self.method} {weights}{table}{kv} [{self.backend}]" + (f" {self.label}" if self.overrides else "")

    def scheme_of(self, tensor: str) -> QScheme:
        from ..quant.scheme import scheme_for

        return self.table if tensor in TABLES else scheme_for(tensor, self.scheme, self.overrides)

    def steps(self, calib: CalibConfig | None = None) -> list:
        """The pipeline that builds it from the float model (calibrating steps on `calib`, default theirs)."""
        calib = calib or CalibConfig()
        quant = dict(scheme=self.scheme, embedding=self.table, overrides=self.overrides, calib=calib)
        steps = {"rtn": [RTNConfig(**quant)], "gptq": [GPTQConfig(**quant)],
                 "awq+gptq": [AWQConfig(scheme=self.scheme, quantize=False, embedding=None, calib=calib),
                              GPTQConfig(**quant)]}
        kv = [KVCacheConfig(scheme=QScheme(self.kv_bits, 0, False))] if self.kv_bits != 16 else []
        return steps[self.method] + kv

    def record(self) -> dict:
        return {"name": self.name, "method": self.method, "scheme": format_name(self.scheme),
                "table": format_name(self.table), "kv_bits": self.kv_bits, "backend": self.backend,
                "overrides": {o.pattern: format_name(o.scheme) for o in self.overrides}, "label": self.label,
                "naive": self.naive}


@dataclass
class Space:
    """What the table's rows give: uniform candidates, the mixed-precision formats and methods, KV bits."""
    uniform: list[Candidate] = field(default_factory=list)
    mixed_formats: list[str] = field(default_factory=list)
    mixed_methods: list[str] = field(default_factory=list)
    kv_bits: list[int] = field(default_factory=lambda: [16])
    rows: dict[str, str] = field(default_factory=dict)  # technique -> "searched" or why not

    def storage_formats(self, backend: str | None = None) -> dict[str, QScheme]:
        """Every storage format a candidate can use (the Q8_0 table always), by name; on llama.cpp the GGUF ones."""
        schemes = {format_name(c.scheme): c.scheme for c in self.uniform}
        schemes.update({f: FORMATS[f] for f in self.mixed_formats})
        schemes["Q8_0"] = FORMATS["Q8_0"]
        return {n: s for n, s in schemes.items() if backend != "llamacpp" or n in FORMATS}


def _schemes(knobs: dict) -> list[QScheme]:
    """Every scheme the knobs name, but 8-bit asymmetric (no file format stores it; Q8_0 is near lossless)."""
    grid = itertools.product(knobs.get("bits", [4]), knobs.get("group_size", [32]), knobs.get("asym", [False]))
    return [QScheme(b, g, not a) for b, g, a in grid if not (b == 8 and a)]


def _uniform(method: str):
    def gen(t: Technique, space: Space) -> None:
        for s in _schemes(t.search):
            space.uniform.append(Candidate(method, s, label="uniform",
                                           naive=(method, s.bits) in {("rtn", 8), ("rtn", 4), ("awq+gptq", 4)}
                                           and s.symmetric))
    return gen


def _mixed(t: Technique, space: Space) -> None:
    space.mixed_formats = list(t.search["formats"])
    space.mixed_methods = list(t.search["method"])


def _kv(t: Technique, space: Space) -> None:
    space.kv_bits = list(t.search["kv_bits"])


GENERATORS = {"RTN weight quantization": _uniform("rtn"), "GPTQ": _uniform("gptq"),
              "AWQ scales + GPTQ": _uniform("awq+gptq"), "mixed precision (per-tensor bits)": _mixed,
              "KV-cache quantization": _kv}
SEARCHED_ELSEWHERE = {"GGUF block formats": "the formats of every quantization row; the llama.cpp backend runs them",
                      "llama.cpp backend": "searched as the backend (--backend, or both when installed)"}


def read_space(methods: tuple[str, ...] = METHODS) -> Space:
    """The search space from the technique table, keeping the quantization methods in `methods`."""
    space = Space()
    for t in TECHNIQUES:
        if t.name in GENERATORS:
            GENERATORS[t.name](t, space)
            space.rows[t.name] = "searched"
        elif t.name in SEARCHED_ELSEWHERE:
            space.rows[t.name] = SEARCHED_ELSEWHERE[t.name]
        else:
            space.rows[t.name] = "not searched: " + NOT_SEARCHED.get(t.name, "no generator in slmkit.plan.space")
    space.uniform = [c for c in space.uniform if c.method in methods]
    space.mixed_methods = [m for m in space.mixed_methods if m in methods]
    return space


def variants(base: Candidate, kv_bits: list[int], backends: list[str]) -> list[Candidate]:
    """The candidate on every backend and KV width that can run it: llama.cpp reads GGUF-exact formats only and
    keeps its own float16 KV cache."""
    out = []
    for backend, kv in itertools.product(backends, kv_bits):
        exact = all(s in FORMATS.values() for s in (base.scheme, base.table, *(o.scheme for o in base.overrides)))
        if backend == "llamacpp" and (kv != 16 or not exact):
            continue
        out.append(replace(base, backend=backend, kv_bits=kv, naive=base.naive and kv == 16))
    return out
