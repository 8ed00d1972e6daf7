"""`slm cascade calibrate`: parsing and printing only; the work is slmkit.collab.calibrate."""

from __future__ import annotations

from pathlib import Path

from .cli_common import set_threads
from .errors import require


def cascade_parser(sub) -> None:
    from .loader import DTYPES

    c = sub.add_parser("cascade", help="small -> large model cascades")
    cs = c.add_subparsers(dest="cascade_command", required=True)
    cal = cs.add_parser("calibrate", help="measure both models on a labelled set; choose the threshold")
    cal.add_argument("small", help="the model that answers first")
    cal.add_argument("large", nargs="?", default=None, help="the model unconfident answers go to (default: "
                     "SmolLM2-135M-Instruct)")
    cal.add_argument("--task", default="arc_easy", help="arc_easy, a multiple-choice JSONL, seed_tasks or an "
                     "instruction JSONL with reference outputs (default arc_easy)")
    cal.add_argument("--limit", type=int, default=None, help="the first N examples")
    goal = cal.add_mutually_exclusive_group()
    goal.add_argument("--escalate", type=float, default=None, help="target share sent to the large model (0..1)")
    goal.add_argument("--target-quality", type=float, default=None, help="target accuracy / ROUGE-L")
    cal.add_argument("--quantile", type=float, default=0.1, help="generation: the log-probability quantile used "
                     "as confidence (default 0.1)")
    cal.add_argument("--max-new-tokens", type=int, default=64)
    cal.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    cal.add_argument("--threads", type=int, default=None)
    cal.add_argument("-o", "--out", required=True, help="folder for cascade.json, cascade.md, cascade.png")


def cmd_cascade(args) -> None:
    from .collab.calibrate import _num, calibrate, write_report
    from .loader import DTYPES, load

    require(args.limit is None or args.limit > 0, f"--limit must be positive, got {args.limit}")
    require(args.escalate is None or 0 <= args.escalate <= 1, f"--escalate must be in [0, 1], got {args.escalate}")
    require(0 <= args.quantile <= 1, f"--quantile must be in [0, 1], got {args.quantile}")
    require(1 <= args.max_new_tokens <= 4096, f"--max-new-tokens must be between 1 and 4096, got {args.max_new_tokens}")
    set_threads(args)
    small, large = (load(spec, DTYPES[args.dtype]) for spec in (args.small, args.large))
    escalate = args.escalate if args.target_quality is None and args.escalate is not None else None
    if escalate is None and args.target_quality is None:
        escalate = 0.3
    report = calibrate(small, large, args.task, args.limit, escalate, args.target_quality, args.quantile,
                       args.max_new_tokens)
    for path in write_report(report, Path(args.out)):
        print(path)
    print(f"threshold {report['threshold']:.4f}: {report['escalated']:.1%} escalated, quality {report['quality']:.4f} "
          f"(small {report['weak_quality']:.4f}, large {report['strong_quality']:.4f}); APGR {_num(report['apgr'])}")
