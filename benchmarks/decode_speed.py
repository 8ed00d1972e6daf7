"""Batch-1 CPU generation speed of slmkit against transformers and llama.cpp, on the default model.

Every engine gets the same prompt token ids (the first --prompt-tokens tokens of wikitext-2 test), generates
exactly --new-tokens tokens greedily (no engine may stop at EOS) on 2 threads, and is timed the same way:

    prompt tok/s = prompt tokens / time to the first new token (prompt processed and first token chosen)
    decode tok/s = (new tokens - 1) / time from the first new token to the last

The engines run interleaved: one warm-up round, then --rounds rounds, each running every engine once (the
order rotates from round to round); the table shows medians, and the ratios are medians of the per-round
ratios (each measured side by side). It also measures the memory read bandwidth and prints the decode
ceiling it implies: bandwidth / bytes of weights read per token.

    python benchmarks/decode_speed.py [--rounds 5] [--new-tokens 128] [--prompt-tokens 256] [--json out.json]

The "slmkit fp32, torch matmul" row is slmkit with SLMKIT_KERNELS=0 (torch's matmul for every linear), switched
in this process; llama.cpp runs an F32 GGUF that slmkit exports to a temporary folder (about 540 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from slmkit import kernels  # noqa: E402
from slmkit.checkpoint import export_gguf  # noqa: E402
from slmkit.eval.cost import decode_bytes_per_token  # noqa: E402
from slmkit.eval.machine import measure_read_bandwidth_gbs  # noqa: E402
from slmkit.generate import GenerationConfig, Timings, generate  # noqa: E402
from slmkit.loader import default_model_path, load  # noqa: E402

PROBE_BYTES = 2**30  # the bandwidth probe: 1 GiB, far past the caches

THREADS = 2
WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext2/wikitext-2-raw/wiki.test.raw"
TRANSFORMERS, SLM_F32, SLM_BF16, SLM_TORCH, LLAMA = (
    "transformers fp32", "slmkit fp32", "slmkit bf16", "slmkit fp32, torch matmul", "llama.cpp F32")
ENGINE_ORDER = [TRANSFORMERS, SLM_F32, SLM_BF16, SLM_TORCH, LLAMA]
RATIO_ROWS = [SLM_F32, SLM_BF16, SLM_TORCH]  # rows compared with transformers and llama.cpp


@dataclass
class Run:
    prompt_tokens: int
    prefill_s: float  # prompt processed and first token chosen
    decode_s: float  # every later token
    tokens: list[int]

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tps(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s


Engine = Callable[[list[int], int], Run]  # (prompt ids, new tokens) -> Run


# ---- the prompt --------------------------------------------------------------------------------------

def prompt_ids(tokenizer, n: int, path: Path = WIKITEXT) -> list[int]:
    """The first n token ids of wikitext-2 test (normalised as in the reference protocol: \\r\\n -> \\n)."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")[: 40 * n]
    ids = tokenizer.encode(text, add_bos=False)
    if len(ids) < n:
        raise SystemExit(f"{path}: only {len(ids)} tokens in its first {40 * n} characters, {n} wanted")
    return ids[:n]


# ---- engines: each returns a Run with the same timing points ---------------------------------------

def slmkit_engine(model) -> Engine:
    def run(prompt: list[int], n: int) -> Run:
        timings = Timings()
        tokens = list(generate(model, prompt, GenerationConfig(max_new_tokens=n), timings))  # no stop ids
        return Run(len(prompt), timings.prefill_s, timings.decode_s, tokens)
    return run


@contextmanager
def torch_matmul():
    """SLMKIT_KERNELS=0 semantics in this process: `kernels.library()` reads the variable once (lru_cache),
    so its cache is cleared on the way in and out; the kernel is reloaded eagerly on the way out."""
    old = os.environ.get("SLMKIT_KERNELS")
    os.environ["SLMKIT_KERNELS"] = "0"
    kernels.library.cache_clear()
    try:
        if kernels.library() is not None:
            raise RuntimeError("SLMKIT_KERNELS=0 did not disable slmkit's kernels")
        yield
    finally:
        if old is None:
            del os.environ["SLMKIT_KERNELS"]
        else:
            os.environ["SLMKIT_KERNELS"] = old
        kernels.library.cache_clear()
        kernels.library()


def slmkit_torch_engine(model) -> Engine:
    inner = slmkit_engine(model)

    def run(prompt: list[int], n: int) -> Run:
        with torch_matmul():
            return inner(prompt, n)
    return run


def transformers_engine(gguf: Path) -> Engine:
    from transformers import AutoModelForCausalLM
    from transformers import logging as hf_logging
    from transformers.generation.streamers import BaseStreamer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

    class Clock(BaseStreamer):
        """Times every new token; the first put() is the prompt itself."""
        def __init__(self):
            self.stamps, self.tokens, self.seen_prompt = [], [], False

        def put(self, value):
            if self.seen_prompt:
                self.stamps.append(time.perf_counter())
                self.tokens.extend(int(t) for t in value.reshape(-1))
            self.seen_prompt = True

        def end(self):
            pass

    def run(prompt: list[int], n: int) -> Run:
        clock, ids = Clock(), torch.tensor([prompt])
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, streamer=clock, pad_token_id=0)
        return Run(len(prompt), clock.stamps[0] - start, clock.stamps[-1] - clock.stamps[0], clock.tokens)
    return run


def llama_engine(gguf: Path, n_ctx: int) -> Engine:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=THREADS, n_threads_batch=THREADS, n_batch=512,
                          verbose=False)
    n_vocab = llm.n_vocab()

    def next_token(tokens: list[int]) -> int:
        """Evaluate tokens after the cache, then greedy over the last position's logits."""
        llm.eval(tokens)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    def run(prompt: list[int], n: int) -> Run:
        llm.reset()
        start = time.perf_counter()
        tokens = [next_token(prompt)]
        first = time.perf_counter()
        while len(tokens) < n:  # no stop at EOS
            tokens.append(next_token(tokens[-1:]))
        return Run(len(prompt), first - start, time.perf_counter() - first, tokens)
    return run


def build_engines(lm32, lm16, gguf_dir: Path, n_ctx: int) -> tuple[dict[str, Engine], dict[str, str]]:
    """The engines that could be set up, and for the others why not (one line each)."""
    engines = {SLM_F32: slmkit_engine(lm32.model), SLM_BF16: slmkit_engine(lm16.model),
               SLM_TORCH: slmkit_torch_engine(lm32.model)}
    missing = {}
    default = default_model_path()
    setups = {TRANSFORMERS: lambda: transformers_engine(default),
              LLAMA: lambda: llama_engine(export_f32(lm32, gguf_dir), n_ctx)}
    for name, setup in setups.items():
        try:
            engines[name] = setup()
        except Exception as exc:  # not installed, or failed to load: the row says so
            missing[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"{name}: unavailable ({missing[name]})", file=sys.stderr)
    return engines, missing


def export_f32(lm, folder: Path) -> Path:
    import llama_cpp  # noqa: F401  (fail before exporting 540 MB when llama.cpp is missing)

    path = export_gguf(lm.model, lm.tokenizer, folder / "slmkit-f32.gguf", "F32")
    print(f"exported {path.stat().st_size / 1e6:.1f} MB F32 GGUF for llama.cpp", file=sys.stderr)
    return path


# ---- measuring -------------------------------------------------------------------------------------

def measure(engines: dict[str, Engine], prompt: list[int], n: int, rounds: int):
    """One warm-up round, then `rounds` rounds of every engine once (the order rotating each round) and of the
    read-bandwidth probe. Returns the runs by engine and the bandwidth (GB/s) of each round."""
    names = [name for name in ENGINE_ORDER if name in engines]
    runs: dict[str, list[Run]] = {name: [] for name in names}
    bandwidths = []
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        results = {name: engines[name](prompt, n) for name in order}
        for name, result in results.items():
            if len(result.tokens) != n:
                raise RuntimeError(f"{name} generated {len(result.tokens)} tokens, not {n}")
        if r == 0:
            print("warm-up done", file=sys.stderr)
            continue
        bandwidths.append(measure_read_bandwidth_gbs(PROBE_BYTES))
        for name in names:
            runs[name].append(results[name])
        print(f"round {r}/{rounds} (load average {os.getloadavg()[0]:.1f}), decode tok/s: "
              + ", ".join(f"{name} {results[name].decode_tps:.1f}" for name in names), file=sys.stderr)
    return runs, bandwidths


# ---- reporting -------------------------------------------------------------------------------------

def paired_ratio(runs: dict[str, list[Run]], a: str, b: str) -> float | None:
    """Median over rounds of decode tok/s of a / b, both measured in the same round."""
    if a not in runs or b not in runs:
        return None
    return statistics.median(x.decode_tps / y.decode_tps for x, y in zip(runs[a], runs[b]))


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def engine_row(name: str, runs: dict[str, list[Run]], ceilings: dict[str, float]) -> dict:
    decode = statistics.median(r.decode_tps for r in runs[name])
    dtype = "bf16" if name == SLM_BF16 else "fp32"
    return {"available": True, "weights": dtype,
            "prompt_tok_s": statistics.median(r.prompt_tps for r in runs[name]),
            "decode_tok_s": decode, "decode_ms_per_token": 1e3 / decode,
            "fraction_of_ceiling": decode / ceilings[dtype],
            "same_tokens_as_slmkit_fp32": common_prefix(runs[name][0].tokens, runs[SLM_F32][0].tokens),
            "vs_transformers": paired_ratio(runs, name, TRANSFORMERS),
            "vs_llama_cpp": paired_ratio(runs, name, LLAMA),
            "rounds": [{"prompt_tok_s": r.prompt_tps, "decode_tok_s": r.decode_tps} for r in runs[name]]}


def summarize(runs, missing, bytes_per_token: dict[str, int], bandwidths: list[float]) -> dict:
    bandwidth = statistics.median(bandwidths)
    ceilings = {dtype: bandwidth * 1e9 / nbytes for dtype, nbytes in bytes_per_token.items()}
    rows = {name: engine_row(name, runs, ceilings) if name in runs
            else {"available": False, "reason": missing.get(name, "not run")} for name in ENGINE_ORDER}
    slow = sum(r.decode_tps < rows[name]["decode_tok_s"] / 2 for name in runs for r in runs[name])
    return {"engines": rows, "disturbed_runs": slow, "read_bandwidth_GBps": bandwidth,
            "read_bandwidth_GBps_rounds": bandwidths, "weight_bytes_per_token": bytes_per_token,
            "ceiling_tok_s": ceilings}


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def print_table(summary: dict, args) -> None:
    print(f"\nSmolLM2-135M-Instruct, batch 1, {THREADS} threads, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens (greedy, no EOS stop), median of {args.rounds} interleaved rounds\n")
    header = ("engine", "prompt tok/s", "decode tok/s", "ms/token", "% of ceiling", "vs transformers",
              "vs llama.cpp", "same tokens")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, row in summary["engines"].items():
        if not row["available"]:
            print(f"| {name} | unavailable: {row['reason']} |" + " |" * (len(header) - 2))
            continue
        ratios = (row["vs_transformers"], row["vs_llama_cpp"]) if name in RATIO_ROWS else (None, None)
        cells = (name, f"{row['prompt_tok_s']:.0f}", f"{row['decode_tok_s']:.1f}",
                 f"{row['decode_ms_per_token']:.2f}", f"{100 * row['fraction_of_ceiling']:.0f}%",
                 fmt_ratio(ratios[0]), fmt_ratio(ratios[1]),
                 f"{row['same_tokens_as_slmkit_fp32']}/{args.new_tokens}")
        print("| " + " | ".join(cells) + " |")
    print_floor(summary)


def print_floor(summary: dict) -> None:
    bw = summary["read_bandwidth_GBps"]
    low, high = min(summary["read_bandwidth_GBps_rounds"]), max(summary["read_bandwidth_GBps_rounds"])
    print(f"\nMemory-bandwidth floor: read bandwidth {bw:.1f} GB/s (median over rounds, range {low:.1f}-{high:.1f}, "
          f"of slmkit.eval.machine.measure_read_bandwidth_gbs: best torch.sum over a 1 GiB float32 tensor on "
          f"{THREADS} threads)")
    print("Weights read per token (slmkit.eval.cost.decode_bytes_per_token: all linear weights + the tied output "
          "embedding; input embedding lookup and KV cache not counted)")
    for dtype, nbytes in summary["weight_bytes_per_token"].items():
        print(f"  {dtype}: {nbytes / 1e6:.1f} MB/token -> ceiling {summary['ceiling_tok_s'][dtype]:.1f} tok/s"
              f" ({1e3 / summary['ceiling_tok_s'][dtype]:.2f} ms/token)")
    print("Ratios: median over rounds of the decode tok/s ratio measured in the same round. "
          "'same tokens': leading generated tokens identical to slmkit fp32's (round 1).")
    if summary["disturbed_runs"]:
        print(f"Warning: {summary['disturbed_runs']} run(s) decoded at under half their engine's median: the "
              "machine was busy. Rerun on an idle machine or with more --rounds.")


# ---- main --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds after one warm-up (default 5)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (default 128)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in tokens (default 256)")
    parser.add_argument("--text", type=Path, default=WIKITEXT, help="UTF-8 text the prompt is taken from "
                        "(default: wikitext-2 raw test in ../shared/data)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 2 or args.prompt_tokens < 1:
        parser.error("need --rounds >= 1, --new-tokens >= 2 and --prompt-tokens >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    if os.environ.get("SLMKIT_KERNELS") == "0":
        print("note: SLMKIT_KERNELS=0 is set, so 'slmkit fp32' also uses torch's matmul", file=sys.stderr)
    lm32, lm16 = load(None, dtype=torch.float32), load(None, dtype=torch.bfloat16)
    prompt = prompt_ids(lm32.tokenizer, args.prompt_tokens, args.text)
    with tempfile.TemporaryDirectory(prefix="slmkit-bench-") as tmp:
        engines, missing = build_engines(lm32, lm16, Path(tmp), max(512, args.prompt_tokens + args.new_tokens))
        runs, bandwidths = measure(engines, prompt, args.new_tokens, args.rounds)
        engines.clear()  # llama.cpp unmaps the temporary file before it is deleted
    per_token = {"fp32": decode_bytes_per_token(lm32.model), "bf16": decode_bytes_per_token(lm16.model)}
    summary = summarize(runs, missing, per_token, bandwidths)
    summary["settings"] = {"threads": THREADS, "rounds": args.rounds, "new_tokens": args.new_tokens,
                           "prompt_tokens": args.prompt_tokens, "torch": torch.__version__}
    print_table(summary, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
