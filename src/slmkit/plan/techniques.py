"""The field's taxonomy as data: every technique slmkit has, where it sits in a model's life, which deployment
constraints it serves, the metric that shows it, and the slmkit verb that applies it.

Constraints (the surveys' six): memory (inference RAM: weights + KV cache), storage (the file), latency
(time to first token, decode tokens/s), energy (joules per token), training compute (tokens/s, peak memory
while training), privacy (a DP guarantee). A technique serves a constraint when it moves that constraint's
metric the right way by design; what it costs elsewhere (quality, usually) is measured, not listed.

`search` holds the knobs a constraint-first search may turn (each value a list of choices), so a technique
joins the planner's search space by adding a row here; rows with an empty `search` are listed but not
searched (they need training data or a second model).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import require

STAGES = ("architecture", "training", "compression", "deployment")
CONSTRAINTS = ("memory", "storage", "latency", "energy", "training compute", "privacy")


@dataclass(frozen=True)
class Technique:
    name: str
    family: str  # quantization | pruning | distillation | adaptation | privacy | runtime | collaboration
    stage: str  # one of STAGES
    constraints: tuple[str, ...]  # those it serves, of CONSTRAINTS
    metric: str  # what shows it
    verb: str  # the slmkit command (or API) that applies it
    search: dict = field(default_factory=dict)  # knobs a planner may turn: name -> list of choices

    def validate(self) -> "Technique":
        require(self.stage in STAGES, f"{self.name}: stage {self.stage!r} is not one of {STAGES}")
        require(bool(self.constraints) and set(self.constraints) <= set(CONSTRAINTS),
                f"{self.name}: constraints {self.constraints} are not among {CONSTRAINTS}")
        return self


_W = ("memory", "storage", "latency", "energy")  # weight compression: fewer bytes stored, read per token
TECHNIQUES = tuple(t.validate() for t in (
    Technique("RTN weight quantization", "quantization", "compression", _W, "file MB, decode tok/s, PPL / KL",
              "slm quantize --method rtn", {"bits": [8, 5, 4, 3], "group_size": [32], "asym": [False, True]}),
    Technique("GPTQ", "quantization", "compression", _W, "file MB, PPL / KL", "slm quantize --method gptq",
              {"bits": [5, 4, 3], "group_size": [32], "asym": [False]}),
    Technique("AWQ", "quantization", "compression", _W, "file MB, PPL / KL", "slm quantize --method awq",
              {"bits": [4, 3, 2], "group_size": [32], "asym": [False, True]}),
    Technique("AWQ scales + GPTQ", "quantization", "compression", _W, "file MB, PPL / KL",
              "slm quantize --method gptq --awq-scales", {"bits": [5, 4], "group_size": [32], "asym": [False]}),
    Technique("mixed precision (per-tensor bits)", "quantization", "compression", _W,
              "file MB, PPL / KL at a size", "slm plan --max-file-mb",
              {"formats": ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"], "method": ["rtn", "awq+gptq"]}),
    Technique("SmoothQuant W8A8", "quantization", "compression", ("memory", "storage", "latency"),
              "file MB, prefill tok/s, PPL / KL", "slm quantize --method smoothquant", {}),
    Technique("GGUF block formats", "quantization", "deployment", _W, "file MB, llama.cpp decode tok/s, PPL",
              "slm export --format gguf --type", {"type": ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"]}),
    Technique("KV-cache quantization", "quantization", "deployment", ("memory", "latency"),
              "KV MB at the context, PPL / KL", "slm quantize --kv-bits", {"kv_bits": [16, 8, 4]}),
    Technique("unstructured pruning (magnitude, Wanda, SparseGPT)", "pruning", "compression", ("storage",),
              "file MB with --sparse-storage, PPL / KL", "slm prune --method --sparsity",
              {"method": ["wanda", "sparsegpt"], "sparsity": [0.3, 0.5]}),
    Technique("N:M sparsity", "pruning", "compression", ("storage",), "file MB, PPL / KL",
              "slm prune --pattern 2:4", {"pattern": ["2:4"]}),
    Technique("structured pruning (heads, MLP, hidden, layers)", "pruning", "compression", _W,
              "parameters, file MB, decode tok/s, PPL / KL", "slm prune --structured",
              {"axis": ["auto", "mlp", "heads", "layers"], "ratio": [0.1, 0.25]}),
    Technique("layer dropping", "pruning", "compression", _W, "parameters, decode tok/s, PPL / KL",
              "slm prune --structured layers", {"ratio": [0.1, 0.2]}),
    Technique("knowledge distillation", "distillation", "training", ("memory", "storage", "latency", "energy"),
              "PPL / KL recovered per training token", "slm train --distill", {}),
    Technique("quantization-aware training", "distillation", "training", _W, "PPL / KL at the same file MB",
              "slm train --qat", {}),
    Technique("teacher-made data (Self-Instruct)", "distillation", "training", ("training compute",),
              "records kept, task accuracy after SFT", "slm synth", {}),
    Technique("LoRA / QLoRA", "adaptation", "training", ("training compute", "storage"),
              "trainable parameters, adapter MB, train tok/s, peak RSS", "slm train --lora", {}),
    Technique("prompt tuning", "adaptation", "training", ("training compute", "storage"),
              "trainable parameters, adapter KB", "slm train --prompt-tuning", {}),
    Technique("activation checkpointing", "runtime", "training", ("training compute",), "peak RSS while training",
              "slm train --checkpointing", {}),
    Technique("DP-SGD", "privacy", "training", ("privacy",), "epsilon at delta, PPL cost", "slm train --dp-epsilon",
              {}),
    Technique("llama.cpp backend", "runtime", "deployment", ("memory", "latency", "energy"),
              "decode tok/s, peak RSS", "--backend llamacpp", {"backend": ["torch", "llamacpp"]}),
    Technique("continuous batching", "runtime", "deployment", ("latency", "energy"),
              "aggregate tok/s, TTFT / TPOT p50 and p99", "slm serve --parallel", {}),
    Technique("speculative decoding", "collaboration", "deployment", ("latency",),
              "decode tok/s, acceptance rate", "slm generate / slm serve --draft, --prompt-lookup", {}),
    Technique("small -> large cascade", "collaboration", "deployment", ("latency", "energy"),
              "quality vs share escalated, APGR", "slm cascade calibrate, slm serve --cascade", {}),
))


def techniques(constraint: str | None = None) -> list[Technique]:
    """Every technique, or those serving `constraint`."""
    return [t for t in TECHNIQUES if constraint is None or constraint in t.constraints]


def as_rows() -> list[dict]:
    return [{**asdict(t), "constraints": list(t.constraints)} for t in TECHNIQUES]


def format_table(rows: list[Technique]) -> str:
    """A plain-text table: technique, stage, constraints, metric, verb."""
    header = ("technique", "stage", "serves", "shown by", "verb")
    cells = [header] + [(t.name, t.stage, ", ".join(t.constraints), t.metric, t.verb) for t in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
