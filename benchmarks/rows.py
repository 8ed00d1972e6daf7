"""What the per-row benchmark scripts (prune_table.py, quant_table.py) share: one row per fresh process, and
the fidelity figures every row reports against a cached reference."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

FIDELITY_KEYS = ("perplexity", "kl_divergence", "top1_agreement", "reference_perplexity")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_rows(script: str, names: list[str], args, header: str, line) -> list[dict]:
    """Every row in its own process, one after the other, sharing a temporary work folder (args.work);
    prints the Markdown header, then line(row) as each row finishes; writes the rows to args.json if given."""
    rows = []
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        print(header, flush=True)
        for name in names:
            rows.append(run_row(script, name, args))
            print(line(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def run_row(script: str, row: str, args) -> dict:
    """`script --row ROW` in a fresh process (its own peak RSS); its last stdout line is the row as JSON."""
    cmd = [sys.executable, script, "--row", row, "--work", args.work, "--max-windows", str(args.max_windows),
           "--calib-samples", str(args.calib_samples)]
    return last_json(cmd)


def last_json(cmd: list[str]) -> dict:
    """Run cmd; its last stdout line, parsed as JSON."""
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fidelity_row(lm, text, protocol, cache, reference: str) -> dict:
    """PPL, KL and top-1 of lm against the reference log-probabilities cached in `cache` (never rerun)."""
    from slmkit.eval.fidelity import fidelity

    f = fidelity(lm.model, None, lm.tokenizer, lm.tokenizer, text, protocol, cache, reference)
    return {k: f[k] for k in FIDELITY_KEYS}


def row_parser(description: str):
    """The options both scripts take; `--row` / `--work` are internal (one row in a child process)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--max-windows", type=int, default=40, help="WikiText-2 test windows of 512 tokens")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration samples of 512 tokens")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return parser
