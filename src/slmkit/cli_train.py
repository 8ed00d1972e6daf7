"""`slm train` and `slm merge`: parsing and printing only; the work is done by slmkit.train and slmkit.adapters."""

from __future__ import annotations

import sys
from pathlib import Path

from .cli_common import set_threads


def train_parser(sub) -> None:
    from .train.config import DISTRIBUTED, OPTIMIZERS, PRECISIONS, SCHEDULES

    t = sub.add_parser("train", help="pretrain or fine-tune (full, LoRA, prompt tuning, DP-SGD) with one resumable loop")
    t.add_argument("model", nargs="?", default=None, help="model to fine-tune (default: SmolLM2-135M-Instruct); "
                   "or --preset to pretrain from scratch")
    t.add_argument("--data", required=True, help="a named corpus (tinyshakespeare, wikitext2-valid, ...), a "
                   ".txt/.jsonl/.parquet file or folder, a hub dataset, or Alpaca / chat records (.json, .jsonl)")
    t.add_argument("--format", choices=["text", "alpaca", "chat"], default=None, help="default: detected")
    t.add_argument("--preset", default=None, help="pretrain this preset from scratch (tiny, nano-20m, ...)")
    t.add_argument("--tokenizer", default=None, help="--preset: the model whose tokenizer to use (default: the "
                   "default model's)")
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (per process)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--tokens", type=int, default=None, help="train on about this many tokens")
    t.add_argument("--epochs", type=float, default=None)
    t.add_argument("--max-time", type=float, default=None, help="stop at the first step after this many seconds")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4; 2e-5 fine-tuning)")
    t.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    t.add_argument("--warmup", type=int, default=0, help="warmup steps")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    t.add_argument("--dtype", choices=PRECISIONS, default="float32", help="float32, bfloat16 (autocast, fp32 "
                   "master weights) or float16 (CUDA, loss scaling)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-data", default=None, help="held-out SOURCE (default: the last 5%% of --data)")
    t.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations")
    t.add_argument("--save-every", type=int, default=0, help="steps between resumable checkpoints (in OUT.train/)")
    t.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    t.add_argument("--distributed", choices=DISTRIBUTED, default="none", help="ddp or fsdp, under torchrun")
    t.add_argument("--trainable", default=None, help="comma-separated glob patterns of parameters that train "
                   "(default: all)")
    t.add_argument("--checkpointing", action="store_true", help="recompute each block's activations in the "
                   "backward: less memory for about a third more time")
    t.add_argument("--low-memory", action="store_true", help="--checkpointing, and large buffers handed back to "
                   "the OS when freed: the least peak memory, about 1.5x the step time")
    _adapter_args(t)
    _privacy_args(t)
    _distill_args(t)
    _qat_args(t)
    t.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model trains (cuda: under "
                   "torchrun, each process's LOCAL_RANK device)")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--json", default=None, help="write the run here (and a Markdown twin)")
    t.add_argument("-o", "--out", required=True, help="output slmkit checkpoint folder (with an adapter: the "
                   "PEFT-format adapter folder)")
    t.add_argument("--force", action="store_true", help="replace OUT (and its train state) if it exists")


def cmd_train(args) -> None:
    from .train.config import TrainConfig
    from .train.job import TrainJob, print_summary, run_train
    from .train.objectives import objective

    set_threads(args)
    job = TrainJob(args.data, Path(args.out), args.model, args.preset, args.tokenizer, args.format, args.eval_data,
                   args.force, args.resume, args.device, _adapter(args), _qat(args))
    privacy = _privacy(args)
    supervised = args.format in ("alpaca", "chat") or (args.format is None and _detect(args.data) != "text")
    lr = args.lr if args.lr is not None else (3e-4 if args.preset else 1e-3 if job.adapter else 2e-5)
    trainable = tuple(p.strip() for p in args.trainable.split(",") if p.strip()) if args.trainable else ("*",)
    cfg = TrainConfig(objective=_distill(args) or objective("sft" if supervised else "lm"), trainable=trainable,
                      optimizer=args.optimizer, lr=lr, weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup, seq_len=args.seq_len,
                      micro_batch=args.batch_size, grad_accum=args.grad_accum, max_steps=args.steps,
                      max_tokens=args.tokens, max_epochs=args.epochs, max_time_s=args.max_time,
                      clip=None if privacy else args.clip or None, precision=args.dtype, seed=args.seed,
                      eval_every=args.eval_every, save_every=args.save_every, distributed=args.distributed,
                      checkpointing=args.checkpointing or args.low_memory, release_memory=args.low_memory,
                      privacy=privacy)
    run, out = run_train(job, cfg, sys.argv)
    if run is not None:
        print_summary(run, out)
        if args.json:
            from .eval.report import write_run

            print(f"[wrote {write_run(run, args.json)}]", file=sys.stderr)
        print(out)


def _detect(spec: str) -> str:
    from .train.data import detect_format

    return detect_format(spec)


def _adapter_args(t) -> None:
    t.add_argument("--lora", type=int, default=None, metavar="R", help="train a LoRA adapter of rank R (the base "
                   "frozen; a packed base stays packed: QLoRA)")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 x rank)")
    t.add_argument("--lora-targets", default=None, help="comma-separated linears (q_proj,v_proj,...) or glob "
                   "patterns on module names (default: all seven projections of every block)")
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank) (rsLoRA)")
    t.add_argument("--dora", action="store_true", help="DoRA: also train a magnitude per output row")
    t.add_argument("--prompt-tuning", type=int, default=None, metavar="N", help="train N virtual tokens instead")


def _privacy_args(t) -> None:
    t.add_argument("--dp-epsilon", type=float, default=None, help="DP-SGD to this epsilon (the noise is found by "
                   "the accountant)")
    t.add_argument("--dp-noise", type=float, default=None, help="DP-SGD with this noise multiplier (epsilon reported)")
    t.add_argument("--dp-delta", type=float, default=None, help="delta (default 1 / training sequences)")
    t.add_argument("--dp-clip", type=float, default=1.0, help="per-sample gradient norm bound C (default 1)")
    t.add_argument("--dp-accountant", choices=["rdp", "prv"], default="rdp", help="Opacus accountant (default rdp)")


def _distill_args(t) -> None:
    from .distill.divergence import LOSSES
    from .distill.teacher import TEACHER_DTYPES

    t.add_argument("--distill", default=None, metavar="TEACHER[,TEACHER2...]", help="learn from this teacher (or "
                   "a mixture of several; 'default' is the default model) instead of the data's labels alone")
    t.add_argument("--teacher-weights", default=None, help="comma-separated mixture weights, one per teacher "
                   "(default: equal)")
    t.add_argument("--teacher-confidence", action="store_true", help="weigh the teachers per token by their top "
                   "probability instead of fixed weights")
    t.add_argument("--teacher-dtype", choices=TEACHER_DTYPES, default="float32", help="run the teachers in this "
                   "dtype (int8 / int4: packed by round-to-nearest)")
    t.add_argument("--kd-loss", choices=LOSSES, default="fkl", help="forward KL (default), reverse KL, generalized "
                   "JSD, skew KL, skew reverse KL")
    t.add_argument("--kd-beta", type=float, default=0.5, help="jsd: 0 = forward KL, 1 = reverse KL")
    t.add_argument("--kd-skew", type=float, default=0.1, help="skl / srkl: the skew")
    t.add_argument("--kd-ratio", type=float, default=1.0, help="weight of the distillation term; the rest goes to "
                   "the hard-label cross-entropy (default 1)")
    t.add_argument("--kd-temperature", type=float, default=1.0)
    t.add_argument("--kd-topk", type=int, default=0, metavar="K", help="keep the teacher's K likeliest tokens and "
                   "one remainder bin (default 0: the whole vocabulary)")
    t.add_argument("--teacher-cache", default=None, metavar="DIR", help="cache the teacher's top-K on disk here, "
                   "filled once and reused over epochs and runs")
    t.add_argument("--on-policy", type=float, default=0.0, metavar="LAMBDA", help="fraction of micro-batches the "
                   "student generates and the teacher scores (GKD)")


def _qat_args(t) -> None:
    t.add_argument("--qat", type=int, default=None, metavar="BITS", help="quantization-aware training to packed "
                   "BITS-bit weights (2..8); OUT is the packed checkpoint. A packed MODEL (AWQ, GPTQ) keeps its grid")
    t.add_argument("--asym", action="store_true", help="--qat: asymmetric grid (scale and offset per group)")
    t.add_argument("--group-size", type=int, default=32, help="--qat: input columns per scale (0: per channel)")
    t.add_argument("--qat-fixed-scales", action="store_true", help="--qat: keep the starting scales (default: "
                   "learn them, LSQ)")


def _qat(args):
    from .errors import require

    require(args.qat is not None or not (args.asym or args.qat_fixed_scales), "--asym and --qat-fixed-scales go "
            "with --qat BITS")
    if args.qat is None:
        return None
    require(args.dp_epsilon is None and args.dp_noise is None, "--qat with DP-SGD is not supported")
    require(args.distributed == "none", "--qat runs in one process")
    from .qat import QATConfig
    from .qat.step import QATJob
    from .quant.scheme import QScheme

    scheme = QScheme(args.qat, args.group_size, not args.asym)
    return QATJob(QATConfig(scheme, learn_scales=not args.qat_fixed_scales).validate())


def _distill(args):
    from .errors import require

    options = [args.teacher_weights, args.teacher_confidence, args.kd_topk, args.teacher_cache, args.on_policy]
    require(args.distill is not None or not any(options), "--teacher-*, --kd-topk, --teacher-cache and --on-policy "
            "go with --distill TEACHER")
    if args.distill is None:
        return None
    from .distill import DistillLoss

    teachers = tuple(None if t.strip() == "default" else t.strip() for t in args.distill.split(",") if t.strip())
    weights = _floats(args.teacher_weights, "--teacher-weights") if args.teacher_weights else None
    return DistillLoss(teachers, weights, args.teacher_confidence, args.kd_loss, args.kd_beta, args.kd_skew,
                       args.kd_temperature, args.kd_ratio, args.kd_topk, args.teacher_cache, args.on_policy,
                       args.teacher_dtype).validate()


def _floats(text: str, flag: str) -> tuple[float, ...]:
    from .errors import SlmError

    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise SlmError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _adapter(args):
    from .errors import require

    lora_opts = [args.lora_alpha is not None, args.lora_targets is not None, bool(args.lora_dropout), args.rslora,
                 args.dora]
    require(args.lora is not None or not any(lora_opts), "--lora-alpha, --lora-targets, --lora-dropout, "
            "--rslora and --dora go with --lora R")
    require(args.lora is None or args.prompt_tuning is None, "give --lora or --prompt-tuning, not both")
    if args.prompt_tuning is not None:
        from .adapters import PromptTuningConfig

        return PromptTuningConfig(args.prompt_tuning, args.seed).validate()
    if args.lora is None:
        return None
    from .adapters import LoRAConfig, targets
    from .modules import LayerFilter

    layers = targets(args.lora_targets) if args.lora_targets else LayerFilter()
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora
    return LoRAConfig(args.lora, alpha, args.lora_dropout, layers, args.rslora, args.dora).validate()


def _privacy(args):
    from .errors import require

    given = args.dp_epsilon is not None or args.dp_noise is not None
    require(given or args.dp_delta is None, "--dp-delta goes with --dp-epsilon or --dp-noise")
    if not given:
        return None
    from .train.privacy import DPConfig

    return DPConfig(args.dp_epsilon, args.dp_noise, args.dp_delta, args.dp_clip, args.dp_accountant).validate()


def merge_parser(sub) -> None:
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base (re-quantized if the base is packed)")
    m.add_argument("adapter", help="a PEFT-format LoRA adapter folder (slm train --lora, or PEFT's own)")
    m.add_argument("--base", default=None, help="the base model (default: the one the adapter names)")
    m.add_argument("-o", "--out", required=True, help="output slmkit checkpoint folder")
    m.add_argument("--force", action="store_true", help="replace OUT if it exists")
    m.add_argument("--threads", type=int, default=None)


def cmd_merge(args) -> None:
    from .adapters.merge import merge

    set_threads(args)
    out, result = merge(Path(args.adapter), Path(args.out), args.base, args.force)
    print(f"[merged {result['modules']} adapted linears ({result['packed_bases']} packed, re-quantized); KL(adapted "
          f"|| merged) {result['kl_mean']:.3g} nats/token (max {result['kl_max']:.3g}), top-1 agreement "
          f"{result['top1_agreement']:.4f} on {result['kl_tokens']} tokens]", file=sys.stderr)
    print(out)
