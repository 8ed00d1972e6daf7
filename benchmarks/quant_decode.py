"""Batch-1 CPU decode speed of slmkit with float and packed low-bit weights, on the default model.

Four copies of SmolLM2-135M-Instruct decode the same prompt token ids greedily on 2 threads:

    fp32   slmkit.loader.load(None, torch.float32)                 slmkit's fp32 GEMV kernel
    bf16   slmkit.loader.load(None, torch.bfloat16)                slmkit's bf16 GEMV kernel
    int8   fp32 model + quantize_(RTNConfig(QScheme(8, 32, True)))  slmkit's packed kernel (gemv_packed)
    int4   fp32 model + quantize_(RTNConfig(QScheme(4, 32, True)))  slmkit's packed kernel (gemv_packed)

RTNConfig packs every linear of the blocks with the scheme and the (tied) embedding table with 8-bit symmetric
groups of 32, as llama.cpp's Q8_0 / Q4_0 files do; the scale search is off (it changes the codes, not the speed).
Prompts, timing and interleaving are those of decode_speed.py: one warm-up round, then --rounds rounds running
every model once (the order rotating), medians over rounds, and ratios against fp32 and bf16 taken as the median
of the per-round ratios (measured side by side). Weight bytes are slmkit.info.weight_bytes: every parameter and
persistent buffer held in memory (packed codes, scales, norms, the embedding table).

    python benchmarks/quant_decode.py [--rounds 5] [--new-tokens 128] [--prompt-tokens 256] [--json out.json]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_speed import (THREADS, Run, common_prefix, paired_ratio, parse_args, prompt_ids,  # noqa: E402
                          slmkit_engine)
from slmkit.info import weight_bytes  # noqa: E402
from slmkit.loader import load  # noqa: E402
from slmkit.quant import QScheme, RTNConfig, quantize_  # noqa: E402

FP32, BF16, INT8, INT4 = "fp32", "bf16", "int8 sym g32", "int4 sym g32"
ORDER = [FP32, BF16, INT8, INT4]


def build_models() -> tuple[dict[str, torch.nn.Module], object]:
    """The four models (by row name) and the tokenizer."""
    lm32 = load(None, dtype=torch.float32)
    models = {FP32: lm32.model, BF16: load(None, dtype=torch.bfloat16).model}
    for name, bits in ((INT8, 8), (INT4, 4)):
        model = load(None, dtype=torch.float32).model
        quantize_(model, RTNConfig(scheme=QScheme(bits, 32, True), search=False))
        models[name] = model
    return models, lm32.tokenizer


def measure(models: dict, prompt: list[int], n: int, rounds: int) -> dict[str, list[Run]]:
    """One warm-up round, then `rounds` rounds of every model once, the order rotating each round."""
    engines = {name: slmkit_engine(model) for name, model in models.items()}
    runs: dict[str, list[Run]] = {name: [] for name in ORDER}
    for r in range(rounds + 1):
        order = ORDER[r % len(ORDER):] + ORDER[:r % len(ORDER)]
        results = {name: engines[name](prompt, n) for name in order}
        if r == 0:
            print("warm-up done", file=sys.stderr)
            continue
        for name in ORDER:
            runs[name].append(results[name])
        print(f"round {r}/{rounds} (load average {os.getloadavg()[0]:.1f}), decode tok/s: "
              + ", ".join(f"{name} {results[name].decode_tps:.1f}" for name in ORDER), file=sys.stderr)
    return runs


def summarize(runs: dict[str, list[Run]], models: dict) -> dict:
    rows = {}
    for name in ORDER:
        decode = statistics.median(r.decode_tps for r in runs[name])
        rows[name] = {"weight_bytes": sum(weight_bytes(models[name]).values()),
                      "decode_tok_s": decode, "decode_ms_per_token": 1e3 / decode,
                      "prompt_tok_s": statistics.median(r.prompt_tps for r in runs[name]),
                      "vs_fp32": paired_ratio(runs, name, FP32), "vs_bf16": paired_ratio(runs, name, BF16),
                      "same_tokens_as_fp32": common_prefix(runs[name][0].tokens, runs[FP32][0].tokens),
                      "rounds": [{"prompt_tok_s": r.prompt_tps, "decode_tok_s": r.decode_tps} for r in runs[name]]}
    return rows


def print_table(rows: dict, args) -> None:
    print(f"\nSmolLM2-135M-Instruct, batch 1, {THREADS} threads, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens (greedy, no EOS stop), median of {args.rounds} interleaved rounds\n")
    header = ("weights", "MB in memory", "decode tok/s", "ms/token", "vs fp32", "vs bf16", "prompt tok/s",
              "same tokens as fp32")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, row in rows.items():
        cells = (name, f"{row['weight_bytes'] / 1e6:.1f}", f"{row['decode_tok_s']:.1f}",
                 f"{row['decode_ms_per_token']:.2f}", f"{row['vs_fp32']:.2f}×", f"{row['vs_bf16']:.2f}×",
                 f"{row['prompt_tok_s']:.0f}", f"{row['same_tokens_as_fp32']}/{args.new_tokens}")
        print("| " + " | ".join(cells) + " |")
    print("\nRatios: median over rounds of the decode tok/s ratio measured in the same round. MB in memory: "
          "slmkit.info.weight_bytes (parameters + persistent buffers). int8 / int4: linears packed with the "
          "scheme, embedding table (tied output matrix) 8-bit g32.")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    if os.environ.get("SLMKIT_KERNELS") == "0":
        print("note: SLMKIT_KERNELS=0 is set: every row uses torch (int8 / int4 dequantize per call)", file=sys.stderr)
    models, tokenizer = build_models()
    prompt = prompt_ids(tokenizer, args.prompt_tokens, args.text)
    runs = measure(models, prompt, args.new_tokens, args.rounds)
    rows = summarize(runs, models)
    print_table(rows, args)
    if args.json:
        settings = {"threads": THREADS, "rounds": args.rounds, "new_tokens": args.new_tokens,
                    "prompt_tokens": args.prompt_tokens, "torch": torch.__version__}
        args.json.write_text(json.dumps({"rows": rows, "settings": settings}, indent=2) + "\n")


if __name__ == "__main__":
    main()
