"""`slm train --lora / --prompt-tuning / --dp-*` and `slm merge` end to end on a tiny model: the PEFT-format folder
that every command then takes as MODEL, QLoRA on a packed base, DP's record in the run and the folder, merge's
measured cost, and bad input (one line, exit 2, nothing written)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slmkit.backends import load
from slmkit.checkpoint import save_checkpoint
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.model import Decoder
from slmkit.quant.packed import QuantLinear
from slmkit.steps import step_from_record
from slmkit.train.init import init_weights_

from test_cli import tiny_tokenizer

DATA = "tinyshakespeare"
FAST = ["--data", DATA, "--seq-len", "32", "--batch-size", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=128, eos_token_id=tok.eos_token_id)
    return save_checkpoint(init_weights_(Decoder(cfg), 0), tok, tmp_path_factory.mktemp("base") / "base")


def test_lora_run_writes_a_peft_folder_every_command_takes(tmp_path, base, capsys):
    out, run_file = tmp_path / "lora", tmp_path / "run.json"
    code = main(["train", str(base), *FAST, "--steps", "4", "--lora", "4", "--lora-targets", "q_proj,v_proj",
                 "-o", str(out), "--json", str(run_file)])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                               "slmkit_adapter.json"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["base_model_name_or_path"] == str(base)
    keys = sorted(load_file(str(out / "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" and len(keys) == 8
    note = json.loads((out / "slmkit_adapter.json").read_text())
    assert [h["method"] for h in note["history"]] == ["lora", "train"] and note["base"] == str(base)
    assert step_from_record(note["history"][0]).rank == 4  # the history reads back as step configs
    run = json.loads(run_file.read_text())
    assert run["protocol"]["train"]["trainable"] == ["*.lora_A.weight", "*.lora_B.weight", "*.lora_magnitude_vector"]
    assert "privacy" not in run
    capsys.readouterr()
    for argv in (["generate", str(out), "--prompt", "the", "--max-new-tokens", "3"],
                 ["eval", str(out), "--tasks", DATA, "--window", "32", "--max-windows", "2"],
                 ["info", str(out)]):
        assert main(argv) == 0, (argv, capsys.readouterr().err)
    assert "(adapter)" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["merge", str(out), "-o", str(merged)]) == 0
    err = capsys.readouterr().err
    assert "merged 4 adapted linears (0 packed" in err and "KL(adapted || merged)" in err
    history = json.loads((merged / "slmkit.json").read_text())["compression"]
    assert [h["method"] for h in history] == ["lora", "train", "merge_lora"]
    assert history[-1]["result"]["kl_mean"] < 1e-8
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert torch.allclose(load(str(merged)).model(x), load(str(out)).model(x), atol=1e-4)


def test_qlora_on_a_packed_base_then_merge_requantizes(tmp_path, base, capsys):
    packed = tmp_path / "q4"
    assert main(["quantize", str(base), "--method", "rtn", "--bits", "4", "--group-size", "32", "-o", str(packed)]) == 0
    out = tmp_path / "qlora"
    assert main(["train", str(packed), *FAST, "--steps", "3", "--lora", "4", "--lr", "1e-2", "-o", str(out)]) == 0
    adapted = load(str(out)).model
    assert isinstance(adapted.blocks[0].attn.q_proj.base, QuantLinear)
    assert main(["merge", str(out), "-o", str(tmp_path / "merged")]) == 0
    assert "(14 packed, re-quantized)" in capsys.readouterr().err
    merged = load(str(tmp_path / "merged")).model
    assert isinstance(merged.blocks[1].mlp.down_proj, QuantLinear)
    assert merged.blocks[1].mlp.down_proj.scheme.bits == 4


def test_prompt_tuning_run(tmp_path, base, capsys):
    out = tmp_path / "pt"
    assert main(["train", str(base), *FAST, "--steps", "3", "--prompt-tuning", "6", "-o", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 6
    assert list(load_file(str(out / "adapter_model.safetensors"))) == ["prompt_embeddings"]
    assert load(str(out)).model.n_virtual == 6
    assert main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "3"]) == 0
    assert main(["merge", str(out), "-o", str(tmp_path / "m")]) == 2
    assert "prompt tuning cannot be merged" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_dp_run_records_its_privacy(tmp_path, base, capsys):
    out, run_file = tmp_path / "dp", tmp_path / "dp.json"
    code = main(["train", str(base), *FAST, "--steps", "3", "--lora", "2", "--dp-epsilon", "8", "--dp-clip", "0.5",
                 "-o", str(out), "--json", str(run_file)])
    assert code == 0, capsys.readouterr().err
    assert "[DP-SGD: epsilon" in capsys.readouterr().err
    privacy = json.loads(run_file.read_text())["privacy"]
    assert set(privacy) >= {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "clip_norm", "accountant"}
    assert privacy["clip_norm"] == 0.5 and privacy["steps"] == 3 and 7.5 < privacy["epsilon"] <= 8.0
    note = json.loads((out / "slmkit_adapter.json").read_text())
    assert note["history"][-1]["result"]["privacy"] == privacy  # in the model's record too
    assert note["history"][-1]["train"]["privacy"]["epsilon"] == 8.0


def bad_inputs(tmp_path: Path, base: Path) -> dict:
    b = [str(base), *FAST, "--steps", "2"]
    other = tmp_path / "other"
    tok = tiny_tokenizer()
    save_checkpoint(Decoder(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                                        max_seq_len=128)), tok, other)
    return {
        "rank 0": ([*b, "--lora", "0"], "positive integer"),
        "rank above the matrix": ([*b, "--lora", "65"], "exceeds"),
        "targets that match nothing": ([*b, "--lora", "2", "--lora-targets", "qkv"], "match no linear layer"),
        "lora options without lora": ([*b, "--lora-alpha", "4"], "go with --lora"),
        "lora and prompt tuning": ([*b, "--lora", "2", "--prompt-tuning", "3"], "not both"),
        "epsilon 0": ([*b, "--lora", "2", "--dp-epsilon", "0"], "--dp-epsilon must be positive"),
        "delta 1": ([*b, "--lora", "2", "--dp-epsilon", "3", "--dp-delta", "1"], "--dp-delta must be in"),
        "clip 0": ([*b, "--lora", "2", "--dp-epsilon", "3", "--dp-clip", "0"], "--dp-clip must be positive"),
        "epsilon and noise": ([*b, "--dp-epsilon", "3", "--dp-noise", "1"], "exactly one"),
        "batch above the data": ([*b, "--lora", "2", "--dp-noise", "1", "--batch-size", "100000"], "has only"),
        "epsilon out of reach": ([*b, "--lora", "2", "--dp-epsilon", "0.001", "--dp-delta", "1e-12"],
                                 "finds no noise multiplier"),
        "adapter on a preset": (["--preset", "tiny", "--tokenizer", str(base), *FAST, "--steps", "2", "--lora", "2"],
                                "from scratch"),
    }, other


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, base, capsys):
    cases, other = bad_inputs(tmp_path, base)
    for name, (argv, message) in cases.items():
        out = tmp_path / "out"
        code = main(["train", *argv, "-o", str(out)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (name, lines[-5:])
        assert len(lines) == 1 and lines[0].startswith("slm: error:") and message in lines[0], (name, lines)
        assert not out.exists() and not Path(f"{out}.train").exists(), name
    adapter = tmp_path / "a"
    assert main(["train", str(base), *FAST, "--steps", "1", "--lora", "2", "-o", str(adapter)]) == 0
    capsys.readouterr()
    assert main(["merge", str(adapter), "--base", str(other), "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made for another base" in err[0] and not (tmp_path / "m").exists()
    assert main(["eval", str(tmp_path), "--tasks", DATA]) == 2  # a folder that is no model at all
    capsys.readouterr()
    prompt = tmp_path / "pt"
    assert main(["train", str(base), *FAST, "--steps", "1", "--prompt-tuning", "2", "-o", str(prompt)]) == 0
    capsys.readouterr()
    for argv in (["quantize", str(prompt), "--method", "rtn", "-o", str(tmp_path / "q")],
                 ["export", str(prompt), "--format", "hf", "-o", str(tmp_path / "q")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no weights to fold in" in err[0] and not (tmp_path / "q").exists(), argv


def test_compression_and_export_of_a_lora_folder_merge_it_first(tmp_path, base, capsys):
    adapter = tmp_path / "a"
    assert main(["train", str(base), *FAST, "--steps", "2", "--lora", "2", "--lr", "1e-2", "-o", str(adapter)]) == 0
    assert main(["quantize", str(adapter), "--method", "rtn", "--group-size", "32", "-o", str(tmp_path / "q")]) == 0
    history = json.loads((tmp_path / "q" / "slmkit.json").read_text())["compression"]
    assert [h["method"] for h in history] == ["lora", "train", "merge_lora", "rtn"]
    assert main(["export", str(adapter), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.allclose(load(str(tmp_path / "hf")).model(x), load(str(adapter)).model(x), atol=1e-4)
