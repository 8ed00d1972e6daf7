"""What differential privacy costs in quality: LoRA fine-tuning of the default model on Tiny Shakespeare without
DP and with DP-SGD at epsilon 8 and 3, validation perplexity of each beside the base model's.

Every run: SmolLM2-135M-Instruct (from its GGUF, float32), LoRA rank 8 on q_proj and v_proj of every block
(alpha 16), sequences of --seq-len tokens from Tiny Shakespeare with the last 5% held out (the same split for
every run), expected batch --batch sequences (micro-batch 16 x accumulation), --steps optimizer steps, AdamW
lr --lr with a cosine schedule. Without DP the batches are the loop's shuffled ones; with DP they are Poisson
samples of the same expected size, every per-sample gradient clipped to norm --clip, noise from the target
epsilon through Opacus's RDP accountant at delta = 1 / N. Validation loss: mean token cross-entropy on every
held-out sequence; perplexity = exp(loss).

    python benchmarks/dp_utility.py [--steps 50] [--seq-len 128] [--batch 64] [--lr 2e-3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--epsilons", default="8,3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [base_row(args)] + [run(args, None)] + [run(args, float(e)) for e in args.epsilons.split(",")]
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


def _setup(args):
    from slmkit.adapters import LoRAConfig, apply_lora_, targets
    from slmkit.loader import load
    from slmkit.train import TrainConfig, load_data

    lm = load(None)
    data = load_data("tinyshakespeare", lm.tokenizer, args.seq_len)
    apply_lora_(lm.model, LoRAConfig(8, 16.0, layers=targets("q_proj,v_proj")))
    micro = 16
    cfg = TrainConfig(trainable=("*.lora_A.weight", "*.lora_B.weight"), lr=args.lr, seq_len=args.seq_len,
                      micro_batch=micro, grad_accum=args.batch // micro, max_steps=args.steps,
                      eval_batches=10 ** 6, betas=(0.9, 0.999), log_every=10)
    return lm, data, cfg


def base_row(args) -> dict:
    from slmkit.train.loop import evaluate

    lm, data, cfg = _setup(args)
    loss = evaluate(lm.model, data, cfg)
    return {"run": "base model (no fine-tuning)", "val_loss": loss, "val_ppl": math.exp(loss), "epsilon": None,
            "data": data.info}


def run(args, epsilon: float | None) -> dict:
    import dataclasses

    from slmkit.train import train
    from slmkit.train.privacy import DPConfig

    lm, data, cfg = _setup(args)
    if epsilon is not None:
        cfg = dataclasses.replace(cfg, clip=None, privacy=DPConfig(epsilon=epsilon, clip_norm=args.clip))
    t0 = time.perf_counter()
    result = train(lm.model, data, cfg, show=sys.stderr.isatty())
    name = "LoRA, no DP" if epsilon is None else f"LoRA, DP-SGD epsilon {epsilon:g}"
    return {"run": name, "val_loss": result.val_loss, "val_ppl": math.exp(result.val_loss), "epsilon": epsilon,
            "final_train_loss": result.final_loss, "tokens_per_s": result.tokens_per_s,
            "wall_s": time.perf_counter() - t0, "privacy": result.privacy}


def print_table(rows: list[dict]) -> None:
    nodp = next(r for r in rows if r["run"] == "LoRA, no DP")["val_loss"]
    print("| run | val loss | val perplexity | vs no-DP loss | noise multiplier | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        sigma = f"{r['privacy']['noise_multiplier']:.3f}" if r.get("privacy") else "–"
        speed = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "–"
        print(f"| {r['run']} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {100 * (r['val_loss'] / nodp - 1):+.1f}% "
              f"| {sigma} | {speed} |")


if __name__ == "__main__":
    main()
