"""Predicted figures of a candidate, from the model's shapes, the sensitivities measured once, and a calibration of
this machine's costs per format.

* file MB: every matrix's stored bytes under its scheme, plus the artifact's other bytes (norms, tokenizer,
  metadata), measured once per backend on a built candidate.
* memory MB: the weights in memory, the KV cache at the stated context (float: the compute dtype; int8/int4: codes
  plus a float16 scale and offset per token and head), and the runtime's own resident memory, measured once.
* decode tok/s and time to first token: the bandwidth floor alone over-predicts quantized decode on a CPU several
  times over (unpacking costs), so each format's cost per stored byte (decode) and per weight (prefill) is measured
  on this machine from a uniform build of that format, and a mixture is the sum over its tensors.
* KL: the per-tensor Fisher scores of the chosen formats, summed (slmkit.plan.sensitivity), times the method's
  factor (GPTQ's error feedback makes its KL a fraction of RTN's): the factor starts at the prior below and is
  replaced by measured / predicted as soon as a candidate of that method is measured. Where RTN is exact (the
  proxy is 0: the base's weights already sit on the format's grid) a method that moves weights (AWQ's scales)
  still costs something: what it measured there is kept as that method's floor. The KV cache's KL is
  measured once per width on the base model. Perplexity increase: exp(gamma * KL) - 1, gamma fitted likewise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .space import Candidate, bytes_per_weight, format_name

# measured on the default model (README quantization table, KL of Q4_0 files): GPTQ 0.1517 / RTN 0.3128,
# AWQ scales + GPTQ 0.1033 / 0.3128; the proxy's own scale (RTN) is fitted on the first measurement
PRIOR_FACTORS = {"rtn": 1.0, "gptq": 0.485, "awq+gptq": 0.33}
PRIOR_GAMMA = 0.85  # ln(PPL ratio) per nat of KL (same table: 0.74 .. 0.93)


@dataclass
class Shapes:
    """The model's figures the predictions need."""
    tensors: dict[str, tuple[int, int]]  # matrix name -> (out, in) (the table: (vocab, dim))
    n_layers: int
    kv_heads: int
    head_size: int
    compute_bytes: int  # activation / float KV element size


@dataclass
class Calibration:
    overhead_bytes: dict[str, float] = field(default_factory=dict)  # backend -> file bytes besides the matrices
    runtime_mb: dict[str, float] = field(default_factory=dict)  # backend -> resident MB besides weights and KV
    decode_ms_per_byte: dict[str, float] = field(default_factory=dict)  # "backend/format" -> ms per stored byte
    ttft_ms_per_weight: dict[str, float] = field(default_factory=dict)  # "backend/format" -> ms per weight
    kv_kl: dict[int, float] = field(default_factory=lambda: {16: 0.0})  # KV bits -> measured KL on the base
    proxy_scale: float | None = None  # measured KL / Fisher sum for RTN; None until something is measured
    factors: dict[str, float] = field(default_factory=lambda: dict(PRIOR_FACTORS))
    measured_factors: dict[str, float] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)  # method -> KL it measured beyond its proxy (least)
    gamma: float = PRIOR_GAMMA
    base: dict = field(default_factory=dict)  # the base model's measured figures (ppl, acc:task)
    measured: dict[str, dict] = field(default_factory=dict)  # candidate name -> figures of its calibration build


def matrix_bytes(shapes: Shapes, cand: Candidate) -> dict[str, float]:
    return {n: o * i * bytes_per_weight(cand.scheme_of(n), i) for n, (o, i) in shapes.tensors.items()}


def kv_bytes(shapes: Shapes, cand: Candidate, context: int) -> float:
    """The KV cache at `context` tokens: keys and values of every layer."""
    d = shapes.head_size
    per = (2 if cand.backend == "llamacpp" else shapes.compute_bytes) if cand.kv_bits == 16 else cand.kv_bits / 8 + 4 / d
    return 2 * shapes.n_layers * shapes.kv_heads * d * context * per


def fisher_sum(scores: dict[str, dict[str, float]], cand: Candidate) -> float:
    return sum(scores[n][format_name(cand.scheme_of(n))] for n in scores)


def predict(cand: Candidate, shapes: Shapes, scores: dict, cal: Calibration, context: int) -> dict:
    """Every figure a budget can name, predicted (None where the calibration lacks what it needs)."""
    mb = matrix_bytes(shapes, cand)
    weights = sum(mb.values())
    fig = {"file_mb": (weights + cal.overhead_bytes.get(cand.backend, 0.0)) / 1e6,
           "memory_mb": None, "decode_tps": None, "ttft_ms": None}
    if cand.backend in cal.runtime_mb:
        fig["memory_mb"] = (weights + kv_bytes(shapes, cand, context)) / 1e6 + cal.runtime_mb[cand.backend]
    keys = [f"{cand.backend}/{format_name(cand.scheme_of(n))}" for n in mb]  # "backend/format" per tensor
    per_byte = [cal.decode_ms_per_byte.get(k) for k in keys]
    if all(k is not None for k in per_byte):
        fig["decode_tps"] = 1e3 / sum(b * k for b, k in zip(mb.values(), per_byte))
    per_weight = [cal.ttft_ms_per_weight.get(k) for k in keys]
    if all(k is not None for k in per_weight):
        fig["ttft_ms"] = sum(o * i * k for (o, i), k in zip(shapes.tensors.values(), per_weight))
    fig.update(quality(cand, scores, cal))
    return fig


def quality(cand: Candidate, scores: dict, cal: Calibration) -> dict:
    scale = cal.proxy_scale if cal.proxy_scale is not None else 1.0
    kl = scale * cal.factors[cand.method] * fisher_sum(scores, cand) + cal.floors.get(cand.method, 0.0) + \
        cal.kv_kl.get(cand.kv_bits, 0.0)
    out = {"kl": kl, "ppl_increase_pct": 100 * (math.exp(cal.gamma * kl) - 1)}
    out.update({k: v for k, v in cal.base.items() if k.startswith("acc:")})  # accuracy: not predicted, measured
    return out


def learn(cal: Calibration, cand: Candidate, scores: dict, measured: dict) -> None:
    """Refit the quality model on one measured candidate: the proxy scale from RTN, the method factor from the
    others (geometric mean over candidates of the method), gamma from KL vs perplexity."""
    kl = measured.get("kl")
    raw = fisher_sum(scores, cand)
    weights_kl = None if kl is None else kl - cal.kv_kl.get(cand.kv_bits, 0.0)
    if weights_kl is None:
        return
    if raw <= 1e-12 * max(weights_kl, 1e-12) or weights_kl <= 0:
        # nothing for the proxy to scale: RTN reproduces these weights exactly (a base that is itself on the
        # grid, as the default model's Q4_1 blocks are), yet this method moved them; keep what it cost as a floor
        cal.floors[cand.method] = min(cal.floors.get(cand.method, math.inf), max(weights_kl, 0.0))
        return
    if cand.method == "rtn" or cal.proxy_scale is None:
        ratio = weights_kl / (raw * cal.factors[cand.method])
        cal.proxy_scale = ratio if cal.proxy_scale is None else math.sqrt(cal.proxy_scale * ratio)
    if cand.method != "rtn":
        factor = weights_kl / (raw * cal.proxy_scale)
        old = cal.measured_factors.get(cand.method)
        cal.factors[cand.method] = cal.measured_factors[cand.method] = factor if old is None else math.sqrt(old * factor)
    if measured.get("ppl_increase_pct") is not None and kl > 1e-4:  # a KL this small says nothing of gamma
        cal.gamma = min(max(math.log1p(measured["ppl_increase_pct"] / 100) / kl, 0.1), 10.0)
