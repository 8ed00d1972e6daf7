"""Structured pruning: the importance math, every axis on a tiny model (a smaller dense model that saves, loads,
generates and exports to Hugging Face and GGUF), GQA groups kept even, and bad targets refused (exit 2)."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import transformers

from slmkit import loader
from slmkit.checkpoint import export_gguf, export_hf, save_checkpoint
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.generate import GenerationConfig, generate
from slmkit.model import Decoder, count_parameters
from slmkit.steps import step_from_record
from slmkit.prune import StructuredPruneConfig, parse_count, prune_structured_
from slmkit.prune.importance import (activation_importance, block_importance, head_scores, keep_heads,
                                     magnitude_importance)
from slmkit.prune.structured import importance_of, prune_structured_model_
from slmkit.quant import QScheme, RTNConfig, quantize_

from conftest import randomize
from test_cli import CORPUS, run, tiny_tokenizer

TOK = tiny_tokenizer()
GQA = ModelConfig(vocab_size=TOK.vocab_size, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                  max_seq_len=64, eos_token_id=TOK.eos_token_id)
MHA = dataclasses.replace(GQA, n_kv_heads=None)
SEQ = torch.randint(0, GQA.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
IMPORTANCES = ["activation", "magnitude"]


def tiny(cfg: ModelConfig = GQA, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(cfg).eval()
    randomize(model, seed=seed)
    return model


def calib() -> torch.Tensor:
    return torch.randint(0, GQA.vocab_size, (4, 16), generator=torch.Generator().manual_seed(9))


def pruned(step: StructuredPruneConfig, model: Decoder | None = None) -> Decoder:
    return prune_structured_(tiny() if model is None else model, step, calib())


def scores(model: Decoder, importance: str):
    return activation_importance(model, calib()) if importance == "activation" else magnitude_importance(model)


@torch.no_grad()
def logits(model: Decoder) -> torch.Tensor:
    return model(SEQ)


# ---- the pure math ---------------------------------------------------------------------------------------
def test_head_scores_rank_a_silent_head_last():
    mean_sq = torch.rand(4 * 16) + 0.1  # E[x^2] of o_proj's input columns: 4 heads of 16
    mean_sq[2 * 16:3 * 16] = 0
    s = head_scores(mean_sq, 4)
    assert s.argmin() == 2 and s[2] == 0
    assert torch.allclose(s[0], mean_sq[:16].sum().sqrt())


def test_keep_heads_keeps_the_same_count_in_every_group():
    s = torch.tensor([0.1, 0.2, 5.0, 6.0])  # the two weakest heads both sit in kv group 0
    assert keep_heads(s, n_kv_heads=2, per_group=1).tolist() == [1, 3]  # not the global top 2 ([2, 3])
    assert keep_heads(s, n_kv_heads=1, per_group=2).tolist() == [2, 3]


def test_block_importance_is_one_minus_cosine():
    x = torch.randn(3, 5, 8)
    y = torch.randn(3, 5, 8)
    y = y - (y * x).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True) * x  # orthogonal to x
    for out, expected in [(x, 0.0), (2 * x, 0.0), (-x, 2.0), (y, 1.0)]:
        assert torch.allclose(block_importance(x, out), torch.full((3, 5), expected), atol=1e-5)


def test_parse_count():
    assert parse_count("90M") == 90_000_000 and parse_count("1.2B") == 1_200_000_000
    assert parse_count("500k") == 500_000 and parse_count("134_515_008") == 134_515_008 and parse_count(7) == 7
    for bad in ("lots", "0", "-5M", "1.2T"):
        with pytest.raises(SlmError, match="parameter count"):
            parse_count(bad)


# ---- importance on a model: a dead unit ranks last, and removing it changes nothing -------------------
@pytest.mark.parametrize("importance", IMPORTANCES)
@torch.no_grad()
def test_dead_units_rank_last_and_go_first(importance):
    model = tiny(MHA)
    for block in model.blocks:
        block.attn.v_proj.weight[2 * 16:3 * 16] = 0  # head 2 outputs zero
        block.mlp.up_proj.weight[5] = 0  # MLP channel 5 outputs zero
    model.blocks[1].attn.o_proj.weight.zero_()  # block 1 is the identity
    model.blocks[1].mlp.down_proj.weight.zero_()
    s = scores(model, importance)
    live = [0, 2, 3]  # block 1 writes nothing: by magnitude all its units tie at zero
    assert all(s.heads[i].argmin() == 2 for i in live) and all(s.channels[i].argmin() == 5 for i in live)
    assert s.layers.argmin() == 1 and s.layers[1] < 1e-6
    expected = logits(model)
    small = pruned(StructuredPruneConfig(heads=3, ffn_dim=95, n_layers=3, importance=importance), model)
    assert (small.cfg.n_heads, small.cfg.kv_heads, small.cfg.ffn_dim, small.cfg.n_layers) == (3, 3, 95, 3)
    assert torch.allclose(logits(small), expected, atol=1e-5)


# ---- the pruned model is the original with the removed units silenced ----------------------------------
def kept_rows(small: torch.Tensor, big: torch.Tensor, width: int) -> list[int]:
    """Which `width`-row blocks of big each block of small is (by equality)."""
    units = big.view(-1, width, big.shape[1])  # [units, width, in]
    kept = small.view(-1, width, small.shape[1])  # [kept units, width, in]
    return [next(i for i in range(len(units)) if torch.equal(k, units[i])) for k in kept]


@torch.no_grad()
def test_heads_axis_keeps_every_kv_group_and_matches_silenced_heads():
    model = tiny()
    step = StructuredPruneConfig("heads", ratio=0.1)
    small = pruned(step, tiny())
    assert (small.cfg.n_heads, small.cfg.kv_heads) == (2, 2)  # one query head left in each of the 2 groups
    for i, block in enumerate(small.blocks):
        heads = kept_rows(block.attn.q_proj.weight, model.blocks[i].attn.q_proj.weight, 16)
        assert sorted(h // 2 for h in heads) == [0, 1]  # query head h reads kv head h // 2
        cols = torch.ones(4, 16)
        cols[[h for h in range(4) if h not in heads]] = 0
        model.blocks[i].attn.o_proj.weight.mul_(cols.flatten())  # silence the removed heads
    assert torch.allclose(logits(small), logits(model), atol=1e-5)


@torch.no_grad()
def test_mlp_and_layers_axes_match_silenced_units():
    model = tiny()
    small = pruned(StructuredPruneConfig("mlp", ratio=0.2), tiny())
    for i, block in enumerate(small.blocks):
        kept = kept_rows(block.mlp.up_proj.weight, model.blocks[i].mlp.up_proj.weight, 1)
        mask = torch.zeros(GQA.ffn_dim)
        mask[kept] = 1
        model.blocks[i].mlp.down_proj.weight.mul_(mask)
    assert torch.allclose(logits(small), logits(model), atol=1e-5)

    model, small = tiny(), pruned(StructuredPruneConfig("layers", ratio=0.3), tiny())
    kept = [next(i for i, b in enumerate(model.blocks) if torch.equal(b.mlp.up_proj.weight, s.mlp.up_proj.weight))
            for s in small.blocks]
    for i, block in enumerate(model.blocks):
        if i not in kept:  # a block writing nothing is the identity
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    assert torch.allclose(logits(small), logits(model), atol=1e-5)


# ---- every axis: a valid, smaller dense model that saves, loads, generates and exports -----------------
AXES = [("heads", 0.1), ("mlp", 0.25), ("hidden", 0.25), ("layers", 0.25), ("auto", 0.4)]


@pytest.mark.parametrize("axis, ratio", AXES)
@torch.no_grad()
def test_each_axis_gives_a_working_smaller_model(axis, ratio, tmp_path):
    total = count_parameters(tiny())["total"]
    step = StructuredPruneConfig(axis, ratio=ratio)
    model = pruned(step)
    assert count_parameters(model)["total"] <= int(total * (1 - ratio))
    assert ModelConfig.from_dict(json.loads(json.dumps(model.cfg.to_dict()))) == model.cfg
    assert step_from_record(model.compression[-1]) == step
    expected = logits(model)
    assert expected.shape == (1, SEQ.shape[1], GQA.vocab_size) and torch.isfinite(expected).all()

    again = loader.load(save_checkpoint(model, TOK, tmp_path / "ckpt")).model
    assert again.cfg == model.cfg and torch.equal(logits(again), expected)
    assert again.compression[-1]["method"] == "prune_structured"
    assert len(list(generate(again, [3, 4, 5], GenerationConfig(max_new_tokens=6)))) == 6

    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, TOK, tmp_path / "hf"), dtype=torch.float32)
    assert (hf.eval()(SEQ).logits - expected).abs().max() < 1e-4


def test_auto_cuts_mlp_then_layers():
    cfg = pruned(StructuredPruneConfig("auto", ratio=0.15)).cfg
    assert (cfg.ffn_dim < 96, cfg.n_heads, cfg.n_layers) == (True, 4, 4)  # the MLP alone reaches 15%
    cfg = pruned(StructuredPruneConfig("auto", ratio=0.4)).cfg
    assert (cfg.ffn_dim, cfg.n_heads, cfg.dim, cfg.n_layers) == (48, 4, 64, 3)  # MLP at its floor, then a layer


@torch.no_grad()
def test_one_importance_pass_serves_several_targets():
    step = StructuredPruneConfig("auto", ratio=0.3)
    scores = importance_of(tiny(), step, calib())
    model = tiny()
    prune_structured_model_(model, step, None, scores)
    reference = pruned(step)
    assert model.cfg == reference.cfg and torch.equal(logits(model), logits(reference))


@torch.no_grad()
def test_gguf_export_loads_in_slmkit_and_llama_cpp(tmp_path):
    model = pruned(StructuredPruneConfig("hidden", ratio=0.1))  # width 48, 4 heads of 16: head_dim written out
    path = export_gguf(model, TOK, tmp_path / "m.gguf")
    assert (logits(loader.load(path).model) - logits(model)).abs().max() < 1e-4
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    llm.eval(SEQ[0].tolist())  # an f32 KV cache (type 0), so the logits agree to float rounding
    theirs = torch.tensor(np.array(llm.scores[:SEQ.shape[1]]))
    llm.close()
    assert (theirs - logits(model)[0]).abs().max() < 1e-3


@torch.no_grad()
def test_layerwise_scaled_model_prunes_layers_and_hidden_not_heads(tmp_path):
    cfg = dataclasses.replace(GQA, layer_n_heads=[2, 4, 4, 8], layer_n_kv_heads=[1, 2, 2, 2],
                              layer_ffn_dims=[64, 96, 96, 128])
    model = pruned(StructuredPruneConfig("layers", ratio=0.2), tiny(cfg))
    assert model.cfg.n_layers == 3 and len(model.cfg.layer_ffn_dims) == 3
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, TOK, tmp_path / "hf"), dtype=torch.float32)
    assert (hf.eval()(SEQ).logits - logits(model)).abs().max() < 1e-4
    with pytest.raises(SlmError, match="uniform widths"):
        pruned(StructuredPruneConfig("heads", ratio=0.1), tiny(cfg))


GEMMA = dataclasses.replace(GQA, family="gemma3", mlp="geglu", activation="gelu_tanh", qk_norm=True,
                            sandwich_norm=True, embed_scale=8.0, attn_scale=24 ** -0.5, norm_eps=1e-6,
                            sliding_window=8, rope_local_theta=50.0, sliding_layers=[True, False, True, False])
QWEN2 = dataclasses.replace(GQA, family="qwen2", qkv_bias=True, tie_embeddings=False)


@pytest.mark.parametrize("cfg, axis, ratio", [(GEMMA, "auto", 0.3), (GEMMA, "heads", 0.1), (QWEN2, "auto", 0.3),
                                              (QWEN2, "hidden", 0.2)])
@torch.no_grad()
def test_other_families_export_after_pruning(cfg, axis, ratio, tmp_path):
    """QK-norm, sandwich norms, sliding layers (kept per kept block), QKV bias and an untied output survive."""
    model = pruned(StructuredPruneConfig(axis, ratio=ratio), tiny(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, TOK, tmp_path / "hf"), dtype=torch.float32,
                                                           attn_implementation="eager")
    assert (hf.eval()(SEQ).logits - logits(model)).abs().max() < 1e-4


# ---- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step, message", [
    (StructuredPruneConfig("heads", ratio=0.3), "every query head of a group"),
    (StructuredPruneConfig("layers", ratio=0.9), "every layer"),
    (StructuredPruneConfig("mlp", ratio=0.9), "every MLP channel"),
    (StructuredPruneConfig("auto", ratio=0.9), "every layer"),
    (StructuredPruneConfig(n_layers=0), "every layer"),
    (StructuredPruneConfig(heads=3), "multiple of 2"),
    (StructuredPruneConfig(ffn_dim=200), "wider than"),
    (StructuredPruneConfig(ratio=0.2, heads=2), "exactly one target"),
    (StructuredPruneConfig("width", ratio=0.2), "axis must be one of"),
])
def test_impossible_steps_are_refused(step, message):
    with pytest.raises(SlmError, match=message):
        pruned(step)


def test_shared_quantized_and_gemma_hidden_are_refused():
    with pytest.raises(SlmError, match="share_blocks"):
        pruned(StructuredPruneConfig(ratio=0.2), tiny(dataclasses.replace(GQA, share_blocks=2)))
    with pytest.raises(SlmError, match="embed_scale"):
        pruned(StructuredPruneConfig("hidden", ratio=0.2), tiny(GEMMA))
    with pytest.raises(SlmError, match="prune before quantizing"):
        pruned(StructuredPruneConfig(ratio=0.2), quantize_(tiny(), RTNConfig(QScheme(4, 16), search=False)))


# ---- the command line -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m")
    (folder / "calib.txt").write_text("\n".join(CORPUS))
    return save_checkpoint(tiny(), TOK, folder / "tiny"), folder / "calib.txt"


def test_cli_writes_a_smaller_checkpoint(checkpoint, tmp_path, capsys):
    model, calib_text = checkpoint
    code, out, err = run(capsys, "prune", str(model), "--structured", "auto", "--target-params", "100k", "--calib",
                         str(calib_text), "--calib-samples", "4", "--calib-length", "16", "-o", str(tmp_path / "p"))
    assert code == 0, err
    small = loader.load(out.strip()).model
    assert count_parameters(small)["total"] <= 100_000 < count_parameters(tiny())["total"]
    assert small.compression[-1]["target_params"] == 100_000


@pytest.mark.parametrize("extra, message", [
    (["--structured", "heads", "--target-params", "1B"], "not below"),
    (["--structured", "heads", "--ratio", "1.5"], r"ratio must be in \(0, 1\)"),
    (["--structured", "heads", "--ratio", "0.3"], "every query head of a group"),
    (["--structured", "layers", "--ratio", "0.95"], "every layer"),
    (["--structured", "mlp", "--target-params", "lots"], "parameter count must look like"),
    (["--structured", "mlp"], "exactly one target"),
    (["--ratio", "0.2"], "need --structured"),
    (["--structured", "mlp", "--ratio", "0.2", "--method", "wanda"], "does not take --method"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(checkpoint, tmp_path, capsys, extra, message):
    code, _, err = run(capsys, "prune", str(checkpoint[0]), *extra, "--importance", "magnitude", "-o",
                       str(tmp_path / "p"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "p").exists()
