"""Training: one loop for pretraining and fine-tuning (slmkit.train.loop), objectives as loss objects, data,
resumable train state, torchrun DDP / FSDP2. Built on the core (config, model, loader, checkpoint); the core
never imports it."""

from .config import TrainConfig, lr_at
from .data import TrainData, load_data
from .loop import TrainResult, backward_step, train
from .objectives import NextTokenLoss, objective

__all__ = ["TrainConfig", "TrainData", "TrainResult", "NextTokenLoss", "backward_step", "load_data", "lr_at",
           "objective", "train"]
