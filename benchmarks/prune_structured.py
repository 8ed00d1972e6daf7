"""Structured pruning of the default model (SmolLM2-135M-Instruct): quality, parameters, file size, decode speed.

Rows: the unpruned model, then `auto` structured pruning (MLP channels down to half, then whole layers; see
slmkit.prune.structured) at --ratios of the parameters (default 10%, 25%, 40%), ranked by activation importance
on --calib-samples x --calib-length tokens of WikiText-2 *valid* (never the test windows that are scored; one
importance pass over the unpruned model serves every ratio). No healing or distillation afterwards. For each row:

* perplexity on the shared WikiText-2 protocol: `perplexity(model, tokenizer, read_text("wikitext2"),
  PerplexityProtocol(512, None, max_windows, False))`;
* parameters (`count_parameters(model)["total"]`, what `slm info` counts) and the size of model.safetensors
  as `save_checkpoint` writes it (float32);
* batch-1 decode tok/s on 2 threads (slmkit.generate, greedy, exactly --new-tokens after a --prompt-tokens
  prompt from the start of WikiText-2 test), all models held in this process and timed interleaved: one
  warm-up round, then --rounds rounds each running every model once (the order rotating); the table shows the
  median tok/s, and the speed-up is the median over rounds of pruned / unpruned tok/s measured in that round.

    python benchmarks/prune_structured.py [--ratios 0.1,0.25,0.4] [--max-windows 40] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from slmkit.calib import CalibConfig, calibration_tokens  # noqa: E402
from slmkit.checkpoint import save_checkpoint  # noqa: E402
from slmkit.eval.data import read_text  # noqa: E402
from slmkit.eval.perplexity import PerplexityProtocol, perplexity  # noqa: E402
from slmkit.generate import GenerationConfig, Timings, generate  # noqa: E402
from slmkit.loader import load  # noqa: E402
from slmkit.model import count_parameters  # noqa: E402
from slmkit.pipeline import step_record  # noqa: E402
from slmkit.prune import StructuredPruneConfig  # noqa: E402
from slmkit.prune.structured import importance_of, prune_structured_model_  # noqa: E402

THREADS = 2
UNPRUNED = "unpruned"


def shape(cfg) -> str:
    return f"{cfg.n_layers} layers, {cfg.n_heads}/{cfg.kv_heads} heads, MLP {cfg.ffn_dim}, width {cfg.dim}"


def file_mb(model, tokenizer, folder: Path) -> float:
    out = save_checkpoint(model, tokenizer, folder, force=True)
    return (out / "model.safetensors").stat().st_size / 1e6


def build_models(args) -> tuple[dict, object, dict]:
    """The unpruned model and one pruned copy per ratio, with the seconds each step took. The activation
    importance is computed once, on the unpruned model (every ratio starts from it, so its scores are the same
    ones `prune_structured_` would compute for each); the rows' slice s is planning and slicing."""
    base = load(None)
    calib_cfg = CalibConfig(samples=args.calib_samples, length=args.calib_length)
    calib = calibration_tokens(base.tokenizer, calib_cfg)
    start = time.perf_counter()
    scores = importance_of(base.model, StructuredPruneConfig("auto", ratio=0.5, calib=calib_cfg), calib)
    seconds = {"importance": time.perf_counter() - start, UNPRUNED: 0.0}
    print(f"importance pass: {seconds['importance']:.0f} s", file=sys.stderr)
    models = {UNPRUNED: base.model}
    for ratio in args.ratios:
        name, model = f"auto {ratio:.0%}", copy.deepcopy(base.model)
        step = StructuredPruneConfig("auto", ratio=ratio, calib=calib_cfg)
        start = time.perf_counter()
        prune_structured_model_(model, step, calib, scores)
        seconds[name] = time.perf_counter() - start
        model.compression.append(step_record(step))
        models[name] = model.eval()
        print(f"{name}: {shape(model.cfg)}", file=sys.stderr)
    return models, base.tokenizer, seconds


def decode_tps(model, prompt: list[int], n: int) -> float:
    timings = Timings()
    tokens = list(generate(model, prompt, GenerationConfig(max_new_tokens=n), timings))  # no stop ids
    assert len(tokens) == n
    return timings.decode_tokens_per_s


def measure_speed(models: dict, prompt: list[int], n: int, rounds: int) -> dict[str, list[float]]:
    """Decode tok/s of every model per round: one warm-up round, then `rounds` with the order rotating."""
    names = list(models)
    speeds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        results = {name: decode_tps(models[name], prompt, n) for name in order}
        if r == 0:
            continue
        for name in names:
            speeds[name].append(results[name])
        print(f"round {r}/{rounds}: " + ", ".join(f"{k} {v:.1f}" for k, v in results.items()), file=sys.stderr)
    return speeds


def rows(models, tokenizer, slice_s, speeds, args) -> dict[str, dict]:
    protocol = PerplexityProtocol(512, None, args.max_windows, False)
    text = read_text("wikitext2")
    base_params = count_parameters(models[UNPRUNED])["total"]
    out = {}
    with tempfile.TemporaryDirectory(prefix="slmkit-prune-") as tmp:
        for name, model in models.items():
            params = count_parameters(model)["total"]
            ppl = perplexity(model, tokenizer, text, protocol)["perplexity"]
            out[name] = {"shape": shape(model.cfg), "params": params, "params_share": params / base_params,
                         "file_mb": file_mb(model, tokenizer, Path(tmp) / "ckpt"), "ppl": ppl,
                         "decode_tok_s": statistics.median(speeds[name]),
                         "speedup": statistics.median(a / b for a, b in zip(speeds[name], speeds[UNPRUNED])),
                         "slice_s": slice_s[name], "rounds_tok_s": speeds[name]}
            print(f"{name}: PPL {ppl:.2f}", file=sys.stderr)
    return out


def print_table(table: dict, args) -> None:
    print(f"\nSmolLM2-135M-Instruct, structured pruning `auto` with activation importance "
          f"({args.calib_samples} x {args.calib_length} calibration tokens of wikitext2-valid, one pass: "
          f"{args.importance_s:.0f} s), no distillation; "
          f"WikiText-2 PPL over {args.max_windows or 'all'} windows of 512; decode: batch 1, {THREADS} threads, "
          f"{args.new_tokens} new tokens, median of {args.rounds} interleaved rounds\n")
    header = ("model", "shape", "params", "% params", "file MB", "PPL", "decode tok/s", "speed-up", "slice s")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, r in table.items():
        cells = (name, r["shape"], f"{r['params'] / 1e6:.1f}M", f"{100 * r['params_share']:.1f}%",
                 f"{r['file_mb']:.1f}", f"{r['ppl']:.2f}", f"{r['decode_tok_s']:.1f}", f"{r['speedup']:.2f}×",
                 f"{r['slice_s']:.1f}")
        print("| " + " | ".join(cells) + " |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.1,0.25,0.4", help="shares of the parameters to remove (default "
                        "0.1,0.25,0.4)")
    parser.add_argument("--max-windows", type=int, default=40, help="WikiText-2 test windows of 512 (default 40)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="measured decode rounds after one warm-up (default 5)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per decode run (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    if args.rounds < 1 or args.new_tokens < 2 or not all(0 < r < 1 for r in args.ratios):
        parser.error("need --rounds >= 1, --new-tokens >= 2 and ratios in (0, 1)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    models, tokenizer, slice_s = build_models(args)
    args.importance_s = slice_s.pop("importance")
    prompt = tokenizer.encode(read_text("wikitext2").text[:40 * args.prompt_tokens], add_bos=False)[:args.prompt_tokens]
    speeds = measure_speed(models, prompt, args.new_tokens, args.rounds)
    table = rows(models, tokenizer, slice_s, speeds, args)
    print_table(table, args)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"settings": {**settings, "threads": THREADS, "torch": torch.__version__},
                                         "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
