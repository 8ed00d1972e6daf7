"""The training loop on tiny models: losses and gradients, schedule, data packing and masks, order, optimizers,
precision, resumable state (bit for bit), refusals."""

import json
import math

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.model import Decoder
from slmkit.tokenizer import Tokenizer
from slmkit.train import NextTokenLoss, TrainConfig, backward_step, lr_at, train
from slmkit.train.data import (Sequences, TrainData, detect_format, load_data, sequence_order, supervised_tokens,
                               text_sequences)
from slmkit.train.init import init_weights_
from slmkit.train.loop import make_optimizer, param_groups, total_steps
from slmkit.train.objectives import IGNORE, Batch
from slmkit.train.state import latest_state, load_state

VOCAB = 64


def tiny_model(seed: int = 0, **overrides) -> Decoder:
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                max_seq_len=64), **overrides})
    return init_weights_(Decoder(cfg), seed)


def random_data(n: int = 24, length: int = 17, seed: int = 0) -> TrainData:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    val = torch.randint(0, VOCAB, (4, length), generator=torch.Generator().manual_seed(seed + 1))
    train_seqs = Sequences(ids)
    return TrainData(train_seqs, Sequences(val), {"digest": train_seqs.digest()})


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- the loss of a step -------------------------------------------------------------------------
def masked_rows() -> list[Batch]:
    """Four sequences of unequal length and unequal masks, as single-row micro-batches (padded by nothing)."""
    gen = torch.Generator().manual_seed(3)
    rows = []
    for length, keep in ((12, 12), (7, 3), (10, 1), (5, 4)):
        ids = torch.randint(0, VOCAB, (length + 1,), generator=gen)
        labels = ids[1:].clone()
        labels[:length - keep] = IGNORE  # only the last `keep` positions count
        rows.append((ids[:-1], labels))
    return rows


def test_four_micro_batches_of_one_equal_one_batch_of_four():
    rows = masked_rows()
    width = max(len(x) for x, _ in rows)
    big_in = torch.zeros(4, width, dtype=torch.long)
    big_lab = torch.full((4, width), IGNORE)
    for i, (x, y) in enumerate(rows):
        big_in[i, :len(x)], big_lab[i, :len(y)] = x, y
    model = tiny_model()
    loss_big, n_big = backward_step(model, NextTokenLoss(), [Batch(big_in, big_lab)])
    g_big = grads(model)
    model.zero_grad(set_to_none=True)
    loss_acc, n_acc = backward_step(model, NextTokenLoss(), [Batch(x[None], y[None]) for x, y in rows])
    g_acc = grads(model)
    assert n_big == n_acc == 12 + 3 + 1 + 4
    assert abs(loss_big - loss_acc) < 1e-6
    assert max((g_big[k] - g_acc[k]).abs().max().item() for k in g_big) < 1e-6
    # the naive mean of micro-batch means (the old HF Trainer bug) gives a different gradient here
    model.zero_grad(set_to_none=True)
    for x, y in rows:
        (NextTokenLoss().loss_sum(model, Batch(x[None], y[None]))[0] / (y != IGNORE).sum() / 4).backward()
    assert max((g_big[k] - grads(model)[k]).abs().max().item() for k in g_big) > 1e-4


def test_step_loss_is_mean_token_cross_entropy():
    model = tiny_model()
    (x, y), = masked_rows()[1:2]
    loss, n = backward_step(model, NextTokenLoss(), [Batch(x[None], y[None])])
    with torch.no_grad():
        logits = model(x[None])[0]
    keep = y != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep], y[keep]).item()
    assert n == 3 and abs(loss - expected) < 1e-6


def test_a_step_with_every_label_masked_is_refused():
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(SlmError, match="no token"):
        backward_step(tiny_model(), NextTokenLoss(), [Batch(x, torch.full((1, 4), IGNORE))])


# ---- schedule and config ------------------------------------------------------------------------
def test_schedules():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, max_steps=14)
    assert [lr_at(s, 14, cfg) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_at(4, 14, cfg) == pytest.approx(1.0) and lr_at(13, 14, cfg) == pytest.approx(0.1)
    assert lr_at(9, 14, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    lin = TrainConfig(lr=1.0, schedule="linear", min_lr_ratio=0.0, max_steps=11)
    assert [lr_at(s, 11, lin) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    const = TrainConfig(lr=0.5, schedule="constant", warmup_steps=1, max_steps=5)
    assert [lr_at(s, 5, const) for s in range(5)] == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("fields, message", [
    (dict(lr=0.0), "learning rate"), (dict(lr=-1e-3), "learning rate"), (dict(lr=float("nan")), "learning rate"),
    (dict(micro_batch=0), "micro-batch"), (dict(grad_accum=0), "grad-accum"), (dict(seq_len=0), "seq-len"),
    (dict(max_steps=None), "give a length"), (dict(max_steps=0), "steps limit"), (dict(optimizer="lion"), "optimizer"),
    (dict(schedule="step"), "schedule"), (dict(precision="int8"), "precision"), (dict(clip=-1.0), "clip"),
])
def test_config_refusals(fields, message):
    with pytest.raises(SlmError, match=message):
        TrainConfig(**{"max_steps": 10, **fields}).validate()


def test_config_round_trips_through_json():
    cfg = TrainConfig(objective=NextTokenLoss("sft"), trainable=("blocks.*",), betas=(0.8, 0.9), max_steps=3)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.objective.name == "sft"


def test_limits_become_steps():
    data = random_data(n=24)
    assert total_steps(TrainConfig(max_steps=7, micro_batch=2), data) == 7
    assert total_steps(TrainConfig(max_epochs=1.0, micro_batch=4, grad_accum=2), data) == 3
    assert total_steps(TrainConfig(max_epochs=2.0, micro_batch=4), data, world=2) == 6
    assert total_steps(TrainConfig(max_tokens=16 * 8 * 2, micro_batch=8), data) == 2  # 16 targets a sequence
    assert total_steps(TrainConfig(max_steps=100, max_epochs=1.0, micro_batch=8), data) == 3


# ---- data ----------------------------------------------------------------------------------------
def word_tokenizer(template: str | None = None) -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<unk>", "<s>", "<eos>"])
    return Tokenizer(backend, bos_token_id=1, eos_token_id=2, chat_template=template)


CHAT = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> w3 {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}")


def test_text_is_packed_with_shared_boundary_tokens(tmp_path):
    words = [f"w{3 + i % 50}" for i in range(101)]
    (tmp_path / "a.txt").write_text(" ".join(words))
    seqs, _ = text_sequences(str(tmp_path / "a.txt"), word_tokenizer(), 10)
    ids = word_tokenizer().encode(" ".join(words))
    assert seqs.ids.shape == (10, 11)
    assert seqs.ids[:, 1:].flatten().tolist() == ids[1:101]  # every token after the first is a target once
    assert torch.equal(seqs.ids[1:, 0], seqs.ids[:-1, -1])
    batch = seqs.batch([3, 0])
    assert torch.equal(batch.inputs[0], seqs.ids[3, :-1]) and torch.equal(batch.labels[0], seqs.ids[3, 1:])


def test_held_out_split_and_refusals(tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(f"w{3 + i % 50}" for i in range(201)))
    data = load_data(str(tmp_path / "a.txt"), word_tokenizer(), 10)
    assert len(data.train) == 19 and len(data.val) == 1 and data.info["format"] == "text"
    (tmp_path / "short.txt").write_text("w3 w4 w5")
    with pytest.raises(SlmError, match="shorter than one sequence"):
        load_data(str(tmp_path / "short.txt"), word_tokenizer(), 10)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(SlmError, match="empty"):
        load_data(str(tmp_path / "empty.txt"), word_tokenizer(), 10)
    (tmp_path / "one.txt").write_text(" ".join(["w3"] * 11))
    with pytest.raises(SlmError, match="too little data"):
        load_data(str(tmp_path / "one.txt"), word_tokenizer(), 10)


def test_supervised_mask_covers_the_reply_and_its_end_token():
    tok = word_tokenizer(CHAT)
    messages = [{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w20 w21 w22"},
                {"role": "user", "content": "w12"}, {"role": "assistant", "content": "w23"}]
    ids, mask = supervised_tokens(tok, messages, tok.stop_ids())
    text = [tok.token(i) for i in ids.tolist()]
    trained = [t for t, m in zip(text, mask.tolist()) if m]
    # "w3" after each <eos> is template text: not trained; the replies and the <eos> ending them are
    assert trained == ["w20", "w21", "w22", "<eos>", "w23", "<eos>"]
    assert ids.tolist() == tok.encode(tok.render_chat(messages, add_generation_prompt=False))


def test_eos_doubling_as_padding_is_never_masked(tmp_path):
    tok = word_tokenizer(CHAT)
    records = [{"instruction": "w10", "output": "w20"}, {"instruction": "w10 w11 w12", "input": "w13",
                                                        "output": "w20 w21 w22 w23"}, {"instruction": "w9", "output": "w5"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    data = load_data(str(tmp_path / "a.json"), tok, 32, eval_spec=str(tmp_path / "a.json"))
    assert data.info["format"] == "alpaca" and data.train.pad_id == tok.eos_token_id
    batch = data.train.batch([0, 1])
    eos_targets = (batch.labels == tok.eos_token_id).sum(1)
    assert eos_targets.tolist() == [1, 1]  # the reply's end token counts in both rows, padding does not
    assert batch.inputs.shape[1] > len(data.train.ids[0]) - 1 and (batch.labels[0, len(data.train.ids[0]) - 1:] == IGNORE).all()
    assert batch.tokens == 2 + 5


def test_chat_records_and_their_refusals(tmp_path):
    tok = word_tokenizer(CHAT)
    good = {"messages": [{"role": "user", "content": "w10"}, {"role": "assistant", "content": "w11"}]}
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(good) for _ in range(4)))
    assert detect_format(str(tmp_path / "c.jsonl")) == "chat"
    data = load_data(str(tmp_path / "c.jsonl"), tok, 16)
    assert data.info["format"] == "chat" and len(data.train) == 3 and len(data.val) == 1
    (tmp_path / "none.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "w10"}]}))
    with pytest.raises(SlmError, match="record 1: no assistant turn"):
        load_data(str(tmp_path / "none.jsonl"), tok, 16)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": 3}]}))
    with pytest.raises(SlmError, match="string 'role' and 'content'"):
        load_data(str(tmp_path / "bad.jsonl"), tok, 16)
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": 5, "output": "w3"}]))
    with pytest.raises(SlmError, match="'instruction' must be a string"):
        load_data(str(tmp_path / "a.json"), tok, 16)


def test_order_is_a_seeded_permutation_per_epoch():
    first = sequence_order(10, seed=3, start=0, count=25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]
    assert sequence_order(10, 3, 7, 9) == first[7:16]  # any position continues the same order
    assert sequence_order(10, 4, 0, 10) != first[:10]


def test_ranks_split_a_step_into_the_single_process_step():
    data = random_data()
    whole = data.step_batches(5, 2, 3, world=1, seed=1)
    parts = [data.step_batches(5, 2, 3, world=2, rank=r, seed=1) for r in (0, 1)]
    rows = lambda bs: sorted(tuple(r.tolist()) for b in bs for r in b.inputs)  # noqa: E731
    assert rows(whole[:3]) + rows(whole[3:]) != [] and rows(parts[0] + parts[1]) == sorted(
        rows(data.step_batches(5, 2, 6, world=1, seed=1)))


# ---- parameters, optimizers, precision -------------------------------------------------------------
def test_weight_decay_skips_norms_biases_and_embeddings():
    model = tiny_model(qkv_bias=True, tie_embeddings=False)
    decay, rest = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("_proj.weight") or names[id(p)] == "lm_head.weight" for p in decay["params"])
    assert {"embed.weight", "norm.weight", "blocks.0.attn.q_proj.bias"} <= {names[id(p)] for p in rest["params"]}


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd"])
def test_every_optimizer_lowers_the_loss(optimizer):
    data = random_data(n=4)
    model = tiny_model()
    lr = {"adamw": 3e-3, "adafactor": 3e-2, "sgd": 1.0}[optimizer]
    result = train(model, data, TrainConfig(optimizer=optimizer, lr=lr, max_steps=30, micro_batch=4,
                                            schedule="constant", clip=None), show=False)
    assert result.loss_curve[-1][1] < result.loss_curve[0][1] - 0.3


def test_frozen_parameters_do_not_move():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, random_data(), TrainConfig(trainable=("blocks.*",), frozen=("*norm*",), max_steps=2, lr=1e-2),
          show=False)
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.startswith("blocks.") and "norm" not in n for n in moved)
    assert {"embed.weight", "norm.weight"}.isdisjoint(moved)
    with pytest.raises(SlmError, match="no parameter matches"):
        train(tiny_model(), random_data(), TrainConfig(trainable=("nothing*",), max_steps=1), show=False)


def test_bf16_autocast_keeps_fp32_master_weights_and_tracks_fp32():
    data = random_data()
    runs = {}
    for precision in ("float32", "bfloat16"):
        model = tiny_model()
        runs[precision] = train(model, data, TrainConfig(precision=precision, max_steps=5, lr=1e-3,
                                                         micro_batch=4), show=False)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    f32, b16 = ([r[1] for r in runs[p].loss_curve] for p in ("float32", "bfloat16"))
    assert f32 != b16 and max(abs(a - b) for a, b in zip(f32, b16)) < 0.05


def test_float16_needs_cuda():
    with pytest.raises(SlmError, match="CUDA"):
        train(tiny_model(), random_data(), TrainConfig(precision="float16", max_steps=1), show=False)


def test_result_counts_tokens_and_speed():
    result = train(tiny_model(), random_data(), TrainConfig(max_steps=4, micro_batch=2, eval_every=2), show=False)
    assert result.steps == 4 and result.tokens == 4 * 2 * 16 and result.stopped == "steps"
    assert [v[0] for v in result.val_curve] == [2, 4] and result.val_loss == result.val_curve[-1][1]
    later = result.loss_curve[1:]
    assert result.tokens_per_s == pytest.approx(sum(r[4] for r in later) / sum(r[5] for r in later))


def test_distributed_outside_torchrun_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SlmError, match="torchrun"):
        train(tiny_model(), random_data(), TrainConfig(distributed="ddp", max_steps=1), show=False)


# ---- resumable state ---------------------------------------------------------------------------------
class Crash(Exception):
    pass


class CrashingData(TrainData):
    """The same data, but the process "dies" when it is about to start optimizer step `at` (1-based)."""

    def __init__(self, data: TrainData, at: int, per_step: int):
        super().__init__(data.train, data.val, data.info)
        self.at, self.per_step = at, per_step

    def step_batches(self, consumed, *args, **kwargs):
        if consumed == (self.at - 1) * self.per_step:
            raise Crash
        return super().step_batches(consumed, *args, **kwargs)


def test_a_crashed_run_resumes_bit_for_bit(tmp_path):
    data = random_data()
    cfg = TrainConfig(max_steps=8, micro_batch=2, grad_accum=2, save_every=3, lr=1e-2, warmup_steps=2,
                      eval_every=4)
    full = tiny_model()
    whole = train(full, data, cfg, tmp_path / "full", show=False)
    with pytest.raises(Crash):
        train(tiny_model(), CrashingData(data, at=8, per_step=4), cfg, tmp_path / "cut", show=False)
    assert latest_state(tmp_path / "cut").name == "step-00000006"  # at most one interval (2 steps) lost
    resumed = tiny_model(seed=5)  # another start: everything must come from the checkpoint
    again = train(resumed, data, cfg, tmp_path / "cut", resume=True, show=False)
    assert again.resumed_from == 6 and again.val_curve == whole.val_curve
    assert [r[:5] for r in again.loss_curve] == [r[:5] for r in whole.loss_curve]  # all but the seconds
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert latest_state(tmp_path / "cut").name == "step-00000008"


def test_resume_without_a_checkpoint_starts_over(tmp_path, capsys):
    data, cfg = random_data(), TrainConfig(max_steps=2)
    a, b = tiny_model(), tiny_model()
    train(a, data, cfg, show=False)
    result = train(b, data, cfg, tmp_path / "none", resume=True, show=False)
    assert result.resumed_from is None and "starting at step 0" in capsys.readouterr().err
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_refuses_another_model_or_config(tmp_path):
    data = random_data()
    train(tiny_model(), data, TrainConfig(max_steps=2, save_every=1), tmp_path / "s", show=False)
    with pytest.raises(SlmError, match="another model config"):
        train(tiny_model(dim=48), data, TrainConfig(max_steps=2), tmp_path / "s", resume=True, show=False)
    with pytest.raises(SlmError, match="another train config"):
        train(tiny_model(), data, TrainConfig(max_steps=2, lr=1e-3), tmp_path / "s", resume=True, show=False)
    with pytest.raises(SlmError, match="another train config"):  # the schedule's length changes every step's lr
        train(tiny_model(), data, TrainConfig(max_steps=4), tmp_path / "s", resume=True, show=False)
    with pytest.raises(SlmError, match="another data digest"):
        train(tiny_model(), random_data(seed=7), TrainConfig(max_steps=2), tmp_path / "s", resume=True, show=False)


def test_checkpoints_are_complete_or_absent(tmp_path):
    train(tiny_model(), random_data(), TrainConfig(max_steps=4, save_every=2), tmp_path / "s", show=False)
    (tmp_path / "s" / ".step-00000006.abc.tmp").mkdir()  # an interrupted save's leftovers
    (tmp_path / "s" / "step-00000009").mkdir()  # a folder without its marker is not a checkpoint
    assert latest_state(tmp_path / "s").name == "step-00000004"
    assert sorted(p.name for p in (tmp_path / "s").glob("step-*")) == ["step-00000004", "step-00000009"]
    (tmp_path / "s" / "step-00000004" / "optimizer.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(SlmError, match="corrupt train-state"):
        load_state(tmp_path / "s" / "step-00000004")


def test_training_is_a_pipeline_step_beside_compression(tmp_path):
    from slmkit.pipeline import run_pipeline_, step_record
    from slmkit.quant import RTNConfig
    from slmkit.steps import step_from_record
    from slmkit.train.step import TrainStep

    (tmp_path / "a.txt").write_text(" ".join(f"w{3 + i % 50}" for i in range(400)))
    steps = [TrainStep(str(tmp_path / "a.txt"), train=TrainConfig(max_steps=3, seq_len=16, micro_batch=2, lr=1e-2)),
             RTNConfig()]
    model = tiny_model()
    run_pipeline_(model, word_tokenizer(), steps)
    assert [r["method"] for r in model.compression] == ["train", "rtn"]
    record = json.loads(json.dumps(model.compression[0]))
    assert record["result"]["steps"] == 3 and record["train"]["seq_len"] == 16
    again = step_from_record(record)
    assert isinstance(again, TrainStep) and again.train == steps[0].train
    replay = tiny_model()
    run_pipeline_(replay, word_tokenizer(), [step_from_record(r) for r in model.compression])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), replay.state_dict().values()))
    assert step_record(again)["train"] == record["train"]


def test_checkpointing_and_released_memory_change_no_weight():
    from slmkit.train.memory import large_buffers_released

    data = random_data()
    cfg = TrainConfig(max_steps=3, micro_batch=2, lr=1e-2)
    plain, low = tiny_model(), tiny_model()
    train(plain, data, cfg, show=False)
    train(low, data, TrainConfig(max_steps=3, micro_batch=2, lr=1e-2, checkpointing=True, release_memory=True),
          show=False)
    for (n, a), b in zip(plain.state_dict().items(), low.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert not low.checkpoint_blocks  # the model is left as it was
    import platform

    with large_buffers_released(True) as active:
        assert active == (platform.libc_ver()[0] == "glibc")  # mallopt exists on glibc only
    with large_buffers_released(False) as active:
        assert not active
