"""End-to-end CLI: `slm info`, `slm generate`, `slm chat`, and bad input (one line, exit 2, nothing written)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from slmkit.checkpoint import save_checkpoint
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.model import Decoder
from slmkit.tokenizer import Tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, small models on small machines",
          "a tokenizer for tests: numbers 0123456789 and punctuation !?."] * 20


def tiny_tokenizer() -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}" \
               "{% if add_generation_prompt %}assistant: {% endif %}"
    return Tokenizer(backend, eos_token_id=backend.token_to_id("<eos>"), chat_template=template)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=128, eos_token_id=tok.eos_token_id)
    return save_checkpoint(Decoder(cfg), tok, tmp_path_factory.mktemp("m") / "tiny")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json(tiny, capsys):
    code, out, _ = run(capsys, "info", str(tiny), "--json")
    info = json.loads(out)
    assert code == 0 and info["architecture"] == "llama" and info["format"] == "slmkit"
    assert info["params"] == info["params_embedding"] + info["params_attention"] + info["params_mlp"] + info["params_norm"]
    assert info["weight_bytes"] == info["params"] * 4 and info["context_length"] == 128


def test_info_text(tiny, capsys):
    code, out, _ = run(capsys, "info", str(tiny))
    assert code == 0 and "grouped-query" in out and "parameters" in out


def test_generate_prints_text_on_stdout_and_timings_on_stderr(tiny, capsys):
    code, out, err = run(capsys, "generate", str(tiny), "--prompt", "the quick", "--max-new-tokens", "6",
                         "--dtype", "float32")
    assert code == 0 and "tok/s" in err and "tok/s" not in out and out.endswith("\n")


def test_generate_chat_and_sampling(tiny, capsys):
    code, _, err = run(capsys, "generate", str(tiny), "--prompt", "hi", "--chat", "--temperature", "0.8",
                       "--top-k", "20", "--top-p", "0.9", "--seed", "1", "--max-new-tokens", "4")
    assert code == 0 and "prompt tokens" in err


def test_chat_reads_turns_until_exit(tiny, capsys, monkeypatch):
    lines = iter(["hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, _, err = run(capsys, "chat", str(tiny), "--max-new-tokens", "3")
    assert code == 0 and err.count("new tokens") == 1


# ---- bad input --------------------------------------------------------------------------------
def _hf_folder(path: Path, **overrides) -> Path:
    path.mkdir()
    config = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, **overrides}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _truncate(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


def bad_inputs(tiny: Path, tmp: Path):
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    for f in tiny.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    yield "missing path", tmp / "nope.gguf", "no such file"
    _truncate(tiny / "model.safetensors", ckpt / "model.safetensors", 0.5)
    yield "truncated safetensors", ckpt, "corrupt or truncated"
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    for f in tiny.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 4096)
    yield "corrupt safetensors", corrupt, "corrupt or truncated"
    sizeless = tmp / "sizeless"
    sizeless.mkdir()
    (sizeless / "config.json").write_text(json.dumps({"model_type": "llama"}))
    yield "config lacking sizes", sizeless, "lacks"
    yield "unknown architecture", _hf_folder(tmp / "bert", model_type="bert"), "unknown architecture"
    yield "kv heads not dividing", _hf_folder(tmp / "kv", num_key_value_heads=3), "does not divide n_heads"
    yield "zero size", _hf_folder(tmp / "zero", hidden_size=0), "dim must be positive"
    not_gguf = tmp / "model.gguf"
    not_gguf.write_bytes(b"\x00" * 64)
    yield "not a gguf", not_gguf, "not a GGUF file"
    shared = tmp / "shared"
    shared.mkdir()
    for f in tiny.iterdir():
        (shared / f.name).write_bytes(f.read_bytes())
    meta = json.loads((shared / "slmkit.json").read_text())
    meta["config"]["share_blocks"] = 3
    (shared / "slmkit.json").write_text(json.dumps(meta))
    yield "shared-layer count not dividing depth", shared, "share_blocks 3 does not divide n_layers 2"


def test_bad_inputs_fail_with_one_line_and_exit_2(tiny, tmp_path, capsys):
    for name, path, message in bad_inputs(tiny, tmp_path):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        code, out, err = run(capsys, "info", str(path))
        assert code == 2, name
        assert err.count("\n") == 1 and err.startswith("slm: error:") and message in err, (name, err)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, name


def test_truncated_and_corrupt_default_gguf(tmp_path, capsys):
    from slmkit.loader import default_model_path

    src = default_model_path()
    for keep in (0.001, 0.5, 0.999):
        code, _, err = run(capsys, "info", str(_truncate(src, tmp_path / f"t{keep}.gguf", keep)))
        assert code == 2 and "truncated GGUF" in err, (keep, err)


def test_real_entry_point_prints_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "slmkit.cli", "info", str(tmp_path / "missing")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_unknown_hub_id_offline_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "info", "someone/not-a-local-model")
    assert code == 2 and "could not be fetched from the hub" in err
