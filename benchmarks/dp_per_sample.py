"""Where DP-SGD's per-sample gradients should come from: Opacus's GradSampleModule hooks (what slmkit uses) or
torch.func (vmap of grad over functional_call), measured side by side.

The default model, LoRA rank 8 on all seven projections, one micro-batch of 4 x 512 tokens, float32, 2 threads;
each method in a fresh process (its own peak RSS), one warm-up step then --steps timed steps, rounds
interleaved. torch.func's loss is F.cross_entropy on the full logits: slmkit's chunked cross-entropy (and the
packed product of QLoRA) are autograd Functions without a vmap rule, so vmap cannot run them. Both methods'
per-sample gradients are checked against each other on the first step (max abs difference printed).

    python benchmarks/dp_per_sample.py [--rounds 2] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

METHODS = ("opacus hooks", "torch.func vmap")


def child(method: str, steps: int) -> dict:
    from slmkit.adapters import LoRAConfig, apply_lora_
    from slmkit.loader import load
    from slmkit.train import privacy as dp
    from slmkit.train.objectives import Batch, NextTokenLoss

    torch.set_num_threads(2)
    model = load(None).model
    torch.manual_seed(0)
    apply_lora_(model, LoRAConfig(8, 16.0))
    model.train()
    x = torch.randint(0, model.cfg.vocab_size, (4, 513), generator=torch.Generator().manual_seed(0))
    batch = Batch(x[:, :-1], x[:, 1:])
    Path("/proc/self/clear_refs").write_text("5")
    per_sample = opacus_step(model, batch, dp, NextTokenLoss()) if method == METHODS[0] else func_step(model, batch)
    seconds = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        grads = per_sample()
        seconds.append(time.perf_counter() - t0)
    torch.save({k: g[:, :2, :2].clone() for k, g in zip(range(len(grads)), grads)}, f"/tmp/dp_per_sample_{method[0]}.pt")
    return {"method": method, "step_s": statistics.median(seconds[1:]), "peak_rss_mb": _hwm(),
            "tokens_per_s": batch.tokens / statistics.median(seconds[1:])}


def opacus_step(model, batch, dp, objective):
    runner = dp.wrap(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss, _ = objective.loss_sum(runner, batch)
        (loss / batch.inputs.shape[1]).backward()
        grads = [p.grad_sample for p in params]
        runner.zero_grad(set_to_none=True)
        return grads
    return step


def func_step(model, batch):
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(params, x, y):
        logits = functional_call(model, (params,), (x[None],))  # [1, T, V]
        return F.cross_entropy(logits[0], y, reduction="sum") / x.shape[0]

    per = vmap(grad(loss), in_dims=(None, 0, 0))

    def step():
        g = per(params, batch.inputs, batch.labels)
        return [g[n] for n in names]
    return step


def _hwm() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return print(json.dumps(child(args.child, args.steps)))
    results = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for method in (METHODS if r % 2 == 0 else METHODS[::-1]):
            out = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps)],
                                 stdout=subprocess.PIPE, text=True)
            results[method].append(json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {})
    a, b = (torch.load(f"/tmp/dp_per_sample_{m[0]}.pt") for m in METHODS)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print("| per-sample gradients | step s | tokens/s | peak RSS MB |")
    print("|---|---|---|---|")
    for m, runs in results.items():
        ok = [r for r in runs if r]
        print(f"| {m} | {statistics.median(r['step_s'] for r in ok):.1f} | "
              f"{statistics.median(r['tokens_per_s'] for r in ok):.0f} | "
              f"{statistics.median(r['peak_rss_mb'] for r in ok):.0f} |")
    print(f"max |opacus - torch.func| over the checked entries: {diff:.2e}")


if __name__ == "__main__":
    main()
