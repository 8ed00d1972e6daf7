"""A synth job on disk: records appended to OUT.partial (one JSON line each, flushed), a sidecar OUT.partial.json
(settings, counts, rejections; rewritten atomically after every request), and at the end OUT.partial renamed
to OUT in one step. An interrupted job leaves only the .partial pair, which --resume continues."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SlmError, require
from ..files import write_atomic
from .config import SCHEMA


@dataclass
class JobState:
    attempts: int = 0  # requests made (kept + rejected)
    kept: list[str] = field(default_factory=list)  # the kept instructions, in order
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    seconds: float = 0.0  # over every session of the job
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.started


def partial_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")


def prepare(out: Path, settings: dict, force: bool, resume: bool) -> JobState:
    """Check OUT and its partial files (writing nothing) and return where the job starts."""
    partial, sidecar = partial_paths(out)
    require(not (force and resume), "give --force (start over) or --resume (continue), not both")
    require(out.parent.is_dir(), f"{out.parent}: no such directory")
    require(not out.is_dir(), f"{out} is a directory")
    if resume:
        require(partial.is_file() and sidecar.is_file(), f"nothing to resume: no {partial} and {sidecar.name}")
        return read_state(partial, sidecar, settings)
    require(force or not out.exists(), f"{out} exists; pass --force to overwrite it")
    require(force or not (partial.exists() or sidecar.exists()), f"{partial} exists (an interrupted run): pass "
            "--resume to continue it or --force to start over")
    return JobState()


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new), key=lambda k: (k not in new, k))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def read_state(partial: Path, sidecar: Path, settings: dict) -> JobState:
    """The state of an interrupted job: settings must equal `settings`; a record cut short by the interruption
    (no final newline) is dropped from the file; the kept instructions are re-read from the records."""
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlmError(f"{sidecar}: not valid JSON ({exc}); cannot resume") from None
    require(isinstance(meta, dict) and meta.get("schema") == SCHEMA, f"{sidecar}: not a synth job ({SCHEMA})")
    diff = _differences(meta.get("settings", {}), settings)
    require(not diff, f"cannot resume {partial}: settings differ from the interrupted run's ({diff})")
    data = partial.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    records = [_record(line, number, partial) for number, line in enumerate(complete.splitlines(), 1)]
    if len(complete) < len(data):
        with partial.open("r+b") as f:
            f.truncate(len(complete))
    last = records[-1]["attempt"] + 1 if records else 0
    return JobState(max(int(meta.get("attempts", 0)), last), [r["instruction"] for r in records],
                    Counter(meta.get("rejected", {})), float(meta.get("seconds", 0.0)))


def _record(line: bytes, number: int, partial: Path) -> dict:
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        rec = None
    require(isinstance(rec, dict) and isinstance(rec.get("instruction"), str) and isinstance(rec.get("attempt"), int),
            f"{partial}: line {number} is not a synth record; cannot resume")
    return rec


def write_sidecar(sidecar: Path, settings: dict, state: JobState, n: int) -> None:
    meta = {"schema": SCHEMA, "settings": settings, "n": n, "kept": len(state.kept), "attempts": state.attempts,
            "rejected": dict(sorted(state.rejected.items())), "seconds": round(state.elapsed(), 3)}
    write_atomic(sidecar, (json.dumps(meta, indent=1) + "\n").encode())


def append_record(f, record: dict) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


def finish(out: Path) -> None:
    """OUT.partial becomes OUT in one rename (after an fsync); the sidecar goes."""
    partial, sidecar = partial_paths(out)
    with partial.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, out)
    sidecar.unlink(missing_ok=True)


def discard(out: Path) -> None:
    for path in partial_paths(out):
        path.unlink(missing_ok=True)
