"""LoRA fine-tuning speed and memory of slmkit against PEFT + transformers, side by side, on the same batches;
slmkit's LoRA on its own packed int4 base (QLoRA) and full fine-tuning beside them; DP-SGD's cost over plain
LoRA, in slmkit and in Opacus on the PEFT model.

The default model (SmolLM2-135M-Instruct), LoRA rank 8 (alpha 16) on all seven projections of every block,
sequences of 512 tokens, micro-batch 4, float32, AdamW lr 1e-4 constant, 2 threads; the packed WikiText-2
sequences and the child-process machinery of train_speed.py (one engine per fresh process, peak RSS = the
training high-water mark after loading, one warm-up step then --steps timed steps). Engines:

    slmkit LoRA           slmkit.adapters.apply_lora_ + slmkit.train.train
    PEFT LoRA             transformers LlamaForCausalLM + peft.get_peft_model + a plain torch loop
    slmkit QLoRA int4     the same LoRA on `slm quantize --method rtn --bits 4` of the model (packed int4 blocks,
                          the tied table packed 8-bit as slm quantize writes it): the base stays packed
    slmkit QLoRA int4 ckpt  the same, with --checkpointing (each block's activations recomputed in the backward),
                          as QLoRA is run to save memory
    slmkit QLoRA int4 low-mem  --low-memory: checkpointing, and large buffers returned to the OS when freed
                          (slmkit.train.memory), so the peak tracks live memory
    slmkit full FT        every weight trains (the memory the QLoRA ratio is taken against)
    slmkit LoRA DP-SGD    --dp-noise 1.0 --dp-clip 1.0: Poisson batches of expected size 4 (their sizes vary;
                          tokens/s counts what was trained), per-sample gradients through Opacus's hooks
    Opacus PEFT DP-SGD    the PEFT model in opacus.GradSampleModule + opacus.optimizers.DPOptimizer (noise 1.0,
                          clip 1.0), fixed batches of 4

Rounds interleave the engines (the order rotating); ratios are medians of per-round ratios.

    python benchmarks/lora_speed.py [--rounds 2] [--steps 3] [--engines ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import (MICRO, SEED, SEQ, THREADS, child_result, fmt, hf_model, interleaved, median_of,  # noqa: E402
                         paired, peak_rss_mb, prepare, reset_peak_rss, train_peak_rss_mb)

LR, RANK, ALPHA = 1e-4, 8, 16.0
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENGINES = ("slmkit LoRA", "PEFT LoRA", "slmkit QLoRA int4", "slmkit QLoRA int4 ckpt", "slmkit QLoRA int4 low-mem",
           "slmkit full FT",
           "slmkit LoRA DP-SGD", "Opacus PEFT DP-SGD")


def quantized(folder: str, work: Path) -> str:
    from slmkit.pipeline import compress
    from slmkit.quant import RTNConfig
    from slmkit.quant.scheme import QScheme

    return str(compress(folder, [RTNConfig(scheme=QScheme(4, 32))], work / "q4", force=True))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return print(json.dumps(child(json.loads(args.child))))
    engines = [e for e in ENGINES if e in args.engines.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = prepare("default", Path(tmp), MICRO * (args.steps + 1))
        inputs["packed"] = quantized(inputs["folder"], Path(tmp))
        results = interleaved(engines, args.rounds, lambda e: child_result(
            __file__, {"engine": e, "steps": args.steps, "dtype": "float32", **inputs}))
    rows = table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "threads": THREADS, "seq_len": SEQ, "micro_batch": MICRO,
                                               "rank": RANK, "steps": args.steps}, indent=2))


def table(results: dict) -> list[dict]:
    full = median_of(results.get("slmkit full FT", []), "train_peak_rss_mb")
    print("| engine | tokens/s | vs PEFT LoRA | peak RSS MB | RSS vs full FT | trainable params |")
    print("|---|---|---|---|---|---|")
    rows = []
    for engine, runs in results.items():
        rss = median_of(runs, "train_peak_rss_mb")
        row = {"engine": engine, "tokens_per_s": median_of(runs, "tokens_per_s"),
               "vs_peft": paired(results, engine, "PEFT LoRA"), "peak_rss_mb": rss,
               "rss_vs_full": rss / full if rss and full else None, "trainable": median_of(runs, "trainable"),
               "runs": runs}
        rows.append(row)
        print(f"| {engine} | {fmt(row['tokens_per_s'], '.0f')} | {fmt(row['vs_peft'], '.2f', '×')} | "
              f"{fmt(rss, '.0f')} | {fmt(row['rss_vs_full'], '.0%')} | {fmt(row['trainable'], ',.0f')} |")
    for a, b in (("slmkit LoRA DP-SGD", "slmkit LoRA"), ("Opacus PEFT DP-SGD", "PEFT LoRA")):
        ratio = paired(results, a, b)
        print(f"{a} / {b}: tokens/s {fmt(ratio, '.2f', '×')}")
    return rows


# ---- a child: one engine ----------------------------------------------------------------------------
def child(spec: dict) -> dict:
    from safetensors.torch import load_file

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    ids = load_file(spec["data"])["ids"]  # [N, SEQ+1]
    run = RUNNERS[spec["engine"]]
    losses, seconds, tokens, trainable = run(spec, ids)
    return {"engine": spec["engine"], "tokens_per_s": sum(tokens[1:]) / sum(seconds[1:]), "step_seconds": seconds,
            "losses": losses, "trainable": trainable, "train_peak_rss_mb": train_peak_rss_mb(),
            "process_peak_rss_mb": peak_rss_mb()}


def _slmkit(spec: dict, ids: torch.Tensor, folder: str, lora: bool, privacy=None, checkpointing: bool = False,
            release: bool = False):
    from slmkit.adapters import LoRAConfig, apply_lora_
    from slmkit.loader import load
    from slmkit.train import TrainConfig, train
    from slmkit.train.data import Sequences, TrainData, sequence_order

    model = load(folder).model
    order = sequence_order(len(ids), SEED, 0, len(ids))  # the loop's seeded order, undone: the peers' batches
    inverse = torch.empty(len(ids), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(ids))
    if lora:
        apply_lora_(model, LoRAConfig(RANK, ALPHA))
    trainable = ("*.lora_A.weight", "*.lora_B.weight") if lora else ("*",)
    cfg = TrainConfig(trainable=trainable, lr=LR, schedule="constant", betas=(0.9, 0.999), seq_len=SEQ,
                      micro_batch=MICRO, max_steps=spec["steps"] + 1, seed=SEED,
                      clip=None if privacy else 1.0, privacy=privacy, checkpointing=checkpointing,
                      release_memory=release)
    reset_peak_rss()
    result = train(model, TrainData(Sequences(ids[inverse]), None), cfg, show=False)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad) if not lora else \
        sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
    return ([r[1] for r in result.loss_curve], [r[5] for r in result.loss_curve], [r[4] for r in result.loss_curve], n)


def run_slmkit_lora(spec, ids):
    return _slmkit(spec, ids, spec["folder"], lora=True)


def run_slmkit_qlora(spec, ids):
    return _slmkit(spec, ids, spec["packed"], lora=True)


def run_slmkit_qlora_ckpt(spec, ids):
    return _slmkit(spec, ids, spec["packed"], lora=True, checkpointing=True)


def run_slmkit_qlora_low(spec, ids):
    return _slmkit(spec, ids, spec["packed"], lora=True, checkpointing=True, release=True)


def run_slmkit_full(spec, ids):
    return _slmkit(spec, ids, spec["folder"], lora=False)


def run_slmkit_dp(spec, ids):
    from slmkit.train.privacy import DPConfig

    return _slmkit(spec, ids, spec["folder"], lora=True, privacy=DPConfig(noise_multiplier=1.0, clip_norm=1.0))


def _peft_model(spec):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model(spec), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=SEVEN,
                                                      task_type="CAUSAL_LM"))
    return model.train()


def _summed_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1]).logits  # [B, SEQ, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")


def run_peft(spec, ids):
    model = _peft_model(spec)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return _torch_loop(model, opt, params, ids, spec["steps"], per_sequence=False)


def run_opacus(spec, ids):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(_peft_model(spec), batch_first=True, loss_reduction="sum", strict=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999)), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=MICRO, loss_reduction="sum")
    return _torch_loop(model, opt, params, ids, spec["steps"], per_sequence=True)


def _torch_loop(model, opt, params, ids, steps: int, per_sequence: bool):
    """Warm-up + `steps` timed steps of batch MICRO. per_sequence (DP): each sequence's loss is its mean token
    loss and the optimizer clips per sample, as in slmkit; else the batch's mean token loss, clipped to 1."""
    losses, seconds, tokens = [], [], []
    reset_peak_rss()
    for step in range(steps + 1):
        t0 = time.perf_counter()
        x = ids[step * MICRO:(step + 1) * MICRO]  # [B, SEQ+1]
        loss = _summed_loss(model, x)
        (loss / (SEQ if per_sequence else x[:, 1:].numel())).backward()
        if not per_sequence:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item() / x[:, 1:].numel())
        seconds.append(time.perf_counter() - t0)
        tokens.append(x[:, 1:].numel())
    return losses, seconds, tokens, sum(p.numel() for p in params)


RUNNERS = {"slmkit LoRA": run_slmkit_lora, "PEFT LoRA": run_peft, "slmkit QLoRA int4": run_slmkit_qlora,
           "slmkit QLoRA int4 ckpt": run_slmkit_qlora_ckpt, "slmkit QLoRA int4 low-mem": run_slmkit_qlora_low,
           "slmkit full FT": run_slmkit_full, "slmkit LoRA DP-SGD": run_slmkit_dp, "Opacus PEFT DP-SGD": run_opacus}

if __name__ == "__main__":
    main()
