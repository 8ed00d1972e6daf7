"""Distillation: every divergence against a direct computation, top-k bins and the remainder, mixtures, the
chunked head loss, DistillLoss inside the training loop (live, top-k, cached, on-policy, several teachers),
the teacher cache's reuse and refusals, and the vocabulary check."""

import math
from pathlib import Path

import pytest
import torch

from slmkit import distill
from slmkit.checkpoint import save_checkpoint
from slmkit.distill import DistillLoss, divergence, mixture, open_cache, topk_bins, topk_target
from slmkit.distill import objective as objective_module
from slmkit.errors import SlmError
from slmkit.losses import IGNORE, chunked_linear_loss
from slmkit.train import TrainConfig, train
from slmkit.train.data import Sequences, TrainData
from slmkit.train.objectives import Batch

from conftest import randomize
from test_train import VOCAB, word_tokenizer
from test_train import tiny_model as plain_model


def tiny_model(seed=0, **overrides):
    """A tiny model with weights large enough that its distributions are far from uniform."""
    model = plain_model(seed, **overrides)
    randomize(model, seed=seed)
    return model


def dists(n=5, v=11, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * scale, -1)
    t = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * scale, -1)
    return s, t


def direct(s_log, t_log, loss, beta=0.5, skew=0.1):
    """The divergences written out over probabilities, as the papers define them."""
    P, Q = t_log.exp(), s_log.exp()

    def KL(a, b):
        return (a * (a.log() - b.log())).sum(-1)
    if loss == "fkl":
        return KL(P, Q)
    if loss == "rkl":
        return KL(Q, P)
    if loss == "jsd":
        if beta == 0:
            return KL(P, Q)
        if beta == 1:
            return KL(Q, P)
        M = beta * P + (1 - beta) * Q
        return beta * KL(P, M) + (1 - beta) * KL(Q, M)
    if loss == "skl":
        return KL(P, skew * P + (1 - skew) * Q)
    return KL(Q, skew * Q + (1 - skew) * P)


# ---- the pure functions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("loss,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.9),
                                       ("jsd", 1.0), ("skl", 0.5), ("srkl", 0.5)])
def test_divergences_equal_their_definitions(loss, beta):
    s, t = dists()
    for skew in (0.1, 0.4):
        torch.testing.assert_close(divergence(s, t, loss, beta, skew), direct(s, t, loss, beta, skew), rtol=1e-10,
                                   atol=1e-12)


def test_divergences_of_equal_distributions_are_zero_and_otherwise_positive():
    s, t = dists()
    for loss in distill.LOSSES:
        assert divergence(s, s, loss).abs().max() < 1e-12
        assert (divergence(s, t, loss) > 0).all()


def test_topk_of_the_whole_vocabulary_is_the_full_divergence():
    s, t = dists(v=9)
    index, values, rest = topk_target(t, 9)
    assert torch.isinf(rest).all() and (rest < 0).all()  # no mass left over
    sb, tb = topk_bins(s, index, values, rest)
    for loss in distill.LOSSES:
        torch.testing.assert_close(divergence(sb, tb, loss), divergence(s, t, loss), rtol=1e-10, atol=1e-12)


def test_topk_keeps_the_kept_tokens_terms_exactly_and_one_remainder_bin():
    s, t = dists(v=50, scale=3.0)
    k = 5
    index, values, rest = topk_target(t, k)
    P, Q = t.exp(), s.exp()
    kept_p, kept_q = P.gather(-1, index), Q.gather(-1, index)
    rest_p, rest_q = 1 - kept_p.sum(-1), 1 - kept_q.sum(-1)
    expected = (kept_p * (kept_p / kept_q).log()).sum(-1) + rest_p * (rest_p / rest_q).log()
    sb, tb = topk_bins(s, index, values, rest)
    torch.testing.assert_close(divergence(sb, tb, "fkl"), expected, rtol=1e-9, atol=1e-12)
    assert (divergence(sb, tb, "fkl") <= divergence(s, t, "fkl") + 1e-12).all()  # log-sum inequality
    torch.testing.assert_close(tb.exp().sum(-1), torch.ones(len(t), dtype=t.dtype))


def test_mixture_of_teachers_fixed_and_by_confidence():
    a, b = dists(seed=1)
    torch.testing.assert_close(mixture([a, b], [1.0, 3.0]), (0.25 * a.exp() + 0.75 * b.exp()).log())
    torch.testing.assert_close(mixture([a, b]), (0.5 * a.exp() + 0.5 * b.exp()).log())
    ca, cb = a.exp().amax(-1, keepdim=True), b.exp().amax(-1, keepdim=True)
    expected = ((ca * a.exp() + cb * b.exp()) / (ca + cb)).log()
    torch.testing.assert_close(mixture([a, b], confidence=True), expected)


def test_chunked_linear_loss_equals_the_whole_computation():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=g, requires_grad=True)
    weight = torch.randn(13, 6, generator=g, requires_grad=True)
    target = torch.log_softmax(torch.randn(10, 13, generator=g), -1)

    def row_loss(z, a, b):
        return divergence(torch.log_softmax(z / 2.0, -1), target[a:b], "jsd", 0.3).sum()
    loss = chunked_linear_loss(hidden, weight, row_loss, chunk=3)
    loss.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    whole = row_loss(hidden @ weight.T, 0, 10)
    whole.backward()
    torch.testing.assert_close(loss, whole)
    torch.testing.assert_close(gh, hidden.grad)
    torch.testing.assert_close(gw, weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(chunked_linear_loss(hidden, weight, row_loss, chunk=4), whole.detach())


# ---- DistillLoss on tiny models ---------------------------------------------------------------------------
def teacher_folder(tmp_path, seed=7, name="teacher", **overrides):
    out = tmp_path / name
    save_checkpoint(tiny_model(seed, **overrides), word_tokenizer(), out)
    return str(out)


def text_data(n=12, length=17, seed=0) -> TrainData:
    ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    val = torch.randint(3, VOCAB, (3, length), generator=torch.Generator().manual_seed(seed + 1))
    seqs = Sequences(ids)
    return TrainData(seqs, Sequences(val), {"digest": seqs.digest(), "seq_len": length - 1}, word_tokenizer())


def direct_loss(student, teachers, batch, loss="fkl", T=1.0, kd_ratio=1.0, beta=0.5, weights=None):
    """DistillLoss written out on the full [B, T, V] logits."""
    logits = student(batch.inputs)  # [B, T, V]
    rows = batch.labels != IGNORE
    with torch.no_grad():
        logs = [torch.log_softmax(t(batch.inputs) / T, -1) for t in teachers]
        t_log = logs[0] if len(logs) == 1 else mixture(logs, weights)
    s_log = torch.log_softmax(logits / T, -1)
    kd = divergence(s_log[rows], t_log[rows], loss, beta).sum() * T * T
    ce = torch.nn.functional.cross_entropy(logits[rows], batch.labels[rows], reduction="sum")
    return kd_ratio * kd + (1 - kd_ratio) * ce


def load(spec):
    from slmkit.loader import load as load_model
    return load_model(spec).model.eval()


@pytest.mark.parametrize("loss,T,kd_ratio", [("fkl", 1.0, 1.0), ("rkl", 2.0, 0.5), ("jsd", 1.5, 0.7),
                                             ("skl", 1.0, 1.0), ("srkl", 1.0, 0.2)])
def test_distill_loss_and_gradient_equal_the_direct_computation(tmp_path, loss, T, kd_ratio):
    spec = teacher_folder(tmp_path)
    student, data = tiny_model(0), text_data()
    obj = DistillLoss(teachers=(spec,), loss=loss, temperature=T, kd_ratio=kd_ratio, beta=0.3).validate()
    obj.prepare(student, data)
    batch = data.train.batch([0, 3, 5])
    batch = Batch(batch.inputs, torch.where(torch.rand(batch.labels.shape) < 0.3, IGNORE, batch.labels), batch.index)
    got, count = obj.loss_sum(student, batch)
    got.backward()
    mine = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    want = direct_loss(student, [load(spec)], batch, loss, T, kd_ratio, beta=0.3)
    want.backward()
    assert count == int((batch.labels != IGNORE).sum())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(mine[n], p.grad, rtol=1e-4, atol=1e-6)


def test_a_student_equal_to_its_teacher_has_zero_loss(tmp_path):
    spec = teacher_folder(tmp_path, seed=0)
    student, data = tiny_model(0), text_data()
    obj = DistillLoss(teachers=(spec,)).validate()
    obj.prepare(student, data)
    loss, _ = obj.loss_sum(student, data.train.batch([0, 1]))
    assert abs(float(loss.detach())) < 1e-4


def test_two_teachers_mix_with_their_weights(tmp_path):
    a, b = teacher_folder(tmp_path, 7, "a"), teacher_folder(tmp_path, 8, "b")
    student, data = tiny_model(0), text_data()
    obj = DistillLoss(teachers=(a, b), weights=(1.0, 3.0)).validate()
    obj.prepare(student, data)
    batch = data.train.batch([2, 4])
    got, _ = obj.loss_sum(student, batch)
    torch.testing.assert_close(got, direct_loss(student, [load(a), load(b)], batch, weights=[1.0, 3.0]), rtol=1e-5,
                               atol=1e-5)
    conf = DistillLoss(teachers=(a, b), confidence=True).validate()
    conf.prepare(student, data)
    assert abs(float(conf.loss_sum(student, batch)[0].detach()) - float(got.detach())) > 1e-6  # another mixture, another loss


def test_distillation_trains_through_the_loop_and_evaluates_plain_cross_entropy(tmp_path):
    spec = teacher_folder(tmp_path)
    student, data = tiny_model(0), text_data()
    cfg = TrainConfig(objective=DistillLoss(teachers=(spec,)), lr=3e-3, seq_len=16, micro_batch=4, max_steps=12)
    result = train(student, data, cfg, show=False)
    losses = [r[1] for r in result.loss_curve]
    assert losses[-1] < 0.8 * losses[0]
    from slmkit.train.loop import evaluate
    from slmkit.train.objectives import NextTokenLoss
    plain = TrainConfig(objective=NextTokenLoss(), seq_len=16, micro_batch=4, max_steps=1)
    assert result.val_loss == pytest.approx(evaluate(student, data, plain), rel=1e-6)
    assert result.objective["teachers"][0].startswith(spec)
    record = cfg.to_dict()["objective"]
    assert record["name"] == "distill" and record["teachers"] == [spec] and "live" not in record
    again = TrainConfig.from_dict(cfg.to_dict()).objective
    assert again.record() == record


def test_top_k_cache_is_filled_once_and_reused(tmp_path, monkeypatch):
    spec = teacher_folder(tmp_path)
    data = text_data()
    calls = []
    real = objective_module.teacher_hidden
    monkeypatch.setattr(objective_module, "teacher_hidden", lambda *a: calls.append(1) or real(*a))

    def run(cache):
        student = tiny_model(0)
        obj = DistillLoss(teachers=(spec,), topk=8, cache=cache)
        cfg = TrainConfig(objective=obj, lr=3e-3, seq_len=16, micro_batch=4, max_steps=6)
        result = train(student, data, cfg, show=False)
        return student, result
    live_student, _ = run(None)
    live_calls, calls[:] = len(calls), []
    first, r1 = run(str(tmp_path / "cache"))
    assert len(calls) == 3  # 12 sequences, 4 a micro-batch: each sequence's teacher rows computed once
    calls[:] = []
    second, r2 = run(str(tmp_path / "cache"))
    assert calls == [] and live_calls == 6  # the cache replaced every teacher forward
    for (n, p), q, live in zip(first.named_parameters(), second.parameters(), live_student.parameters()):
        assert torch.equal(p, q), n
        torch.testing.assert_close(p, live, rtol=1e-4, atol=1e-5)
    report = r2.objective["cache"]
    assert report["filled"] == 12 and report["k"] == 8 and 0 < report["mean_kept_mass"] <= 1
    assert report["bytes"] > 12 * 16 * 8 * 6  # ids + log-probs of every position


def test_cache_made_for_another_teacher_data_or_k_is_refused(tmp_path):
    spec, other = teacher_folder(tmp_path), teacher_folder(tmp_path, 9, "other")
    student, data = tiny_model(0), text_data()
    cache = str(tmp_path / "cache")
    DistillLoss(teachers=(spec,), topk=4, cache=cache).prepare(student, data)
    for obj, d, what in [(DistillLoss(teachers=(other,), topk=4, cache=cache), data, "teachers"),
                         (DistillLoss(teachers=(spec,), topk=4, cache=cache), text_data(seed=5), "data"),
                         (DistillLoss(teachers=(spec,), topk=6, cache=cache), data, "k")]:
        with pytest.raises(SlmError, match=f"made for another {what}"):
            obj.prepare(tiny_model(0), d)
    (tmp_path / "cache" / "logp.npy").write_bytes(b"not an array")
    with pytest.raises(SlmError, match="damaged"):
        DistillLoss(teachers=(spec,), topk=4, cache=cache).prepare(tiny_model(0), data)
    (tmp_path / "junk").mkdir()
    with pytest.raises(SlmError, match="not a teacher cache"):
        open_cache(tmp_path / "junk", {}, 1, 1, 1, VOCAB)


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    spec = teacher_folder(tmp_path, vocab_size=VOCAB + 8)
    with pytest.raises(SlmError, match=f"vocabulary of {VOCAB + 8} tokens, the student {VOCAB}"):
        DistillLoss(teachers=(spec,)).prepare(tiny_model(0), text_data())


def test_on_policy_batches_hold_the_students_samples_and_repeat_under_a_seed(tmp_path):
    spec = teacher_folder(tmp_path)
    student, data = tiny_model(0), text_data()
    obj = DistillLoss(teachers=(spec,), on_policy=1.0).validate()
    obj.prepare(student, data)
    batch = data.train.batch([0, 1])
    torch.manual_seed(3)
    new = objective_module.student_batch(student, batch, set(), None)
    torch.manual_seed(3)
    again = objective_module.student_batch(student, batch, set(), None)
    assert torch.equal(new.inputs, again.inputs) and torch.equal(new.labels, again.labels)
    half = batch.inputs.shape[1] // 2
    assert torch.equal(new.inputs[:, :half + 1], batch.inputs[:, :half + 1])  # the prompt is kept
    assert (new.labels[:, :half] == IGNORE).all() and (new.labels[:, half:] != IGNORE).all()
    assert torch.equal(new.inputs[:, half + 1:], new.labels[:, half:-1])  # inputs are the sampled tokens
    assert not torch.equal(new.labels[:, half:], batch.labels[:, half:])
    loss, count = obj.loss_sum(student, batch)
    assert count == 2 * (batch.inputs.shape[1] - half) and math.isfinite(float(loss.detach()))


@pytest.mark.parametrize("fields,message", [
    (dict(loss="kl"), "--kd-loss must be one of"), (dict(beta=1.5), "--kd-beta"), (dict(temperature=0), "temperature"),
    (dict(kd_ratio=2.0), "--kd-ratio"), (dict(cache="x"), "needs --kd-topk"), (dict(on_policy=1.5), "--on-policy"),
    (dict(teachers=("a", "b"), weights=(1.0,)), "one positive weight per teacher"),
    (dict(teacher_dtype="int3"), "--teacher-dtype")])
def test_distill_settings_are_refused(fields, message):
    with pytest.raises(SlmError, match=message):
        DistillLoss(**fields).validate()


def test_distillation_refuses_distributed_and_dp(tmp_path):
    from slmkit.train.privacy import DPConfig
    with pytest.raises(SlmError, match="one process"):
        TrainConfig(objective=DistillLoss(), max_steps=1, distributed="ddp").validate()
    with pytest.raises(SlmError, match="DP-SGD with distillation"):
        TrainConfig(objective=DistillLoss(), max_steps=1, clip=None, privacy=DPConfig(epsilon=8.0)).validate()


# ---- the CLI: slm train --distill ---------------------------------------------------------------------------
CLI_FAST = ["--data", "tinyshakespeare", "--seq-len", "32", "--batch-size", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def cli_base(tmp_path_factory):
    from test_adapters_cli import base as make_base

    return make_base.__wrapped__(tmp_path_factory)


def test_slm_train_distill_writes_a_checkpoint_that_records_its_teacher_and_cache(tmp_path, cli_base, capsys):
    import json as json_module

    from slmkit.backends import load
    from slmkit.cli import main

    out, run_file, cache = tmp_path / "kd", tmp_path / "run.json", tmp_path / "cache"
    argv = ["train", str(cli_base), *CLI_FAST, "--steps", "2", "--distill", str(cli_base), "--kd-loss", "jsd",
            "--kd-beta", "0.3", "--kd-ratio", "0.8", "--kd-topk", "8", "--teacher-cache", str(cache), "--lr", "1e-3"]
    assert main([*argv, "--json", str(run_file), "-o", str(out)]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "teacher cache" in err and "top-8 keeps" in err
    record = load(str(out)).model.compression[-1]
    objective = record["train"]["objective"]
    assert objective["name"] == "distill" and objective["loss"] == "jsd" and objective["beta"] == 0.3
    assert objective["teachers"] == [str(cli_base)] and objective["topk"] == 8
    run = json_module.loads(run_file.read_text())
    assert run["objective"]["cache"]["filled"] > 0 and run["objective"]["cache"]["bytes"] > 0


def test_slm_train_distill_refusals_exit_2_in_one_line_and_write_nothing(tmp_path, cli_base, capsys):
    from slmkit.cli import main

    cache = tmp_path / "cache"
    assert main(["train", str(cli_base), *CLI_FAST, "--steps", "1", "--distill", str(cli_base), "--kd-topk", "4",
                 "--teacher-cache", str(cache), "-o", str(tmp_path / "first")]) == 0
    capsys.readouterr()
    spec = teacher_folder(tmp_path, vocab_size=VOCAB + 8)  # a tiny teacher whose vocabulary differs
    other_data = ["--data", "wikitext2-valid", *CLI_FAST[2:]]
    cases = {
        "vocabulary": ([*CLI_FAST, "--distill", spec], "vocabulary of"),
        "other data": ([*other_data, "--distill", str(cli_base), "--kd-topk", "4", "--teacher-cache", str(cache)],
                       "made for another data"),
        "other k": ([*CLI_FAST, "--distill", str(cli_base), "--kd-topk", "6", "--teacher-cache", str(cache)],
                    "made for another k"),
        "cache without k": ([*CLI_FAST, "--distill", str(cli_base), "--teacher-cache", str(cache)], "needs --kd-topk"),
        "kd flag alone": ([*CLI_FAST, "--kd-topk", "4"], "go with --distill"),
        "weights": ([*CLI_FAST, "--distill", f"{cli_base},{cli_base}", "--teacher-weights", "1"], "one positive weight"),
    }
    for name, (extra, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        assert main(["train", str(cli_base), *extra, "--steps", "1", "-o", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (name, err)
        assert not out.exists() and not Path(f"{out}.train").exists(), name
