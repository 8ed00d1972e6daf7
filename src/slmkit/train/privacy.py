"""Differential privacy in the training loop: DP-SGD with Poisson sampling, accounted by Opacus.

Each optimizer step draws every training sequence independently with probability q = (micro_batch x
grad_accum) / N (Poisson sampling, what the RDP and PRV accountants assume), takes each sampled sequence's
gradient on its own, scales it to norm at most C, sums, adds Gaussian noise of standard deviation sigma * C to
every coordinate and divides by the expected batch q * N (as Opacus does for Poisson batches).

A sequence's loss is its summed token loss over the mean counted tokens per training sequence (for packed
text: its mean token loss), so with noise 0, no clipping and a batch of the expected size the update is the
ordinary loop's exactly (tests/test_privacy.py). Per-sample gradients come from Opacus's GradSampleModule
(hooks on the trainable linears; other trainable modules through its torch.func fallback); the accountant is
Opacus's RDP (default) or PRV one. What is ours: the sampling, clipping and noise in the one loop, and the
record. Which sequences a step samples and the noise it adds come from a secret seed drawn from the operating
system at the start of the run and kept only in the run's train state (OUT.train/, for --resume): the
guarantee assumes that folder stays private, or is deleted after the run.

Policy for tables: the embedding table (on SmolLM2 tied to the output projection) and an untied output
matrix are frozen under DP. Their per-sample gradients would be vocabulary x width per sequence (113 MB each
on the default model) for rows that a sequence mostly does not touch.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import SlmError, require
from .objectives import Batch, Objective

ACCOUNTANTS = ("rdp", "prv")
# RDP orders beyond Opacus's defaults (which stop at 63): at few steps or a large epsilon the best order is
# higher, and with the defaults alone Opacus over-states epsilon (it warns "optimal order is the largest alpha").
EXTRA_ALPHAS = (80, 100, 128, 160, 200, 256, 320, 400, 512, 768, 1024)
FROZEN_UNDER_DP = ("embed.weight", "lm_head.weight")


@dataclass(frozen=True)
class DPConfig:
    epsilon: float | None = None  # target epsilon: the noise multiplier is found for it ...
    noise_multiplier: float | None = None  # ... or sigma is given and epsilon reported
    delta: float | None = None  # default 1 / N (training sequences)
    clip_norm: float = 1.0  # C: every per-sample gradient is scaled to norm <= C
    accountant: str = "rdp"  # rdp | prv (Opacus)

    def validate(self) -> "DPConfig":
        require((self.epsilon is None) != (self.noise_multiplier is None),
                "differential privacy takes a target --dp-epsilon or a --dp-noise multiplier, exactly one")
        require(self.epsilon is None or _finite(self.epsilon) and self.epsilon > 0,
                f"--dp-epsilon must be positive, got {self.epsilon}")
        require(self.noise_multiplier is None or _finite(self.noise_multiplier) and self.noise_multiplier >= 0,
                f"--dp-noise must be >= 0, got {self.noise_multiplier}")
        require(self.delta is None or _finite(self.delta) and 0 < self.delta < 1,
                f"--dp-delta must be in (0, 1), got {self.delta}")
        require(_finite(self.clip_norm) and self.clip_norm > 0, f"--dp-clip must be positive, got {self.clip_norm}")
        require(self.accountant in ACCOUNTANTS, f"accountant must be one of {', '.join(ACCOUNTANTS)}")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "DPConfig":
        return cls(**data).validate()


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _need_opacus() -> None:
    import importlib.util

    require(importlib.util.find_spec("opacus") is not None,
            "DP-SGD uses Opacus's accountants and per-sample gradients: pip install 'slmkit[dp]' (opacus)")


def make_accountant(name: str):
    _need_opacus()
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


def accountant_options(name: str) -> dict:
    """What slmkit passes to the accountant's get_epsilon: the RDP orders (Opacus's defaults plus EXTRA_ALPHAS)."""
    if name != "rdp":
        return {}
    from opacus.accountants import RDPAccountant

    return {"alphas": list(RDPAccountant.DEFAULT_ALPHAS) + list(EXTRA_ALPHAS)}


def epsilon_of(accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The accountant's epsilon after `steps` Poisson-sampled steps at (sigma, q), for delta."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = make_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta, **accountant_options(accountant)))


@dataclass
class Privacy:
    """DP-SGD as resolved for one run: what the accountant was told, and the secret that drives the noise."""

    noise_multiplier: float
    sample_rate: float
    steps: int  # planned steps (the accounting of a run cut short uses the steps taken)
    delta: float
    clip_norm: float
    accountant: str
    expected_batch: float  # q * N sequences
    mean_tokens: float  # counted tokens per training sequence, on average
    secret: int  # seeds the sampling and the noise; kept in the train state only

    def record(self, steps_taken: int) -> dict:
        """privacy.* of the run JSON and the checkpoint: epsilon recomputed for the steps taken."""
        eps = epsilon_of(self.accountant, self.noise_multiplier, self.sample_rate, steps_taken, self.delta)
        return {"epsilon": eps, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": steps_taken, "clip_norm": self.clip_norm,
                "accountant": f"opacus {self.accountant}", "sampling": "poisson",
                "accountant_options": accountant_options(self.accountant),
                "frozen": list(FROZEN_UNDER_DP)}

    def batches(self, train, step: int, micro_batch: int) -> list[Batch]:
        """Step `step`'s Poisson sample of the training sequences, in micro-batches (possibly none)."""
        gen = torch.Generator().manual_seed((self.secret + 7919 * step) % (1 << 63))
        chosen = (torch.rand(len(train), generator=gen) < self.sample_rate).nonzero().flatten().tolist()
        return [train.batch(chosen[i:i + micro_batch]) for i in range(0, len(chosen), micro_batch)]

    def noise_generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.secret * 31 + 104729 * step + 1) % (1 << 63))


def plan(cfg: DPConfig, n_train: int, expected_batch: int, steps: int, mean_tokens: float,
         secret: int | None = None) -> Privacy:
    """Resolve sigma (from the target epsilon, through the accountant) for a run of `steps` steps."""
    cfg.validate()
    _need_opacus()
    q = expected_batch / n_train
    require(q <= 1, f"DP: a step expects {expected_batch} sequences but the data has only {n_train}; lower "
            "--batch-size x --grad-accum")
    delta = cfg.delta if cfg.delta is not None else 1.0 / n_train
    sigma = cfg.noise_multiplier if cfg.noise_multiplier is not None else _noise_for(cfg, delta, q, steps)
    return Privacy(sigma, q, steps, delta, cfg.clip_norm, cfg.accountant, q * n_train, mean_tokens,
                   secret if secret is not None else secrets.randbits(62))


def _noise_for(cfg: DPConfig, delta: float, q: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=delta, sample_rate=q,
                                          steps=steps, accountant=cfg.accountant,
                                          **accountant_options(cfg.accountant)))
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise SlmError(f"DP: the {cfg.accountant} accountant finds no noise multiplier for epsilon {cfg.epsilon}, "
                       f"delta {delta:g}, sample rate {q:.4g}, {steps} steps ({exc})") from None


# ---- per-sample gradients ----------------------------------------------------------------------------
def wrap(model: nn.Module):
    """The module the loop runs forward through under DP: Opacus's GradSampleModule, which gives every
    trainable parameter a per-sample gradient `grad_sample` [b, ...] in each backward."""
    from opacus import GradSampleModule

    from ..model import Linear

    samplers = GradSampleModule.GRAD_SAMPLERS
    samplers.setdefault(Linear, samplers[nn.Linear])  # slmkit's Linear is an nn.Linear with a decode kernel
    return GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)


def clip_per_sample(per_sample: list[torch.Tensor], clip: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample gradients ([b, ...] per parameter) -> (the sum over samples of each scaled to total norm
    <= clip, per parameter; the [b] total norms after scaling)."""
    norms = torch.stack([g.flatten(1).float().norm(dim=1) for g in per_sample]).norm(dim=0)  # [b]
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # [b]
    summed = [torch.einsum("b,b...->...", factor.to(g.dtype), g) for g in per_sample]
    return summed, norms * factor


def dp_backward_step(runner, objective: Objective, batches: list[Batch], privacy: Privacy, step: int
                     ) -> tuple[float, int]:
    """Set every trainable parameter's .grad to the step's DP-SGD gradient; returns (mean token loss of the
    sampled sequences, their counted tokens)."""
    params = [p for p in runner.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    loss_sum, tokens, device = 0.0, 0, params[0].device
    for batch in batches:
        part, count = objective.loss_sum(runner, batch.to(device))
        with warnings.catch_warnings():  # the first adapters' inputs need no gradient: torch says so, rightly
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            (part / privacy.mean_tokens).backward()
        clipped, _ = clip_per_sample([p.grad_sample for p in params], privacy.clip_norm)
        for total, c in zip(sums, clipped):
            total += c
        runner.zero_grad(set_to_none=True)
        loss_sum, tokens = loss_sum + part.item(), tokens + count
    noise = privacy.noise_generator(step)
    std = privacy.noise_multiplier * privacy.clip_norm
    for p, total in zip(params, sums):
        total += torch.randn(total.shape, generator=noise).to(total.device) * std
        p.grad = (total / privacy.expected_batch).to(p.dtype)
    return loss_sum / max(tokens, 1), tokens


def describe(privacy: Privacy) -> dict:
    return {k: v for k, v in asdict(privacy).items() if k != "secret"}
