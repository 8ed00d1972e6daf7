"""Train runs in slmkit.eval.report: checks on their curves, their Markdown twin, report.md and loss-curves.png
(synthetic runs, and one real run of a tiny preset trained for four steps)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from slmkit.cli import main
from slmkit.errors import SlmError
from slmkit.eval.report import build_report, plot_runs, read_run, run_envelope, to_markdown, write_run

from test_report import PNG_MAGIC, synthetic_run, three_runs


def train_run(name: str, steps: int = 40, start: float = 6.0, eval_every: int = 10, lr: float = 3e-4) -> dict:
    """A train run shaped as `slm train` writes it, with a decaying loss and a cosine learning rate."""
    run = run_envelope("train", {"source": f"/out/{name}", "format": "slmkit", "params": 3_219_776,
                                 "weight_bytes": 12_879_104, "dtype": "float32", "name": name},
                       ["slm", "train", "--preset", "tiny", "-o", f"/out/{name}"])
    loss = [start * (0.5 + 0.5 * math.exp(-s / 15)) + 0.05 * math.sin(s) for s in range(1, steps + 1)]
    curve = [[s, loss[s - 1], lr * (0.55 + 0.45 * math.cos(math.pi * s / steps)), 1.2, 512, 0.25]
             for s in range(1, steps + 1)]
    val = [[s, loss[s - 1] + 0.1] for s in range(eval_every, steps + 1, eval_every)]
    run["protocol"] = {"train": {"lr": lr, "max_steps": steps, "betas": [0.9, 0.95]}, "data": {"source": "x.txt"},
                       "base": "preset:tiny", "threads": 2, "init": "normal(0, 0.02)", "world_size": 1}
    run["results"] = {"train": {"final_loss": curve[-1][1], "val_loss": val[-1][1] if val else None,
                                "tokens_per_s": 2048.0, "steps": steps, "tokens": 512 * steps, "wall_s": 0.25 * steps,
                                "stopped": "steps", "resumed_from": None, "loss_curve": curve, "val_curve": val}}
    run["cost"] = {"peak_rss_mb": 581.5}
    return run


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and len(data) > 10_000, (path, len(data))
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """One `slm train` of the tiny preset: 4 steps of 2 x 32 tokens, a held-out loss every 2 steps."""
    folder = tmp_path_factory.mktemp("train")
    rc = main(["train", "--preset", "tiny", "--data", "tinyshakespeare", "--seq-len", "32", "--batch-size", "2",
               "--steps", "4", "--eval-every", "2", "--json", str(folder / "run.json"), "-o", str(folder / "model")])
    assert rc == 0
    return folder / "run.json"


# ------------------------------------------------------------------------------------ checks


def test_train_runs_round_trip(tmp_path):
    run = train_run("a")
    assert read_run(write_run(run, tmp_path / "a.json")) == run


@pytest.mark.parametrize("key, bad", [
    ("loss_curve", "oops"), ("loss_curve", [1.0, 2.0]), ("loss_curve", [[1, "x", 3e-4]]), ("loss_curve", [[1]]),
    ("loss_curve", [[1, None]]), ("loss_curve", [[1, True]]), ("val_curve", [[10, 2.0], {"step": 20}])])
def test_malformed_curves_are_one_line_errors(tmp_path, key, bad):
    run = train_run("a")
    run["results"]["train"][key] = bad
    with pytest.raises(SlmError, match=f"results.train.{key} must be a list") as e:
        write_run(run, tmp_path / "w.json")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(run))
    for call in (lambda: read_run(path), lambda: plot_runs([run], tmp_path / "plots", []),
                 lambda: build_report([str(path)], tmp_path / "out")):
        with pytest.raises(SlmError, match=f"results.train.{key}") as e:
            call()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "plots").exists() and not (tmp_path / "out").exists()


def test_train_section_must_be_an_object_and_curves_may_be_empty_or_absent(tmp_path):
    run = train_run("a")
    run["results"]["train"] = [1, 2]
    with pytest.raises(SlmError, match="'results.train' must be an object"):
        write_run(run, tmp_path / "a.json")
    run = train_run("a")
    run["results"]["train"]["loss_curve"], run["results"]["train"]["val_curve"] = [], []
    run["results"]["train"]["loss_curve"].append([1, math.nan, 3e-4, math.inf, 512, 0.1])  # a diverged step is data
    assert read_run(write_run(run, tmp_path / "a.json"))["results"]["train"]["loss_curve"][0][0] == 1
    del run["results"]["train"]["loss_curve"]
    write_run(run, tmp_path / "b.json")


# ------------------------------------------------------------------------------------ markdown


def test_markdown_twin_summarises_the_curves():
    run = train_run("a", steps=400)
    md = to_markdown(run)
    for text in ["# slmkit train run: a", "| train | final_loss (lower is better) |",
                 "| train | val_loss (lower is better) |", "| train | tokens_per_s (higher is better) | 2048 |",
                 "| train | steps | 400 |", "| train | loss_curve | 400 points, steps 1–400, ",
                 "| train | val_curve | 40 points, steps 10–400, ",
                 "## Loss curve", "10 of 400 logged steps", "| step | loss | lr | grad norm | tokens | seconds |",
                 "| peak_rss_mb | 581.5 |", "| train.lr | 0.0003 |", "| base | preset:tiny |"]:
        assert text in md, text
    assert "| 1 | " in md and "| 400 | " in md and "[[" not in md
    assert len(md) < 8000 and max(len(line) for line in md.splitlines()) < 300


def test_short_curves_are_shown_whole_and_eval_runs_have_no_curve_section():
    md = to_markdown(train_run("a", steps=3))
    assert "3 of 3 logged steps" in md and "| train | val_curve | 0 points |" in md
    assert "## Loss curve" not in to_markdown(synthetic_run("small", 135, 21.5, 0.41, 80.0))


# --------------------------------------------------------------------------------------- plots


def test_loss_curves_png(tmp_path):
    runs = [train_run("a"), train_run("b", steps=60, start=5.0, eval_every=20, lr=1e-3)]
    notes: list[str] = []
    paths = plot_runs(runs, tmp_path, notes)
    assert [p.name for p in paths] == ["loss-curves.png"] and notes == []
    width, height = png_size(paths[0])
    assert 600 < width < 2000 and 500 < height < 2000


def test_repeated_labels_get_the_run_position():
    from slmkit.eval.report import _train_curves

    curves = _train_curves([train_run("a"), synthetic_run("x", 1, 2.0, 0.5, 1.0), train_run("a")], [])
    assert [label for label, _, _ in curves] == ["a #1", "a #3"]


def test_train_runs_without_curve_points_are_noted(tmp_path):
    run = train_run("a")
    run["results"]["train"]["loss_curve"] = []
    notes: list[str] = []
    assert plot_runs([run], tmp_path / "p", notes) == []
    assert any("loss curves skipped" in n for n in notes) and not (tmp_path / "p").exists()


def test_mixed_report_has_quality_plots_loss_curves_and_train_columns(tmp_path):
    runs = three_runs() + [train_run("a"), train_run("b", steps=20)]
    paths = [str(write_run(r, tmp_path / f"{i}.json")) for i, r in enumerate(runs)]
    written = build_report(paths, tmp_path / "out")
    names = [p.name for p in written]
    assert names[0] == "loss-curves.png" and names[-1] == "report.md" and "wikitext-vs-size.png" in names
    md = written[-1].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    for column in ["final loss", "val loss", "train tok/s", "peak RSS MB", "wikitext perplexity", "decode tok/s"]:
        assert f"| {column} |" in header, column
    assert "![loss-curves](loss-curves.png)" in md and "[[" not in md and "Loss (nats per token)" in md
    row = next(line for line in md.splitlines() if line.startswith("| 3.json |"))
    assert "| train | a |" in row and "| 2048 |" in row and "| 581.5 |" in row
    eval_row = next(line for line in md.splitlines() if line.startswith("| 0.json |")).split(" | ")
    train_cells = [header.split(" | ").index(c) for c in ("final loss", "val loss", "train tok/s")]
    assert all(eval_row[i] == "–" for i in train_cells)


def test_eval_only_report_is_unchanged(tmp_path):
    paths = [str(write_run(r, tmp_path / f"{i}.json")) for i, r in enumerate(three_runs())]
    md = build_report(paths, tmp_path / "out")[-1].read_text()
    assert "loss" not in md.lower() and not (tmp_path / "out" / "loss-curves.png").exists()


# ------------------------------------------------------------------------------------ real run


def test_real_train_run_reports(real_run, tmp_path):
    run = read_run(real_run)
    train = run["results"]["train"]
    assert run["kind"] == "train" and train["steps"] == 4 and len(train["loss_curve"]) == 4
    assert [row[0] for row in train["val_curve"]] == [2, 4]
    md = real_run.with_suffix(".md").read_text()
    assert "| train | loss_curve | 4 points, steps 1–4, " in md and "4 of 4 logged steps" in md
    written = build_report([str(real_run)], tmp_path / "out")
    assert [p.name for p in written] == ["loss-curves.png", "report.md"]
    width, height = png_size(written[0])
    assert width > 600 and height > 500
    report_md = written[-1].read_text()
    assert "![loss-curves](loss-curves.png)" in report_md and "## Notes" not in report_md
    row = next(line for line in report_md.splitlines() if line.startswith("| run.json |"))
    assert f"| {train['final_loss']:.4g} |" in row and f"| {run['cost']['peak_rss_mb']:.4g} |" in row
