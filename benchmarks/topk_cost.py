"""What top-k truncation of the teacher costs in KL: for a student and a teacher on the same held-out text,
the full-vocabulary forward KL(teacher || student) per token beside the KL over the teacher's top-k tokens and
one remainder bin (what --kd-topk K trains on), and the teacher mass the top k keep.

By the chain rule of KL, full KL = top-k KL + r * KL(teacher's rest || student's rest), r the remainder mass;
the kept tokens' terms are exact, so what truncation leaves out is the divergence *inside* the remainder, and
the column 'left out' is that share of the full KL.

    python benchmarks/topk_cost.py --student PRUNED [--teacher MODEL] [--ks 8,16,64,256] [--windows 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", default=None, help="default: the default model")
    p.add_argument("--ks", default="8,16,64,256")
    p.add_argument("--windows", type=int, default=8, help="windows of 512 WikiText-2 validation tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from slmkit.distill.divergence import kl, topk_bins, topk_target
    from slmkit.eval.data import read_text
    from slmkit.loader import load

    torch.set_num_threads(args.threads)
    student, teacher = load(args.student), load(args.teacher)
    ids = torch.tensor(student.tokenizer.encode(read_text("wikitext2-valid").text)[: args.windows * 512])
    ks = [int(k) for k in args.ks.split(",")]
    full, binned, kept = 0.0, {k: 0.0 for k in ks}, {k: 0.0 for k in ks}
    with torch.no_grad():
        for window in ids.view(args.windows, 512):
            s = torch.log_softmax(student.model(window[None])[0].float(), -1)  # [512, V]
            t = torch.log_softmax(teacher.model(window[None])[0].float(), -1)
            full += float(kl(t, s).sum())
            for k in ks:
                index, values, rest = topk_target(t, k)
                sb, tb = topk_bins(s, index, values, rest)
                binned[k] += float(kl(tb, sb).sum())
                kept[k] += float(values.exp().sum())
    n = ids.numel()
    rows = [{"k": k, "full_kl": full / n, "topk_kl": binned[k] / n, "left_out": 1 - binned[k] / full,
             "kept_mass": kept[k] / n} for k in ks]
    print(f"student {args.student}, teacher {teacher.source}, {n} tokens of WikiText-2 validation")
    print("| k | full KL (nats/token) | top-k + remainder KL | left out | teacher mass kept |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['full_kl']:.4f} | {r['topk_kl']:.4f} | {r['left_out']:.1%} | {r['kept_mass']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "tokens": n}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
