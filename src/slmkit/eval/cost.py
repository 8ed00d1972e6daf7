"""Cost on the device: what running a model costs on the machine at hand, beside the floor the machine allows.

`measure_cost` generates exactly `new_tokens` tokens (greedy, no stop at EOS) from a fixed prompt, once or more
as a warm-up and then `runs` times, and reports medians of time to first token, prefill and decode speed,
the process's peak resident memory, weight bytes in memory and on disk, and energy per decoded token where the
machine has a readable energy counter (RAPL on Linux CPUs, NVML on NVIDIA GPUs) -- else None with the reason.

Beside the measured figures, analytic floors from the machine's measured rates (see machine.py):

    decode floor (ms/token) = bytes of weights read per token / read bandwidth
    prefill floor (ms)      = prefill FLOPs / matmul throughput

Bytes per token: every linear weight including the output head, in its stored dtype, each counted once (the
input embedding is a one-row lookup; norms, biases and the KV cache are left out; a GGUF file on llama.cpp counts
its matrices as stored in the file). Prefill FLOPs: 2 per weight of every executed linear layer per prompt token,
the output head once (only the last position is projected), plus 4 * heads * head_dim per attended (query, key)
pair.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import require
from ..generate import GenerationConfig, Timings, generate
from ..info import weight_bytes
from ..loader import LoadedModel
from ..model import Decoder
from ..modules import is_matrix, matrix_bytes, matrix_numel
from ..progress import progress
from .machine import machine_speed

RAPL_ROOT = Path("/sys/class/powercap")  # module-level so tests can point it at a fake tree


@dataclass
class CostConfig:
    prompt_tokens: int = 128
    new_tokens: int = 64
    runs: int = 5  # measured runs; the figures are their medians
    warmup: int = 1  # unmeasured runs first (kernels compiled, caches and allocator warm)

    def validate(self) -> "CostConfig":
        for name in ("prompt_tokens", "new_tokens", "runs", "warmup"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"cost: {name} must be a positive integer, got {value!r}")
        require(self.new_tokens >= 2, "cost: new_tokens must be at least 2 (decode speed is timed after the "
                f"first new token), got {self.new_tokens}")
        return self


# ---- energy counters ---------------------------------------------------------------------------------
class RaplMeter:
    """The package-level RAPL zones (intel-rapl:N, also used by AMD): microjoule counters that wrap."""

    def __init__(self, names: list[str], counters: list[Path], max_ranges: list[int]):
        self.names, self.counters, self.max_ranges = names, counters, max_ranges
        self.source = "rapl:" + "+".join(names)

    def read(self) -> tuple[int, ...]:
        return tuple(int(path.read_text()) for path in self.counters)

    def joules(self, start: tuple[int, ...], end: tuple[int, ...]) -> float:
        """Energy between two readings; a counter that wrapped past max_energy_range_uj is unwrapped."""
        deltas = (b - a if b >= a else b + top - a for a, b, top in zip(start, end, self.max_ranges))
        return sum(deltas) / 1e6


class NvmlMeter:
    """An NVIDIA GPU's total-energy counter (millijoules since the driver loaded) through pynvml."""

    def __init__(self, nvml, handle, source: str):
        self.nvml, self.handle, self.source = nvml, handle, source

    def read(self) -> tuple[int, ...]:
        return (int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)),)

    def joules(self, start: tuple[int, ...], end: tuple[int, ...]) -> float:
        return (end[0] - start[0]) / 1e3


def find_rapl() -> tuple[RaplMeter | None, str]:
    """A meter over every RAPL package zone under RAPL_ROOT and its source, or None and why not."""
    zones = sorted(p for p in RAPL_ROOT.glob("intel-rapl:*") if p.name.count(":") == 1)  # not sub-zones
    if not zones:
        return None, f"unavailable: no RAPL counter under {RAPL_ROOT}"
    try:
        names = [(z / "name").read_text().strip() if (z / "name").is_file() else z.name for z in zones]
        tops = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        meter = RaplMeter(names, [z / "energy_uj" for z in zones], tops)
        meter.read()
    except PermissionError as exc:
        return None, f"unavailable: permission denied reading {exc.filename} (root only on Linux >= 5.10)"
    except (OSError, ValueError) as exc:
        return None, f"unavailable: unreadable RAPL counter under {RAPL_ROOT} ({type(exc).__name__}: {exc})"
    return meter, meter.source


def find_nvml(index: int) -> tuple[NvmlMeter | None, str]:
    """A meter on NVIDIA GPU `index` through pynvml, or None and why not."""
    try:
        import pynvml
    except ImportError:
        return None, "unavailable: the model is on a GPU and pynvml is not installed"
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        meter = NvmlMeter(pynvml, handle, f"nvml:gpu{index}")
        meter.read()
    except pynvml.NVMLError as exc:  # no driver, no such GPU, or no energy counter (before Volta)
        return None, f"unavailable: NVML energy counter of GPU {index}: {exc}"
    return meter, meter.source


def find_meter(device: torch.device) -> tuple[RaplMeter | NvmlMeter | None, str]:
    """The energy counter of the device the model runs on: NVML for a CUDA device, RAPL for the CPU."""
    if device.type == "cuda":
        return find_nvml(device.index or 0)
    if device.type == "cpu":
        return find_rapl()
    return None, f"unavailable: no energy counter known for device {device.type}"


# ---- analytic floors -----------------------------------------------------------------------------------
def decode_bytes_per_token(model: Decoder) -> int:
    """Bytes of weights a decoded token reads at least once: every linear weight in its stored dtype, plus the
    output matrix when it is the tied embedding (an untied lm_head is one of the linear layers)."""
    matrices = [m for m in model.modules() if is_matrix(m)]
    if model.lm_head is None:
        matrices.append(model.output_module)
    return sum(matrix_bytes(m) for m in matrices)


def attended_pairs(tokens: int, window: int | None) -> int:
    """(query, key) pairs causal attention scores over `tokens` tokens, within a sliding window if any."""
    return sum(min(i + 1, window or i + 1) for i in range(tokens))


def prefill_flops(model: Decoder, tokens: int) -> int:
    """FLOPs to process a prompt of `tokens` and choose the first new token (see the module docstring)."""
    cfg = model.cfg
    flops = 2 * matrix_numel(model.output_module)  # generate projects the last position only
    for layer in range(cfg.n_layers):
        block = model.blocks[layer // cfg.share_blocks]  # a shared block runs (and costs) once per layer
        linear = sum(matrix_numel(m) for m in block.modules() if is_matrix(m))
        pairs = attended_pairs(tokens, cfg.sliding_window if block.sliding else None)
        flops += 2 * tokens * linear + 4 * block.attn.n_heads * block.attn.head_dim * pairs
    return flops


def floor(model: Decoder, prompt_tokens: int, speed: dict, bytes_per_token: int | None = None) -> dict:
    """The decode and prefill floors (and the decode ceiling) that the machine's measured rates allow.
    bytes_per_token: the weight bytes a decoded token reads; None: decode_bytes_per_token(model)."""
    nbytes = decode_bytes_per_token(model) if bytes_per_token is None else bytes_per_token
    flops = prefill_flops(model, prompt_tokens)
    decode_ms = nbytes / (speed["read_bandwidth_gbs"] * 1e9) * 1e3
    return {"bytes_per_token": nbytes, "read_bandwidth_gbs": speed["read_bandwidth_gbs"],
            "decode_floor_ms_per_token": decode_ms, "decode_ceiling_tokens_per_s": 1e3 / decode_ms,
            "prefill_flops": flops, "matmul_gflops": speed["matmul_gflops"],
            "prefill_floor_ms": flops / (speed["matmul_gflops"] * 1e9) * 1e3}


# ---- measuring -----------------------------------------------------------------------------------------
def synthetic_prompt(tokens: int, vocab_size: int) -> list[int]:
    """The default prompt: ids (17 + 7919 i) mod vocab_size for i = 0..tokens-1. Deterministic and needing no
    tokenizer; which ids a prompt holds does not change what processing it costs."""
    return [(17 + 7919 * i) % vocab_size for i in range(tokens)]


def choose_prompt(model: Decoder, cfg: CostConfig, prompt_ids: list[int] | None) -> list[int]:
    """The first cfg.prompt_tokens of prompt_ids (or the synthetic prompt), checked against the model."""
    mc = model.cfg
    ids = synthetic_prompt(cfg.prompt_tokens, mc.vocab_size) if prompt_ids is None else list(prompt_ids)
    require(len(ids) >= cfg.prompt_tokens, f"cost: {cfg.prompt_tokens} prompt tokens wanted, {len(ids)} given")
    ids = ids[:cfg.prompt_tokens]
    require(all(0 <= i < mc.vocab_size for i in ids), f"cost: prompt ids must lie in [0, {mc.vocab_size})")
    require(cfg.prompt_tokens + cfg.new_tokens <= mc.max_seq_len, f"cost: {cfg.prompt_tokens} prompt + "
            f"{cfg.new_tokens} new tokens exceed the model's context of {mc.max_seq_len}")
    return ids


def run_once(model: Decoder, prompt: list[int], new_tokens: int, meter) -> dict:
    """One generation of exactly new_tokens tokens (no stop ids), timed, with energy where a meter exists."""
    timings = Timings()
    stream = generate(model, prompt, GenerationConfig(max_new_tokens=new_tokens), timings)
    read = meter.read if meter else lambda: None
    start = read()
    tokens = [next(stream)]
    first = read()  # decode energy starts after the first new token
    tokens += list(stream)
    end = read()
    prefill_j, decode_j = (meter.joules(start, first), meter.joules(first, end)) if meter else (None, None)
    return {"ttft_ms": timings.prefill_s * 1e3, "prefill_tokens_per_s": timings.prefill_tokens_per_s,
            "decode_tokens_per_s": timings.decode_tokens_per_s,
            "decode_ms_per_token": 1e3 / timings.decode_tokens_per_s, "new_tokens": len(tokens),
            "energy_j": prefill_j + decode_j if meter else None, "decode_energy_j": decode_j}


def run_all(model: Decoder, prompt: list[int], cfg: CostConfig, meter) -> list[dict]:
    """cfg.warmup unmeasured runs, then cfg.runs measured ones, under one progress bar."""
    runs = []
    for i in progress(range(cfg.warmup + cfg.runs), f"cost: {cfg.warmup} warm-up + {cfg.runs} runs"):
        run = run_once(model, prompt, cfg.new_tokens, meter)
        if run["new_tokens"] != cfg.new_tokens:  # generate capped or stopped: the medians would mislead
            raise RuntimeError(f"cost: a run generated {run['new_tokens']} tokens, not {cfg.new_tokens}")
        if i >= cfg.warmup:
            runs.append(run)
    return runs


def peak_rss_mb() -> float | None:
    """The process's peak resident set size in MB (getrusage ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e6


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def energy_per_token(runs: list[dict], new_tokens: int) -> float | None:
    """Median over runs of decode energy / decoded tokens (the new tokens after the first)."""
    if runs[0]["decode_energy_j"] is None:
        return None
    return statistics.median(run["decode_energy_j"] / (new_tokens - 1) for run in runs)


def engine_figures(model) -> tuple[Decoder, dict[str, int], int, int]:
    """(architecture, weight bytes in memory by dtype, weight bytes read per decoded token, threads): measured on
    a torch Decoder; another engine's model (slmkit.backends) reports its own, with a meta-device Decoder of its
    architecture for the FLOP count."""
    if isinstance(model, Decoder):
        return model, weight_bytes(model), decode_bytes_per_token(model), torch.get_num_threads()
    return model.layout, model.weight_bytes(), model.decode_bytes_per_token(), model.threads


def measure_cost(lm: LoadedModel, cfg: CostConfig, prompt_ids: list[int] | None = None) -> dict:
    """Measure what `lm` costs on this machine (see the module docstring); a flat dict of figures.

    prompt_ids: the prompt (its first cfg.prompt_tokens ids); None: `synthetic_prompt`. No tokenizer needed."""
    cfg.validate()
    model = lm.model
    prompt = choose_prompt(model, cfg, prompt_ids)
    speed = machine_speed()
    meter, energy_source = find_meter(model.device)
    runs = run_all(model, prompt, cfg, meter)
    layout, by_dtype, bytes_per_token, threads = engine_figures(model)
    decode = median_of(runs, "decode_tokens_per_s")
    result = {"ttft_ms": median_of(runs, "ttft_ms"), "prefill_tokens_per_s": median_of(runs, "prefill_tokens_per_s"),
              "decode_tokens_per_s": decode, "decode_ms_per_token": 1e3 / decode, "runs": runs,
              "peak_rss_mb": peak_rss_mb(), "weight_bytes": sum(by_dtype.values()), "weight_bytes_by_dtype": by_dtype,
              "file_bytes": lm.file_bytes, "energy_j_per_token": energy_per_token(runs, cfg.new_tokens),
              "energy_source": energy_source, "floor": floor(layout, cfg.prompt_tokens, speed, bytes_per_token),
              "config": dataclasses.asdict(cfg), "threads": threads,
              "notes": cost_notes(cfg, prompt_ids is None, energy_source, speed)}
    result["notes"] += floor_violations(result)
    return result


def cost_notes(cfg: CostConfig, synthetic: bool, energy_source: str, speed: dict) -> list[str]:
    """How each figure was obtained, in words, for whoever reads the numbers later."""
    energy = (f"energy_j_per_token: {energy_source} counter over the decode phase / decoded tokens, median of "
              "runs; the counter covers the whole package or GPU (every process on it)"
              if not energy_source.startswith("unavailable") else f"energy: {energy_source}")
    return [f"medians of {cfg.runs} runs after {cfg.warmup} warm-up; each generates exactly {cfg.new_tokens} "
            "tokens greedily (no stop at EOS); decode tok/s = (new tokens - 1) / time after the first new token",
            f"prompt: {'synthetic ids (17 + 7919 i) mod vocab' if synthetic else 'the given ids'}, "
            f"first {cfg.prompt_tokens}",
            "peak_rss_mb: peak resident memory of the whole process (getrusage ru_maxrss), everything it has "
            "loaded so far, not the model alone", energy,
            f"read bandwidth: {speed['read_bandwidth_how']}; matmul: {speed['matmul_how']}; "
            f"measured {speed['measured_at']} (1-minute load average then: {speed.get('load_average')})"]


# ---- reporting -----------------------------------------------------------------------------------------
def floor_violations(cost: dict) -> list[str]:
    """A measured figure faster than its floor means the machine's rate was under-measured (a busy machine)."""
    fl, refresh = cost["floor"], "re-measure with machine_speed(refresh=True) on a quiet machine"
    problems = []
    if cost["ttft_ms"] < fl["prefill_floor_ms"]:
        problems.append(f"time to first token beats its floor: matmul throughput under-measured; {refresh}")
    if cost["decode_ms_per_token"] < fl["decode_floor_ms_per_token"]:
        problems.append(f"decode beats its floor: read bandwidth under-measured; {refresh}")
    return problems


def format_cost(cost: dict) -> str:
    """A short Markdown table for a human: each measured figure beside the floor this machine allows."""
    fl, c, mb = cost["floor"], cost["config"], 1e6
    prefill_ceiling = c["prompt_tokens"] / fl["prefill_floor_ms"] * 1e3
    energy = (f"{cost['energy_j_per_token'] * 1e3:.1f} mJ ({cost['energy_source']})"
              if cost["energy_j_per_token"] is not None else cost["energy_source"])
    rss = "unknown" if cost["peak_rss_mb"] is None else f"{cost['peak_rss_mb']:.0f} MB"
    dtypes = ", ".join(f"{d} {b / mb:.1f}" for d, b in cost["weight_bytes_by_dtype"].items())
    rows = [("time to first token", f"{cost['ttft_ms']:.1f} ms", f"{fl['prefill_floor_ms']:.1f} ms"),
            ("prefill", f"{cost['prefill_tokens_per_s']:.0f} tok/s", f"{prefill_ceiling:.0f} tok/s"),
            ("decode", f"{cost['decode_ms_per_token']:.2f} ms/token ({cost['decode_tokens_per_s']:.1f} tok/s)",
             f"{fl['decode_floor_ms_per_token']:.2f} ms/token ({fl['decode_ceiling_tokens_per_s']:.1f} tok/s)"),
            ("energy per decoded token", energy, "—"),
            ("peak resident memory (process)", rss, "—"),
            ("weights", f"{cost['weight_bytes'] / mb:.1f} MB in memory ({dtypes}), {cost['file_bytes'] / mb:.1f} "
             "MB on disk", f"{fl['bytes_per_token'] / mb:.1f} MB read per token")]
    head = (f"| batch 1, {cost['threads']} threads, {c['prompt_tokens']}-token prompt, {c['new_tokens']} new "
            f"tokens, median of {c['runs']} runs | measured | floor |")
    lines = [head, "|---|---|---|"] + [f"| {a} | {b} | {f} |" for a, b, f in rows]
    lines += [f"\nWarning: {problem}" for problem in floor_violations(cost)]
    lines.append(f"\nFloors: weights read per token / {fl['read_bandwidth_gbs']:.1f} GB/s read bandwidth; "
                 f"{fl['prefill_flops'] / 1e9:.2f} GFLOP prefill / {fl['matmul_gflops']:.0f} GFLOP/s matmul.")
    return "\n".join(lines)
