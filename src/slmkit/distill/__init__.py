"""Knowledge distillation through the one training loop: divergences (pure functions), teachers (one or a
mixture; float, bfloat16 or packed), a top-k teacher cache on disk, and on-policy sampling, wrapped in one
loss object, DistillLoss, which registers itself as the objective "distill" of slmkit.train. Built on the core
and on slmkit.train; neither imports it.

    train(student, data, TrainConfig(objective=DistillLoss(teachers=("teacher-folder",), topk=64), ...))
"""

from ..train.objectives import OBJECTIVES
from .cache import TeacherCache, open_cache
from .divergence import LOSSES, divergence, kl, mixture, topk_bins, topk_target
from .objective import DistillLoss
from .teacher import Teacher, check_vocabulary, load_teacher

OBJECTIVES["distill"] = DistillLoss.from_record

__all__ = ["DistillLoss", "LOSSES", "Teacher", "TeacherCache", "check_vocabulary", "divergence", "kl",
           "load_teacher", "mixture", "open_cache", "topk_bins", "topk_target"]
