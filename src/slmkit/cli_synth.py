"""`slm synth`: parsing and printing only; the work is done by slmkit.synth."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli_common import set_threads


def synth_parser(sub) -> None:
    from .backends import BACKENDS
    from .loader import DTYPES

    s = sub.add_parser("synth", help="teacher-made instruction data (Self-Instruct) from seed tasks, as chat JSONL")
    s.add_argument("--teacher", default=None, help="the model that writes the data (default: SmolLM2-135M-Instruct)")
    s.add_argument("--seeds", required=True, help="seed tasks, JSONL with 'instruction' (Self-Instruct / Alpaca "
                   "seed_tasks.jsonl)")
    s.add_argument("-n", type=int, required=True, help="records to keep")
    s.add_argument("-o", "--out", required=True, help="output chat JSONL (written as OUT.partial until complete)")
    s.add_argument("-k", type=int, default=3, help="seed tasks shown per request (default 3; plus up to 2 kept ones)")
    s.add_argument("--threshold", type=float, default=0.7, help="ROUGE-L F at or above which a new instruction is "
                   "a near-duplicate of a kept one or a seed (default 0.7)")
    s.add_argument("--rationale", action="store_true", help="the teacher explains step by step, then answers; the "
                   "record's reply holds both")
    s.add_argument("--given", action="store_true", help="answer the seeds' own instructions (file order) instead "
                   "of generating new ones")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--max-new-tokens", type=int, default=256, help="per teacher reply (default 256)")
    s.add_argument("--seed", type=int, default=0, help="the job's seed; each request's comes from it and its number")
    s.add_argument("--max-attempts", type=int, default=None, help="stop after this many requests (default 10 n + 10)")
    s.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the teacher's weights (default bfloat16)")
    s.add_argument("--backend", choices=BACKENDS, default="torch")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--resume", action="store_true", help="continue an interrupted job from OUT.partial (same "
                   "settings)")
    s.add_argument("--force", action="store_true", help="start over, replacing OUT and any interrupted job")
    s.add_argument("--json", default=None, help="also write the job's summary (counts, rejections, settings) here")


def cmd_synth(args) -> None:
    from .files import write_atomic
    from .synth import SynthConfig, synthesize

    set_threads(args)
    cfg = SynthConfig(args.n, args.k, 2, args.threshold, args.seed, args.temperature, args.top_p,
                      args.max_new_tokens, args.rationale, args.given, args.max_attempts)
    summary = synthesize(args.seeds, args.out, cfg, args.teacher, force=args.force, resume=args.resume,
                         dtype=args.dtype, backend=args.backend)
    rejected = ", ".join(f"{r} {n}" for r, n in sorted(summary["rejected"].items(), key=lambda kv: -kv[1]))
    short = "" if summary["complete"] else f" (fewer than the {summary['n']} asked: attempt limit reached)"
    print(f"[kept {summary['kept']} of {summary['attempts']} attempts{short} in {summary['seconds']:.1f} s; "
          f"rejected: {rejected or 'none'}]", file=sys.stderr)
    if args.json:
        print(f"[wrote {write_atomic(Path(args.json), (json.dumps(summary, indent=1) + chr(10)).encode())}]",
              file=sys.stderr)
    print(summary["out"])
