"""The `slm` command line: parsing and printing only; the work is done by the Python API."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .errors import SlmError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _model_args(p: argparse.ArgumentParser, dtype: str = "float32") -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="path (.gguf, Hugging Face folder, slmkit checkpoint), known name or hub id; "
                        "default: SmolLM2-135M-Instruct")
    p.add_argument("--dtype", choices=DTYPES, default=dtype, help=f"weight dtype in memory (default {dtype})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm", description="slmkit: the small language model kit")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="architecture, parameters, bytes, context length")
    _model_args(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    gen = sub.add_parser("generate", help="generate text from a prompt (text on stdout, timings on stderr)")
    _model_args(gen, dtype="bfloat16")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _sampling_args(gen)
    chat = sub.add_parser("chat", help="interactive chat on the terminal (/exit or Ctrl-D to leave)")
    _model_args(chat, dtype="bfloat16")
    chat.add_argument("--system", default=None, help="system message")
    _sampling_args(chat)
    return parser


def _load(args):
    from .loader import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, dtype=DTYPES[args.dtype])


def cmd_info(args) -> None:
    from .info import format_info, model_info

    info = model_info(_load(args))
    print(json.dumps(info) if args.json else format_info(info))


def _generation_config(args, tokenizer):
    from .generate import GenerationConfig

    return GenerationConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            tokenizer.stop_ids(), args.seed).validate()


def _stream(lm, prompt_ids: list[int], gen_cfg) -> tuple[str, object]:
    """Generate, printing text to stdout as it forms; returns (text, timings)."""
    from .generate import TextStream, Timings, generate

    timings, stream, pieces = Timings(), TextStream(lm.tokenizer), []
    for token in generate(lm.model, prompt_ids, gen_cfg, timings):
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
    t0 = time.perf_counter()
    lm = _load(args)
    print(f"[loaded {lm.source} in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    text = args.prompt
    if args.chat:
        text = lm.tokenizer.render_chat([{"role": "user", "content": args.prompt}])
    ids = lm.tokenizer.encode(text)
    _, timings = _stream(lm, ids, _generation_config(args, lm.tokenizer))
    sys.stdout.write("\n")
    _print_timings(timings)


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


COMMANDS = {"info": cmd_info, "generate": cmd_generate, "chat": cmd_chat}


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
