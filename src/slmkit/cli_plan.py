"""`slm plan`: parsing and printing only; the work is slmkit.plan.run."""

from __future__ import annotations

import sys
from pathlib import Path

from .cli_common import set_threads


def plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="a device budget in, the best measured model that meets it out (or why none "
                       "can)")
    p.add_argument("model", nargs="?", default=None, help="the float model to start from (default SmolLM2-135M)")
    lim = p.add_argument_group("budget (units optional: 60MB, 0.2s, 20tok/s)")
    lim.add_argument("--max-file-mb", help="the artifact's size (MB = 10^6 bytes)")
    lim.add_argument("--max-memory-mb", help="resident memory with a full --context KV cache")
    lim.add_argument("--min-decode-tps", help="decode tokens/s")
    lim.add_argument("--max-ttft-ms", help="time to first token for a --prompt-tokens prompt")
    q = lim.add_mutually_exclusive_group()
    q.add_argument("--max-kl", help="mean KL(base || model) on WikiText-2 test, nats/token")
    q.add_argument("--max-ppl-increase", help="perplexity increase over the base in percent (e.g. 5%%)")
    lim.add_argument("--min-task-acc", action="append", default=[], metavar="TASK:ACC",
                     help="multiple-choice accuracy floor, e.g. arc_easy:0.4 (repeatable)")
    lim.add_argument("--max-energy-j-per-token", help="measured energy per decoded token (needs RAPL or NVML)")
    p.add_argument("--context", type=int, default=2048, help="KV cache the memory budget holds (default 2048)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for TTFT (default 128)")
    p.add_argument("--backend", choices=("torch", "llamacpp"), default="torch")
    p.add_argument("--objective", choices=("quality", "speed", "size"), default="quality",
                   help="what to maximise among models that meet the budget (default quality)")
    p.add_argument("--methods", default="rtn,gptq,awq+gptq", help="quantization methods searched (comma list)")
    p.add_argument("--kv-bits", default=None, help="KV-cache widths searched, e.g. 16,8 (default: the table's "
                   "16,8,4)")
    p.add_argument("--finalists", type=int, default=3, help="best predicted weight choices built and measured "
                   "(the naive recipes predicted to fit are measured too)")
    p.add_argument("--max-builds", type=int, default=6, help="most candidates built in all")
    p.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 test windows of 512 tokens for quality")
    p.add_argument("--explain", action="store_true", help="print why each family was kept or dropped")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("-o", "--out", required=True, type=Path, help="folder: the model, plan.json, plan.md, plan.png")


def cmd_plan(args) -> None:
    from .plan.budget import Budget, quantity, task_floor
    from .plan.report import explain
    from .plan.run import PlanSettings, plan
    from .plan.search import Infeasible

    set_threads(args)
    budget = Budget(quantity(args.max_file_mb, "size", "--max-file-mb"),
                    quantity(args.max_memory_mb, "size", "--max-memory-mb"),
                    quantity(args.min_decode_tps, "speed", "--min-decode-tps"),
                    quantity(args.max_ttft_ms, "time", "--max-ttft-ms"), quantity(args.max_kl, "kl", "--max-kl"),
                    quantity(args.max_ppl_increase, "percent", "--max-ppl-increase"),
                    tuple(task_floor(t) for t in args.min_task_acc),
                    quantity(args.max_energy_j_per_token, "energy", "--max-energy-j-per-token"),
                    args.context, args.prompt_tokens, args.backend, args.objective)
    settings = PlanSettings(methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                            kv_bits=_ints(args.kv_bits, "--kv-bits"), finalists=args.finalists, max_builds=args.max_builds, windows=args.eval_windows)
    try:
        report = plan(args.model, budget, args.out, settings, args.force, sys.argv)
    except Infeasible as exc:
        if args.explain:
            print(explain(exc.report), file=sys.stderr)
        raise
    if args.explain:
        print(explain(report), file=sys.stderr)
    chosen = report["chosen"]
    margins = ", ".join(f"{f} {m * 100:+.1f}%" for f, m in chosen["margins"].items())
    print(f"{args.out / chosen['artifact']}  ({chosen['name']}; margins: {margins})")



def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    from .errors import require

    if text is None:
        return None
    parts = [t.strip() for t in text.split(",") if t.strip()]
    require(bool(parts) and all(t.isdigit() for t in parts), f"{flag}: {text!r} is not a comma list of integers")
    return tuple(int(t) for t in parts)
