"""`slm train` end to end: from-scratch pretraining that then generates, evaluates and exports; supervised
fine-tuning; the run file; SIGKILL at a random moment and --resume (bit for bit); torchrun DDP and FSDP against
one process; bad input (one line, exit 2, nothing left behind)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slmkit.checkpoint import save_checkpoint
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.model import Decoder
from slmkit.steps import step_from_record

from test_cli import tiny_tokenizer

SHAKESPEARE = "tinyshakespeare"
FAST = ["--seq-len", "32", "--batch-size", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def donor(tmp_path_factory) -> Path:
    """A tiny checkpoint whose tokenizer (300-token byte-level BPE, a chat template) presets borrow."""
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=128,
                      eos_token_id=tok.eos_token_id)
    return save_checkpoint(Decoder(cfg), tok, tmp_path_factory.mktemp("donor") / "donor")


def slm(*argv, env=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "slmkit", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=600, **kw)


def weights(folder: Path) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def test_pretrain_a_preset_then_generate_eval_and_export(tmp_path, donor, capsys):
    out, run_file = tmp_path / "nano", tmp_path / "run.json"
    code = main(["train", "--preset", "nano-20m", "--tokenizer", str(donor), "--data", SHAKESPEARE, *FAST,
                 "--steps", "6", "--lr", "1e-3", "--warmup", "2", "--eval-every", "3", "-o", str(out),
                 "--json", str(run_file)])
    assert code == 0, capsys.readouterr().err
    run = json.loads(run_file.read_text())
    r = run["results"]["train"]
    assert run["kind"] == "train" and r["steps"] == 6 and len(r["loss_curve"]) == 6 and r["tokens"] == 6 * 4 * 32
    assert r["loss_curve"][-1][1] < r["loss_curve"][0][1] and r["tokens_per_s"] > 0 and r["val_loss"] > 0
    assert [v[0] for v in r["val_curve"]] == [3, 6] and run["cost"]["peak_rss_mb"] > 0
    assert run["protocol"]["init"].startswith("normal(0, 0.02)") and run["protocol"]["data"]["format"] == "text"
    history = json.loads((out / "slmkit.json").read_text())["compression"]
    assert [h["method"] for h in history] == ["train"] and history[0]["result"]["base"] == "preset:nano-20m"
    assert history[0]["train"]["objective"] == {"name": "lm"} and history[0]["result"]["steps"] == 6
    step = step_from_record(history[0])  # the history reads back as a step config that runs again
    assert step.train.max_steps == 6 and step.train.seq_len == 32 and step.data == SHAKESPEARE
    assert (out.parent / "nano.train").is_dir()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "4"]) == 0
    assert main(["eval", str(out), "--tasks", SHAKESPEARE, "--window", "32", "--max-windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["export", str(out), "--format", "gguf", "-o", str(tmp_path / "nano.gguf")]) == 0
    assert main(["export", str(out), "--format", "hf", "-o", str(tmp_path / "nano-hf")]) == 0


def test_supervised_fine_tuning_on_alpaca(tmp_path, donor, capsys):
    records = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w}"} for w in ("fox", "dog", "hello") * 4]
    (tmp_path / "a.json").write_text(json.dumps(records))
    run_file = tmp_path / "sft.json"
    assert main(["train", str(donor), "--data", str(tmp_path / "a.json"), "--seq-len", "64", "--batch-size", "2",
                 "--epochs", "1", "--lr", "1e-3", "-o", str(tmp_path / "sft"), "--json", str(run_file)]) == 0
    run = json.loads(run_file.read_text())
    assert run["protocol"]["train"]["objective"] == {"name": "sft"} and run["protocol"]["data"]["format"] == "alpaca"
    assert run["results"]["train"]["steps"] == 6  # 11 training records (one held out), 2 a step, one epoch


def test_sigkill_at_a_random_moment_then_resume_is_bit_for_bit(tmp_path, donor):
    args = ["train", "--preset", "tiny", "--tokenizer", donor, "--data", SHAKESPEARE, *FAST, "--steps", "400",
            "--save-every", "4", "--lr", "3e-3"]
    assert slm(*args, "-o", tmp_path / "full").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", *map(str, args), "-o", str(tmp_path / "cut")],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "cut.train"
    deadline = time.time() + 120
    while not list(state.glob("step-*/train_state.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    moment = random.uniform(0.0, 1.0)  # somewhere in the middle of training, mid-step or mid-save
    time.sleep(moment)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut").exists(), moment  # killed: nothing under OUT that looks complete
    resumed = slm(*args, "-o", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), moment


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, donor, kind):
    common = ["train", "--preset", "tiny", "--tokenizer", donor, "--data", SHAKESPEARE, "--seq-len", "32",
              "--threads", "1", "--steps", "20", "--lr", "3e-3", "--grad-accum", "2"]
    single = slm(*common, "--batch-size", "4", "-o", tmp_path / "one", "--json", tmp_path / "one.json")
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "slmkit", *map(str, common), "--batch-size", "2", "--distributed", kind, "--save-every", "10",
           "-o", str(tmp_path / kind), "--json", str(tmp_path / f"{kind}.json")]
    multi = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert multi.returncode == 0, multi.stderr[-2000:]
    one = json.loads((tmp_path / "one.json").read_text())["results"]["train"]["loss_curve"]
    two = json.loads((tmp_path / f"{kind}.json").read_text())["results"]["train"]["loss_curve"]
    assert len(one) == len(two) == 20 and max(abs(x[1] - y[1]) for x, y in zip(one, two)) < 1e-5
    assert [x[4] for x in one] == [y[4] for y in two]  # the same tokens in every step
    a, b = weights(tmp_path / "one"), weights(tmp_path / kind)  # consolidated: loads anywhere, same layout
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert main(["info", str(tmp_path / kind)]) == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- bad input ----------------------------------------------------------------------------------
def bad_inputs(tmp: Path, donor: Path) -> dict[str, tuple[list, str]]:
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("the quick brown fox")
    (tmp / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    base = ["--tokenizer", str(donor), "--seq-len", "32", "--batch-size", "2", "--steps", "2"]
    return {
        "empty data": (["--preset", "tiny", *base, "--data", str(tmp / "empty.txt")], "empty"),
        "shorter than a sequence": (["--preset", "tiny", *base, "--data", str(tmp / "short.txt")], "shorter than one"),
        "no assistant turn": ([str(donor), *base[2:], "--data", str(tmp / "chat.jsonl")], "no assistant turn"),
        "unknown preset": (["--preset", "giant", *base, "--data", SHAKESPEARE], "unknown preset 'giant'"),
        "learning rate 0": (["--preset", "tiny", *base, "--data", SHAKESPEARE, "--lr", "0"], "learning rate"),
        "negative learning rate": (["--preset", "tiny", *base, "--data", SHAKESPEARE, "--lr", "-1"], "learning rate"),
        "zero batch": (["--preset", "tiny", *base, "--data", SHAKESPEARE, "--batch-size", "0"], "micro-batch"),
        "no length": (["--preset", "tiny", *base[:-2], "--data", SHAKESPEARE], "give a length"),
        "distributed outside torchrun": (["--preset", "tiny", *base, "--data", SHAKESPEARE, "--distributed", "ddp"],
                                         "torchrun"),
        "model and preset": ([str(donor), "--preset", "tiny", *base, "--data", SHAKESPEARE], "not both"),
        "sequence past the context": ([str(donor), *base[2:], "--seq-len", "4096", "--data", SHAKESPEARE], "context"),
        "huge thread count": (["--preset", "tiny", *base, "--data", SHAKESPEARE, "--threads", "999999999999"],
                              "--threads"),
    }


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, donor, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name, (argv, message) in bad_inputs(tmp_path, donor).items():
        out = tmp_path / "out"
        code = main(["train", *map(str, argv), "-o", str(out)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (name, lines[-5:])
        assert len(lines) == 1 and lines[0].startswith("slm: error:") and message in lines[0], (name, lines)
        assert not out.exists() and not Path(f"{out}.train").exists(), name


def test_existing_output_and_resume_of_another_run(tmp_path, donor):
    args = ["train", "--preset", "tiny", "--tokenizer", donor, "--data", SHAKESPEARE, *FAST, "--steps", "2",
            "--save-every", "1"]
    assert slm(*args, "-o", tmp_path / "m").returncode == 0
    before = weights(tmp_path / "m")
    again = slm(*args, "-o", tmp_path / "m")
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    shutil.move(tmp_path / "m", tmp_path / "kept")  # the train state stays: a new run must not overwrite it
    fresh = slm(*args, "-o", tmp_path / "m")
    assert fresh.returncode == 2 and "--resume to continue it or --force" in fresh.stderr
    other = slm(*[a if a != "3e-3" else a for a in args], "--lr", "1e-2", "-o", tmp_path / "m", "--resume")
    assert other.returncode == 2 and "another train config" in other.stderr and not (tmp_path / "m").exists()
    assert all(torch.equal(before[k], v) for k, v in weights(tmp_path / "kept").items())
    forced = slm(*args, "-o", tmp_path / "kept", "--force")
    assert forced.returncode == 0


@pytest.mark.parametrize("name", ["tiny", "nano-20m", "mobilellm-50m", "openelm-style-100m"])
def test_every_preset_pretrains_and_exports(tmp_path, donor, name, capsys):
    out = tmp_path / name
    assert main(["train", "--preset", name, "--tokenizer", str(donor), "--data", SHAKESPEARE, "--seq-len", "16",
                 "--batch-size", "1", "--steps", "2", "--lr", "1e-3", "-o", str(out)]) == 0, capsys.readouterr().err
    saved = json.loads((out / "slmkit.json").read_text())["config"]
    assert saved["share_blocks"] == (2 if name == "mobilellm-50m" else 1)
    assert bool(saved["layer_ffn_dims"]) == (name == "openelm-style-100m")
    assert main(["export", str(out), "--format", "hf", "-o", str(tmp_path / f"{name}-hf")]) == 0
