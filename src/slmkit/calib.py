"""Layer-wise calibration, shared by quantization (GPTQ, AWQ, SmoothQuant, imatrix) and pruning (Wanda, SparseGPT).

The calibration tokens pass through the model one block at a time: the inputs of block i are kept (samples x
length x width floats), the block runs over them once so hooks can gather statistics of each linear's input,
the caller changes the block, and the block runs again to produce the inputs of block i+1 (so later blocks
see the errors of earlier ones, as GPTQ does). Peak memory is the model plus two activation tensors plus one
block's working set for one chunk of samples, whatever the depth.

Default data: WikiText-2 *valid* (`wikitext2-valid`), a different split from the test text every perplexity
figure is measured on.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import SlmError, require
from .modules import LinearGroup, check_unshared
from .progress import progress


@dataclass(frozen=True)
class CalibConfig:
    source: str = "wikitext2-valid"  # any text source of the evaluator (named, file, folder, hub dataset)
    samples: int = 128
    length: int = 512  # tokens per sample
    seed: int = 0

    def validate(self) -> "CalibConfig":
        require(self.samples >= 1 and self.length >= 2, f"calibration needs samples >= 1 and length >= 2, got "
                f"{self.samples} x {self.length}")
        return self


def calibration_tokens(tokenizer, cfg: CalibConfig) -> torch.Tensor:
    """[samples, length] token ids: windows of the source at random (seeded) non-overlapping positions."""
    from .eval.data import read_text

    cfg.validate()
    ids = torch.tensor(tokenizer.encode(read_text(cfg.source).text), dtype=torch.long)
    n_windows = len(ids) // cfg.length
    require(n_windows >= cfg.samples, f"{cfg.source}: {len(ids)} tokens hold only {n_windows} windows of "
            f"{cfg.length}; asked for {cfg.samples}")
    pick = torch.randperm(n_windows, generator=torch.Generator().manual_seed(cfg.seed))[:cfg.samples]
    return ids[:n_windows * cfg.length].view(n_windows, cfg.length)[pick.sort().values]  # [N, T]


class InputStats:
    """Running statistics of one input width. With `hessian`: X^T X (for the Hessian 2 X^T X / n; its diagonal
    gives the mean square per column), which is all GPTQ and SparseGPT read; without: the sum of squares, of
    absolute values and the absolute maximum per column (Wanda, AWQ, SmoothQuant, importance), and every k-th
    row kept as a sample (AWQ's loss)."""

    def __init__(self, width: int, hessian: bool, keep_every: int = 0):
        self.n = 0
        self.xtx = torch.zeros(width, width) if hessian else None
        moments = not hessian
        self.sq = torch.zeros(width, dtype=torch.float64) if moments else None
        self.abs = torch.zeros(width, dtype=torch.float64) if moments else None
        self.absmax = torch.zeros(width) if moments else None
        self.keep_every, self.kept = keep_every, []  # every k-th row kept as a sample (AWQ's loss), 0: none

    def add(self, x: torch.Tensor, where: str) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [rows, width]
        if not torch.isfinite(x.sum()):  # one reduction: any nan or inf makes the sum non-finite
            raise SlmError(f"non-finite calibration activation at the input of {where}")
        self.n += x.shape[0]
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
        else:
            self.sq += (x * x).sum(0, dtype=torch.float64)
            self.abs += x.abs().sum(0, dtype=torch.float64)
            self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        if self.keep_every:
            self.kept.append(x[::self.keep_every].clone())

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x^2] per column: the importance of each input column (imatrix); its sqrt is Wanda's norm / sqrt(n)."""
        total = self.sq if self.xtx is None else torch.diag(self.xtx).double()
        return (total / max(self.n, 1)).float()

    @property
    def mean_abs(self) -> torch.Tensor:
        require(self.abs is not None, "mean |x| is not gathered alongside a Hessian (capture(hessian=False))")
        return (self.abs / max(self.n, 1)).float()

    @property
    def samples(self) -> torch.Tensor:
        """The kept rows [m, width]."""
        return torch.cat(self.kept)

    @property
    def hessian(self) -> torch.Tensor:
        return 2 * self.xtx / max(self.n, 1)


@contextmanager
def capture(block: nn.Module, groups: list[LinearGroup], hessian: bool, keep_every: int = 0) -> Iterator[list[InputStats]]:
    """While open, every forward of `block` adds each group's input to that group's InputStats."""
    stats = [InputStats(g.consumers[0].in_features, hessian, keep_every) for g in groups]
    handles = [g.consumers[0].register_forward_pre_hook(_adder(s, g.names[0]))
               for s, g in zip(stats, groups)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _adder(stats: InputStats, where: str) -> Callable:
    return lambda module, args: stats.add(args[0], where)


def layerwise(model: nn.Module, tokens: torch.Tensor, description: str, chunk: int = 8,
              sequential: bool = True) -> Iterator[tuple[int, nn.Module, Callable[[], torch.Tensor]]]:
    """Yield (index, block, run) for each block; run() runs the block over its calibration inputs and returns
    the outputs [N, T, C]. After the caller's step the block runs once more, now changed, to make the next
    block's inputs (sequential: later blocks see earlier blocks' quantization errors); with sequential=False
    the outputs of the caller's last run() are reused instead, saving one forward pass per block."""
    check_unshared(model)
    with torch.inference_mode():
        x = model.embed(tokens).to(model.compute_dtype)  # [N, T, C]
        if model.cfg.embed_scale != 1.0:
            x = x * model.cfg.embed_scale
    last = len(model.blocks) - 1
    for i in progress(range(len(model.blocks)), description):
        block = model.blocks[i]
        outputs: list[torch.Tensor] = []
        run = _block_runner(model, block, i, x, chunk, outputs)
        yield i, block, run
        if i < last:  # the last block's outputs feed nothing
            x = run() if sequential or not outputs else outputs[-1]


def _block_runner(model, block, index: int, x: torch.Tensor, chunk: int, outputs: list) -> Callable[[], torch.Tensor]:
    T = x.shape[1]
    rope = (model.rope_local if block.sliding else model.rope)[:, :T]  # [2, T, D]
    from .model import attention_mask

    mask = attention_mask(T, 0, model.cfg.sliding_window if block.sliding else None, x.device)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        outputs.clear()  # the previous run's outputs are freed before new ones are allocated
        y = torch.empty_like(x)  # [N, T, C]
        for s in range(0, len(x), chunk):
            y[s:s + chunk] = block(x[s:s + chunk], rope, mask, None, index, 0)
        outputs.append(y)
        return y
    return run
