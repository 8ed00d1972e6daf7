"""GPTQ of the default model (SmolLM2-135M-Instruct): slmkit's against llm-compressor's, wall time and peak memory.

Both quantize every linear of the 30 blocks to 4-bit symmetric groups of 32 with GPTQ (activation order off in
llm-compressor's default, on in slmkit's; damping 0.01 in both) on the same calibration tokens: --samples
sequences of --length tokens cut from WikiText-2 *valid* by slmkit (`slmkit.calib.calibration_tokens`), saved
once and handed to both. Each runs in its own process, one after the other, on 2 threads:

* slmkit: `load(None)` then `quantize_(model, GPTQConfig(QScheme(4, 32, True)), tokens)`; with --awq also
  AWQ's scales then GPTQ (AWQConfig(quantize=False), GPTQConfig), the best Q4_0 row of quant_table.py;
* llm-compressor: the float model exported by `slm export --format hf` loaded with transformers, then
  `llmcompressor.oneshot(model, dataset=<the same token ids>, recipe=GPTQModifier(W4A16, group 32))`. It lives
  in its own virtual environment (it pins another transformers): pass its python with --peer-python, e.g.
  `python3 -m venv /tmp/lc && /tmp/lc/bin/pip install torch==2.13.0 llmcompressor`.

Printed: seconds (the quantization call alone, and the whole process including loading) and peak RSS of each
process, and the ratios slmkit / llm-compressor.

    python benchmarks/gptq_speed.py [--samples 128] [--length 512] [--awq] [--peer-python /tmp/lc/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rows import last_json, peak_rss_mb  # noqa: E402  (benchmarks/rows.py)

PEER = r'''
import json, resource, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(2)
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
folder, tokens_path = sys.argv[1], sys.argv[2]
ids = torch.load(tokens_path, weights_only=True)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                      ignore=["lm_head"], dampening_frac=0.01)
t1 = time.perf_counter()
oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1])
t2 = time.perf_counter()
print(json.dumps({"quantize_s": t2 - t1, "total_s": t2 - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def run_slmkit(tokens_path: Path, row: str) -> dict:
    """In this process (the caller runs it in a fresh one): load, the row's steps, timings and peak RSS. The
    rows are quant_table.py's recipes of the same names: GPTQ alone, or AWQ's scales then GPTQ."""
    t0 = time.perf_counter()
    import torch

    from quant_table import METHODS  # benchmarks/quant_table.py
    from slmkit.calib import CalibConfig
    from slmkit.loader import load
    from slmkit.pipeline import apply_step_
    from slmkit.quant import QScheme

    torch.set_num_threads(2)
    lm = load(None)
    tokens = torch.load(tokens_path, weights_only=True)
    t1 = time.perf_counter()
    for step in METHODS[row.removeprefix("slmkit ")](QScheme(4, 32, True), CalibConfig()):
        apply_step_(lm.model, step, tokens)  # the tokens given here are the calibration data
    t2 = time.perf_counter()
    return {"quantize_s": t2 - t1, "total_s": t2 - t0, "peak_rss_mb": peak_rss_mb()}


def prepare(work: Path, samples: int, length: int) -> Path:
    """Calibration tokens (saved as a tensor) and the float HF folder of the default model."""
    import torch

    from slmkit.calib import CalibConfig, calibration_tokens
    from slmkit.checkpoint import export_hf
    from slmkit.loader import load

    lm = load(None)
    tokens = calibration_tokens(lm.tokenizer, CalibConfig(samples=samples, length=length))
    torch.save(tokens, work / "tokens.pt")
    export_hf(lm.model, lm.tokenizer, work / "hf")
    return work / "tokens.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--peer-python", default=None, help="python of a venv with llmcompressor installed")
    parser.add_argument("--awq", action="store_true", help="also time slmkit's AWQ+GPTQ (AWQ scales, then GPTQ)")
    parser.add_argument("--slmkit-row", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: tokens, row
    args = parser.parse_args()
    if args.slmkit_row:
        print(json.dumps(run_slmkit(Path(args.slmkit_row[0]), args.slmkit_row[1])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokens = prepare(work, args.samples, args.length)
        names = ["slmkit GPTQ"] + (["slmkit AWQ+GPTQ"] if args.awq else [])
        rows = {n: last_json([sys.executable, __file__, "--slmkit-row", str(tokens), n]) for n in names}
        if args.peer_python:
            (work / "peer.py").write_text(PEER)
            rows["llm-compressor"] = last_json([args.peer_python, str(work / "peer.py"), str(work / "hf"), str(tokens)])
    print(f"GPTQ 4-bit g32 of SmolLM2-135M, {args.samples} x {args.length} calibration tokens, 2 threads\n"
          "| engine | GPTQ s | process s | peak RSS MB |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['quantize_s']:.0f} | {r['total_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    if "llm-compressor" in rows:
        a, b = rows["slmkit GPTQ"], rows["llm-compressor"]
        print(f"slmkit GPTQ / llm-compressor GPTQ: time {a['quantize_s'] / b['quantize_s']:.2f}x, "
              f"peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
