"""Quantization of the default model (SmolLM2-135M-Instruct): slmkit's GGUF exports against llama.cpp's own
quantizer on the same F32 base, measured by llama.cpp; and slmkit's 3- and 2-bit formats in slmkit's runtime.

The F32 base is the default model's Q4_1 weights dequantized (see ../shared/reference/README.md), written as
an F32 GGUF by `slm export --format gguf --type F32`. Rows:

* `llama.cpp TYPE`: `llama_cpp.llama_model_quantize` of the F32 base (no imatrix), run by llama.cpp;
* `slmkit METHOD TYPE`: slmkit's pipeline on the same weights (RTN, GPTQ or AWQ; the tied embedding table in
  8-bit groups of 32 = Q8_0, as llama.cpp stores it), exported to GGUF code for code (`slm export`), run by
  llama.cpp through llama-cpp-python; `slmkit Q4_K_M` quantizes the float model on export;
* `slmkit METHOD int3/int2`: 3- and 2-bit asymmetric groups of 32 (no GGUF type holds them), run by slmkit.

Every row runs in its own process (its peak RSS is its own): build the weights (timed: calibration and
quantization), write the file, then perplexity on the shared WikiText-2 protocol (512-token windows, no BOS,
the first --max-windows windows of the test text) and KL(F32 base || row) with top-1 agreement on the same
windows; the reference log-probabilities come from slmkit's evaluator on the F32 base, computed once.
Calibration: --calib-samples x 512 tokens of WikiText-2 *valid*, never the scored test windows.

    python benchmarks/quant_table.py [--max-windows 40] [--calib-samples 128] [--rows NAME,...] [--json out.json]
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rows import fidelity_row, peak_rss_mb, row_parser, run_rows  # noqa: E402  (benchmarks/rows.py)

from slmkit.backends import load  # noqa: E402
from slmkit.calib import CalibConfig, calibration_tokens  # noqa: E402
from slmkit.checkpoint import export_gguf, save_checkpoint  # noqa: E402
from slmkit.eval.data import read_text  # noqa: E402
from slmkit.eval.fidelity import reference_logprobs  # noqa: E402
from slmkit.eval.perplexity import PerplexityProtocol, window_sequences  # noqa: E402
from slmkit.gguf_io import read_header  # noqa: E402
from slmkit.pipeline import apply_step_  # noqa: E402
from slmkit.quant import AWQConfig, GPTQConfig, QScheme, RTNConfig  # noqa: E402

REFERENCE = "F32 base (benchmarks/quant_table.py)"
LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}
METHODS = {"RTN": lambda s, cal: [RTNConfig(s, search=False)], "GPTQ": lambda s, cal: [GPTQConfig(s, calib=cal)],
           "GPTQ-search": lambda s, cal: [GPTQConfig(s, calib=cal, search=True)],
           "GPTQ-search-refit": lambda s, cal: [GPTQConfig(s, calib=cal, search=True, refit=3)],
           "AWQ": lambda s, cal: [AWQConfig(s, calib=cal)],
           "AWQ+GPTQ": lambda s, cal: [AWQConfig(s, quantize=False, calib=cal), GPTQConfig(s, calib=cal)]}
GGUF_SCHEMES = {"Q8_0": QScheme(8, 32, True), "Q4_0": QScheme(4, 32, True)}
LOW_BITS = {"int3": QScheme(3, 32, False), "int2": QScheme(2, 32, False)}
ROWS = (["F32 base"] + [f"llama.cpp {t}" for t in LLAMA_FTYPES] + ["slmkit RTN Q8_0", "slmkit Q4_K_M"]
        + [f"slmkit {m} Q4_0" for m in ("RTN", "GPTQ", "GPTQ-search", "GPTQ-search-refit", "AWQ", "AWQ+GPTQ")]
        + [f"slmkit {m} {b}" for b in LOW_BITS for m in ("RTN", "GPTQ", "AWQ")])


def base_gguf(work: Path) -> Path:
    """The F32 base: the default model's weights as slmkit loads them, written as an F32 GGUF."""
    path = work / "base-f32.gguf"
    if not path.exists():
        lm = load(None)
        export_gguf(lm.model, lm.tokenizer, path, "F32")
    return path


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def build_row(row: str, work: Path, calib_samples: int) -> tuple[Path, str]:
    """Write the row's model (timed by the caller); returns (path, backend that runs it)."""
    base = base_gguf(work)
    kind, *rest = row.split()
    if row == "F32 base":
        return base, "llamacpp"
    if kind == "llama.cpp":
        llama_quantize(base, work / "row.gguf", LLAMA_FTYPES[rest[0]])
        return work / "row.gguf", "llamacpp"
    lm = load(base)
    if rest == ["Q4_K_M"]:
        return export_gguf(lm.model, lm.tokenizer, work / "row.gguf", "Q4_K_M", force=True), "llamacpp"
    method, fmt = rest
    scheme = GGUF_SCHEMES.get(fmt) or LOW_BITS[fmt]
    cal = CalibConfig(samples=calib_samples)
    steps = METHODS[method](scheme, cal)
    tokens = calibration_tokens(lm.tokenizer, cal) if any(getattr(s, "needs_calibration", False) for s in steps) \
        else None
    for step in steps:
        apply_step_(lm.model, step, tokens)
    if fmt in GGUF_SCHEMES:
        return export_gguf(lm.model, lm.tokenizer, work / "row.gguf", fmt, force=True), "llamacpp"
    return save_checkpoint(lm.model, lm.tokenizer, work / "row-ckpt", force=True), "torch"


def base_parameters(work: Path) -> int:
    """Parameters of the F32 base, counted from its GGUF header (every tensor, the tied table once)."""
    return sum(math.prod(t.shape) for t in read_header(base_gguf(work))[1])


def file_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else (path / "model.safetensors").stat().st_size


def measure_row(row: str, args) -> dict:
    work = Path(args.work)
    start = time.perf_counter()
    path, backend = build_row(row, work, args.calib_samples)
    result = {"name": row, "build_s": time.perf_counter() - start, "build_peak_rss_mb": peak_rss_mb(),
              "file_mb": file_bytes(path) / 1e6, "evaluated_by": "llama.cpp" if backend == "llamacpp" else "slmkit"}
    lm = load(path, backend=backend, threads=2) if backend == "llamacpp" else load(path)
    result["bits_per_weight"] = 8 * file_bytes(path) / base_parameters(work)
    return {**result, **quality(lm, row, work, args.max_windows)}


def quality(lm, row: str, work: Path, windows: int) -> dict:
    protocol, text = PerplexityProtocol(512, None, windows, False), read_text("wikitext2")
    if not (work / "reference.done").exists():  # the F32 base in slmkit's evaluator fills the cache, once
        ref = load(base_gguf(work))
        _, _, sequences, firsts = window_sequences(ref.tokenizer, text, protocol)
        reference_logprobs(ref.model, sequences, firsts, work, REFERENCE)
        (work / "reference.done").touch()
    return fidelity_row(lm, text, protocol, work, REFERENCE)


def table_line(r: dict, base_ppl: float) -> str:
    return (f"| {r['name']} | {r['evaluated_by']} | {r['bits_per_weight']:.2f} | {r['file_mb']:.1f} | "
            f"{r['perplexity']:.3f} ({100 * (r['perplexity'] / base_ppl - 1):+.1f}%) | {r['kl_divergence']:.4f} | "
            f"{100 * r['top1_agreement']:.1f}% | {r['build_s']:.0f} | {r['build_peak_rss_mb']:.0f} |")


def main() -> None:
    parser = row_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.row:
        print(json.dumps(measure_row(args.row, args)))
        return
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    assert not unknown, f"unknown rows {unknown}; rows: {ROWS}"
    header = ("| weights | run by | bits/weight (file) | file MB | PPL | KL vs F32 | top-1 | build s | "
              "build peak RSS MB |\n|---|---|---|---|---|---|---|---|---|")
    run_rows(__file__, rows, args, header, lambda r: table_line(r, r["reference_perplexity"]))

if __name__ == "__main__":
    main()
