"""Recipes: a JSON or YAML file that lists steps (prune, train or distill, QAT, quantize, KV cache, export) and
`run_recipe` that runs them as one pipeline (slmkit.pipeline), every step recorded in the checkpoint.

    {"model": null,                                  # optional; `slm compress RECIPE MODEL` overrides it
     "steps": [{"method": "prune_structured", "axis": "auto", "ratio": 0.25},
               {"method": "distill", "data": "...", "teachers": ["input"], "kd_topk": 64,
                "train": {"max_tokens": 500000, "lr": 2e-4}},
               {"method": "gptq", "scheme": {"bits": 4, "group_size": 32}},
               {"method": "export", "format": "gguf"}]}

A step is a history record (what a checkpoint's slmkit.json holds, read by slmkit.steps.step_from_record), so a
model's own history is a recipe; `distill` is shorthand for a `train` record whose objective is distillation,
and the teacher `input` names the model the recipe started from."""

from .parse import KNOWN, Recipe, read_recipe
from .run import run_recipe

__all__ = ["KNOWN", "Recipe", "read_recipe", "run_recipe"]
