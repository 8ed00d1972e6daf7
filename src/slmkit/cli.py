"""The `slm` command line: parsing and printing only; the work is done by the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


from .backends import BACKENDS
from .cli_common import set_threads as _set_threads
from .cli_cascade import cascade_parser, cmd_cascade
from .cli_plan import cmd_plan, plan_parser
from .cli_serve import cmd_serve, serve_parser
from .cli_synth import cmd_synth, synth_parser
from .cli_train import cmd_merge, cmd_train, merge_parser, train_parser
from .errors import SlmError, require
from .loader import DTYPES


def _model_args(p: argparse.ArgumentParser, dtype: str = "float32") -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="path (.gguf, Hugging Face folder, slmkit checkpoint), known name or hub id; "
                        "default: SmolLM2-135M-Instruct")
    p.add_argument("--dtype", choices=DTYPES, default=dtype, help=f"weight dtype in memory (default {dtype})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")


def _backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="engine: torch (slmkit's own, default) or "
                   "llamacpp (a GGUF file as stored, through llama-cpp-python; --dtype does not apply)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", default=None, metavar="MODEL", help="speculative decoding with this draft model (same "
                   "vocabulary; e.g. a pruned or low-bit copy of MODEL)")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N", help="speculative decoding with drafts "
                   "looked up after the last n-gram (n <= N) in the text so far")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens drafted per verification "
                   "(default 4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm", description="slmkit: the small language model kit")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="architecture, parameters, bytes, context length")
    _model_args(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    gen = sub.add_parser("generate", help="generate text from a prompt (text on stdout, timings on stderr)")
    _model_args(gen, dtype="bfloat16")
    _backend_arg(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _sampling_args(gen)
    _speculative_args(gen)
    chat = sub.add_parser("chat", help="interactive chat on the terminal (/exit or Ctrl-D to leave)")
    _model_args(chat, dtype="bfloat16")
    _backend_arg(chat)
    chat.add_argument("--system", default=None, help="system message")
    _sampling_args(chat)
    _eval_parsers(sub)
    _compress_parsers(sub)
    train_parser(sub)
    merge_parser(sub)
    synth_parser(sub)
    serve_parser(sub)
    cascade_parser(sub)
    plan_parser(sub)
    t = sub.add_parser("techniques", help="the taxonomy: each technique, its stage, the constraints it serves, "
                       "the metric that shows it, the verb")
    t.add_argument("--constraint", default=None, help="only those serving this constraint (memory, storage, "
                   "latency, energy, 'training compute', privacy)")
    t.add_argument("--json", action="store_true", help="print one JSON list")
    _recipe_parser(sub)
    return parser


def _recipe_parser(sub) -> None:
    r = sub.add_parser("compress", help="run a recipe (JSON or YAML list of steps: prune, distill, qat, quantize, "
                       "export) as one recorded pipeline")
    r.add_argument("recipe", help="the recipe file")
    r.add_argument("model", nargs="?", default=None, help="the model to start from (default: the recipe's, else "
                   "SmolLM2-135M-Instruct)")
    r.add_argument("-o", "--out", required=True, help="output slmkit checkpoint folder")
    r.add_argument("--measure", action="store_true", help="measure size, WikiText-2 PPL, KL against the input "
                   "and decode tok/s after every step (OUT/recipe.md, OUT/recipe.json)")
    r.add_argument("--force", action="store_true", help="replace OUT (and the export) if they exist")
    r.add_argument("--resume", action="store_true", help="continue a failed or interrupted run after the last step "
                   "it finished (kept in OUT.steps/)")
    r.add_argument("--threads", type=int, default=None)


def cmd_compress(args) -> None:
    from .recipe import read_recipe, run_recipe
    from .recipe.run import Measure

    recipe = read_recipe(args.recipe, args.model)  # every step and its order checked before any work
    _set_threads(args)
    result = run_recipe(recipe, args.out, args.force, Measure() if args.measure else None, resume=args.resume)
    if result["rows"]:
        from .recipe.run import markdown

        print(markdown(result["rows"]), file=sys.stderr)
    if result["export"]:
        print(f"[exported {result['export']}]", file=sys.stderr)
    print(result["checkpoint"])


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="wikitext2-valid", help="calibration text: a named source, file, folder or "
                   "hub dataset (default wikitext2-valid, not the test text perplexity is measured on)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-length", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("-o", "--out", required=True, help="output slmkit checkpoint folder")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--threads", type=int, default=None)


def _compress_parsers(sub) -> None:
    q = sub.add_parser("quantize", help="post-training quantization to packed low-bit weights")
    q.add_argument("model", nargs="?", default=None, help="model to quantize (default: SmolLM2-135M-Instruct)")
    q.add_argument("--method", choices=["rtn", "gptq", "awq", "smoothquant"], default="gptq")
    q.add_argument("--bits", type=int, default=None, help="weight bits, 2..8 (default 4; smoothquant 8)")
    q.add_argument("--group-size", type=int, default=None, help="columns per scale, 0 = per channel "
                   "(default 32; smoothquant 0)")
    q.add_argument("--asym", action="store_true", help="asymmetric (scale + offset) instead of symmetric")
    q.add_argument("--imatrix", action="store_true", help="rtn: weigh the scale search by calibration activations")
    q.add_argument("--no-act-order", action="store_true", help="gptq: columns in their natural order")
    q.add_argument("--awq-scales", action="store_true", help="gptq / rtn: first fold AWQ's activation-aware scales "
                   "into the weights (an AWQ step that quantizes nothing), then quantize")
    q.add_argument("--damp", type=float, default=None, help="gptq: Hessian damping (default 0.01)")
    q.add_argument("--search", action="store_true", help="gptq: also sweep from clip-searched scales (weighted by "
                   "the Hessian diagonal) and keep whichever has the lower layer error")
    q.add_argument("--refit", type=int, default=None, help="gptq: rounds of least-squares scale refit, each "
                   "followed by a sweep with the refitted scales")
    q.add_argument("--alpha", type=float, default=None, help="smoothquant: migration strength (default 0.5)")
    q.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="also store the KV cache in 8 or 4 bits")
    _calib_args(q)
    _prune_parser(sub)
    _export_parser(sub)


def _export_parser(sub) -> None:
    from .prune.compressed_tensors import SPARSE_FORMATS
    from .quant.ggml import FILE_TYPES

    ex = sub.add_parser("export", help="write a model as GGUF (llama.cpp) or a Hugging Face folder")
    _model_args(ex)
    ex.add_argument("--format", choices=["gguf", "hf"], required=True)
    ex.add_argument("--type", default="auto", choices=["auto", *FILE_TYPES, *SPARSE_FORMATS],
                    help="gguf: file type (default auto: the packed weights' own type, F32 for a float model); "
                    "packed codes are written as they are. hf: auto (float, or packed weights in compressed-tensors' "
                    "pack-quantized format) or a compressed-tensors sparse format for a pruned float model")
    ex.add_argument("-o", "--out", required=True, help="output .gguf file or Hugging Face folder")
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="set weights to zero: unstructured or N:M sparsity")
    p.add_argument("model", nargs="?", default=None, help="model to prune (default: SmolLM2-135M-Instruct)")
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], default=None,
                   help="unstructured / N:M criterion (default wanda)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of each row's weights set to zero "
                   "(default 0.5)")
    p.add_argument("--pattern", default=None, help="N:M sparsity instead, e.g. 2:4 (keep 2 of every 4 columns)")
    p.add_argument("--per-layer", action="store_true", help="compare weights across the whole layer, not per row")
    p.add_argument("--damp", type=float, default=None, help="sparsegpt: Hessian damping (default 0.01)")
    p.add_argument("--sparse-storage", action="store_true", help="store the zeros compressed (bitmask + values): "
                   "a smaller file, the same model in memory")
    p.add_argument("--layer-sparsity", default=None, help="layer-wise targets instead of --sparsity: one fraction "
                   "per decoder block, comma-separated (e.g. 0.4,0.45,...,0.6)")
    p.add_argument("--structured", choices=["heads", "mlp", "hidden", "layers", "auto"], default=None,
                   help="structured instead: remove attention heads, MLP channels, hidden channels or whole layers "
                   "(auto: MLP channels to half, then layers), giving a smaller dense model")
    p.add_argument("--ratio", type=float, default=None, help="structured: share of the parameters to remove, in "
                   "(0, 1) (0.25 leaves at most 75%% of what slm info counts)")
    p.add_argument("--target-params", default=None, help="structured: at most this many parameters remain, "
                   "e.g. 90M, 1.2B")
    p.add_argument("--importance", choices=["activation", "magnitude"], default=None, help="structured: rank units "
                   "by calibration activations (default) or by weight magnitude (no data)")
    p.add_argument("--mlp-multiple", type=int, default=8, help="structured: MLP widths are multiples of this "
                   "(default 8; 32 keeps the result quantizable in groups of 32 and as GGUF blocks)")
    _calib_args(p)


def _eval_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="perplexity, multiple-choice accuracy, fidelity against a reference")
    _model_args(ev)
    _backend_arg(ev)
    ev.add_argument("--tasks", default="wikitext2", help="comma-separated: wikitext2, arc_easy, a text file or "
                    "folder (perplexity), a .jsonl of questions (multiple choice)")
    ev.add_argument("--limit", type=int, default=None, help="questions per task / windows per text")
    ev.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    ev.add_argument("--stride", type=int, default=None, help="sliding windows every STRIDE tokens "
                    "(default: non-overlapping)")
    ev.add_argument("--max-windows", type=int, default=None)
    ev.add_argument("--add-bos", action="store_true", help="prepend BOS to every window")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--reference", default=None, help="model to measure KL divergence / top-1 agreement against")
    ev.add_argument("--reference-cache", default=None, help="folder to keep the reference's log-probabilities in")
    ev.add_argument("--json", default=None, help="write the run here (and a Markdown twin)")
    bench = sub.add_parser("bench", help="time to first token, prefill and decode speed, memory, energy")
    _model_args(bench)
    _backend_arg(bench)
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument("--runs", type=int, default=5)
    bench.add_argument("--json", default=None)
    report = sub.add_parser("report", help="comparison table and plots (quality vs size / latency) from runs")
    report.add_argument("runs", nargs="+", help="RUN.json files written by slm eval / slm bench")
    report.add_argument("-o", "--out", required=True, help="output folder")


def _load(args):
    from .backends import load

    _set_threads(args)
    return load(args.model, DTYPES[args.dtype], getattr(args, "backend", "torch"))


def cmd_info(args) -> None:
    from .info import format_info, model_info

    info = model_info(_load(args))
    print(json.dumps(info) if args.json else format_info(info))


def _generation_config(args, tokenizer):
    from .generate import GenerationConfig

    return GenerationConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            tokenizer.stop_ids(), args.seed).validate()


def _stream(lm, prompt_ids: list[int], gen_cfg, tokens=None) -> tuple[str, object]:
    """Generate (or print what `tokens`, a generator filling the returned timings, yields), printing text to
    stdout as it forms; returns (text, timings)."""
    from .generate import TextStream, Timings, generate

    timings, stream, pieces = Timings(), TextStream(lm.tokenizer), []
    for token in (tokens(timings) if tokens else generate(lm.model, prompt_ids, gen_cfg, timings)):
        piece = stream.push(token)
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    return "".join(pieces), timings


def _print_timings(t) -> None:
    print(f"[{t.prompt_tokens} prompt tokens: {t.prefill_s * 1000:.0f} ms to first token "
          f"({t.prefill_tokens_per_s:.0f} tok/s); {t.new_tokens} new tokens at {t.decode_tokens_per_s:.1f} tok/s]",
          file=sys.stderr)


def cmd_generate(args) -> None:
    spec = bool(args.draft or args.prompt_lookup)
    require(not spec or args.backend == "torch", "--draft / --prompt-lookup run on slmkit's own runtime "
            "(--backend torch)")
    require(not (args.draft and args.prompt_lookup), "give --draft or --prompt-lookup, not both")
    require(1 <= args.draft_tokens <= 64, f"--draft-tokens must be between 1 and 64, got {args.draft_tokens}")
    t0 = time.perf_counter()
    lm = _load(args)
    print(f"[loaded {lm.source} in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    text = args.prompt
    if args.chat:
        text = lm.tokenizer.render_chat([{"role": "user", "content": args.prompt}])
    ids = lm.tokenizer.encode(text)
    gen_cfg = _generation_config(args, lm.tokenizer)
    if not spec:
        _, timings = _stream(lm, ids, gen_cfg)
        sys.stdout.write("\n")
        return _print_timings(timings)
    from .collab import SpecStats, make_drafter, speculative_generate

    drafter, stats = make_drafter(lm, args.draft, args.prompt_lookup, DTYPES[args.dtype]), SpecStats()
    _, timings = _stream(lm, ids, gen_cfg, lambda t: speculative_generate(lm.model, ids, gen_cfg, drafter,
                                                                          args.draft_tokens, t, stats))
    sys.stdout.write("\n")
    _print_timings(timings)
    print(f"[speculative: {stats.steps} verifications, {stats.accepted} of {stats.drafted} drafted tokens kept "
          f"({stats.acceptance_rate:.0%}), {timings.new_tokens / max(stats.steps + 1, 1):.2f} tokens per target "
          f"forward]", file=sys.stderr)


def cmd_chat(args) -> None:
    lm = _load(args)
    gen_cfg = _generation_config(args, lm.tokenizer)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("[chat: /exit or Ctrl-D to leave]", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        messages.append({"role": "user", "content": line})
        ids = lm.tokenizer.encode(lm.tokenizer.render_chat(messages))
        reply, timings = _stream(lm, ids, gen_cfg)
        print()
        _print_timings(timings)
        messages.append({"role": "assistant", "content": reply})


def _finish_run(run: dict, path: str | None, table: str) -> None:
    from .eval.report import write_run

    print(table)
    if path:
        print(f"[wrote {write_run(run, path)}]", file=sys.stderr)


def cmd_eval(args) -> None:
    from pathlib import Path

    from .eval.perplexity import PerplexityProtocol
    from .eval.report import to_markdown
    from .eval.run import EvalConfig, run_eval

    _set_threads(args)
    protocol = PerplexityProtocol(args.window, args.stride, args.max_windows, args.add_bos)
    cfg = EvalConfig([t for t in args.tasks.split(",") if t], args.limit, protocol, args.batch_size,
                     args.reference, Path(args.reference_cache) if args.reference_cache else None)
    run = run_eval(args.model, cfg, DTYPES[args.dtype], sys.argv, args.backend)
    _finish_run(run, args.json, to_markdown(run))


def cmd_bench(args) -> None:
    from .eval.cost import CostConfig, format_cost
    from .eval.run import run_bench

    _set_threads(args)
    cfg = CostConfig(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs)
    run = run_bench(args.model, cfg, DTYPES[args.dtype], sys.argv, args.backend)
    _finish_run(run, args.json, format_cost(run["cost"]))


def cmd_quantize(args) -> None:
    from .calib import CalibConfig
    from .pipeline import compress
    from .steps import make_step
    from .quant.scheme import QScheme

    _set_threads(args)
    default = QScheme(8, 0) if args.method == "smoothquant" else QScheme()
    scheme = QScheme(args.bits if args.bits is not None else default.bits,
                     args.group_size if args.group_size is not None else default.group_size, not args.asym)
    calib = CalibConfig(args.calib, args.calib_samples, args.calib_length)
    require(not args.awq_scales or args.method in ("gptq", "rtn"), "--awq-scales goes before gptq or rtn")
    steps = [make_step("awq", scheme=scheme.validate(), calib=calib, quantize=False)] if args.awq_scales else []
    steps.append(make_step(args.method, scheme=scheme.validate(), calib=calib, imatrix=args.imatrix or None,
                           damp=args.damp, act_order=False if args.no_act_order else None, alpha=args.alpha,
                           search=True if args.search else None, refit=args.refit))
    if args.kv_bits:
        steps.append(make_step("kv_cache", scheme=QScheme(args.kv_bits, 0 if args.kv_bits == 8 else 32, False)))
    print(compress(args.model, steps, args.out, args.force))


def cmd_prune(args) -> None:
    """Unstructured / N:M pruning (--method, --sparsity | --pattern); structured pruning takes its own branch."""
    from .calib import CalibConfig
    from .pipeline import compress
    from .steps import make_step
    from .prune import parse_pattern

    if args.structured or args.ratio is not None or args.target_params is not None:
        return _prune_structured(args)
    _set_threads(args)
    layer_sparsity = None if args.layer_sparsity is None else _floats(args.layer_sparsity, "--layer-sparsity")
    step = make_step("prune", algorithm=args.method or "wanda", sparsity=args.sparsity, damp=args.damp,
                     layer_sparsity=layer_sparsity,
                     pattern=parse_pattern(args.pattern) if args.pattern else None, per_layer=args.per_layer or None,
                     calib=CalibConfig(args.calib, args.calib_samples, args.calib_length))
    print(compress(args.model, [step.validate()], args.out, args.force, sparse_storage=args.sparse_storage))


def _floats(text: str, option: str) -> tuple[float, ...]:
    from .errors import require

    parts = [t.strip() for t in text.split(",")]
    require(all(p.replace(".", "", 1).isdigit() for p in parts), f"{option} takes comma-separated numbers, got {text!r}")
    return tuple(float(p) for p in parts)


def _prune_structured(args) -> None:
    """slm prune --structured AXIS --ratio R | --target-params N: a smaller dense model (slmkit.prune.structured)."""
    from .calib import CalibConfig
    from .errors import require
    from .pipeline import compress
    from .steps import make_step

    require(args.structured is not None, "--ratio and --target-params need --structured AXIS")
    unstructured = {"--method": args.method, "--sparsity": args.sparsity, "--pattern": args.pattern,
                    "--layer-sparsity": args.layer_sparsity,
                    "--damp": args.damp, "--per-layer": args.per_layer or None,
                    "--sparse-storage": args.sparse_storage or None}
    given = [k for k, v in unstructured.items() if v is not None]
    require(not given, f"--structured does not take {', '.join(given)} (unstructured / N:M options)")
    _set_threads(args)
    step = make_step("prune_structured", axis=args.structured, ratio=args.ratio, target_params=args.target_params,
                     importance=args.importance, mlp_multiple=args.mlp_multiple,
                     calib=CalibConfig(args.calib, args.calib_samples, args.calib_length))
    print(compress(args.model, [step.validate()], args.out, args.force))


def cmd_export(args) -> None:
    from .export import export_model

    loaded = _load(args)
    print(export_model(loaded.model, loaded.tokenizer, args.out, args.format, args.type, args.force))


def cmd_techniques(args) -> None:
    from .plan.techniques import CONSTRAINTS, as_rows, format_table, techniques

    require(args.constraint is None or args.constraint in CONSTRAINTS,
            f"--constraint must be one of {', '.join(CONSTRAINTS)}, got {args.constraint!r}")
    rows = techniques(args.constraint)
    names = {t.name for t in rows}
    print(json.dumps([r for r in as_rows() if r["name"] in names], indent=1) if args.json else format_table(rows))


def cmd_report(args) -> None:
    from .eval.report import build_report

    for path in build_report(args.runs, args.out):
        print(path)


COMMANDS = {"info": cmd_info, "generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval, "bench": cmd_bench,
            "report": cmd_report, "quantize": cmd_quantize, "prune": cmd_prune,
            "export": cmd_export, "train": cmd_train, "merge": cmd_merge, "synth": cmd_synth,
            "serve": cmd_serve, "cascade": cmd_cascade, "techniques": cmd_techniques, "compress": cmd_compress,
            "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except SlmError as exc:
        print(f"slm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nslm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (slm techniques | head): not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
