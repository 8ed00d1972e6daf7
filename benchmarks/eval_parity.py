"""slmkit's evaluator beside llama.cpp on the same tokens: WikiText-2 perplexity (the shared 40x512 protocol)
and ARC-Easy accuracy, on the default model. llama.cpp runs an F32 GGUF that slmkit exports of the same weights.

    python benchmarks/eval_parity.py [--windows 40] [--arc-limit 300] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from slmkit.checkpoint import export_gguf  # noqa: E402
from slmkit.eval.data import read_text  # noqa: E402
from slmkit.eval.perplexity import PerplexityProtocol, perplexity, window_sequences  # noqa: E402
from slmkit.eval.tasks import encode_pair, evaluate_task, load_task  # noqa: E402
from slmkit.loader import load  # noqa: E402


def llama_logprobs(llm, tokens: list[int], first: int) -> np.ndarray:
    """log p(token i | tokens < i) for i >= first, from llama.cpp's logits (float64 log-softmax)."""
    llm.reset()
    llm.eval(tokens)
    logits = np.array(llm.scores[:len(tokens)], dtype=np.float64)  # [T, V]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logp[np.arange(first - 1, len(tokens) - 1), tokens[first:]]


def llama_perplexity(llm, lm, windows: int) -> dict:
    _, _, seqs, firsts = window_sequences(lm.tokenizer, read_text("wikitext2"), PerplexityProtocol(512, max_windows=windows))
    lps = np.concatenate([llama_logprobs(llm, s, f) for s, f in zip(seqs, firsts)])
    return {"perplexity": math.exp(-lps.mean()), "mean_nll": float(-lps.mean()), "tokens_scored": len(lps)}


def llama_arc(llm, lm, limit: int) -> dict:
    questions, _ = load_task("arc_easy")
    correct = correct_norm = 0
    for q in questions[:limit]:
        lls = [float(llama_logprobs(llm, *encode_pair(lm.tokenizer, c, x, 512)).sum()) for c, x in q.pairs]
        norms = [v / len(x.encode()) for v, (_, x) in zip(lls, q.pairs)]
        correct += int(np.argmax(lls) == q.answer)
        correct_norm += int(np.argmax(norms) == q.answer)
    return {"acc": correct / limit, "acc_norm": correct_norm / limit, "questions": limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--arc-limit", type=int, default=300)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    lm = load()
    t0 = time.perf_counter()
    ours = {"wikitext2": perplexity(lm.model, lm.tokenizer, read_text("wikitext2"), PerplexityProtocol(512, max_windows=args.windows)),
            "arc_easy": evaluate_task(lm.model, lm.tokenizer, load_task("arc_easy")[0][:args.arc_limit], 16)}
    ours_s = time.perf_counter() - t0
    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(lm.model, lm.tokenizer, Path(tmp) / "f32.gguf", "F32")
        llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, n_threads=2, verbose=False)
        t0 = time.perf_counter()
        theirs = {"wikitext2": llama_perplexity(llm, lm, args.windows), "arc_easy": llama_arc(llm, lm, args.arc_limit)}
        theirs_s = time.perf_counter() - t0
    print(f"SmolLM2-135M-Instruct, WikiText-2 raw test {args.windows}x512 (shared protocol), ARC-Easy first {args.arc_limit}")
    print("| engine | WikiText-2 PPL | mean NLL | ARC-Easy acc | acc_norm | seconds |\n|---|---|---|---|---|---|")
    for name, r, s in (("slmkit fp32", ours, ours_s), ("llama.cpp F32 (same tokens)", theirs, theirs_s)):
        w, a = r["wikitext2"], r["arc_easy"]
        print(f"| {name} | {w['perplexity']:.4f} | {w['mean_nll']:.5f} | {a['acc']:.4f} | {a['acc_norm']:.4f} | {s:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"slmkit": ours, "llama.cpp": theirs}, indent=2, default=str))


if __name__ == "__main__":
    main()
