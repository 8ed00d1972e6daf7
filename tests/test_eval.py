"""Evaluator: perplexity protocols, multiple-choice readers and scoring, fidelity, `slm eval` end to end."""

import json
import math

import pytest
import torch

from slmkit.cli import main
from slmkit.errors import SlmError
from slmkit.eval.data import Text, read_text
from slmkit.eval.fidelity import fidelity
from slmkit.eval.perplexity import PerplexityProtocol, perplexity, plan_windows
from slmkit.eval.tasks import evaluate_task, load_task, loglikelihoods
from slmkit.model import Decoder

from test_cli import tiny  # noqa: F401  (fixture: a tiny checkpoint folder)
from test_cli import tiny_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. hello world, small models on small machines. " * 6


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    from slmkit.config import ModelConfig
    model = Decoder(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=128, max_seq_len=512, eos_token_id=tok.eos_token_id)).eval()
    model.embed.weight.data *= 0.05  # tied N(0, 1) embeddings give one-hot predictions; soften them
    return model, tok


# ---- windows ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n, protocol", [(10, PerplexityProtocol(4)), (10, PerplexityProtocol(4, stride=2)),
                                         (11, PerplexityProtocol(4, stride=3)), (10, PerplexityProtocol(4, add_bos=True)),
                                         (7, PerplexityProtocol(16))])
def test_windows_score_each_token_at_most_once_within_the_window(n, protocol):
    windows = plan_windows(n, protocol)
    scored = [s + f + i for s, e, f in windows for i in range(e - s - f)]
    assert len(scored) == len(set(scored)) and all(e - s <= protocol.window for s, e, _ in windows)
    if protocol.stride or protocol.add_bos:  # sliding windows and BOS leave no token unscored
        assert sorted(scored) == list(range(0 if protocol.add_bos else 1, n))


def test_reference_protocol_windows():
    windows = plan_windows(301948, PerplexityProtocol(512, max_windows=40))
    assert len(windows) == 40 and windows[1] == (512, 1024, 1)
    assert sum(e - s - f for s, e, f in windows) == 20440


def test_perplexity_equals_direct_computation(tiny_lm):
    model, tok = tiny_lm
    ids = tok.encode(TEXT)
    result = perplexity(model, tok, Text(TEXT, "t", "none"), PerplexityProtocol(window=len(ids)))
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0, :-1].double().log_softmax(-1)
    nll = -lp.gather(-1, torch.tensor(ids[1:])[:, None]).mean().item()
    assert result["tokens_scored"] == len(ids) - 1
    assert abs(result["mean_nll"] - nll) < 1e-6 and abs(result["perplexity"] - math.exp(nll)) < 1e-4
    assert result["bits_per_byte"] > 0 and result["protocol"]["kind"] == "non-overlapping windows"


def test_sliding_windows_see_more_context_than_disjoint_ones(tiny_lm):
    model, tok = tiny_lm
    text = Text(TEXT, "t", "none")
    disjoint = perplexity(model, tok, text, PerplexityProtocol(window=16))
    sliding = perplexity(model, tok, text, PerplexityProtocol(window=16, stride=4))
    assert sliding["tokens_scored"] > disjoint["tokens_scored"]
    assert sliding["protocol"]["stride"] == 4


# ---- multiple choice ----------------------------------------------------------------------------
RECORDS = {
    "generic": {"context": "the quick brown", "choices": ["fox", "dog"], "answer": 0},
    "arc": {"question": {"stem": "hello?", "choices": [{"text": "world", "label": "A"}, {"text": "dog", "label": "B"}]},
            "answerKey": "B"},
    "hellaswag": {"activity_label": "Run", "ctx_a": "the fox", "ctx_b": "jumps", "endings": ["over", "under [x]"], "label": 1},
    "piqa": {"goal": "small models", "sol1": "on small machines", "sol2": "on big ones", "label": 0},
    "winogrande": {"sentence": "the fox jumps over _ lazy dog", "option1": "the", "option2": "a", "answer": "1"},
}


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_task_readers(kind, tmp_path):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text(json.dumps(RECORDS[kind]) + "\n")
    (q,), _ = load_task(str(path))
    assert len(q.pairs) == 2 and q.answer in (0, 1)
    assert all(cont.startswith(" ") for _, cont in q.pairs)


def test_arc_reader_on_shared_file():
    questions, _ = load_task("arc_easy")
    assert len(questions) == 2376 and questions[0].pairs[0][0].startswith("Question: Which statement")


@pytest.mark.parametrize("content, message", [
    ('{"context": "a", "choices": ["b"], "answer": 0}\n{"context": "a", "choices": ["b"]\n', ":2: malformed JSON"),
    ('{"context": "a", "choices": ["b"], "answer": 0}\n{"context": "a", "choices": ["b"], "answer": 5}\n', ":2: answer 5"),
    ('{"context": "a", "choices": "b", "answer": 0}\n', ":1: "),
    ("", "no records"),
    ('{"foo": 1}\n', ":1: unrecognised record"),
])
def test_malformed_task_files(tmp_path, content, message):
    path = tmp_path / "task.jsonl"
    path.write_text(content)
    with pytest.raises(SlmError, match=message):
        load_task(str(path))


def test_binary_and_empty_text_sources(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(SlmError, match="binary"):
        read_text(str(tmp_path / "b.txt"))
    with pytest.raises(SlmError, match="empty"):
        read_text(str(tmp_path / "e.txt"))
    with pytest.raises(SlmError, match="no such file"):
        read_text(str(tmp_path / "missing.txt"))


def test_loglikelihoods_do_not_depend_on_batch_size(tiny_lm):
    model, tok = tiny_lm
    pairs = [(TEXT[:i], TEXT[i:i + 7 + i % 5]) for i in range(5, 200, 6)]
    by_batch = [loglikelihoods(model, tok, pairs, b) for b in (1, 8, 32)]
    assert max(abs(a - b) for other in by_batch[1:] for a, b in zip(by_batch[0], other)) < 1e-4


def test_loglikelihood_is_sum_of_continuation_logprobs(tiny_lm):
    model, tok = tiny_lm
    ctx, cont = "the quick brown", " fox jumps"
    (ll,) = loglikelihoods(model, tok, [(ctx, cont)])
    whole, n_ctx = tok.encode(ctx + cont), len(tok.encode(ctx))
    with torch.no_grad():
        lp = model(torch.tensor([whole]))[0].double().log_softmax(-1)
    assert abs(ll - sum(lp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))) < 1e-6


def test_acc_norm_divides_by_bytes(tiny_lm, tmp_path):
    model, tok = tiny_lm
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"context": "the quick", "choices": ["brown", "brown fox jumps over"],
                                          "answer": 1}) for _ in range(3)))
    questions, _ = load_task(str(path))
    res = evaluate_task(model, tok, questions, batch_size=4)
    assert res["questions"] == 3 and res["acc"] in (0, 1) and res["acc_norm"] in (0, 1)


# ---- fidelity -------------------------------------------------------------------------------
def test_fidelity_of_a_model_against_itself_and_a_perturbed_copy(tiny_lm, tmp_path):
    model, tok = tiny_lm
    text, protocol = Text(TEXT, "t", "none"), PerplexityProtocol(window=32)
    same = fidelity(model, model, tok, tok, text, protocol)
    assert same["kl_divergence"] < 1e-9 and same["top1_agreement"] == 1.0 and abs(same["delta_perplexity"]) < 1e-9
    noisy = Decoder(model.cfg).eval()
    noisy.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in model.state_dict().items()})
    first = fidelity(noisy, model, tok, tok, text, protocol, cache_dir=tmp_path, reference_source="ref")
    assert first["kl_divergence"] > 1e-4 and first["reference_perplexity"] == pytest.approx(same["perplexity"], rel=1e-9)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    cached = fidelity(noisy, Decoder(model.cfg), tok, tok, text, protocol, cache_dir=tmp_path, reference_source="ref")
    assert cached["kl_divergence"] == pytest.approx(first["kl_divergence"], rel=1e-5)  # the cache, not the new model


def test_fidelity_refuses_a_different_tokenizer(tiny_lm):
    model, tok = tiny_lm
    from tokenizers import Tokenizer as HF, models
    from slmkit.tokenizer import Tokenizer
    other = Tokenizer(HF(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    with pytest.raises(SlmError, match="different tokenizer"):
        fidelity(model, model, tok, other, Text(TEXT, "t", "none"), PerplexityProtocol(32))


# ---- CLI ------------------------------------------------------------------------------------
def test_slm_eval_writes_a_run_with_the_relied_upon_keys(tiny, tmp_path, capsys):  # noqa: F811
    tasks = tmp_path / "q.jsonl"
    tasks.write_text("\n".join(json.dumps(RECORDS["generic"]) for _ in range(4)))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "run.json"
    code = main(["eval", str(tiny), "--tasks", f"{text},{tasks}", "--window", "32", "--reference", str(tiny),
                 "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    run = json.loads(out.read_text())
    assert run["schema"] == "slmkit.run/1" and run["results"]["t"]["perplexity"] > 1
    assert run["results"]["q"]["acc"] in (0.0, 1.0) and "acc_norm" in run["results"]["q"]
    assert run["fidelity"]["kl_divergence"] < 1e-9 and (tmp_path / "run.md").is_file()


def test_slm_eval_bad_input_leaves_no_json(tiny, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b"], "answer": 0}\nnot json\n')
    for argv, message in ((["--tasks", str(bad)], "bad.jsonl:2: malformed JSON"), (["--limit", "0"], "--limit"),
                          (["--tasks", str(tmp_path / "none.txt")], "no such file")):
        code = main(["eval", str(tiny), *argv, "--json", str(tmp_path / "run.json")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1
        assert not list(tmp_path.glob("run*"))


def test_slm_bench_and_report(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny), "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "2", "--json", str(out)]) == 0
    cost = json.loads(out.read_text())["cost"]
    assert cost["decode_tokens_per_s"] > 0 and cost["ttft_ms"] > 0 and cost["peak_rss_mb"] > 0 and cost["weight_bytes"] > 0
    assert main(["report", str(out), "-o", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
