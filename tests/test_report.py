"""Run files, Markdown, Pareto fronts and plots of slmkit.eval.report (synthetic runs, no model)."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

from slmkit.errors import SlmError
from slmkit.eval import report
from slmkit.eval.report import (SCHEMA, build_report, pareto_front, plot_runs, read_run, run_envelope, to_markdown,
                                write_run)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(name: str, mb: float, ppl: float, acc: float, tok_s: float | None, kind: str = "eval") -> dict:
    run = run_envelope(kind, {"source": f"org/{name}", "format": "safetensors", "params": int(mb * 250_000),
                              "weight_bytes": int(mb * 1e6), "file_bytes": int(mb * 1e6) + 1000, "dtype": "bfloat16"},
                       ["slm", kind, f"org/{name}"])
    run["protocol"] = {"seed": 0, "limit": 100}
    run["results"] = {"wikitext": {"perplexity": ppl, "mean_nll": math.log(ppl), "tokens_scored": 4096,
                                   "protocol": {"window": 512, "stride": None}},
                      "hellaswag": {"acc": acc, "acc_norm": acc + 0.01, "n": 100}}
    run["fidelity"] = {"kl_divergence": 0.0123, "reference": "org/base"}
    run["cost"] = {"decode_tokens_per_s": tok_s, "ttft_ms": 42.5, "peak_rss_mb": 812.0, "weight_bytes": int(mb * 1e6)}
    return run


def three_runs() -> list[dict]:
    return [synthetic_run("small", 135, 21.5, 0.41, 80.0), synthetic_run("medium", 360, 16.2, 0.52, 35.0),
            synthetic_run("worse", 400, 25.0, 0.38, 20.0)]


# --------------------------------------------------------------------------------------- pareto


def brute_front(points, minimize_y):
    """Reference: a point is on the front when no other point is at least as good on both axes and
    strictly better on one."""
    sign = 1 if minimize_y else -1

    def dominates(a, b):
        return a[0] <= b[0] and sign * a[1] <= sign * b[1] and (a[0] < b[0] or sign * a[1] < sign * b[1])

    return {i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)}


@pytest.mark.parametrize("minimize_y", [True, False])
def test_pareto_empty_and_single_point(minimize_y):
    assert pareto_front([], minimize_y) == []
    assert pareto_front([(3.0, 7.0)], minimize_y) == [0]


def test_pareto_minimize_staircase_in_x_order():
    points = [(4, 1), (1, 5), (2, 3), (3, 4), (5, 0.5)]  # (3, 4) is dominated by (2, 3)
    assert pareto_front(points, minimize_y=True) == [1, 2, 0, 4]


def test_pareto_maximize_flips_the_y_direction():
    points = [(1, 0.3), (2, 0.5), (3, 0.4), (4, 0.7)]  # (3, 0.4) is dominated by (2, 0.5)
    assert pareto_front(points, minimize_y=False) == [0, 1, 3]
    assert pareto_front(points, minimize_y=True) == [0]


def test_pareto_all_dominated_by_one_point():
    points = [(5, 9), (2, 4), (1, 1), (3, 3)]
    assert pareto_front(points, minimize_y=True) == [2]
    assert pareto_front([(5, 0.1), (1, 0.9), (2, 0.5)], minimize_y=False) == [1]


def test_pareto_ties():
    assert pareto_front([(1, 2), (1, 2), (1, 2)], True) == [0, 1, 2]  # identical: none dominates another
    assert pareto_front([(1, 5), (2, 5)], True) == [0]  # same y, larger x: dominated
    assert pareto_front([(2, 5), (2, 3)], True) == [1]  # same x, worse y: dominated
    assert pareto_front([(2, 5), (2, 3)], False) == [0]
    assert pareto_front([(2, 3), (1, 3), (1, 3), (0.5, 9)], True) == [3, 1, 2]


def test_pareto_skips_non_finite_points():
    points = [(1, math.nan), (math.inf, 0), (2, 3), (3, -math.inf)]
    assert pareto_front(points, True) == [2]


@pytest.mark.parametrize("minimize_y", [True, False])
def test_pareto_matches_brute_force_on_random_grids(minimize_y):
    rng = random.Random(7)
    for n in itertools.chain(range(1, 9), [20, 50]):
        points = [(rng.randint(0, 5), rng.randint(0, 5)) for _ in range(n)]  # a small grid forces many ties
        front = pareto_front(points, minimize_y)
        assert set(front) == brute_front(points, minimize_y), points
        assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


# ------------------------------------------------------------------------------------ envelope


def test_envelope_has_the_common_sections():
    run = run_envelope("bench", {"source": "m", "weight_bytes": 10}, ["slm", "bench", "a b"])
    assert run["schema"] == SCHEMA and run["kind"] == "bench"
    assert run["command"] == ["slm", "bench", "a b"] and run["command_line"] == "slm bench 'a b'"
    assert run["created"].endswith("+00:00")
    assert {"python", "torch", "slmkit"} <= set(run["versions"])
    assert run["machine"]["cores"] >= 1 and run["machine"]["cpu_model"]
    json.dumps(run)  # serialisable as is
    with pytest.raises(SlmError, match="kind"):
        run_envelope("finetune", {}, [])


# -------------------------------------------------------------------------------- write / read


def test_write_read_round_trip_and_markdown_twin(tmp_path):
    run = synthetic_run("small", 135, 21.5, 0.41, 80.0)
    path = write_run(run, tmp_path / "sub" / "run.json")
    assert read_run(path) == run
    assert (tmp_path / "sub" / "run.md").read_text() == to_markdown(run)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["run.json", "run.md"]


def test_failed_write_leaves_nothing(tmp_path):
    run = synthetic_run("small", 135, 21.5, 0.41, 80.0)
    run["results"]["wikitext"]["bad"] = object()
    with pytest.raises(SlmError, match="cannot be written as JSON"):
        write_run(run, tmp_path / "run.json")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path):
    good = synthetic_run("small", 135, 21.5, 0.41, 80.0)
    path = write_run(good, tmp_path / "run.json")
    bad = dict(good, cost={"x": {1, 2}})
    with pytest.raises(SlmError):
        write_run(bad, path)
    assert read_run(path) == good and sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.md"]


def test_write_refuses_a_bad_envelope(tmp_path):
    good = synthetic_run("small", 135, 21.5, 0.41, 80.0)
    for bad, message in [({k: v for k, v in good.items() if k != "schema"}, "no 'schema'"),
                         (dict(good, kind="finetune"), "kind"), (dict(good, results=[1]), "'results' must be")]:
        with pytest.raises(SlmError, match=message):
            write_run(bad, tmp_path / "run.json")
    with pytest.raises(SlmError, match=".md"):
        write_run(good, tmp_path / "run.md")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [
    (None, "run file not found"), ("{not json", "not valid JSON"), (b"\xff\xfe", "UTF-8"),
    ("[1, 2]", "top level is list"), ('{"kind": "eval"}', "no 'schema'"),
    ('{"schema": "slmkit.run/99", "kind": "eval"}', "is not supported"),
    ('{"schema": "slmkit.run/1", "kind": "nope"}', "kind must be")])
def test_read_run_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "run.json"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SlmError, match=message) as e:
        read_run(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


# ------------------------------------------------------------------------------------ markdown


def test_markdown_contains_the_numbers():
    md = to_markdown(synthetic_run("small", 135, 21.5, 0.4125, 80.0))
    for text in ["org/small", "safetensors", "bfloat16", "135000000", "| wikitext | perplexity (lower is better) | 21.5 |",
                 "| hellaswag | acc (higher is better) | 0.4125 |", "| hellaswag | acc_norm (higher is better) | 0.4225 |",
                 "| kl_divergence | 0.0123 |", "| decode_tokens_per_s | 80 |", "| ttft_ms | 42.5 |",
                 "| peak_rss_mb | 812 |", "| wikitext.protocol.window | 512 |", "| seed | 0 |", "slm eval org/small"]:
        assert text in md, text


def test_markdown_survives_missing_sections_and_pipes():
    run = run_envelope("bench", {"source": "a|b"}, ["slm"])
    md = to_markdown(run)
    assert "a\\|b" in md and "## Results" not in md and "## Machine" in md


# --------------------------------------------------------------------------------------- plots


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, (path, len(data))


def test_plot_runs_writes_pngs(tmp_path):
    notes: list[str] = []
    paths = plot_runs(three_runs(), tmp_path, notes)
    assert sorted(p.name for p in paths) == ["hellaswag-vs-latency.png", "hellaswag-vs-size.png",
                                              "wikitext-vs-latency.png", "wikitext-vs-size.png"]
    for path in paths:
        assert_png(path)
    assert notes == [] and sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_plot_runs_skips_without_the_fields(tmp_path, capsys):
    runs = three_runs()
    for run in runs:
        run["cost"].pop("decode_tokens_per_s")
    notes: list[str] = []
    paths = plot_runs(runs, tmp_path, notes)
    assert sorted(p.name for p in paths) == ["hellaswag-vs-size.png", "wikitext-vs-size.png"]
    assert len(notes) == 2 and all("cost.decode_tokens_per_s" in n for n in notes)
    bare = [run_envelope("eval", {"source": "m"}, ["slm"])]
    assert plot_runs(bare, tmp_path / "none") == []
    assert "no run has results" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_eval_and_bench_runs_of_one_model_combine(tmp_path):
    evals = three_runs()
    for run in evals:
        run.pop("cost")
    benches = [dict(run_envelope("bench", r["model"], ["slm", "bench"]), cost={"decode_tokens_per_s": s})
               for r, s in zip(evals, (80.0, 35.0, 20.0))]
    entries = report._merge_by_model(evals + benches)
    assert len(entries) == 3 and all("perplexity" in e["results"]["wikitext"] and e["cost"] for e in entries)
    names = [p.name for p in plot_runs(evals + benches, tmp_path, [])]
    assert "wikitext-vs-latency.png" in names


def test_labels_disambiguate_only_different_models():
    a, b = {"source": "x/m", "dtype": "float32"}, {"source": "y/m", "dtype": "int8"}
    assert report._labels([a, b, a]) == ["m (float32)", "m (int8)", "m (float32)"]
    assert report._labels([a, a, {"source": "z", "label": "mine"}]) == ["m", "m", "mine"]


def test_build_report(tmp_path):
    paths = [str(write_run(r, tmp_path / f"{i}.json")) for i, r in enumerate(three_runs())]
    odd = synthetic_run("odd", 200, 18.0, 0.45, None)
    odd["results"]["wikitext"]["protocol"] = {"window": 2048, "stride": 512}
    paths.append(str(write_run(odd, tmp_path / "odd.json")))
    written = build_report(paths, tmp_path / "out")
    assert written[-1].name == "report.md" and len(written) == 5
    md = written[-1].read_text()
    for text in ["| 0.json | eval | small |", "21.5", "0.52", "ms/token", "![wikitext-vs-size](wikitext-vs-size.png)",
                 "wikitext: the protocol differs"]:
        assert text in md, text
    with pytest.raises(SlmError, match="not found"):
        build_report([str(tmp_path / "missing.json")], tmp_path / "out2")
