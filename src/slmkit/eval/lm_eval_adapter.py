"""lm-evaluation-harness adapter: every model slmkit loads, as the lm-eval model `slmkit`.

    lm_eval --model slmkit --model_args pretrained=PATH,dtype=bfloat16 --tasks hellaswag   # see Registration
    python -m slmkit.eval.lm_eval_adapter --model slmkit --model_args pretrained=PATH --tasks hellaswag  # the same

model_args: pretrained (a path, known name or hub id as `slm` takes them; default SmolLM2-135M-Instruct),
dtype (float32 | bfloat16), batch_size, max_length (tokens of context one prediction sees; at most and by
default the model's max_seq_len - 1, because slmkit's scorer runs the scored token through the model too),
max_gen_toks (default for generate_until, 256). Needs the optional extra: `pip install 'slmkit[lmeval]'`;
slmkit's own evaluator does not use lm-eval. Everything runs on the CPU, whatever `--device` says.

Scoring follows lm-eval's Hugging Face model (HFLM), so the numbers are comparable with `--model hf`:
loglikelihood moves trailing spaces of the context into the continuation, encodes context+continuation and
the context, and scores whole[len(context):], truncating from the left to max_length; loglikelihood_rolling
scores lm-eval's disjoint rolling windows of max_length tokens. Both use slmkit.eval.scoring.score.
generate_until decodes greedily unless do_sample (then temperature, top_k, top_p, from torch's RNG, which
lm-eval seeds), stops at the tokenizer's stop tokens and cuts the text at the first `until` string.

Registration. lm-eval resolves `--model NAME` with `lm_eval.api.registry.get_model(NAME)`, a registry filled
from lm-eval's own table of models (lm_eval/models/__init__.py) and by `@register_model` in modules that were
imported. lm-eval up to 0.4.13 (the newest release at the time of writing) has no plugin discovery: its CLI
never imports third-party code, and nothing reads the entry points of installed packages. So slmkit installs
a start-up hook: `slmkit_lm_eval_hook.pth` in site-packages (written by setup.py, for regular and editable
installs) imports the top-level module `_slmkit_lm_eval_hook`, which imports nothing heavy and, once
`lm_eval.api.registry` is imported, wraps its `get_model` so that asking for `slmkit` imports this module first
(its docstring has the details). That makes the bare `lm_eval --model slmkit ...` work in any environment where
slmkit is installed. slmkit also declares `slmkit = "slmkit.eval.lm_eval_adapter:SlmkitLM"` in the
`lm_eval.models` entry-point group (pyproject.toml), which lm-eval's development tree documents for plugin
discovery (its docs/plugins.md) but no release reads yet. Without the hook (e.g. `python -S`),
`python -m slmkit.eval.lm_eval_adapter ARGS` is the exact equivalent of `lm_eval ARGS`: it registers the model
and hands over to lm-eval's own command line. From Python, importing this module registers it:
`import slmkit.eval.lm_eval_adapter; lm_eval.simple_evaluate(model="slmkit", ...)` (with the hook installed,
`simple_evaluate(model="slmkit")` works without the import too).
Rejected: a console script of our own named `lm_eval` (it would overwrite lm-eval's), and a hook module inside
the slmkit package (importing it would import slmkit, and torch with it, in every Python process).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..errors import require
from ..generate import GenerationConfig, generate
from ..backends import load
from ..loader import DTYPES, LoadedModel
from ..progress import progress
from .scoring import score

log = logging.getLogger(__name__)

MODEL_NAME = "slmkit"
DEFAULT_BATCH_SIZE = 8


class SlmkitLM(LM):
    """An slmkit model (GGUF, Hugging Face folder or slmkit checkpoint) behind lm-eval's LM interface.

    From Python, `pretrained` may also be an already loaded model (slmkit.loader.LoadedModel, used as it is)."""

    def __init__(self, pretrained: str | Path | LoadedModel | None = None, dtype: str = "float32",
                 batch_size: int | str = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                 max_gen_toks: int = 256, device: str | None = None, max_batch_size: int | None = None):
        super().__init__()
        require(str(dtype) in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.loaded = pretrained if isinstance(pretrained, LoadedModel) else load(pretrained, DTYPES[str(dtype)])
        self.model, self.tokenizer = self.loaded.model.eval(), self.loaded.tokenizer
        limit = self.model.cfg.max_seq_len - 1  # score() feeds the scored token too: max_length + 1 positions
        self.max_length = limit if max_length is None else int(max_length)
        require(0 < self.max_length <= limit, f"max_length must be in 1..{limit} for this model "
                f"(max_seq_len {self.model.cfg.max_seq_len} holds the context and the scored token), "
                f"got {max_length}")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = max_batch_size or DEFAULT_BATCH_SIZE  # no probing: scoring memory is one batch of logits
        self.batch_size = int(batch_size)
        require(self.batch_size > 0, f"batch_size must be positive, got {batch_size}")
        self.max_gen_toks = int(max_gen_toks)
        if device not in (None, "cpu"):
            log.info("slmkit evaluates on the CPU; device=%s is ignored", device)
        self._warned_kwargs: set[str] = set()

    # ---- tokens -----------------------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for: BOS when the tokenizer has one, else EOS (as HFLM does)."""
        token = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None \
            else self.tokenizer.eos_token_id
        require(token is not None, "the tokenizer has neither BOS nor EOS to condition the first token on")
        return token

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens), split as lm-eval's Hugging Face model splits them."""
        if not context:
            cont = self.tokenizer.encode(continuation, add_bos=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        spaces = len(context) - len(context.rstrip())
        if spaces:  # "Answer: " + "B" is scored as "Answer:" + " B", the way tokenizers see words
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return ctx or [self.prefix_token_id], whole[len(ctx):]  # a context of only spaces: the prefix token

    # ---- lm-eval requests -------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        seqs, first = [], []
        for request in requests:
            ctx, cont = self._encode_pair(*request.args)
            require(len(cont) <= self.max_length, f"a continuation of {len(cont)} tokens is longer than "
                    f"max_length {self.max_length}")
            seq = (ctx + cont)[-(self.max_length + 1):]  # left truncation: the model sees max_length tokens
            seqs.append(seq)
            first.append(len(seq) - len(cont))
        answers = []
        scores = score(self.model, seqs, self.batch_size, first, description="lm-eval loglikelihood")
        for request, scored in zip(requests, scores):
            answer = (float(scored.logprobs.sum()), bool(scored.greedy.all()))
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
            answers.append(answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        seqs, first, owner = [], [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tokenizer.encode(text, add_bos=False)
            # lm-eval's disjoint windows of max_length scored tokens; every token is scored exactly once. The
            # first token is predicted from the prefix token alone (BOS, or EOS when the tokenizer has no BOS:
            # see prefix_token_id); later ones see their window so far plus the token before the window, and a
            # short last window looks back a full max_length tokens.
            for ctx, pred in map(make_disjoint_window,
                                 get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)):
                seqs.append(ctx + pred)
                first.append(len(ctx))
                owner.append(index)
        totals = [0.0] * len(requests)
        scores = score(self.model, seqs, self.batch_size, first, description="lm-eval loglikelihood_rolling")
        for index, scored in zip(owner, scores):
            totals[index] += float(scored.logprobs.sum())
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in progress(requests, "lm-eval generate_until"):
            context, gen_kwargs = request.args
            text = self._generate(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs

    def _generate(self, context: str, kwargs: dict) -> str:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
        do_sample = kwargs.pop("do_sample", None)
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        if do_sample is False:
            temperature = 0.0  # greedy, as lm-eval does when do_sample=False whatever the temperature
        top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
        ignored = set(kwargs) - self._warned_kwargs
        if ignored:
            log.warning("slmkit ignores these generation kwargs: %s", ", ".join(sorted(ignored)))
            self._warned_kwargs |= ignored
        if max_new <= 0:
            return ""
        prompt = self.tokenizer.encode(context) or [self.prefix_token_id]
        prompt = prompt[-max(1, self.max_length - max_new):]  # left truncation leaves room for the answer
        cfg = GenerationConfig(max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                               stop_ids=self.tokenizer.stop_ids())  # sampling draws from torch's seeded RNG
        ids, text = [], ""
        for token in generate(self.model, prompt, cfg):
            ids.append(token)
            text = self.tokenizer.decode(ids)
            cut = min((text.find(s) for s in until if s in text), default=-1)
            if cut >= 0:
                return text[:cut]
        return text

    # ---- chat templates and bookkeeping -----------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.loaded.source.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        dtype = str(self.model.embed.weight.dtype).removeprefix("torch.")
        return {"model_source": self.loaded.source, "model_kind": self.loaded.kind, "dtype": dtype,
                "max_length": self.max_length}


def register() -> None:
    """Make `slmkit` an lm-eval model name (kept when an entry point or an earlier import already made it)."""
    from lm_eval.api import registry
    import lm_eval.models  # noqa: F401  lm-eval's own names first: 0.4.13 adds them only to an empty registry

    if MODEL_NAME not in registry.MODEL_REGISTRY:
        registry.register_model(MODEL_NAME)(SlmkitLM)


def main() -> None:
    """`python -m slmkit.eval.lm_eval_adapter ARGS`: `lm_eval ARGS` with the slmkit model registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    cli_evaluate()


if __name__ == "__main__":
    from slmkit.eval.lm_eval_adapter import main as _main  # the importable module, so one SlmkitLM class exists

    _main()
else:
    register()
