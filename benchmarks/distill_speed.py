"""Distillation and QAT step time against plain fine-tuning, side by side on the same batches.

The default model (SmolLM2-135M-Instruct) as student and, for distillation, as its own teacher in bfloat16
(the student of a real run is smaller: a 25%-pruned student makes the teacher's share larger than here, the
cached engines' cost does not change). Sequences of 512 WikiText-2 tokens, micro-batch 4, bf16 autocast (fp32
master weights), AdamW lr 1e-5 constant, 2 threads, one engine per fresh process, a warm-up step then --steps
timed steps; peak RSS is the training high-water mark after loading (train_speed.py's machinery). Engines:

    fine-tuning           the one loop, next-token cross-entropy (the baseline of every ratio)
    KD live full-vocab    forward KL against the teacher's whole distribution, the teacher run every step
    KD live top-64        the teacher's top 64 tokens + a remainder bin, the teacher run every step
    KD cached top-64      the same targets read from a filled teacher cache (filled before the timing)
    QAT int4 g32          prepare_qat_ (Q4_0's grid, learned scales), cross-entropy
    QAT int4 g32 + KD cached   QAT with the cached top-64 distillation

Rounds interleave the engines (the order rotating); ratios are medians of per-round ratios.

    python benchmarks/distill_speed.py [--rounds 2] [--steps 3] [--engines ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import (MICRO, SEED, SEQ, THREADS, child_result, fmt, interleaved, median_of, paired,  # noqa: E402
                         prepare, reset_peak_rss, train_peak_rss_mb)

LR, K = 1e-5, 64
ENGINES = ("fine-tuning", "KD live full-vocab", "KD live top-64", "KD cached top-64", "QAT int4 g32",
           "QAT int4 g32 + KD cached")


def engine_config(engine: str, spec: dict):
    """(objective, QATConfig or None) of an engine."""
    from slmkit.distill import DistillLoss
    from slmkit.qat import QATConfig
    from slmkit.quant.scheme import QScheme
    from slmkit.train.objectives import objective

    teacher = (spec["folder"],)
    kd = {"KD live full-vocab": DistillLoss(teacher, teacher_dtype="bfloat16"),
          "KD live top-64": DistillLoss(teacher, topk=K, teacher_dtype="bfloat16"),
          "KD cached top-64": DistillLoss(teacher, topk=K, cache=spec["cache"], teacher_dtype="bfloat16"),
          "QAT int4 g32 + KD cached": DistillLoss(teacher, topk=K, cache=spec["cache"], teacher_dtype="bfloat16")}
    qat = QATConfig(QScheme(4, 32, True)) if engine.startswith("QAT") else None
    return kd.get(engine, objective("lm")), qat


def child(spec: dict) -> dict:
    from safetensors.torch import load_file

    from slmkit.loader import load
    from slmkit.qat import prepare_qat_
    from slmkit.train import TrainConfig, train
    from slmkit.train.data import Sequences, TrainData

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    ids = load_file(spec["data"])["ids"]  # [N, SEQ+1]
    lm = load(spec["folder"])
    obj, qat = engine_config(spec["engine"], spec)
    if qat is not None:
        prepare_qat_(lm.model, qat)
    seqs = Sequences(ids)
    data = TrainData(seqs, None, {"digest": seqs.digest(), "seq_len": SEQ}, tokenizer=lm.tokenizer)
    cfg = TrainConfig(objective=obj, lr=LR, schedule="constant", seq_len=SEQ, micro_batch=MICRO,
                      max_steps=spec["steps"] + 1, seed=SEED, precision="bfloat16")
    reset_peak_rss()
    result = train(lm.model, data, cfg, show=False)
    seconds, tokens = [r[5] for r in result.loss_curve], [r[4] for r in result.loss_curve]
    return {"engine": spec["engine"], "tokens_per_s": sum(tokens[1:]) / sum(seconds[1:]), "step_seconds": seconds,
            "train_peak_rss_mb": train_peak_rss_mb()}


def fill_cache(spec: dict) -> None:
    """One pass of the cached engine over every sequence, so the timed runs only read the cache."""
    from safetensors.torch import load_file

    from slmkit.distill import DistillLoss
    from slmkit.loader import load
    from slmkit.train.data import Sequences, TrainData

    torch.set_num_threads(THREADS)
    ids = load_file(spec["data"])["ids"]
    lm = load(spec["folder"])
    seqs = Sequences(ids)
    data = TrainData(seqs, None, {"digest": seqs.digest(), "seq_len": SEQ}, tokenizer=lm.tokenizer)
    obj = DistillLoss((spec["folder"],), topk=K, cache=spec["cache"], teacher_dtype="bfloat16")
    obj.prepare(lm.model, data)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(seqs), MICRO):
            obj.loss_sum(lm.model, seqs.batch(list(range(start, min(start + MICRO, len(seqs))))))


def table(results: dict) -> list[dict]:
    print("| engine | tokens/s | vs fine-tuning | peak RSS MB |")
    print("|---|---|---|---|")
    rows = []
    for engine, runs in results.items():
        row = {"engine": engine, "tokens_per_s": median_of(runs, "tokens_per_s"),
               "vs_ft": paired(results, engine, "fine-tuning"), "peak_rss_mb": median_of(runs, "train_peak_rss_mb"),
               "runs": runs}
        rows.append(row)
        print(f"| {engine} | {fmt(row['tokens_per_s'], '.0f')} | {fmt(row['vs_ft'], '.2f', '×')} | "
              f"{fmt(row['peak_rss_mb'], '.0f')} |")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--fill", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return print(json.dumps(child(json.loads(args.child))))
    if args.fill:
        return fill_cache(json.loads(args.fill))
    engines = [e for e in ENGINES if e in args.engines.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = prepare("default", Path(tmp), MICRO * (args.steps + 1))
        inputs["cache"] = str(Path(tmp) / "cache")
        subprocess.run([sys.executable, __file__, "--fill", json.dumps(inputs)], check=True)
        results = interleaved(engines, args.rounds, lambda e: child_result(
            __file__, {"engine": e, "steps": args.steps, **inputs}))
    rows = table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "threads": THREADS, "seq_len": SEQ, "micro_batch": MICRO,
                                               "steps": args.steps, "k": K}, indent=2))


if __name__ == "__main__":
    main()
