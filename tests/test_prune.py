"""Unstructured and N:M pruning: the mask math, SparseGPT's reconstruction, whole tiny models (with GPTQ after),
compressed sparse storage, `slm info` sparsity and `slm prune` end to end."""

import json
from pathlib import Path

import pytest
import torch

from slmkit import loader
from slmkit.checkpoint import save_checkpoint
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.info import zero_fractions
from slmkit.model import Decoder
from slmkit.modules import named_linears
from slmkit.pipeline import step_record
from slmkit.steps import step_from_record
from slmkit.prune import PruneConfig, nm_mask, prune_, sparsegpt_prune, unstructured_mask
from slmkit.prune.scores import magnitude_scores, select_mask, wanda_scores
from slmkit.prune.storage import compress_state, expand_state_, pack_bits, unpack_bits
from slmkit.quant import GPTQConfig, QScheme, RTNConfig, quantize_

from conftest import tokens
from test_cli import CORPUS, run, tiny_tokenizer
from test_quant_model import calib, tiny_model


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- masks ----------------------------------------------------------------------------------------
def lowest_are_dropped(scores, keep):
    """Every dropped score is at most every kept one, within each row of scores [rows, size] (scores in [0, 1))."""
    return (torch.where(keep, -1.0, scores).amax(1) <= torch.where(keep, scores, 2.0).amin(1)).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_masks_are_exact_per_row_and_per_layer(sparsity):
    scores = torch.rand(12, 40, generator=gen())
    keep = unstructured_mask(scores, sparsity)
    assert ((~keep).sum(1) == round(sparsity * 40)).all() and lowest_are_dropped(scores, keep)
    layer = unstructured_mask(scores, sparsity, per_layer=True)
    assert (~layer).sum() == round(sparsity * scores.numel())
    assert lowest_are_dropped(scores.reshape(1, -1), layer.reshape(1, -1))


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_keep_exactly_n_of_every_m(pattern):
    n, m = pattern
    scores = torch.rand(6, 32, generator=gen(1))
    keep = nm_mask(scores, pattern)
    groups, kept = scores.reshape(-1, m), keep.reshape(-1, m)  # [out * 32 / M, M]
    assert (kept.sum(1) == n).all() and lowest_are_dropped(groups, kept)


def test_wanda_equals_magnitude_under_uniform_activations_and_protects_outlier_channels():
    W = torch.randn(16, 64, generator=gen(2))
    uniform = torch.full((64,), 3.0)
    for pattern in (None, (2, 4)):
        assert torch.equal(select_mask(wanda_scores(W, uniform), 0.5, pattern),
                           select_mask(magnitude_scores(W), 0.5, pattern))
    loud = uniform.clone()
    loud[:4] = 1e4
    assert select_mask(wanda_scores(W, loud), 0.5, None)[:, :4].all()  # every weight on an outlier channel kept


def correlated_inputs(n=128, samples=2048):
    """Inputs X [samples, n] with correlated columns and a few outlier channels, as real activations have."""
    mix = torch.randn(n, n, generator=gen(3)) / n ** 0.5 + torch.eye(n)
    X = torch.randn(samples, n, generator=gen(4)) @ mix
    X[:, :4] *= 20
    return X


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    X, W = correlated_inputs(), torch.randn(64, 128, generator=gen(5))
    H = 2 * X.T @ X / len(X)

    def error(pruned):
        return ((X @ W.T - X @ pruned.T).norm() / (X @ W.T).norm()).item()

    magnitude = W * select_mask(magnitude_scores(W), 0.5, pattern)
    wanda = W * select_mask(wanda_scores(W, (X * X).mean(0)), 0.5, pattern)
    sparse = sparsegpt_prune(W, H, 0.5, pattern, block=32)
    assert error(sparse) < error(wanda) <= error(magnitude)  # measured 0.068 < 0.080 < 0.28; 0.24 < 0.370 < 0.372
    if pattern is None:
        assert ((sparse == 0).sum(1) == 64).all()
        assert ((sparsegpt_prune(W, H, 0.3, per_layer=True, block=48) == 0).sum() == round(0.3 * W.numel()))
        assert ((sparsegpt_prune(W, H, 0.3, block=48) == 0).sum(1) == round(0.3 * 128)).all()  # 128 = 48+48+32
    else:
        assert ((sparse.reshape(-1, 4) != 0).sum(1) == 2).all()


def test_bad_sparsity_and_patterns_are_refused():
    scores = torch.rand(4, 12)
    for bad, message in ((lambda: unstructured_mask(scores, 1.0), "sparsity must be in"),
                         (lambda: unstructured_mask(scores, -0.1), "sparsity must be in"),
                         (lambda: nm_mask(scores, (4, 4)), "1 <= N < M"),
                         (lambda: nm_mask(scores, (0, 4)), "1 <= N < M"),
                         (lambda: nm_mask(scores, (2, 8)), "does not divide the layer width 12"),
                         (lambda: PruneConfig(sparsity=0.5, pattern=(2, 4)).validate(), "not both"),
                         (lambda: PruneConfig("random").validate(), "unknown pruning method")):
        with pytest.raises(SlmError, match=message):
            bad()


# ---- compressed storage -------------------------------------------------------------------------
def test_bitmask_storage_round_trips_exactly():
    mask = torch.rand(37, generator=gen(6)) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), 37), mask)
    W = torch.randn(8, 16, generator=gen(7)) * (torch.rand(8, 16, generator=gen(8)) > 0.5)
    dense = torch.randn(8, 16)
    state, layout = compress_state({"a.weight": W, "b.weight": dense}, ["a.weight", "b.weight"])
    assert layout == {"a.weight": [8, 16]} and "b.weight" in state  # dense stays dense: sparse would be larger
    assert torch.equal(expand_state_(state, layout)["a.weight"], W)


# ---- whole tiny models ----------------------------------------------------------------------------
def block_weights(model):
    return {n: m.weight.data for n, m in named_linears(model)}


@pytest.mark.parametrize("algorithm", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("shape", [{"sparsity": 0.5}, {"pattern": (2, 4)}])
def test_every_algorithm_prunes_every_block_linear_and_reruns_from_its_record(algorithm, shape):
    cfg = PruneConfig(algorithm, **shape)
    model = prune_(tiny_model(), cfg, calib() if cfg.needs_calibration else None)
    for name, W in block_weights(model).items():
        if "pattern" in shape:
            assert ((W.reshape(-1, 4) != 0).sum(1) == 2).all(), name
        else:
            assert ((W == 0).sum(1) == W.shape[1] // 2).all(), name
    assert zero_fractions(model)[0] == 0.5 and torch.isfinite(model(tokens(16))).all()
    record = json.loads(json.dumps(model.compression[0]))  # as read back from slmkit.json
    assert record["method"] == "prune" and step_from_record(record) == cfg and step_record(cfg) == record
    again = prune_(tiny_model(), step_from_record(record), calib() if cfg.needs_calibration else None)
    assert torch.equal(again(tokens(16)), model(tokens(16)))


@pytest.mark.parametrize("algorithm", ["magnitude", "wanda", "sparsegpt"])
def test_layer_wise_targets_prune_each_block_to_its_own_sparsity(algorithm):
    cfg = PruneConfig(algorithm, layer_sparsity=(0.25, 0.75))
    model = prune_(tiny_model(), cfg, calib() if cfg.needs_calibration else None)
    for name, W in block_weights(model).items():
        target = 0.25 if name.startswith("blocks.0.") else 0.75
        assert ((W == 0).sum(1) == int(W.shape[1] * target)).all(), name
    assert zero_fractions(model)[0] == 0.5 and "layer-wise" in cfg.describe()
    record = json.loads(json.dumps(model.compression[0]))
    assert record["layer_sparsity"] == [0.25, 0.75] and step_from_record(record) == cfg


def test_bad_layer_wise_targets_are_refused():
    with pytest.raises(SlmError, match="one target per block"):
        prune_(tiny_model(), PruneConfig("magnitude", layer_sparsity=(0.5,)))
    with pytest.raises(SlmError, match="sparsity must be in"):
        PruneConfig("magnitude", layer_sparsity=(0.5, 1.0)).validate()
    with pytest.raises(SlmError, match="do not combine"):
        PruneConfig("magnitude", layer_sparsity=(0.5, 0.5), pattern=(2, 4)).validate()


def test_calibrated_pruning_keeps_the_function_closer_than_magnitude():
    reference, seq = tiny_model(), calib(4, 32)

    def error(algorithm):
        model = prune_(tiny_model(), PruneConfig(algorithm, sparsity=0.5), calib())
        with torch.no_grad():
            a, b = model(seq), reference(seq)
        return ((a - b).norm() / b.norm()).item()

    assert error("sparsegpt") < error("magnitude") and error("wanda") < error("magnitude")


def test_gptq_after_pruning_keeps_the_zeros_and_both_steps_rerun():
    model = prune_(tiny_model(), PruneConfig("wanda", pattern=(2, 4)), calib())
    masks = {n: W == 0 for n, W in block_weights(model).items()}
    quantize_(model, GPTQConfig(QScheme(4, 32)), calib())
    for name, zero in masks.items():
        assert (model.get_submodule(name).dequantize()[zero] == 0).all(), name
    assert [s["method"] for s in model.compression] == ["prune", "gptq"]
    again = tiny_model()
    for record in model.compression:
        step = step_from_record(json.loads(json.dumps(record)))
        prune_(again, step, calib()) if step.method == "prune" else quantize_(again, step, calib())
    assert torch.equal(again(tokens(16)), model(tokens(16)))
    assert zero_fractions(model)[1]["q_proj"] >= 0.5  # packed codes that dequantize to zero are counted


def test_pruning_a_quantized_layer_is_refused():
    model = quantize_(tiny_model(), RTNConfig(QScheme(4, 32), search=False))
    with pytest.raises(SlmError, match="already quantized; prune before quantizing"):
        prune_(model, PruneConfig("magnitude"))
    with pytest.raises(SlmError, match="does not divide the layer width"):
        prune_(tiny_model(), PruneConfig("magnitude", pattern=(2, 5)))


def test_sparse_storage_shrinks_the_file_and_loads_exactly(tmp_path, tokenizer):
    model = prune_(tiny_model(), PruneConfig("magnitude", sparsity=0.5))
    dense = save_checkpoint(model, tokenizer, tmp_path / "dense")
    sparse = save_checkpoint(model, tokenizer, tmp_path / "sparse", sparse_storage=True)
    a, b = loader.load(dense), loader.load(sparse)
    assert b.file_bytes < a.file_bytes
    assert all(torch.equal(w, block_weights(b.model)[n]) for n, w in block_weights(model).items())
    assert b.model.compression == model.compression
    meta = json.loads((sparse / "slmkit.json").read_text())
    assert sorted(meta["sparse"]) == sorted(f"{n}.weight" for n in block_weights(model))


# ---- the CLI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny64(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128,
                      max_seq_len=128, eos_token_id=tok.eos_token_id)
    return save_checkpoint(Decoder(cfg), tok, tmp_path_factory.mktemp("m") / "tiny64")


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(CORPUS))
    return path


def prune_cli(capsys, model, out, calib_text, *extra):
    return run(capsys, "prune", str(model), "--calib", str(calib_text), "--calib-samples", "4", "--calib-length",
               "16", "-o", str(out), *extra)


def test_slm_prune_writes_a_sparse_checkpoint_that_info_reports(tiny64, calib_text, tmp_path, capsys):
    code, out, err = prune_cli(capsys, tiny64, tmp_path / "p", calib_text, "--method", "sparsegpt", "--pattern",
                               "2:4", "--sparse-storage")
    assert code == 0, err
    step = loader.load(out.strip()).model.compression[0]
    assert step["algorithm"] == "sparsegpt" and step["pattern"] == [2, 4] and step["calib"]["samples"] == 4
    code, info, _ = run(capsys, "info", out.strip(), "--json")
    info = json.loads(info)
    assert info["sparsity"] == 0.5 and info["sparsity_by_layer"]["down_proj"] == 0.5
    assert info["file_bytes"] < 0.8 * 4 * info["params"]
    code, text, _ = run(capsys, "info", out.strip())
    assert "50.0% of linear-layer weights are exactly zero" in text and "save no time and no memory" in text
    code, out, err = prune_cli(capsys, tiny64, tmp_path / "w", calib_text)  # defaults: wanda, 50%
    assert code == 0 and loader.load(out.strip()).model.compression[0]["algorithm"] == "wanda"
    code, out, err = prune_cli(capsys, tiny64, tmp_path / "l", calib_text, "--layer-sparsity", "0.25,0.75")
    assert code == 0, err
    assert loader.load(out.strip()).model.compression[0]["layer_sparsity"] == [0.25, 0.75]


@pytest.mark.parametrize("extra,message", [(["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
                                           (["--pattern", "4:4"], "1 <= N < M"),
                                           (["--pattern", "two:four"], "must look like 2:4"),
                                           (["--pattern", "3:5"], "does not divide the layer width 64"),
                                           (["--sparsity", "0.5", "--pattern", "2:4"], "not both"),
                                           (["--layer-sparsity", "0.5,x"], "comma-separated numbers"),
                                           (["--layer-sparsity", "0.5,0.5,0.5"], "one target per block"),
                                           (["--calib-samples", "400"], "asked for 400")])
def test_bad_input_exits_2_and_writes_nothing(tiny64, calib_text, tmp_path, capsys, extra, message):
    code, _, err = prune_cli(capsys, tiny64, tmp_path / "p", calib_text, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
