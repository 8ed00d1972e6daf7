"""Unstructured and 2:4 pruning of the default model (SmolLM2-135M-Instruct): quality, cost and file size.

Rows: the dense model, then magnitude / Wanda / SparseGPT at 50% unstructured sparsity (per output row) and at
2:4. Every row runs in its own Python process, so its peak RSS is its own: load the float32 model, draw the
calibration tokens, prune (timed: the calibration passes and the pruning), then measure

* perplexity on the shared WikiText-2 protocol (512-token windows, no BOS, the first --max-windows windows of
  the test text), KL(dense || pruned) and top-1 agreement on the same windows (slmkit.eval.fidelity; the dense
  row computes the reference log-probabilities once into a cache the other rows read);
* the fraction of linear-layer weights that are exactly zero (slmkit.info.zero_fractions);
* the size of model.safetensors saved with sparse storage (bitmask + nonzero values; the dense row: dense).

    python benchmarks/prune_table.py [--max-windows 40] [--calib-samples 128] [--json out.json]

Calibration: 128 x 512 tokens of WikiText-2 *valid* (`wikitext2-valid`), never the test windows that are scored.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rows import fidelity_row, peak_rss_mb, row_parser, run_rows  # noqa: E402  (benchmarks/rows.py)

from slmkit.calib import CalibConfig, calibration_tokens  # noqa: E402
from slmkit.checkpoint import save_checkpoint  # noqa: E402
from slmkit.eval.data import read_text  # noqa: E402
from slmkit.eval.fidelity import reference_logprobs  # noqa: E402
from slmkit.eval.perplexity import PerplexityProtocol, perplexity, window_sequences  # noqa: E402
from slmkit.info import zero_fractions  # noqa: E402
from slmkit.loader import load  # noqa: E402
from slmkit.pipeline import apply_step_  # noqa: E402
from slmkit.prune import PruneConfig  # noqa: E402

ROWS = ["dense"] + [f"{a} {s}" for a in ("magnitude", "wanda", "sparsegpt") for s in ("50%", "2:4")]
REFERENCE = "dense float32 (benchmarks/prune_table.py)"


def step(row: str, calib_samples: int) -> PruneConfig:
    algorithm, shape = row.split()
    sparsity = {"sparsity": 0.5} if shape == "50%" else {"pattern": (2, 4)}
    return PruneConfig(algorithm, **sparsity, calib=CalibConfig(samples=calib_samples))


def file_mb(model, tokenizer, folder: Path, sparse: bool) -> float:
    out = save_checkpoint(model, tokenizer, folder, force=True, sparse_storage=sparse)
    return (out / "model.safetensors").stat().st_size / 1e6


def measure_row(row: str, args) -> dict:
    """One row, in this process: load, prune (timed), measure."""
    lm = load(None)
    result = {"name": row, "prune_s": 0.0}
    if row != "dense":
        cfg = step(row, args.calib_samples)
        calib = calibration_tokens(lm.tokenizer, cfg.calib)
        start = time.perf_counter()
        apply_step_(lm.model, cfg, calib)
        result["prune_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()  # load + calibration + pruning, before evaluation
    result["zeros"] = zero_fractions(lm.model)[0]
    result["file_mb"] = file_mb(lm.model, lm.tokenizer, Path(args.work) / "ckpt", sparse=row != "dense")
    return {**result, **quality(lm, row, args)}


def quality(lm, row: str, args) -> dict:
    """Perplexity, KL and top-1 on the shared protocol; the dense row fills the reference cache."""
    protocol, text = PerplexityProtocol(512, None, args.max_windows, False), read_text("wikitext2")
    cache = Path(args.work)
    if row == "dense":
        _, _, sequences, firsts = window_sequences(lm.tokenizer, text, protocol)
        reference_logprobs(lm.model, sequences, firsts, cache, REFERENCE)
        ppl = perplexity(lm.model, lm.tokenizer, text, protocol)["perplexity"]
        return {"perplexity": ppl, "kl_divergence": 0.0, "top1_agreement": 1.0, "reference_perplexity": ppl}
    # the cache holds the reference's log-probabilities for these windows, so the reference model is never run
    return fidelity_row(lm, text, protocol, cache, REFERENCE)


def table_line(r: dict) -> str:
    return (f"| {r['name']} | {100 * r['zeros']:.2f}% | {r['perplexity']:.3f} | {r['kl_divergence']:.4f} | "
            f"{100 * r['top1_agreement']:.1f}% | {r['prune_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['file_mb']:.1f} |")


def main() -> None:
    parser = row_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.row:
        print(json.dumps(measure_row(args.row, args)))
        return
    header = ("| model | zeros | PPL | KL vs dense | top-1 | prune s | peak RSS MB | file MB |\n"
              "|---|---|---|---|---|---|---|---|")
    rows = run_rows(__file__, ROWS, args, header, table_line)
    # every row was compared with the same reference (its cached log-probabilities are stored as float32)
    assert all(abs(r["reference_perplexity"] / rows[0]["perplexity"] - 1) < 1e-4 for r in rows), "reference drift"


if __name__ == "__main__":
    main()
