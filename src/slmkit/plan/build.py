"""Building a candidate for real and measuring it in a fresh process.

`Builder` applies a candidate's pipeline to a copy of the float base model (the result of a shared first step,
such as AWQ's scales, is kept and reused by later candidates that start with the same step), writes the artifact
its backend runs (an slmkit checkpoint for torch, a GGUF file for llama.cpp) and measures it with
slmkit.plan.probe in a child process.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from pathlib import Path

from ..errors import SlmError
from ..pipeline import run_pipeline_
from ..records import step_record
from .probe import ProbeSpec
from .space import Candidate


class Builder:
    def __init__(self, base, tokenizer, work: Path, probe_args: dict, calib=None):
        self.base, self.tokenizer, self.work, self.calib = base, tokenizer, work, calib
        self.probe_args = probe_args  # ProbeSpec fields besides artifact / backend
        self.memo: dict[str, object] = {}  # json of a one-step prefix -> the model after it
        self.built: dict[str, Path] = {}  # candidate name -> artifact
        self.seconds: dict[str, float] = {}  # candidate name -> build seconds
        self.probe_seconds: dict[str, float] = {}  # artifact -> measuring seconds

    def model(self, cand: Candidate):
        """The candidate's model: a copy of the base with its pipeline applied (a memoised first step reused)."""
        steps = cand.steps(self.calib)
        key = json.dumps(step_record(steps[0]), sort_keys=True)
        if len(steps) > 1 and key in self.memo:
            model, rest = copy.deepcopy(self.memo[key]), steps[1:]
        else:
            model, rest = copy.deepcopy(self.base), steps
            if len(steps) > 1:
                run_pipeline_(model, self.tokenizer, steps[:1])
                self.memo = {key: copy.deepcopy(model)}  # one kept: builds are ordered so that sharers follow
                rest = steps[1:]
        run_pipeline_(model, self.tokenizer, rest)
        return model

    def artifact(self, cand: Candidate) -> Path:
        """Build and write the candidate's artifact once (work/NN/model or model.gguf)."""
        if cand.name in self.built:
            return self.built[cand.name]
        from ..checkpoint import export_gguf, save_checkpoint

        start = time.perf_counter()
        model = self.model(cand)
        folder = self.work / f"{len(self.built):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "candidate.json").write_text(json.dumps(cand.record(), indent=2))
        if cand.backend == "llamacpp":
            path = export_gguf(model, self.tokenizer, folder / "model.gguf", "auto", force=True)
        else:
            path = save_checkpoint(model, self.tokenizer, folder / "model", force=True)
        self.built[cand.name] = path
        self.seconds[cand.name] = time.perf_counter() - start
        return path

    def measure(self, artifact: Path, backend: str, quality: bool = True, tag: str = "probe") -> dict:
        """The probe's figures of an artifact, from a fresh process."""
        spec = ProbeSpec(artifact, backend, quality=quality, **self.probe_args)
        out = artifact.parent / f"{tag}{'' if quality else '-cost'}.json"
        start = time.perf_counter()
        done = subprocess.run(spec.argv(out), capture_output=True, text=True)
        self.probe_seconds[str(artifact)] = self.probe_seconds.get(str(artifact), 0.0) + time.perf_counter() - start
        if done.returncode != 0 or not out.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SlmError(f"measuring {artifact} failed: {last}")
        return json.loads(out.read_text())
