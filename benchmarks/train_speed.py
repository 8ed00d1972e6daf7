"""Training speed and memory of slmkit against transformers, side by side, on the same tokens.

Full fine-tuning of the default model (SmolLM2-135M-Instruct) and pretraining of the `nano-20m` preset, at
sequence length 512 and micro-batch 4, in float32 and in bfloat16 autocast (float32 master weights), with
three engines:

    slmkit               slmkit.train.train(model, data, TrainConfig(...))
    transformers Trainer LlamaForCausalLM + transformers.Trainer (adamw_torch, bf16=True for bfloat16)
    torch loop           LlamaForCausalLM + a plain loop: forward, summed cross-entropy / tokens, backward,
                         clip, torch.optim.AdamW

Every engine loads the same weights (one Hugging Face folder that slmkit writes: the default model dequantized
from its GGUF, or nano-20m initialised by slmkit.train.init), trains on the same packed WikiText-2 sequences
(the raw test text) in the same order with the same hyper-parameters (AdamW lr 1e-5 constant, betas 0.9/0.999, no weight decay, clip
1.0), on 2 threads, one engine per fresh process (its own peak memory). Per run: one warm-up step, then
--steps timed steps; tokens/s = trained tokens of the timed steps / their wall time. Peak RSS is the process's
high-water mark from the start of training (reset after loading: /proc/self/clear_refs), so loading
transients do not count; whole-process peaks are in the JSON.

Runs are interleaved: --rounds rounds, each running every engine once (the order rotating); the table shows
medians and the ratios are medians of per-round ratios. Beside them, the floor: 6 x parameters FLOPs per
token over this machine's measured matmul throughput (float32 or bfloat16), and each row's model FLOPs
utilisation (MFU). Attention's own FLOPs (12 x layers x seq x width per token) are left out of 6N, as usual.

    python benchmarks/train_speed.py [--models default,nano-20m] [--dtypes float32,bfloat16] [--rounds 3]
                                     [--steps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

THREADS, SEQ, MICRO, LR, SEED = 2, 512, 4, 1e-5, 0
WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext2/wikitext-2-raw/wiki.test.raw"
ENGINES = ("slmkit", "transformers Trainer", "torch loop")
MODELS = ("default", "nano-20m")


# ---- the parent: shared inputs, interleaved rounds, the table ----------------------------------
def prepare(model: str, work: Path, sequences: int) -> dict:
    """The HF folder every engine loads and the packed [N, SEQ+1] token ids, in `work`."""
    from safetensors.torch import save_file

    from slmkit.checkpoint import export_hf
    from slmkit.loader import load, load_tokenizer
    from slmkit.train.data import tokenize_text

    if model == "default":
        lm = load(None)
        model_obj, tok = lm.model, lm.tokenizer
    else:
        from slmkit.config import preset
        from slmkit.model import Decoder
        from slmkit.train.init import init_weights_

        tok = load_tokenizer(None)
        cfg = preset(model, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model_obj = init_weights_(Decoder(cfg), SEED)
    folder = export_hf(model_obj, tok, work / f"{model}-hf", force=True)
    text = WIKITEXT.read_text(encoding="utf-8")[: sequences * (SEQ + 1) * 6]
    ids = torch.tensor(tokenize_text(text, tok)[: sequences * (SEQ + 1)], dtype=torch.long)
    assert ids.numel() == sequences * (SEQ + 1), "not enough WikiText-2 text for the requested steps"
    data = work / f"{model}-ids.safetensors"
    save_file({"ids": ids.view(sequences, SEQ + 1).contiguous()}, str(data))
    params = sum(p.numel() for p in model_obj.parameters())
    return {"folder": str(folder), "data": str(data), "params": params}


def run_child(model: str, dtype: str, engine: str, inputs: dict, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps({"model": model, "dtype": dtype, "engine": engine,
                                                             "steps": steps, **inputs})]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return {"engine": engine, "error": f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_result(script: str, spec: dict) -> dict:
    """Run `script --child SPEC` in a fresh process; its last stdout line is the result (JSON)."""
    done = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return {"engine": spec["engine"], "error": f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved(engines: list[str], rounds: int, run_one) -> dict[str, list[dict]]:
    """results[engine] = run_one(engine) once per round, the engines' order rotating from round to round."""
    results = {e: [] for e in engines}
    for r in range(rounds):
        for engine in engines[r % len(engines):] + engines[:r % len(engines)]:
            results[engine].append(run_one(engine))
            print(f"  round {r + 1}/{rounds} {engine}: {results[engine][-1].get('tokens_per_s')}",
                  file=sys.stderr, flush=True)
    return results


def measure_rounds(args, inputs: dict) -> dict:
    """runs[(model, dtype)][engine] = one result per round; matmul[dtype] = GFLOP/s per round."""
    from slmkit.eval.machine import measure_matmul_gflops

    engines = tuple(e for e in ENGINES if e in args.engines)
    runs = {(m, d): {e: [] for e in engines} for m in args.models for d in args.dtypes}
    matmul = {d: [] for d in args.dtypes}
    torch.set_num_threads(THREADS)
    for r in range(args.rounds):
        for key, per_engine in runs.items():
            order = engines[r % len(engines):] + engines[: r % len(engines)]
            for engine in order:
                res = run_child(*key, engine, inputs[key[0]], args.steps)
                per_engine[engine].append(res)
                print(f"  round {r + 1}/{args.rounds} {key[0]} {key[1]} {engine}: "
                      f"{res.get('tokens_per_s', res.get('error'))}", file=sys.stderr, flush=True)
        for d in args.dtypes:
            matmul[d].append(measure_matmul_gflops(1024, getattr(torch, d)))
    return {"runs": runs, "matmul": matmul}


def paired(results: dict, a: str, b: str) -> float | None:
    if a not in results or b not in results:
        return None
    ratios = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(results[a], results[b])
              if "tokens_per_s" in x and "tokens_per_s" in y]
    return statistics.median(ratios) if ratios else None


def median_of(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else None


def rows_of(measured: dict, inputs: dict) -> list[dict]:
    rows = []
    for (model, dtype), results in measured["runs"].items():
        gflops = statistics.median(measured["matmul"][dtype])
        ceiling = gflops * 1e9 / (6 * inputs[model]["params"])
        for engine in results:
            tps = median_of(results[engine], "tokens_per_s")
            rows.append({"model": model, "dtype": dtype, "engine": engine, "tokens_per_s": tps,
                         "vs_trainer": paired(results, engine, "transformers Trainer"),
                         "vs_torch_loop": paired(results, engine, "torch loop"),
                         "peak_rss_mb": median_of(results[engine], "train_peak_rss_mb"),
                         "first_loss": median_of(results[engine], "first_loss"),
                         "mfu": tps / ceiling if tps else None, "ceiling_tokens_per_s": ceiling,
                         "matmul_gflops": gflops, "runs": results[engine]})
    return rows


def fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def print_table(rows: list[dict], inputs: dict) -> None:
    print("| model | dtype | engine | tokens/s | vs Trainer | vs torch loop | peak RSS MB | MFU | step-1 loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = r["engine"] == "transformers Trainer"
        print(f"| {r['model']} | {r['dtype']} | {r['engine']} | {fmt(r['tokens_per_s'], '.0f')} | "
              f"{'—' if same else fmt(r['vs_trainer'], '.2f', '×')} | "
              f"{'—' if r['engine'] == 'torch loop' else fmt(r['vs_torch_loop'], '.2f', '×')} | "
              f"{fmt(r['peak_rss_mb'], '.0f')} | {fmt(r['mfu'], '.0%')} | {fmt(r['first_loss'], '.4f')} |")
    print()
    seen = set()
    for r in rows:
        if (r["model"], r["dtype"]) not in seen:
            seen.add((r["model"], r["dtype"]))
            n = inputs[r["model"]]["params"]
            print(f"floor {r['model']} {r['dtype']}: 6 x {n / 1e6:.1f}M params = {6 * n / 1e9:.2f} GFLOP/token; "
                  f"matmul {r['matmul_gflops']:.0f} GFLOP/s -> ceiling {r['ceiling_tokens_per_s']:.0f} tokens/s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="default and/or nano-20m")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--engines", default=",".join(ENGINES), help="a subset of: " + ", ".join(ENGINES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run, after one warm-up step")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return print(json.dumps(child(json.loads(args.child))))
    args.models, args.dtypes, args.engines = args.models.split(","), args.dtypes.split(","), args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {m: prepare(m, Path(tmp), MICRO * (args.steps + 1)) for m in args.models}
        measured = measure_rounds(args, inputs)
    rows = rows_of(measured, inputs)
    print_table(rows, inputs)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "inputs": inputs, "threads": THREADS, "seq_len": SEQ,
                                               "micro_batch": MICRO, "steps": args.steps}, indent=2))


# ---- a child: one engine, one model, one dtype --------------------------------------------------
def child(spec: dict) -> dict:
    from safetensors.torch import load_file

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    ids = load_file(spec["data"])["ids"]  # [N, SEQ+1], step i takes rows 4i..4i+3
    run = {"slmkit": run_slmkit, "transformers Trainer": run_trainer, "torch loop": run_torch_loop}[spec["engine"]]
    whole_before = peak_rss_mb()
    losses, seconds = run(spec, ids)
    tokens = MICRO * SEQ
    return {"engine": spec["engine"], "tokens_per_s": tokens * len(seconds[1:]) / sum(seconds[1:]),
            "step_seconds": seconds, "losses": losses, "first_loss": losses[0],
            "train_peak_rss_mb": train_peak_rss_mb(), "process_peak_rss_mb": peak_rss_mb(),
            "load_peak_rss_mb": whole_before}


def reset_peak_rss() -> None:
    """Start the high-water mark (VmHWM) afresh, so it measures training and not loading."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def train_peak_rss_mb() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_slmkit(spec: dict, ids: torch.Tensor) -> tuple[list[float], list[float]]:
    from slmkit.loader import load
    from slmkit.train import TrainConfig, train
    from slmkit.train.data import Sequences, TrainData, sequence_order

    model = load(spec["folder"]).model
    order = sequence_order(len(ids), SEED, 0, len(ids))  # slmkit's own seeded order: undo it, keep ids' order
    inverse = torch.empty(len(ids), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(ids))
    data = TrainData(Sequences(ids[inverse]), None)
    cfg = TrainConfig(lr=LR, schedule="constant", betas=(0.9, 0.999), seq_len=SEQ, micro_batch=MICRO,
                      max_steps=spec["steps"] + 1, precision=spec["dtype"], seed=SEED)
    reset_peak_rss()
    result = train(model, data, cfg, show=False)
    return [r[1] for r in result.loss_curve], [r[5] for r in result.loss_curve]


def hf_model(spec: dict):
    from transformers import AutoModelForCausalLM
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32, attn_implementation="sdpa")
    return model.train()


def run_torch_loop(spec: dict, ids: torch.Tensor) -> tuple[list[float], list[float]]:
    import contextlib

    model = hf_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if spec["dtype"] == "bfloat16"
                else contextlib.nullcontext())
    losses, seconds = [], []
    reset_peak_rss()
    for step in range(spec["steps"] + 1):
        t0 = time.perf_counter()
        x = ids[step * MICRO:(step + 1) * MICRO]  # [B, SEQ+1]
        with autocast:
            logits = model(input_ids=x[:, :-1]).logits  # [B, SEQ, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
        (loss / x[:, 1:].numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item() / x[:, 1:].numel())
        seconds.append(time.perf_counter() - t0)
    return losses, seconds


def run_trainer(spec: dict, ids: torch.Tensor) -> tuple[list[float], list[float]]:
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = hf_model(spec)
    rows = [{"input_ids": x[:-1], "labels": x[:-1].clone(), "shift_labels": x[1:]} for x in ids]
    marks, losses = [], []

    class Clock(TrainerCallback):  # step boundaries: on_step_end after each optimizer step
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    class InOrder(Trainer):  # the same sequences in the same order as the other engines
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    targs = TrainingArguments(output_dir=spec["folder"] + "-trainer", per_device_train_batch_size=MICRO,
                              max_steps=spec["steps"] + 1, learning_rate=LR, lr_scheduler_type="constant",
                              adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
                              max_grad_norm=1.0, optim="adamw_torch", bf16=spec["dtype"] == "bfloat16",
                              use_cpu=True, logging_steps=1, save_strategy="no", report_to=[],
                              dataloader_num_workers=0, seed=SEED, disable_tqdm=True,
                              remove_unused_columns=False)
    trainer = InOrder(model=model, args=targs, train_dataset=rows, callbacks=[Clock()])
    reset_peak_rss()
    trainer.train()
    return losses, [b - a for a, b in zip(marks, marks[1:])]


if __name__ == "__main__":
    main()
