"""Speculative decoding speed on the default model: plain greedy decoding against prompt lookup (an
input-grounded task: rewrite a given passage) and against a draft model, with the acceptance rates; each
speculative output must equal the plain greedy one token for token.

The target is the default model in bf16 (slm generate's default). Passages: the first paragraphs of
WikiText-2 test longer than 400 characters (speed only; no quality is measured), each asked to be rewritten
in plain words through the chat template; max 128 new tokens. Drafts: prompt lookup (n-grams up to 3) and
--draft MODEL (e.g. `slm quantize --method rtn --bits 4 -o rtn4`, or a pruned + distilled copy). Each setting
runs every passage once per round; rounds alternate the order; tokens/s are summed over the passages.

    python benchmarks/spec_speed.py [--draft rtn4] [--k 4,8] [--passages 4] [--rounds 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from slmkit.collab import DraftModel, PromptLookup, SpecStats, speculative_generate
from slmkit.eval.data import shared_data_dir
from slmkit.generate import GenerationConfig, Timings, generate
from slmkit.loader import load


def passages(n: int) -> list[str]:
    text = (shared_data_dir() / "wikitext2" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    paras = [p.strip() for p in text.replace("\r\n", "\n").split("\n") if len(p.strip()) > 400 and not p.startswith(" =")]
    return [p[:1200] for p in paras[:n]]


def run(setting, lm, ids: list[int], cfg: GenerationConfig, k: int) -> tuple[list[int], float, SpecStats]:
    stats, t = SpecStats(), Timings()
    start = time.perf_counter()
    if setting is None:
        out = list(generate(lm.model, ids, cfg, t))
    else:
        out = list(speculative_generate(lm.model, ids, cfg, setting, k, t, stats))
    return out, time.perf_counter() - start - t.prefill_s, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", default=None, help="a draft model (same vocabulary)")
    ap.add_argument("--k", default="4,8", help="draft lengths")
    ap.add_argument("--passages", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(None, torch.bfloat16)
    tok = lm.tokenizer
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": f"Rewrite this passage in plain words:\n\n{p}"}]))
               for p in passages(args.passages)]
    cfg = GenerationConfig(args.max_new_tokens, stop_ids=tok.stop_ids())
    ks = [int(k) for k in args.k.split(",")]
    settings = {"plain": (None, 1)}
    settings.update({f"prompt lookup k={k}": (PromptLookup(3), k) for k in ks})
    if args.draft:
        draft = load(args.draft, torch.bfloat16).model.eval()
        settings.update({f"draft {Path(args.draft).name} k={k}": (DraftModel(draft, 4096), k) for k in ks})
    totals = {name: {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "steps": 0, "identical": True}
              for name in settings}
    reference = {}
    for r in range(args.rounds):
        order = list(settings) if r % 2 == 0 else list(settings)[::-1]
        for i, ids in enumerate(prompts):
            for name in order:
                drafter, k = settings[name]
                out, seconds, stats = run(drafter, lm, ids, cfg, k)
                ref = reference.setdefault(i, out if name == "plain" else None)
                tot = totals[name]
                tot["tokens"] += len(out)
                tot["seconds"] += seconds
                tot["drafted"], tot["accepted"], tot["steps"] = (tot["drafted"] + stats.drafted,
                                                                 tot["accepted"] + stats.accepted, tot["steps"] + stats.steps)
                reference[i] = ref
                tot.setdefault("outputs", {})[i] = out
                print(f"[round {r + 1}] passage {i}: {name}: {len(out)} tokens, {len(out) / seconds:.1f} tok/s",
                      file=sys.stderr)
    for name, tot in totals.items():
        tot["identical"] = all(tot["outputs"][i] == totals["plain"]["outputs"][i] for i in tot["outputs"])
    base = totals["plain"]["tokens"] / totals["plain"]["seconds"]
    print(f"\n{len(prompts)} passages, {args.rounds} round(s), {args.threads} threads, bf16 target, greedy\n")
    print("| decoding | decode tok/s | speed-up | drafts kept | tokens per target forward | output = plain greedy |")
    print("|---|---|---|---|---|---|")
    for name, tot in totals.items():
        tps = tot["tokens"] / tot["seconds"]
        kept = f"{tot['accepted'] / tot['drafted']:.0%}" if tot["drafted"] else "–"
        per = f"{tot['tokens'] / max(tot['steps'] + len(prompts) * args.rounds, 1):.2f}" if tot["steps"] else "1.00"
        print(f"| {name} | {tps:.1f} | {tps / base:.2f}× | {kept} | {per} | {'yes' if tot['identical'] else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({n: {k: v for k, v in t.items() if k != "outputs"}
                                               for n, t in totals.items()}, indent=1))


if __name__ == "__main__":
    main()
