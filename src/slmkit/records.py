"""A pipeline step's record: its config as plain JSON data, as a checkpoint's history holds it. Its own module so
that steps defined anywhere (compression, training, adapters) record themselves without importing the pipeline."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def step_record(cfg) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists), exactly as slmkit.json will hold it."""
    return json.loads(json.dumps({"method": cfg.method, **dataclasses.asdict(cfg)}))
