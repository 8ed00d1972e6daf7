"""Seed tasks: the Self-Instruct / Alpaca `seed_tasks.jsonl` format, one JSON object a line with `instruction`
(a non-empty string) and optionally `instances` (a list of {"input", "output"}), `id`, `name`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlmError, require


@dataclass(frozen=True)
class Seed:
    instruction: str
    input: str = ""  # the first instance's input
    id: str = ""


def _seed(obj, where: str) -> Seed:
    require(isinstance(obj, dict), f"{where}: expected a JSON object, got {type(obj).__name__}")
    instruction = obj.get("instruction")
    require(isinstance(instruction, str) and bool(instruction.strip()),
            f"{where}: 'instruction' must be a non-empty string")
    instances = obj.get("instances") or [{}]
    require(isinstance(instances, list) and all(isinstance(i, dict) for i in instances),
            f"{where}: 'instances' must be a list of objects")
    input_text = instances[0].get("input") or ""
    require(isinstance(input_text, str), f"{where}: an instance's 'input' must be a string")
    return Seed(instruction.strip(), input_text.strip(), str(obj.get("id", "")))


def read_seeds(path: str | Path) -> tuple[list[Seed], str]:
    """(the seed tasks, the sha256 of the file): every line checked, the first bad one named."""
    path = Path(path)
    require(path.is_file(), f"{path}: no such seeds file")
    data = path.read_bytes()
    seeds = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SlmError(f"{path}: line {number}: not valid JSON ({exc})") from None
        seeds.append(_seed(obj, f"{path}: line {number}"))
    require(bool(seeds), f"{path}: no seed tasks (empty file)")
    return seeds, hashlib.sha256(data).hexdigest()
