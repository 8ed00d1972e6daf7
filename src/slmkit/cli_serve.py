"""`slm serve`: parsing only; the server is slmkit.serve."""

from __future__ import annotations

import sys
import time

from .cli_common import set_threads
from .errors import require


def serve_parser(sub) -> None:
    from .loader import DTYPES

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    s.add_argument("model", nargs="?", default=None, help="the model to serve (default: SmolLM2-135M-Instruct)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", default=None, help="the model id clients use (default: the model's name)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--parallel", type=int, default=8, help="sequences decoded together (rows of the batch)")
    s.add_argument("--queue", type=int, default=64, help="requests that may wait for a row; past it: 503")
    s.add_argument("--ctx", type=int, default=2048, help="tokens per sequence, prompt and completion (capped by "
                   "the model's context)")
    s.add_argument("--max-tokens", type=int, default=1024, help="cap (and default) of a request's max_tokens")
    s.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype in memory (default bfloat16)")
    s.add_argument("--backend", choices=["torch", "llamacpp"], default="torch", help="torch: slmkit's runtime "
                   "(default); llamacpp: the GGUF file run by llama.cpp, its sequences batched in one context")
    s.add_argument("--draft", default=None, metavar="MODEL", help="speculative decoding in the batch with this "
                   "draft model (same vocabulary; slmkit's runtime, a cache row per batch row)")
    s.add_argument("--prompt-lookup", type=int, default=0, metavar="N", help="speculative decoding in the batch: "
                   "each row drafts what followed the last n-gram (n <= N) in its text so far")
    s.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens drafted per step (default 4)")
    s.add_argument("--cascade", default=None, metavar="LARGE", help="answer unconfident requests with this model: "
                   "a local model or an OpenAI-compatible server's URL (http://...)")
    s.add_argument("--threshold", type=float, default=None, help="--cascade: escalate when the answer's confidence "
                   "(a log-probability quantile, <= 0; slm cascade calibrate chooses it) is below this")
    s.add_argument("--cascade-quantile", type=float, default=0.1, help="--cascade: the quantile (default 0.1)")
    s.add_argument("--cascade-model", default=None, help="--cascade URL: the model id to ask for (default: the "
                   "first it lists)")
    s.add_argument("--cascade-timeout", type=float, default=60.0, help="--cascade URL: seconds to wait (default 60)")
    s.add_argument("--threads", type=int, default=None)


def cmd_serve(args) -> None:
    from .batching import BatchDraftModel
    from .collab import PromptLookup, load_draft
    from .loader import DTYPES, load
    from .serve import Engine, ServeConfig, create_app, run

    require(0 < args.port < 65536, f"--port must be between 1 and 65535, got {args.port}")
    require(1 <= args.parallel <= 256, f"--parallel must be between 1 and 256, got {args.parallel}")
    require(0 <= args.queue <= 100_000, f"--queue must be between 0 and 100000, got {args.queue}")
    require(2 <= args.ctx <= 1_048_576, f"--ctx must be between 2 and 1048576, got {args.ctx}")
    require(1 <= args.max_tokens <= 1_048_576, f"--max-tokens must be between 1 and 1048576, got {args.max_tokens}")
    require(not (args.draft and args.prompt_lookup), "give --draft or --prompt-lookup, not both")
    require(0 <= args.prompt_lookup <= 64, f"--prompt-lookup must be between 0 and 64, got {args.prompt_lookup}")
    require(1 <= args.draft_tokens <= 64, f"--draft-tokens must be between 1 and 64, got {args.draft_tokens}")
    require((args.cascade is None) == (args.threshold is None), "--cascade and --threshold go together")
    require(args.threshold is None or -1e9 < args.threshold <= 0, f"--threshold is a log-probability: in (-1e9, 0], "
            f"got {args.threshold}")
    require(0 <= args.cascade_quantile <= 1, f"--cascade-quantile must be in [0, 1], got {args.cascade_quantile}")
    require(0 < args.cascade_timeout <= 3600, f"--cascade-timeout must be in (0, 3600], got {args.cascade_timeout}")
    set_threads(args)
    t0 = time.perf_counter()
    if args.backend == "llamacpp":
        from .backends.llamacpp_batch import load_batch

        lm = load_batch(args.model, args.parallel, args.ctx, args.threads)
    else:
        lm = load(args.model, DTYPES[args.dtype])
        lm.model.eval()
    drafter = PromptLookup(args.prompt_lookup) if args.prompt_lookup else None
    if args.draft:
        drafter = BatchDraftModel(load_draft(lm, args.draft, DTYPES[args.dtype]).model, args.parallel, args.ctx)
    engine = Engine(lm.model, lm.tokenizer, args.parallel, args.queue, args.ctx, drafter, args.draft_tokens)
    name = args.name or lm.source.rsplit("/", 1)[-1].removesuffix(".gguf")
    app = create_app(engine, ServeConfig(name, args.api_key, args.max_tokens, cascade=_cascade(args, lm)))
    print(f"[loaded {lm.source} in {time.perf_counter() - t0:.1f} s; serving {name!r} on http://{args.host}:"
          f"{args.port}/v1 ({args.backend}: {args.parallel} sequences at once, {args.queue} queued, context "
          f"{engine.context})]",
          file=sys.stderr)
    run(app, args.host, args.port, limit_concurrency=4 * (args.parallel + args.queue) + 1024)


def _cascade(args, small):
    """The cascade route --cascade / --threshold ask for (a local large model must share the vocabulary)."""
    from .batching import Engine
    from .loader import DTYPES, load
    from .serve.cascade import CascadeRoute
    from .tokenizer import vocabulary_difference

    if args.cascade is None:
        return None
    route = CascadeRoute(args.threshold, args.cascade_quantile, model=args.cascade_model,
                         timeout_s=args.cascade_timeout)
    if args.cascade.startswith(("http://", "https://")):
        route.url = args.cascade
        return route.validate()
    large = load(args.cascade, DTYPES[args.dtype])
    differ = vocabulary_difference(large.tokenizer, large.model.cfg.vocab_size, small.tokenizer,
                                   small.model.cfg.vocab_size, "the served model")
    require(differ is None, f"cascade model {large.source} {differ}: a cascade needs the same vocabulary")
    route.engine = Engine(large.model.eval(), large.tokenizer, args.parallel, args.queue, args.ctx)
    return route.validate()
