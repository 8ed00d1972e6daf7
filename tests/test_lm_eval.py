"""lm-evaluation-harness adapter: request semantics against direct computation with the model, batch-size
independence, tasks defined on local files (tests/data/lm_eval) through simple_evaluate and lm-eval's own
`lm_eval` command (resolved by the start-up hook), and that the hook costs interpreter start-up nothing heavy."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from conftest import randomize  # noqa: E402
from slmkit.checkpoint import save_checkpoint  # noqa: E402
from slmkit.config import ModelConfig  # noqa: E402
from slmkit.eval.lm_eval_adapter import SlmkitLM  # noqa: E402
from slmkit.generate import GenerationConfig, generate  # noqa: E402
from slmkit.loader import load  # noqa: E402
from slmkit.model import Decoder  # noqa: E402
from test_cli import tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"  # the task YAMLs name their JSONL files relative to ROOT
MAX_SEQ = 48  # short, so truncation and several rolling windows are exercised

PAIRS = [("Question: what is 2 + 3?\nAnswer:", " 5"),
         ("hello world, small models", " on small machines"),
         ("the quick brown fox ", "jumps"),  # trailing space moves to the continuation
         ("", "the lazy dog"),  # empty context: the prefix token stands in
         ("   ", "hello"),  # a context of spaces only
         ("the quick brown fox jumps over the lazy dog. " * 6, "hello world"),  # longer than max_length
         ("a tokenizer for tests:", " numbers 0123456789 and punctuation !?.")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=MAX_SEQ, eos_token_id=tok.eos_token_id)
    model = Decoder(cfg)
    randomize(model)  # peaked, position-dependent predictions: sums and greedy flags mean something
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("lm_eval") / "tiny")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """The checkpoint in float64, so that comparisons to 1e-6 measure the adapter, not float32 rounding
    (padding a batch changes matmul shapes, and float32 sums of ~100 log-probabilities differ by ~1e-6)."""
    model = load(checkpoint)
    return dataclasses.replace(model, model=model.model.double())


@pytest.fixture(scope="module")
def lm(loaded) -> SlmkitLM:
    return SlmkitLM(pretrained=loaded, batch_size=4)


@pytest.fixture(scope="module")
def lm32(checkpoint) -> SlmkitLM:
    """The adapter as `--model slmkit` builds it (float32), to check task results against."""
    return SlmkitLM(pretrained=str(checkpoint), batch_size=4)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """Run from the repository root with the datasets cache in tmp_path (nothing written under ~/.cache)."""
    import datasets.config

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path / "datasets"


def requests(kind: str, *args_list) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


@torch.no_grad()
def direct(model, seq: list[int], first: int) -> tuple[float, bool]:
    """Sum of log-softmax of seq[first:] given everything before, and whether each token was the argmax."""
    logp = model(torch.tensor([seq]))[0].double().log_softmax(-1)[first - 1:len(seq) - 1]  # [n, V]
    targets = torch.tensor(seq[first:])
    return float(logp.gather(-1, targets[:, None]).sum()), bool((logp.argmax(-1) == targets).all())


def expected_pair(tok, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """The sequence and first scored position lm-eval's HF model would use for one loglikelihood request."""
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if not context:
        cont = tok.encode(continuation, add_bos=False)
        return [prefix] + cont, 1
    stripped = context.rstrip()
    ctx = tok.encode(stripped) or [prefix]
    cont = tok.encode(context + continuation)[len(tok.encode(stripped)):]
    seq = (ctx + cont)[-(max_length + 1):]
    return seq, len(seq) - len(cont)


# ---- request semantics ---------------------------------------------------------------------------
def test_loglikelihood_matches_direct_computation(lm, loaded):
    results = lm.loglikelihood(requests("loglikelihood", *PAIRS))
    assert lm.max_length == MAX_SEQ - 1
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results):
        seq, first = expected_pair(loaded.tokenizer, context, continuation, lm.max_length)
        want, want_greedy = direct(loaded.model, seq, first)
        assert len(seq) <= MAX_SEQ and first >= 1
        assert abs(logprob - want) < 1e-6 and greedy == want_greedy
    # the trailing space of a context is scored as the start of the continuation
    moved = lm.loglikelihood(requests("loglikelihood", ("the quick brown fox", " jumps")))[0]
    assert moved == pytest.approx(results[2], abs=1e-9)
    # the model's own greedy continuation is greedy
    context, tok = PAIRS[0][0], loaded.tokenizer
    ids = list(generate(loaded.model, tok.encode(context), GenerationConfig(max_new_tokens=4)))
    assert tok.encode(context + tok.decode(ids)) == tok.encode(context) + ids  # the text re-encodes to ids
    assert lm.loglikelihood(requests("loglikelihood", (context, tok.decode(ids))))[0][1] is True
    # the first token of a continuation after an empty context is predicted from the prefix token (EOS here)
    assert loaded.tokenizer.bos_token_id is None and lm.prefix_token_id == loaded.tokenizer.eos_token_id


def test_loglikelihood_independent_of_batch_size(loaded):
    pairs = PAIRS + [(f"hello world {i}", " the lazy dog" * (i % 3 + 1)) for i in range(6)]
    one = SlmkitLM(pretrained=loaded, batch_size=1).loglikelihood(requests("loglikelihood", *pairs))
    four = SlmkitLM(pretrained=loaded, batch_size=4).loglikelihood(requests("loglikelihood", *pairs))
    for (a, greedy_a), (b, greedy_b) in zip(one, four):
        assert abs(a - b) < 1e-9 and greedy_a == greedy_b


def test_loglikelihood_rolling_windows(loaded):
    short, long = "hello world", "the quick brown fox jumps over the lazy dog. " * 4
    lm = SlmkitLM(pretrained=loaded, max_length=16)
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (short,), (long,), ("",)))
    tok, L, prefix = loaded.tokenizer, 16, loaded.tokenizer.eos_token_id
    tokens = tok.encode(short, add_bos=False)
    assert len(tokens) <= L and got[0] == pytest.approx(direct(loaded.model, [prefix] + tokens, 1)[0], abs=1e-6)
    tokens = tok.encode(long, add_bos=False)
    assert len(tokens) > 3 * L  # several windows, the last one partial
    want, start = 0.0, 0
    while start < len(tokens):  # disjoint windows of L predicted tokens, each seeing up to L tokens before
        end = min(start + L, len(tokens))
        seq = [prefix] + tokens[:end] if start == 0 else tokens[end - L - 1:end]
        want += direct(loaded.model, seq, len(seq) - (end - start))[0]
        start = end
    assert got[1] == pytest.approx(want, abs=1e-6)
    assert got[2] == 0.0


def test_generate_until(lm, loaded):
    context = "Question: what is 2 + 3?\nAnswer:"
    prompt = loaded.tokenizer.encode(context)
    ids = list(generate(loaded.model, prompt, GenerationConfig(max_new_tokens=10,
                                                               stop_ids=loaded.tokenizer.stop_ids())))
    full = loaded.tokenizer.decode(ids)
    [text] = lm.generate_until(requests("generate_until", (context, {"max_gen_toks": 10, "do_sample": False})))
    assert text == full and len(ids) <= 10
    stop = next(c for c in full[1:] if c.isascii() and c.isprintable())  # cut at the first `until` string
    [cut] = lm.generate_until(requests("generate_until", (context, {"max_gen_toks": 10, "until": [stop, "\x01"]})))
    assert cut == full[:full.index(stop)] and len(cut) < len(full)
    torch.manual_seed(0)
    sampled = lm.generate_until(requests("generate_until", *[(context, {"max_gen_toks": 6, "do_sample": True,
                                                                          "temperature": 1.0, "top_k": 20})] * 2))
    torch.manual_seed(0)
    again = lm.generate_until(requests("generate_until", *[(context, {"max_gen_toks": 6, "do_sample": True,
                                                                        "temperature": 1.0, "top_k": 20})] * 2))
    assert sampled == again and all(isinstance(s, str) for s in sampled)


def test_same_numbers_as_lm_eval_hf_model(checkpoint, tmp_path):
    """The same weights exported to a Hugging Face folder and run by lm-eval's own `hf` model: every request
    kind agrees, truncation and rolling windows included (max_length 24)."""
    pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from slmkit.checkpoint import export_hf

    ours = SlmkitLM(pretrained=str(checkpoint), max_length=24)
    export_hf(ours.model, ours.tokenizer, tmp_path / "hf")
    hf = HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", device="cpu", max_length=24, batch_size=3)
    assert hf.prefix_token_id == ours.prefix_token_id
    pairs = [pair for pair in PAIRS if pair[0] != "   "]  # HFLM fails on a context of spaces only (no tokens)
    for kind, args in [("loglikelihood", pairs), ("loglikelihood_rolling", [("hello world",), (PAIRS[5][0],)])]:
        got, want = getattr(ours, kind)(requests(kind, *args)), getattr(hf, kind)(requests(kind, *args))
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a == pytest.approx(b, abs=1e-4)
    gen = requests("generate_until", (PAIRS[0][0], {"until": ["?"], "max_gen_toks": 6, "do_sample": False}))
    assert ours.generate_until(gen) == hf.generate_until(gen)


def test_model_args(checkpoint, loaded):
    bf16 = SlmkitLM(pretrained=str(checkpoint), dtype="bfloat16", batch_size="auto", device="cuda:0")
    assert bf16.get_model_info()["dtype"] == "bfloat16" and bf16.batch_size > 0  # device: CPU regardless
    with pytest.raises(Exception, match="max_length"):
        SlmkitLM(pretrained=loaded, max_length=MAX_SEQ)
    with pytest.raises(Exception, match="dtype"):
        SlmkitLM(pretrained=loaded, dtype="float16")


# ---- registration ------------------------------------------------------------------------------
def test_registered_with_lm_eval():
    from lm_eval.api.registry import MODEL_REGISTRY, get_model

    assert get_model("slmkit") is SlmkitLM and issubclass(SlmkitLM, LM)
    assert "hf" in MODEL_REGISTRY  # registering ours first did not hide lm-eval's own models


def test_entry_point_resolves_through_lm_eval_registry():
    points = [p for p in importlib.metadata.entry_points(group="lm_eval.models") if p.name == "slmkit"]
    if not points:
        pytest.skip("installed slmkit metadata predates the lm_eval.models entry point: pip install -e .")
    from lm_eval.api import registry

    if not hasattr(registry, "Registry"):
        pytest.skip("this lm-eval has no lazy registry")
    fresh = registry.Registry("model", base_cls=LM)
    fresh.register("slmkit", target=points[0])  # what lm-eval's entry-point discovery records: a placeholder
    assert fresh.get("slmkit") is SlmkitLM


# ---- tasks on local files ----------------------------------------------------------------------
def expected_mc_acc(lm: SlmkitLM) -> float:
    """slmkit_tiny_mc's accuracy from our own loglikelihoods: the highest-scoring choice is the answer."""
    docs = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
    hits = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = lm.loglikelihood(requests("loglikelihood", *[(context, f" {c}") for c in doc["choices"]]))
        hits += max(range(len(scores)), key=lambda i: scores[i][0]) == doc["answer"]
    return hits / len(docs)


def expected_bits_per_byte(lm: SlmkitLM) -> float:
    """slmkit_tiny_ppl's bits per byte from our own rolling loglikelihoods."""
    texts = [json.loads(line)["text"] for line in (TASKS / "tiny_text.jsonl").read_text().splitlines()]
    total = sum(lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(t,) for t in texts])))
    return -total / sum(len(t.encode()) for t in texts) / math.log(2)


def test_simple_evaluate_local_tasks(checkpoint, lm32, datasets_cache):
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    out = lm_eval.simple_evaluate(model="slmkit", model_args=f"pretrained={checkpoint},batch_size=4",
                                  tasks=["slmkit_tiny_mc", "slmkit_tiny_ppl", "slmkit_tiny_gen"],
                                  task_manager=manager, bootstrap_iters=0)
    results = out["results"]
    assert out["config"]["model_kind"] == "slmkit"
    assert results["slmkit_tiny_mc"]["acc,none"] == pytest.approx(expected_mc_acc(lm32))
    ppl = results["slmkit_tiny_ppl"]
    assert math.isfinite(ppl["bits_per_byte,none"]) and ppl["bits_per_byte,none"] > 0
    assert ppl["bits_per_byte,none"] == pytest.approx(expected_bits_per_byte(lm32), rel=1e-9)
    assert 0.0 <= results["slmkit_tiny_gen"]["exact_match,none"] <= 1.0


# ---- the lm_eval command and the start-up hook behind it ---------------------------------------------
HOOK_PTH = Path(sysconfig.get_paths()["purelib"]) / "slmkit_lm_eval_hook.pth"


def test_lm_eval_console_script(checkpoint, lm32, tmp_path):
    """The literal `lm_eval --model slmkit ...`: lm-eval's own console script, which imports nothing of ours;
    the start-up hook (src/_slmkit_lm_eval_hook.py, installed by setup.py) resolves the name. Same numbers as
    simple_evaluate, and lm-eval's own models stay available."""
    assert HOOK_PTH.is_file(), f"{HOOK_PTH} missing: reinstall slmkit (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    args = ["--model", "slmkit", "--model_args", f"pretrained={checkpoint}", "--batch_size", "4",
            "--tasks", "slmkit_tiny_mc,slmkit_tiny_ppl", "--include_path", str(TASKS), "--device", "cpu",
            "--output_path", str(tmp_path / "out")]
    run = subprocess.run([str(Path(sys.executable).with_name("lm_eval")), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "slmkit_tiny_mc" in run.stdout and "acc" in run.stdout
    [saved] = (tmp_path / "out").rglob("results_*.json")
    out = json.loads(saved.read_text())
    assert out["config"]["model"] == "slmkit"
    results = out["results"]
    assert results["slmkit_tiny_mc"]["acc,none"] == pytest.approx(expected_mc_acc(lm32))
    assert results["slmkit_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(expected_bits_per_byte(lm32),
                                                                             rel=1e-9)


def test_start_up_hook_imports_nothing_heavy():
    """The hook's .pth line runs in every interpreter of the environment: it only installs its finder."""
    assert HOOK_PTH.read_text().strip() == "import _slmkit_lm_eval_hook"
    probe = ("import sys; print(sorted(m for m in ('slmkit', 'torch', 'lm_eval', 'numpy') if m in sys.modules), "
             "'_slmkit_lm_eval_hook' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "_slmkit_lm_eval_hook" not in run.stderr, run.stderr
    assert run.stdout.split() == ["[]", "True"]
