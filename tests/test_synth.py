"""`slm synth`: ROUGE-L against hand-computed values (and rouge-score), every filter's reason, deduplication, the
parser on junk replies, end to end with a scripted teacher and with a tiny random model (the default tokenizer),
resume after an interruption equal to an uninterrupted run, the rationale layout, bad input (one line, exit 2,
nothing written), and the real default model (slow)."""

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

import slmkit.synth.generate as synth_generate
from slmkit.cli_synth import cmd_synth, synth_parser
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.loader import LoadedModel, load_tokenizer
from slmkit.model import Decoder
from slmkit.synth import (FILTERS, REASONS, Deduper, ModelTeacher, Reply, Sampling, SynthConfig, lcs_length,
                          parse_answer, parse_task, partial_paths, read_seeds, rejection, rouge_l, synthesize,
                          tokenize)
from slmkit.synth.prompts import ANSWER_LABEL, RATIONALE_REQUEST, TASK_REQUEST
from slmkit.train.data import load_data
from slmkit.train.init import init_weights_

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "seed_tasks.jsonl"
MINI_SEEDS = [{"id": f"s{i}", "instruction": text, "instances": [{"input": inp, "output": "x"}]} for i, (text, inp) in
              enumerate([("Give three tips for staying healthy.", ""),
                         ("Translate the sentence into French.", "I like tea."),
                         ("Name the capital city of the given country.", "Japan"),
                         ("Suggest a name for a small bakery.", ""),
                         ("Explain why the sky looks blue during the day.", "")])]


@pytest.fixture
def seeds(tmp_path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in MINI_SEEDS))
    return path


@pytest.fixture(scope="module")
def default_tokenizer():
    try:
        return load_tokenizer(None)  # the default model's tokenizer and chat template, from the GGUF header
    except SlmError as exc:
        pytest.skip(str(exc))


# ---- ROUGE-L -------------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b, expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat sat on the mat", "the cat on the mat", 10 / 11),  # LCS 5: P 5/6, R 5/5
    ("a b c d", "b d a", 4 / 7),  # LCS "b d": P 2/4, R 2/3 -> 2 * 2 / (4 + 3)
    ("The CAT, sat!", "the cat sat", 1.0),  # lowercased, punctuation separates
    ("one two three", "four five", 0.0),
    ("", "anything at all", 0.0),
    ("Write a poem about the sea.", "Write a short poem about a river.", 8 / 13),  # LCS write a poem about: 2*4/(6+7)
])
def test_rouge_l_against_hand_computed_values(a, b, expected):
    assert rouge_l(a, b) == pytest.approx(expected) and rouge_l(b, a) == pytest.approx(expected)


def test_rouge_l_tokens_and_lcs():
    assert tokenize("It's 3 o'clock -- tea-time!") == ["it", "s", "3", "o", "clock", "tea", "time"]
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (CLRS)
    assert lcs_length([], ["x"]) == 0


def test_rouge_l_equals_the_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)  # as Self-Instruct configures it
    texts = [s["instruction"] for s in map(json.loads, SEEDS.read_text().splitlines()[:30])]
    rng = random.Random(0)
    for _ in range(60):
        a, b = rng.sample(texts, 2)
        assert rouge_l(a, b) == pytest.approx(scorer.score(b, a)["rougeL"].fmeasure, abs=1e-12)


# ---- filters and deduplication ---------------------------------------------------------------------
GOOD = {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Sleep, eat well, walk.",
        "truncated": False}
REJECTED = {
    "empty_instruction": {"instruction": "  "},
    "instruction_too_short": {"instruction": "Tell a joke."},
    "instruction_too_long": {"instruction": "word " * 151},
    "leading_non_ascii": {"instruction": "\u00bfQu\u00e9 hora es ahora mismo?"},
    "leading_punctuation": {"instruction": "- list three kinds of fruit"},
    "garbled_instruction": {"instruction": "Describe \u4f60\u597d\u4e16\u754c\u3002\u4f60\u597d\u4e16\u754c the city"},
    "unactionable_word": {"instruction": "Describe the picture of a sunset in two lines."},
    "program_request": {"instruction": "Write a program that sorts numbers."},
    "input_too_long": {"input": "word " * 301},
    "empty_output": {"output": "\n "},
    "empty_rationale": {"rationale": "", "output": "x", "answer": "x"},
    "output_truncated": {"truncated": True},
    "output_leading_non_ascii": {"output": "\u2022 Sleep well."},
    "output_repeats_instruction": {"output": "Give three tips for staying healthy!"},
    "empty_answer": {"rationale": "Because.", "answer": " "},
}


@pytest.mark.parametrize("reason", sorted(REJECTED))
def test_each_filter_rejects_with_its_reason(reason):
    assert rejection({**GOOD, **REJECTED[reason]}) == reason


def test_filters_keep_a_good_record_and_every_reason_is_tested():
    assert rejection(GOOD) is None and rejection({"instruction": GOOD["instruction"], "input": ""}) is None
    assert {f.reason for f in FILTERS} == set(REJECTED) and set(REASONS) == set(REJECTED) | {"similar"}
    assert rejection({"instruction": "Describe a graphic novel you enjoyed reading."}) is None  # words, not substrings


def test_dedup_keeps_different_and_rejects_similar_instructions():
    pool = Deduper(0.7, ["Write a poem about the sea."])
    assert pool.is_similar("Write a poem about the sea!")  # 1.0
    assert pool.is_similar("Write a short poem about the sea.")  # 2*6/(6+7) = 0.92
    assert not pool.is_similar("Write a short poem about a river.")  # 8/13 = 0.62
    assert not pool.is_similar("Name three prime numbers.")
    pool.add("Name three prime numbers.")
    assert pool.is_similar("Name three prime numbers below ten.")  # 2*4/(4+6) = 0.8
    assert Deduper(0.9, ["Name three prime numbers."]).most_similar("Name three prime numbers below ten.") == 0.8


@pytest.mark.parametrize("reply, expected", [
    (" Describe your favourite season.", ("Describe your favourite season.", "")),
    (" Translate the text into German. Input: Good morning\n5. next", ("Translate the text into German.",
                                                                      "Good morning")),
    ("\n\n5. Task: \"List three uses of salt.\"", ("List three uses of salt.", "")),
    ("Here is a new task:\n**Summarize the plot of Hamlet.**", ("Summarize the plot of Hamlet.", "")),
    ("- Sort the list of numbers.\nInput: 3, 1, 2", ("Sort the list of numbers.", "3, 1, 2")),
    ("   \n \n", ("", "")),
    ("", ("", "")),
])
def test_parse_task_is_robust_to_junk(reply, expected):
    assert parse_task(reply) == expected


def test_parse_answer_and_seeds():
    assert parse_answer(" 42\nsomething else") == "42" and parse_answer("\n Answer: yes") == "yes"
    seeds, digest = read_seeds(SEEDS)
    assert len(seeds) == 175 and len(digest) == 64 and seeds[1].input == "Night : Day :: Right : Left"


# ---- a scripted teacher --------------------------------------------------------------------------
VERBS, THINGS = ("Describe", "Explain", "Summarize", "Compare", "List"), ("rivers", "bread", "chess", "rain", "owls")
WHO = ("children", "a tourist", "a chef", "students", "a farmer")


class ScriptedTeacher:
    """Valid, varied text that is a function of each request's seed (so runs are reproducible); tasks repeat
    often enough that deduplication rejects some. `stop_after`: raise KeyboardInterrupt on that call."""

    name = "scripted"

    def __init__(self, stop_after: int | None = None):
        self.calls, self.asks, self.stop_after = 0, [], stop_after

    def __call__(self, ask):
        self.calls += 1
        if self.calls == self.stop_after:
            raise KeyboardInterrupt
        self.asks.append(ask)
        r = random.Random(ask.seed)
        if ask.kind == "task":
            return f" {r.choice(VERBS)} the {r.choice(THINGS)} for {r.choice(WHO)} in simple words.\n9. junk"
        if ask.kind == "rationale":
            return f"Step 1: think about {r.randint(0, 99)}. Step 2: combine the facts."
        if ask.kind == "final":
            return f" {r.randint(0, 9)}\nAnswer: again"
        return Reply(f"A reply numbered {r.randint(0, 10**6)} that is long enough.", finished=r.random() > 0.1)


def slm(capsys, *argv) -> tuple[int, str, str]:
    """`slm synth ARGS` as slmkit.cli.main runs a command: SlmError -> one line on stderr, exit 2."""
    parser = argparse.ArgumentParser(prog="slm")
    synth_parser(parser.add_subparsers(dest="command", required=True))
    try:
        cmd_synth(parser.parse_args(["synth", *map(str, argv)]))
        code = 0
    except SlmError as exc:
        print(f"slm: error: {exc}", file=__import__("sys").stderr)
        code = 2
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def scripted(monkeypatch):
    """The CLI's teacher replaced by a ScriptedTeacher (its spec checked, nothing loaded)."""
    made = []

    def load_teacher(spec, sampling, dtype, backend):
        made.append(ScriptedTeacher())
        return made[-1]

    monkeypatch.setattr(synth_generate, "load_teacher", load_teacher)
    return made


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_writes_chat_records_that_training_reads(tmp_path, seeds, scripted, capsys, default_tokenizer):
    out = tmp_path / "data.jsonl"
    code, stdout, err = slm(capsys, "--seeds", seeds, "-n", 3, "-o", out, "--json", tmp_path / "s.json")
    assert code == 0, err
    assert stdout.strip() == str(out) and "[kept 3 of" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "s.json", "seeds.jsonl"]  # no partial left
    recs = records(out)
    assert len(recs) == 3 and all(r["source"] == "synth" and r["teacher"] == "default" for r in recs)
    for r in recs:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][0]["content"] == r["instruction"] and r["messages"][1]["content"].startswith("A reply")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["kept"] == 3 and summary["kept"] + sum(summary["rejected"].values()) == summary["attempts"]
    first = scripted[0].asks[0]  # the Self-Instruct request: 3 seeds numbered, the 4th to write
    assert first.messages == [{"role": "user", "content": TASK_REQUEST}] and first.prefill.endswith("\n4.")
    assert sum(s["instruction"] in first.prefill for s in MINI_SEEDS) == 3
    later = [a for a in scripted[0].asks if a.kind == "task"][-1]  # kept tasks join the examples once there
    assert later.prefill.endswith("\n6.") and recs[0]["instruction"] in later.prefill
    data = load_data(str(out), default_tokenizer, 128)
    assert data.info["format"] == "chat" and data.info["train_sequences"] + data.info["val_sequences"] == 3


def test_rationale_mode_record_layout(tmp_path, seeds, scripted, capsys):
    out = tmp_path / "r.jsonl"
    code, _, err = slm(capsys, "--seeds", seeds, "-n", 2, "-o", out, "--rationale", "--given")
    assert code == 0, err
    recs, asks = records(out), scripted[0].asks
    assert [r["instruction"] for r in recs] == [s["instruction"] for s in MINI_SEEDS[:2]]  # --given: the seeds'
    assert recs[1]["messages"][0]["content"] == "Translate the sentence into French.\n\nI like tea."
    for r in recs:
        assert r["rationale"].startswith("Step 1") and r["answer"].isdigit()
        assert r["messages"][1]["content"] == f"{r['rationale']}\n\n{ANSWER_LABEL} {r['answer']}"
    rationale, final = [a for a in asks if a.kind == "rationale"][1], [a for a in asks if a.kind == "final"][1]
    assert rationale.messages[0]["content"].endswith(RATIONALE_REQUEST) and "I like tea." in rationale.messages[0]["content"]
    assert final.messages == rationale.messages and final.one_line
    assert final.prefill == f"{recs[1]['rationale']}\n\n{ANSWER_LABEL}"
    assert not any(a.kind in ("task", "answer") for a in asks)


# ---- resume --------------------------------------------------------------------------------------
def run_api(seeds, out, teacher, resume=False, **cfg):
    return synthesize(seeds, out, SynthConfig(**{"n": 6, **cfg}), "t", teacher=teacher, resume=resume, force=not resume)


@pytest.mark.parametrize("stop_after", [2, 5, 9, 14])
def test_resume_after_interruption_writes_the_same_file(tmp_path, seeds, stop_after):
    whole = tmp_path / "whole.jsonl"
    expected = run_api(seeds, whole, ScriptedTeacher())
    assert expected["rejected"]  # the script makes rejections (similar, truncated): they must be replayed too
    out = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_api(seeds, out, ScriptedTeacher(stop_after=stop_after))
    partial, sidecar = partial_paths(out)
    assert not out.exists() and partial.is_file() and sidecar.is_file()  # nothing that looks complete
    resumed = run_api(seeds, out, ScriptedTeacher(), resume=True)
    assert out.read_bytes() == whole.read_bytes() and not partial.exists() and not sidecar.exists()
    assert (resumed["attempts"], resumed["rejected"]) == (expected["attempts"], expected["rejected"])


def test_resume_drops_a_record_cut_short(tmp_path, seeds):
    whole, out = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    run_api(seeds, whole, ScriptedTeacher())
    with pytest.raises(KeyboardInterrupt):
        run_api(seeds, out, ScriptedTeacher(stop_after=9))
    partial, _ = partial_paths(out)
    with partial.open("a") as f:
        f.write('{"messages": [{"role": "us')  # a write the interruption cut
    run_api(seeds, out, ScriptedTeacher(), resume=True)
    assert out.read_bytes() == whole.read_bytes()


# ---- a tiny random model as the teacher -------------------------------------------------------------
class Interrupting:
    def __init__(self, teacher, stop_after):
        self.teacher, self.calls, self.stop_after = teacher, 0, stop_after

    def __call__(self, ask):
        self.calls += 1
        if self.calls == self.stop_after:
            raise KeyboardInterrupt
        return self.teacher(ask)


def ending(model: Decoder, eos: int, p: float = 0.2) -> Decoder:
    """The model with its EOS logit set so that, sampled at temperature 1, EOS comes with probability p each
    step: a random model's replies otherwise never end and are all rejected as cut off."""
    def hook(module, args, logits):
        others = logits.clone()
        others[..., eos] = float("-inf")
        logits[..., eos] = others.logsumexp(-1) + torch.log(torch.tensor(p / (1 - p)))
        return logits

    model.register_forward_hook(hook)
    return model


def test_tiny_random_model_end_to_end_and_resume(tmp_path, seeds, default_tokenizer):
    tok = default_tokenizer
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=512,
                      eos_token_id=tok.eos_token_id)
    model = ending(init_weights_(Decoder(cfg), 0).eval(), tok.eos_token_id)
    lm = LoadedModel(model, tok, "tiny", "slmkit", 0)
    teacher = ModelTeacher(lm, Sampling(1.0, 1.0, 12))
    settings = dict(n=3, k=2, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3, max_attempts=40)
    whole = tmp_path / "whole.jsonl"
    summary = run_api(seeds, whole, teacher, **settings)
    assert summary["kept"] + sum(summary["rejected"].values()) == summary["attempts"]
    recs = records(whole)
    assert len(recs) == 3 and all(r["messages"][1]["content"] for r in recs), summary
    out = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_api(seeds, out, Interrupting(teacher, 4), **settings)
    run_api(seeds, out, teacher, resume=True, **settings)
    assert out.read_bytes() == whole.read_bytes()  # per-request seeds: the same tokens after a resume
    assert load_data(str(whole), tok, 128).info["train_sequences"] == 2


# ---- bad input -----------------------------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_SEEDS = {
    "missing": (None, "no such seeds file"),
    "bad json": ('{"instruction": "Say hi to me."}\n{"instruction": \n', "line 2: not valid JSON"),
    "no instruction": ('{"instruction": "Say hi to me."}\n{"name": "x", "instances": []}\n',
                       "line 2: 'instruction' must be a non-empty string"),
    "not an object": ('["Say hi"]\n', "line 1: expected a JSON object"),
    "empty": ("\n", "no seed tasks"),
}


@pytest.mark.parametrize("case", sorted(BAD_SEEDS))
def test_bad_seeds_one_line_exit_2_nothing_written(tmp_path, case, scripted, capsys):
    text, message = BAD_SEEDS[case]
    path = tmp_path / "seeds.jsonl" if text is None else write(tmp_path / "seeds.jsonl", text)
    code, out, err = slm(capsys, "--seeds", path, "-n", 2, "-o", tmp_path / "out.jsonl")
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert [p.name for p in tmp_path.iterdir()] == ([] if text is None else ["seeds.jsonl"]) and not scripted


BAD_ARGS = {
    "-n 0": (["-n", 0], "-n must be positive"),
    "-n -3": (["-n", -3], "-n must be positive"),
    "threshold": (["-n", 2, "--threshold", 0], "--threshold must be in (0, 1]"),
    "top-p": (["-n", 2, "--top-p", 1.5], "--top-p must be in (0, 1]"),
    "-k": (["-n", 2, "-k", 9], "-k 9 is more than the 5 seed tasks"),
    "given": (["-n", 6, "--given"], "--given: -n 6 is more than the 5 seed tasks"),
    "both": (["-n", 2, "--force", "--resume"], "not both"),
    "nothing to resume": (["-n", 2, "--resume"], "nothing to resume"),
    "no folder": (["-n", 2, "-o", "missing/out.jsonl"], "no such directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_arguments_one_line_exit_2_nothing_written(tmp_path, seeds, case, scripted, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, message = BAD_ARGS[case]
    code, out, err = slm(capsys, "--seeds", seeds, *(argv if "-o" in argv else [*argv, "-o", "out.jsonl"]))
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["seeds.jsonl"] and not scripted


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_existing_output_and_interrupted_job_are_protected(tmp_path, seeds, scripted, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    before = snapshot(tmp_path)
    code, _, err = slm(capsys, "--seeds", seeds, "-n", 2, "-o", out)
    assert code == 2 and "exists; pass --force" in err and snapshot(tmp_path) == before
    with pytest.raises(KeyboardInterrupt):  # an interrupted job beside it
        synthesize(seeds, out, SynthConfig(n=4), "default", teacher=ScriptedTeacher(stop_after=4), force=True)
    assert out.read_text() == "precious\n"
    before = snapshot(tmp_path)
    for argv, message in [([], "exists; pass --force"), (["--temperature", 0.9, "--resume"], "settings differ"),
                          (["--seed", 1, "--resume"], "seed 0 -> 1")]:
        code, _, err = slm(capsys, "--seeds", seeds, "-n", 4, "-o", out, *argv)
        assert code == 2 and message in err and err.count("\n") == 1 and snapshot(tmp_path) == before, err
    out.unlink()
    code, _, err = slm(capsys, "--seeds", seeds, "-n", 4, "-o", out)
    assert code == 2 and "an interrupted run): pass --resume" in err
    code, _, err = slm(capsys, "--seeds", seeds, "-n", 4, "-o", out, "--resume")
    assert code == 0 and len(records(out)) == 4, err


def test_attempt_limit(tmp_path, seeds):
    def junk(ask):
        return "\u00bfQu\u00e9 hora es ahora mismo?" if ask.kind == "task" else "ok"

    out = tmp_path / "out.jsonl"
    with pytest.raises(SlmError, match="no record kept in 5 attempts .*leading_non_ascii 5.*nothing written"):
        synthesize(seeds, out, SynthConfig(n=2, max_attempts=5), teacher=junk)
    assert list(tmp_path.iterdir()) == [seeds]
    summary = synthesize(seeds, out, SynthConfig(n=50, max_attempts=8), teacher=ScriptedTeacher())
    assert not summary["complete"] and summary["attempts"] == 8 and len(records(out)) == summary["kept"] >= 1


# ---- the real default model ------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_as_teacher(tmp_path, default_tokenizer):
    torch.set_num_threads(2)
    out = tmp_path / "real.jsonl"
    summary = synthesize(SEEDS, out, SynthConfig(n=2, max_new_tokens=48, max_attempts=12))
    recs = records(out)
    assert len(recs) == summary["kept"] >= 1 and summary["kept"] + sum(summary["rejected"].values()) == summary["attempts"]
    assert all(r["messages"][1]["content"].strip() and rejection({**r, "output": r["messages"][1]["content"]}) is None
               for r in recs)
