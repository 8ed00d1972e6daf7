"""QAT: the fake quantizer's forward is the packed format's arithmetic bit for bit (every bit width, sym and
asym), its straight-through gradients (clipped STE for weights, LSQ for scales), prepare -> train -> convert
with a converted model's prefill logits equal to the prepared model's exactly, a start from PTQ that changes
nothing at step 0, the recorded step, the CLI, and refusals."""

import json

import pytest
import torch

from slmkit.cli import main
from slmkit.checkpoint import save_checkpoint
from slmkit.errors import SlmError
from slmkit.modules import LayerFilter
from slmkit.qat import FakeQuantLinear, QATConfig, QATStep, convert_qat_, fake_quantize_weight, prepare_qat_
from slmkit.quant import GPTQConfig, RTNConfig, quantize_
from slmkit.quant.packed import QuantEmbedding, QuantLinear
from slmkit.quant.scheme import QScheme, dequantize_weight, quantize_weight
from slmkit.steps import step_from_record
from slmkit.train import TrainConfig, train

from conftest import randomize, tokens
from test_train import VOCAB, random_data, tiny_model


SCHEMES = [QScheme(b, g, s) for b in (2, 3, 4, 5, 8) for g in (8, 32) for s in (True, False)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_fake_quantize_is_the_packed_arithmetic_bit_for_bit(scheme):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(scheme.bits)) * 0.05
    codes, scales, offsets = quantize_weight(w, scheme)
    packed = dequantize_weight(codes, scales, offsets, scheme)
    fake = fake_quantize_weight(w, scales, offsets, scheme)
    assert torch.equal(fake, packed)


def test_fake_quantize_rounds_scales_to_float16_as_stored():
    scheme = QScheme(4, 32, True)
    w = torch.randn(4, 32) * 0.1
    scale = torch.full((4, 1), 0.0123456789)  # not float16-exact
    fake = fake_quantize_weight(w, scale, None, scheme)
    s16 = scale.half().float()
    codes = (torch.round(w / s16) + 8).clamp(0, 15)
    assert torch.equal(fake, s16 * (codes - 8))


def test_straight_through_gradients_clip_weights_and_give_lsq_scale_gradients():
    scheme = QScheme(4, 4, True)
    s = torch.tensor([[0.125]])  # float16-exact; grid -8..7 times s covers [-1, 0.875]
    w = torch.tensor([[0.3, -0.55, 2.0, -3.0]], requires_grad=True)  # the last two beyond the grid
    scale = s.clone().requires_grad_(True)
    fake_quantize_weight(w, scale, None, scheme).sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    q = torch.clamp(torch.round(w.detach() / s) + 8, 0, 15) - 8  # codes minus mid: 2, -4, 7, -8
    inside = torch.tensor([True, True, False, False])
    lsq = torch.where(inside, q - w.detach() / s, q)  # Esser et al.: q - w/s inside, the saturated code outside
    assert torch.allclose(scale.grad, lsq.sum().reshape(1, 1))


def test_asymmetric_offset_moves_only_the_saturated_values():
    scheme = QScheme(4, 4, False)
    w = torch.tensor([[0.1, 0.2, 0.9, 1.5]], requires_grad=True)  # 1.5 / 0.0625 = 24: beyond the code 15
    scale, offset = torch.tensor([[0.0625]], requires_grad=True), torch.tensor([[0.0]], requires_grad=True)
    fake_quantize_weight(w, scale, offset, scheme).sum().backward()
    # inside the grid s * round((w - o) / s) + o does not move with o under STE (d = -1 + 1); a saturated
    # value s * 15 + o moves one for one
    assert offset.grad.item() == 1.0
    assert torch.equal(w.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    q = torch.clamp(torch.round(w.detach() / 0.0625), 0, 15)
    assert scale.grad.item() == pytest.approx((q - w.detach() / 0.0625 * torch.tensor([1.0, 1, 1, 0])).sum().item())


def model_and_data(seed=0):
    model = tiny_model(seed)
    randomize(model, seed=seed)
    return model, random_data()


@pytest.mark.parametrize("scheme", [QScheme(4, 32, True), QScheme(3, 8, False)], ids=["q4_0", "int3-asym-g8"])
@pytest.mark.parametrize("learn", [True, False], ids=["lsq", "fixed"])
def test_converted_logits_equal_the_prepared_models_exactly(scheme, learn):
    model, data = model_and_data()
    prepare_qat_(model, QATConfig(scheme, learn_scales=learn))
    fakes = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    assert len(fakes) == 14 and isinstance(model.embed, QuantEmbedding)
    train(model, data, TrainConfig(max_steps=4, seq_len=16, micro_batch=4, lr=1e-2), show=False)
    moved = [m.log_scale.abs().max().item() for m in fakes if m.log_scale is not None]
    assert (max(moved) > 0) if learn else not moved
    ids = tokens(3 * 16, vocab=VOCAB).reshape(3, 16)
    model.eval()
    with torch.no_grad():
        prepared = model(ids)
        convert_qat_(model)
        converted = model(ids)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert torch.equal(prepared, converted)


@pytest.mark.parametrize("ptq", [RTNConfig(QScheme(4, 32, False)), GPTQConfig(scheme=QScheme(4, 32, True))],
                         ids=["rtn-asym", "gptq"])
def test_qat_from_a_ptq_result_starts_exactly_where_it_is(ptq):
    model, _ = model_and_data()
    quantize_(model, ptq, tokens(4 * 32, vocab=VOCAB).reshape(4, 32))
    ids = tokens(2 * 16, vocab=VOCAB, seed=5).reshape(2, 16)
    before = {n: m.codes().clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    with torch.no_grad():
        packed_logits = model(ids)
        prepare_qat_(model, QATConfig(QScheme(4, 32, ptq.scheme.symmetric)))
        assert torch.equal(model(ids), packed_logits)
        convert_qat_(model)
    after = {n: m.codes() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_qat_moves_the_weights_towards_lower_loss_than_ptq():
    model, data = model_and_data(1)
    cfg = TrainConfig(max_steps=12, seq_len=16, micro_batch=4, lr=1e-2)
    rtn = tiny_model(1)
    randomize(rtn, seed=1)
    quantize_(rtn, RTNConfig(QScheme(2, 8, False)))
    prepare_qat_(model, QATConfig(QScheme(2, 8, False)))
    result = train(model, data, cfg, show=False)
    convert_qat_(model)
    from slmkit.train.loop import evaluate

    assert evaluate(model, data, cfg) < evaluate(rtn, data, cfg) and result.val_loss is not None


def test_qat_step_is_recorded_and_runs_again_from_its_record(tmp_path):
    from slmkit.pipeline import run_pipeline_
    from test_train import word_tokenizer

    (tmp_path / "a.txt").write_text(" ".join(f"w{3 + i % 50}" for i in range(400)))
    step = QATStep(QATConfig(QScheme(4, 8, False), layers=LayerFilter(exclude=("*.down_proj",))), str(tmp_path / "a.txt"),
                   train=TrainConfig(max_steps=2, seq_len=16, micro_batch=2, lr=1e-2))
    model = tiny_model()
    run_pipeline_(model, word_tokenizer(), [step])
    record = json.loads(json.dumps(model.compression[-1]))
    assert record["method"] == "qat" and record["qat"]["scheme"] == {"bits": 4, "group_size": 8, "symmetric": False}
    assert record["result"]["steps"] == 2
    again = step_from_record(record)
    assert isinstance(again, QATStep) and again.qat == step.qat and again.train == step.train
    replay = tiny_model()
    run_pipeline_(replay, word_tokenizer(), [again])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), replay.state_dict().values()))
    assert not isinstance(model.get_submodule("blocks.0.mlp.down_proj"), QuantLinear)


@pytest.mark.parametrize("scheme, message", [
    (QScheme(9, 32), "bits must be 2..8"),
    (QScheme(4, 24), "does not divide"),
    (QScheme(3, 4, False), "multiple of 8"),
])
def test_schemes_the_packed_format_cannot_hold_are_refused_before_any_change(scheme, message):
    model, _ = model_and_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlmError, match=message):
        prepare_qat_(model, QATConfig(scheme))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---- the CLI -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from test_adapters_cli import base as make_base

    return make_base.__wrapped__(tmp_path_factory)


FAST = ["--data", "tinyshakespeare", "--seq-len", "32", "--batch-size", "4", "--threads", "1"]


def test_slm_train_qat_writes_a_packed_checkpoint(tmp_path, base, capsys):
    from slmkit.backends import load

    out = tmp_path / "qat"
    assert main(["train", str(base), *FAST, "--steps", "2", "--qat", "4", "--asym", "--group-size", "32",
                 "--lr", "1e-3", "-o", str(out)]) == 0, capsys.readouterr().err
    lm = load(str(out))
    packed = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 14 and all(m.scheme == QScheme(4, 32, False) for m in packed)
    assert lm.model.compression[-1]["method"] == "qat" and lm.model.compression[-1]["result"]["steps"] == 2
    assert main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--qat", "9"], "bits must be 2..8"),
    (["--qat", "4", "--group-size", "48"], "does not divide"),
    (["--asym"], "go with --qat"),
    (["--qat", "4", "--lora", "2"], "QAT trains a whole model"),
    (["--qat", "4", "--dp-epsilon", "8"], "DP-SGD"),
])
def test_slm_train_qat_refusals_exit_2_and_write_nothing(tmp_path, base, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["train", str(base), *FAST, "--steps", "1", *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


def test_a_q4_0_qat_model_exports_to_gguf_code_for_code(tmp_path):
    """QAT on Q4_0's grid, converted, written as GGUF Q4_0: the file holds the trained codes (read back equal),
    so llama.cpp runs what QAT trained."""
    from slmkit import loader
    from slmkit.checkpoint import export_gguf
    from slmkit.gguf_io import read_header
    from slmkit.quant.ggml import TYPES
    from test_gguf_export import tiny, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny(tok)
    prepare_qat_(model, QATConfig(QScheme(4, 32, True)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FakeQuantLinear):
                m.weight.add_(torch.randn_like(m.weight) * 0.01)  # stand-in for training: new codes
                m.log_scale.fill_(0.05)
    convert_qat_(model)
    path = export_gguf(model, tok, tmp_path / "qat.gguf")
    types = {t.name: t.ggml_type for t in read_header(path)[1]}
    assert types["blk.0.ffn_up.weight"] == TYPES["Q4_0"].id
    back = loader.load(path).model
    for name in ("blocks.0.attn.q_proj", "blocks.1.mlp.down_proj"):
        assert torch.equal(back.get_submodule(name).weight, model.get_submodule(name).dequantize())
