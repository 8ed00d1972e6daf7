"""Recipes (slm compress): JSON and YAML read into step configs, the teacher 'input', order and field refusals
before any work (one line, exit 2, nothing written), a prune -> distill -> qat -> export recipe end to end on a
tiny model with every step recorded, the recorded history run again as a recipe giving the same weights, and
the measured table."""

import json
from pathlib import Path

import pytest
import torch

from slmkit.backends import load
from slmkit.cli import main
from slmkit.distill import DistillLoss
from slmkit.errors import SlmError
from slmkit.prune import StructuredPruneConfig
from slmkit.qat import QATStep
from slmkit.quant import GPTQConfig
from slmkit.recipe import read_recipe, run_recipe
from slmkit.recipe.run import Measure
from slmkit.train.step import TrainStep

CALIB = {"source": "tinyshakespeare", "samples": 4, "length": 32}
TRAIN = {"max_steps": 2, "seq_len": 32, "micro_batch": 2, "lr": 1e-3}


def recipe_steps(base: Path) -> list[dict]:
    return [{"method": "prune_structured", "axis": "mlp", "ffn_dim": 96, "calib": CALIB},
            {"method": "distill", "data": "tinyshakespeare", "teachers": ["input"], "topk": 8, "kd_ratio": 0.9,
             "train": TRAIN},
            {"method": "qat", "qat": {"scheme": {"bits": 4, "group_size": 32, "symmetric": False}},
             "data": "tinyshakespeare", "train": TRAIN},
            {"method": "export", "format": "gguf"}]


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from test_adapters_cli import base as make_base

    return make_base.__wrapped__(tmp_path_factory)


def test_json_and_yaml_recipes_read_into_step_configs(tmp_path, base):
    steps = recipe_steps(base)[:2] + [{"method": "gptq", "scheme": {"bits": 4, "group_size": 32}, "calib": CALIB}]
    from_json = read_recipe(write(tmp_path / "r.json", {"steps": steps}), str(base))
    yaml = pytest.importorskip("yaml")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": str(base), "steps": steps}))
    from_yaml = read_recipe(tmp_path / "r.yaml")
    for recipe in (from_json, from_yaml):
        prune, distill, gptq = recipe.steps
        assert isinstance(prune, StructuredPruneConfig) and prune.ffn_dim == 96 and prune.calib.samples == 4
        assert isinstance(distill, TrainStep) and isinstance(distill.train.objective, DistillLoss)
        assert distill.train.objective.teachers == (str(base),)  # 'input' is the recipe's model
        assert distill.train.objective.kd_ratio == 0.9 and distill.train.max_steps == 2
        assert isinstance(gptq, GPTQConfig) and recipe.export is None and recipe.model == str(base)


@pytest.mark.parametrize("steps, message", [
    ([{"method": "sparsify"}], "unknown step 'sparsify'"),
    ([{"method": "rtn"}, {"method": "prune", "sparsity": 0.5}], "step 2 (prune) cannot come after step 1 (rtn)"),
    ([{"method": "gptq"}, {"method": "distill", "data": "tinyshakespeare"}], "needs float weights"),
    ([{"method": "export"}, {"method": "rtn"}], "export is the last step"),
    ([{"method": "qat", "data": "x"}, {"method": "qat", "data": "x"}], "at most one qat"),
    ([{"method": "rtn", "bogus": 1}], "unknown field(s) bogus"),
    ([{"method": "export", "format": "onnx"}], "format must be gguf or hf"),
    ([{"method": "distill", "data": "tinyshakespeare", "loss": "mse"}], "--kd-loss must be one of"),
    ([], "non-empty list 'steps'"),
])
def test_bad_recipes_are_refused_in_one_line_before_any_work(tmp_path, base, capsys, steps, message):
    recipe = write(tmp_path / "bad.json", {"steps": steps})
    out = tmp_path / "out"
    assert main(["compress", str(recipe), str(base), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_malformed_recipe_files_are_refused(tmp_path, capsys):
    (tmp_path / "r.json").write_text("{not json")
    (tmp_path / "r.yaml").write_text("steps: [unclosed")
    for name in ("r.json", "r.yaml", "missing.json"):
        assert main(["compress", str(tmp_path / name), "-o", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_prune_distill_qat_export_end_to_end_and_replayed_from_its_history(tmp_path, base, capsys):
    recipe = write(tmp_path / "recipe.json", {"steps": recipe_steps(base)})
    out = tmp_path / "small"
    assert main(["compress", str(recipe), str(base), "-o", str(out), "--threads", "1"]) == 0, capsys.readouterr().err
    assert (tmp_path / "small.gguf").is_file()
    lm = load(str(out))
    history = lm.model.compression
    assert [r["method"] for r in history] == ["prune_structured", "train", "qat"]
    assert history[1]["train"]["objective"]["name"] == "distill"
    assert history[1]["train"]["objective"]["teachers"] == [str(base)] and history[1]["result"]["steps"] == 2
    assert history[2]["result"]["steps"] == 2 and lm.model.cfg.ffn_dim < 128
    # the checkpoint's history is itself a recipe: run again, the same weights come out
    again = write(tmp_path / "again.json", {"steps": history})
    assert main(["compress", str(again), str(base), "-o", str(tmp_path / "again"), "--threads", "1"]) == 0
    replay = load(str(tmp_path / "again")).model.state_dict()
    assert replay.keys() == lm.model.state_dict().keys()
    assert all(torch.equal(v, replay[k]) for k, v in lm.model.state_dict().items())


def test_measured_recipe_writes_its_table(tmp_path, base):
    steps = [{"method": "prune_structured", "axis": "mlp", "ffn_dim": 96, "calib": CALIB},
             {"method": "rtn", "scheme": {"bits": 4, "group_size": 32}}]
    recipe = read_recipe(write(tmp_path / "r.json", {"steps": steps}), str(base))
    result = run_recipe(recipe, tmp_path / "out", measure=Measure(windows=2, window=64, prompt_tokens=16, new_tokens=4, runs=1),
                        show=False)
    rows = result["rows"]
    assert [r["step"] for r in rows] == ["input", "prune_structured", "rtn"]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0 and rows[2]["bytes"] < rows[1]["bytes"] < rows[0]["bytes"]
    assert all(r["ppl"] > 1 and r["decode_tps"] > 0 for r in rows)
    table = (tmp_path / "out" / "recipe.md").read_text()
    assert table.count("\n") == 5 and "| rtn |" in table
    assert not Path(f"{tmp_path / 'out'}.steps").exists()


def test_the_shipped_recipes_read(tmp_path):
    for path in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")):
        recipe = read_recipe(path)
        assert recipe.steps and recipe.export is not None, path
        distill = next(s for s in recipe.steps if isinstance(s, TrainStep))
        assert distill.train.objective.teachers == (None,)  # 'input' of the default model


def test_a_failed_run_keeps_its_steps_and_resumes(tmp_path, base, capsys):
    """Prune to an MLP 100 wide, then distill, then GPTQ g32: GPTQ refuses (32 does not divide 100) in one line
    — after the distillation, which is kept; the fixed recipe resumes after it and gives the weights an
    uninterrupted run gives."""
    steps = [{"method": "prune_structured", "axis": "mlp", "ffn_dim": 100, "calib": CALIB},
             {"method": "distill", "data": "tinyshakespeare", "teachers": ["input"], "topk": 8, "train": TRAIN},
             {"method": "gptq", "scheme": {"bits": 4, "group_size": 32}, "calib": CALIB}]
    recipe, out = write(tmp_path / "r.json", {"steps": steps}), tmp_path / "small"
    assert main(["compress", str(recipe), str(base), "-o", str(out), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "group size 32 does not divide blocks.0.mlp.down_proj's 100 input columns" in err
    assert "--resume" in err and not out.exists()
    assert (Path(f"{out}.steps") / "state.json").is_file()
    # without --resume the kept steps are not silently thrown away
    assert main(["compress", str(recipe), str(base), "-o", str(out), "--threads", "1"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    # another recipe cannot resume from them
    other = write(tmp_path / "o.json", {"steps": [{**steps[0], "ffn_dim": 64}, *steps[1:]]})
    assert main(["compress", str(other), str(base), "-o", str(out), "--resume", "--threads", "1"]) == 2
    assert "made by another recipe" in capsys.readouterr().err
    fixed = [*steps[:2], {"method": "gptq", "scheme": {"bits": 4, "group_size": 4}, "calib": CALIB}]
    write(recipe, {"steps": fixed})
    assert main(["compress", str(recipe), str(base), "-o", str(out), "--resume", "--threads", "1"]) == 0
    assert "resuming after step 2/3" in capsys.readouterr().err
    assert not Path(f"{out}.steps").exists()
    whole = tmp_path / "whole"
    assert main(["compress", str(recipe), str(base), "-o", str(whole), "--threads", "1"]) == 0
    a, b = load(str(out)).model.state_dict(), load(str(whole)).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
