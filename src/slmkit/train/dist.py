"""Training past one process: torchrun + DDP or FSDP2 (`fully_shard` per block), gloo on CPU, NCCL on CUDA.

The loop sees a `DistEnv` (world size, rank, sums across processes) and the module it runs forward through;
a single process gets `DistEnv()` and its own model, and nothing here does any work. Checkpoints are always
full (consolidated) state dicts, so a model trained on many processes loads anywhere.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import require


@dataclass
class DistEnv:
    kind: str = "none"  # none | ddp | fsdp
    world: int = 1
    rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        """The sum of a number over every process (float64 on the wire: token counts stay exact)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        torch.distributed.all_reduce(t)
        return t.item()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _comm_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def setup(kind: str) -> DistEnv:
    """DistEnv for `kind`; ddp / fsdp need torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR ...)."""
    if kind == "none":
        return DistEnv()
    require("WORLD_SIZE" in os.environ and "RANK" in os.environ, f"--distributed {kind} runs under torchrun, e.g. "
            f"torchrun --nproc_per_node=2 -m slmkit train ... --distributed {kind}")
    if not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return DistEnv(kind, torch.distributed.get_world_size(), torch.distributed.get_rank())


def teardown(env: DistEnv) -> None:
    if env.world > 1 or env.kind != "none":
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """The module to run forward through: the model, DDP around it, or the model sharded in place by FSDP2."""
    if env.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = [model.device] if model.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device)
    if env.kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


@contextlib.contextmanager
def grad_sync(runner: nn.Module, env: DistEnv, sync: bool):
    """Gradients are reduced across processes only on the last micro-batch of a step."""
    if env.kind == "ddp" and not sync:
        with runner.no_sync():
            yield
        return
    if env.kind == "fsdp":
        runner.set_requires_gradient_sync(sync)
    yield


def full_states(model: nn.Module, optimizer, env: DistEnv) -> tuple[dict, dict]:
    """(model state, optimizer state) as full tensors: FSDP gathers its shards (optimizer keyed by name)."""
    if env.kind != "fsdp":
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_states(model: nn.Module, optimizer, env: DistEnv, model_state: dict, optim_state: dict) -> None:
    """Every process loads the same full checkpoint; FSDP keeps its own shard of it."""
    if env.kind != "fsdp":
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def plain_model(model: nn.Module, env: DistEnv) -> nn.Module | None:
    """A model that saves like any other: the model itself, or for FSDP a fresh copy holding the gathered full
    state on the main process (None elsewhere). Every process must call it (the gather is collective)."""
    if env.kind != "fsdp":
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..model import Decoder

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.main:
        return None
    plain = Decoder(model.cfg)
    plain.load_state_dict(full)
    plain.compression = list(model.compression)
    return plain.eval()
