"""DP-SGD in the training loop on tiny models: per-sample clipping (every norm <= C), Opacus's per-sample
gradients against one backward per sequence, a step with noise 0 and no clipping equal to the ordinary step,
epsilon equal to the accountant's for the recorded parameters, Poisson sampling, the table policy, resume bit
for bit, refusals."""

import dataclasses
import math

import pytest
import torch

from slmkit.adapters import LoRAConfig, apply_lora_
from slmkit.errors import SlmError
from slmkit.train import TrainConfig, train
from slmkit.train import privacy as dp
from slmkit.train.loop import make_optimizer, optimizer_step, set_trainable_
from slmkit.train.objectives import NextTokenLoss
from slmkit.train.state import latest_state

from test_train import Crash, random_data, tiny_model

LORA = ("*.lora_A.weight", "*.lora_B.weight")


def lora_model(seed: int = 0):
    model = tiny_model(seed)
    torch.manual_seed(seed)  # lora_A's Kaiming initialisation draws from torch's generator
    apply_lora_(model, LoRAConfig(rank=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
    return model


def privacy(sigma: float = 0.0, clip: float = 1.0, expected: float = 4.0, tokens: float = 16.0) -> dp.Privacy:
    return dp.Privacy(sigma, 0.25, 10, 1e-5, clip, "rdp", expected, tokens, secret=12345)


def test_clipping_bounds_every_per_sample_norm_and_keeps_small_ones():
    gen = torch.Generator().manual_seed(0)
    per_sample = [torch.randn(6, 3, 4, generator=gen), torch.randn(6, 5, generator=gen) * 0.01]
    per_sample[0][2] *= 1e-3  # one sample far below the bound
    summed, norms = dp.clip_per_sample(per_sample, clip=0.5)
    assert torch.all(norms <= 0.5 + 1e-6)
    raw = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample]).norm(dim=0)
    assert norms[2] == pytest.approx(float(raw[2]), rel=1e-4)  # below C: untouched
    factor = torch.clamp(0.5 / (raw + 1e-6), max=1.0)
    assert torch.allclose(summed[1], (factor[:, None] * per_sample[1]).sum(0), atol=1e-6)


def test_opacus_per_sample_gradients_match_one_backward_per_sequence():
    model, data = lora_model(), random_data()
    batch = data.train.batch([0, 1, 2])
    runner = dp.wrap(model)
    model.train()
    loss, _ = NextTokenLoss().loss_sum(runner, batch)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample = [p.grad_sample.clone() for p in params]
    runner._close()
    for i in range(3):
        model.zero_grad()
        one = data.train.batch([i])
        model(one.inputs, labels=one.labels).backward()
        for p, g in zip(params, per_sample):
            assert torch.allclose(g[i], p.grad, atol=1e-5)
    _, norms = dp.clip_per_sample(per_sample, clip=0.01)
    assert torch.all(norms <= 0.01 + 1e-7)


def test_a_dp_step_with_no_noise_and_no_clipping_is_the_ordinary_step():
    data = random_data()  # packed rows of 16 targets each: mean tokens per sequence 16
    batches = [data.train.batch([0, 1]), data.train.batch([2, 3])]
    cfg = TrainConfig(trainable=LORA, max_steps=1, micro_batch=2, grad_accum=2, clip=None, lr=1e-2)
    plain, private = lora_model(), lora_model()
    for model in (plain, private):
        set_trainable_(model, cfg)
        model.train()
    opt_a, opt_b = make_optimizer(plain, cfg), make_optimizer(private, cfg)
    from slmkit.train.dist import DistEnv

    optimizer_step(plain, opt_a, cfg, batches, DistEnv(), 1e-2)
    runner = dp.wrap(private)
    optimizer_step(runner, opt_b, cfg, batches, DistEnv(), 1e-2, privacy=privacy(0.0, clip=1e9, expected=4.0), step=0)
    runner._close()
    for (n, a), b in zip(plain.named_parameters(), private.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_epsilon_is_the_accountants_for_the_recorded_parameters():
    from opacus.accountants import RDPAccountant

    model, data = lora_model(), random_data(n=40)
    cfg = TrainConfig(trainable=LORA, max_steps=6, micro_batch=2, grad_accum=2, clip=None, lr=1e-2,
                      privacy=dp.DPConfig(epsilon=5.0, clip_norm=0.5))
    result = train(model, data, cfg, show=False)
    p = result.privacy
    assert p["steps"] == 6 and p["sample_rate"] == pytest.approx(4 / 40) and p["delta"] == pytest.approx(1 / 40)
    assert p["clip_norm"] == 0.5 and p["accountant"] == "opacus rdp" and p["sampling"] == "poisson"
    acc = RDPAccountant()
    acc.history = [(p["noise_multiplier"], p["sample_rate"], p["steps"])]
    alphas = p["accountant_options"]["alphas"]
    assert alphas[:len(acc.DEFAULT_ALPHAS)] == list(acc.DEFAULT_ALPHAS) and max(alphas) == 1024
    assert p["epsilon"] == pytest.approx(acc.get_epsilon(delta=p["delta"], alphas=alphas), rel=1e-9)
    assert p["epsilon"] <= acc.get_epsilon(delta=p["delta"])  # more orders: never a looser bound
    assert p["epsilon"] == pytest.approx(5.0, rel=0.02)  # the noise was chosen for the target
    assert not any(hasattr(q, "grad_sample") and q.grad_sample is not None for q in model.parameters())


def test_a_given_noise_multiplier_reports_its_epsilon():
    cfg = dp.DPConfig(noise_multiplier=1.1, delta=1e-5)
    plan = dp.plan(cfg, n_train=1000, expected_batch=10, steps=100, mean_tokens=16.0)
    assert plan.noise_multiplier == 1.1
    assert plan.record(100)["epsilon"] == pytest.approx(dp.epsilon_of("rdp", 1.1, 0.01, 100, 1e-5))
    assert plan.record(0)["epsilon"] == 0.0 and math.isinf(dp.epsilon_of("rdp", 0.0, 0.01, 5, 1e-5))


def test_poisson_sampling_draws_each_sequence_with_the_sample_rate():
    data = random_data(n=200)
    plan = dp.Privacy(1.0, 0.1, 100, 1e-5, 1.0, "rdp", 20.0, 16.0, secret=99)
    sizes = [sum(len(b.inputs) for b in plan.batches(data.train, step, 8)) for step in range(200)]
    assert 17 < sum(sizes) / len(sizes) < 23 and len(set(sizes)) > 5  # mean q * N = 20, sizes vary
    assert all(len(b.inputs) <= 8 for b in plan.batches(data.train, 0, 8))
    again = dp.Privacy(1.0, 0.1, 100, 1e-5, 1.0, "rdp", 20.0, 16.0, secret=99)
    assert torch.equal(plan.batches(data.train, 3, 8)[0].inputs, again.batches(data.train, 3, 8)[0].inputs)


def test_the_embedding_table_is_frozen_under_dp():
    model = tiny_model()
    cfg = TrainConfig(max_steps=1, clip=None, privacy=dp.DPConfig(noise_multiplier=1.0))
    names = set_trainable_(model, cfg)
    assert "embed.weight" not in names and "blocks.0.attn.q_proj.weight" in names


def test_a_crashed_dp_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setattr(dp.secrets, "randbits", lambda bits: 424242)  # the same secret for both runs
    data = random_data(n=40)
    cfg = TrainConfig(trainable=LORA, max_steps=6, micro_batch=2, grad_accum=2, clip=None, lr=1e-2, save_every=2,
                      privacy=dp.DPConfig(noise_multiplier=0.8))
    whole_model = lora_model()
    whole = train(whole_model, data, cfg, tmp_path / "full", show=False)

    cut = lora_model()
    real = dp.Privacy.batches

    def dying(self, train_seqs, step, micro):
        if step == 5:
            raise Crash
        return real(self, train_seqs, step, micro)

    monkeypatch.setattr(dp.Privacy, "batches", dying)
    with pytest.raises(Crash):
        train(cut, data, cfg, tmp_path / "cut", show=False)
    assert latest_state(tmp_path / "cut").name == "step-00000004"
    monkeypatch.setattr(dp.Privacy, "batches", real)
    monkeypatch.setattr(dp.secrets, "randbits", lambda bits: 1)  # a resumed run must use the saved secret
    resumed = lora_model(seed=3)
    again = train(resumed, data, cfg, tmp_path / "cut", resume=True, show=False)
    assert again.resumed_from == 4 and [r[:5] for r in again.loss_curve] == [r[:5] for r in whole.loss_curve]
    for (n, a), b in zip(whole_model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert again.privacy == whole.privacy


@pytest.mark.parametrize("fields, message", [
    (dict(epsilon=0.0), "--dp-epsilon must be positive"),
    (dict(epsilon=-1.0), "--dp-epsilon must be positive"),
    (dict(epsilon=3.0, delta=1.0), "--dp-delta must be in"),
    (dict(epsilon=3.0, clip_norm=0.0), "--dp-clip must be positive"),
    (dict(epsilon=3.0, noise_multiplier=1.0), "exactly one"),
    (dict(), "exactly one"),
    (dict(noise_multiplier=-0.5), "--dp-noise must be >= 0"),
    (dict(epsilon=3.0, accountant="gdp"), "accountant must be one of"),
])
def test_dp_config_refusals(fields, message):
    with pytest.raises(SlmError, match=message):
        dp.DPConfig(**fields).validate()


def test_settings_the_accountant_cannot_account_for_are_refused():
    with pytest.raises(SlmError, match="only 3"):
        dp.plan(dp.DPConfig(epsilon=3.0), n_train=3, expected_batch=8, steps=10, mean_tokens=16.0)
    with pytest.raises(SlmError, match="finds no noise multiplier"):
        dp.plan(dp.DPConfig(epsilon=0.01, delta=1e-9), n_train=10, expected_batch=10, steps=1000, mean_tokens=16.0)
    base = TrainConfig(max_steps=1, clip=None, privacy=dp.DPConfig(epsilon=1.0))
    with pytest.raises(SlmError, match="--clip does not apply"):
        dataclasses.replace(base, clip=1.0).validate()
    with pytest.raises(SlmError, match="one process"):
        dataclasses.replace(base, distributed="ddp").validate()
    with pytest.raises(SlmError, match="--checkpointing"):
        dataclasses.replace(base, checkpointing=True).validate()


def test_dp_config_round_trips_through_the_train_config_record():
    cfg = TrainConfig(max_steps=3, clip=None, privacy=dp.DPConfig(epsilon=8.0, delta=1e-6, clip_norm=0.7))
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.privacy == cfg.privacy and again.to_dict() == cfg.to_dict()

