"""Fidelity of a (compressed) model against its reference on the same tokens: KL divergence, top-1 agreement,
and the change in perplexity, in the manner of llama.cpp's --kl-divergence."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import SlmError, require
from ..files import atomic_output
from ..progress import progress
from .data import Text
from .perplexity import PerplexityProtocol, protocol_record, window_sequences
from .scoring import score


def check_same_tokenizer(tokenizer, reference_tokenizer) -> None:
    """Fidelity compares distributions token by token: both models must share one vocabulary."""
    if tokenizer.backend.get_vocab(with_added_tokens=True) != reference_tokenizer.backend.get_vocab(with_added_tokens=True):
        raise SlmError("the reference model has a different tokenizer; KL divergence needs the same vocabulary")


def kl_stats(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(reference || model) in nats and whether both pick the same top token. Inputs [n, V]."""
    kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)  # [n]
    return kl, ref_logprobs.argmax(-1) == logprobs.argmax(-1)


def _cache_file(cache_dir: Path, reference_source: str, sequences: list[list[int]], firsts: list[int]) -> Path:
    key = hashlib.sha256(json.dumps([reference_source, sequences, firsts]).encode()).hexdigest()[:20]
    return cache_dir / f"reference-logprobs-{key}.safetensors"


def reference_logprobs(reference, sequences, firsts, cache_dir: Path | None, source: str) -> list[torch.Tensor]:
    """The reference's float64 log-probabilities [n, V] per window; with a cache folder, stored once as
    float32 safetensors (written atomically) and read back on later runs."""
    path = _cache_file(cache_dir, source, sequences, firsts) if cache_dir else None
    if path is not None and path.is_file():
        cached = load_file(str(path))
        return [cached[str(i)].double() for i in range(len(sequences))]
    result = [score(reference, [seq], 1, first=[f], keep_logprobs=True)[0].logprobs
              for seq, f in progress(list(zip(sequences, firsts)), "reference logits")]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, force=True, is_dir=False) as tmp:
            save_file({str(i): t.float() for i, t in enumerate(result)}, str(tmp))
    return result


def fidelity(model, reference, tokenizer, reference_tokenizer, text: Text, protocol: PerplexityProtocol,
             cache_dir: Path | None = None, reference_source: str = "") -> dict:
    """Mean KL(reference || model), top-1 agreement and Δ perplexity over the protocol's windows."""
    check_same_tokenizer(tokenizer, reference_tokenizer)
    _, _, sequences, firsts = window_sequences(tokenizer, text, protocol)
    ref = reference_logprobs(reference, sequences, firsts, cache_dir, reference_source)
    return {**fidelity_on(model, sequences, firsts, ref), "reference": reference_source,
            "protocol": protocol_record(protocol, text)}


def fidelity_on(model, sequences: list[list[int]], firsts: list[int], ref: list[torch.Tensor]) -> dict:
    """The figures of `fidelity` for token sequences whose reference log-probabilities [n, V] are given."""
    kls, agree, nll, ref_nll = [], [], 0.0, 0.0
    for seq, first, ref_lp in progress(list(zip(sequences, firsts, ref)), "fidelity"):
        ours = score(model, [seq], 1, first=[first], keep_logprobs=True)[0].logprobs  # [n, V]
        kl, same = kl_stats(ref_lp, ours)
        kls.append(kl)
        agree.append(same)
        targets = torch.tensor(seq[first:])[:, None]
        nll -= float(ours.gather(-1, targets).sum())
        ref_nll -= float(ref_lp.gather(-1, targets).sum())
    kl_all, n = torch.cat(kls), sum(len(k) for k in kls)
    require(n > 0, "no tokens scored")
    ppl, ref_ppl = math.exp(nll / n), math.exp(ref_nll / n)
    return {"kl_divergence": float(kl_all.mean()), "kl_divergence_median": float(kl_all.median()),
            "kl_divergence_p99": float(torch.quantile(kl_all.float(), 0.99)),
            "top1_agreement": float(torch.cat(agree).float().mean()), "perplexity": ppl,
            "reference_perplexity": ref_ppl, "delta_perplexity": ppl - ref_ppl,
            "delta_perplexity_pct": 100 * (ppl / ref_ppl - 1), "tokens_scored": n}
