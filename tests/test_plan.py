"""The constraint-first planner: budgets and units, the knapsack, sensitivities, the search space, predictions,
the search with fake costs (the guarantee and the infeasible explanation), and `slm plan` end to end on a tiny
model (fresh-process measurement, the re-measured guarantee, every refusal)."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.model import Decoder
from slmkit.plan.allocate import allocate, exact, total
from slmkit.plan.budget import Budget, quantity, task_floor
from slmkit.plan.predict import Calibration, Shapes, learn, predict
from slmkit.plan.search import Entry, Search, binding, mixed_candidate, run_search
from slmkit.plan.sensitivity import fisher_diagonal, matrices, scores
from slmkit.plan.space import FORMATS, Candidate, read_space, variants
from slmkit.plan.techniques import TECHNIQUES
from slmkit.quant import GPTQConfig, QScheme, RTNConfig, quantize_
from slmkit.quant.scheme import LayerScheme
from slmkit.records import step_record
from slmkit.steps import step_from_record

from conftest import randomize, tokens


# ---- budgets -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,kind,value", [("60", "size", 60.0), ("60MB", "size", 60.0), ("0.06GB", "size", 60.0),
                                             ("512KB", "size", 0.512), ("1MiB", "size", 1.048576),
                                             ("200ms", "time", 200.0), ("0.2s", "time", 200.0),
                                             ("20tok/s", "speed", 20.0), ("5%", "percent", 5.0), (3, "size", 3.0)])
def test_quantity_units(text, kind, value):
    assert quantity(text, kind, "--x") == pytest.approx(value)


@pytest.mark.parametrize("text", ["60 furlongs", "MB", "6e", "fast"])
def test_quantity_refuses_unknown_units(text):
    with pytest.raises(SlmError, match="--x"):
        quantity(text, "size", "--x")


def test_task_floor():
    assert task_floor("arc_easy:0.45") == ("arc_easy", 0.45)
    assert task_floor("arc_easy:45%") == ("arc_easy", 0.45)
    for bad in ("arc_easy", ":0.4", "arc_easy:1.5x"):
        with pytest.raises(SlmError):
            task_floor(bad)


@pytest.mark.parametrize("kw,match", [({"max_kl": 0.1, "max_ppl_increase": 5.0}, "give one"),
                                      ({}, "no budget"), ({"max_file_mb": -1.0}, "positive"),
                                      ({"max_file_mb": 50.0, "context": 64, "prompt_tokens": 128}, "does not fit"),
                                      ({"max_file_mb": 50.0, "objective": "fun"}, "objective"),
                                      ({"max_file_mb": 50.0, "backend": "onnx"}, "backend")])
def test_budget_refusals(kw, match):
    with pytest.raises(SlmError, match=match):
        Budget(**kw).validate()


def test_margins_and_slack():
    b = Budget(max_file_mb=100.0, min_decode_tps=20.0, max_kl=0.1)
    m = b.margins({"file_mb": 90.0, "decode_tps": 19.0, "kl": 0.05})
    assert m == pytest.approx({"file_mb": 0.1, "decode_tps": -0.05, "kl": 0.5})
    assert not b.met({"file_mb": 90.0, "decode_tps": 19.0, "kl": 0.05})
    assert b.met({"file_mb": 90.0, "decode_tps": 19.0, "kl": 0.05}, {"decode_tps": 0.06})
    assert b.margins({"file_mb": 90.0})["kl"] == float("-inf")  # a figure not measured never passes


# ---- the knapsack --------------------------------------------------------------------------------------------
def _instance(seed: int, n: int = 5, k: int = 4):
    rng = random.Random(seed)
    opts = {}
    for t in range(n):
        size = rng.uniform(1, 10)
        opts[f"t{t}"] = [(size * (j + 1), rng.uniform(0.5, 2) * size / (j + 1) ** 2) for j in range(k)]
    return opts


@pytest.mark.parametrize("seed", range(12))
def test_allocate_fits_and_is_near_the_optimum(seed):
    opts = _instance(seed)
    lo, hi = sum(o[0][0] for o in opts.values()), sum(o[-1][0] for o in opts.values())
    for budget in (lo, lo + (hi - lo) * 0.3, lo + (hi - lo) * 0.7, hi):
        got, best = allocate(opts, budget), exact(opts, budget)
        assert total(opts, got)[0] <= budget + 1e-9
        assert total(opts, got)[1] <= total(opts, best)[1] * 1.05 + 1e-12  # within 5% of the exact optimum


def test_allocate_extremes():
    opts = _instance(0)
    assert allocate(opts, sum(o[0][0] for o in opts.values()) - 1) is None  # nothing fits
    assert set(allocate(opts, 1e9).values()) == {3}  # everything at the best option when bytes are free


# ---- sensitivities -------------------------------------------------------------------------------------------
def _tiny(seed=0, **kw) -> Decoder:
    cfg = ModelConfig(**{**dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                max_seq_len=128), **kw})
    model = Decoder(cfg).eval()
    randomize(model, seed=seed)
    for p in model.parameters():  # calmer logits than randomize's: KL behaves as on a trained model
        if p.dim() >= 2:
            p.data *= 0.5
    return model


def test_fisher_and_scores():
    model = _tiny()
    fisher = fisher_diagonal(model, tokens(4 * 32).view(4, 32))
    assert set(fisher) == set(matrices(model)) and all(bool((f >= 0).all()) and f.sum() > 0 for f in fisher.values())
    s = scores({n: w.detach() for n, w in matrices(model).items()}, fisher,
               {f: FORMATS[f] for f in ("Q4_0", "Q5_0", "Q8_0")})
    for name, by in s.items():
        assert by["Q8_0"] < by["Q5_0"] < by["Q4_0"], name  # more bits, less predicted KL, for every tensor


def test_fisher_proxy_ranks_like_measured_kl():
    """The summed proxy of uniform RTN formats orders their measured KL on held-out tokens."""
    from slmkit.eval.fidelity import kl_stats

    model = _tiny()
    fisher = fisher_diagonal(model, tokens(8 * 32, seed=3).view(8, 32))
    weights = {n: w.detach().clone() for n, w in matrices(model).items()}
    held = tokens(4 * 32, seed=9).view(4, 32)
    with torch.no_grad():
        ref = model(held).double().log_softmax(-1).flatten(0, 1)
    pred, meas = [], []
    for bits in (3, 4, 5, 8):
        scheme = QScheme(bits, 32, True)
        pred.append(sum(v["f"] for v in scores(weights, fisher, {"f": scheme}).values()))
        q = _tiny()
        quantize_(q, RTNConfig(scheme, embedding=scheme))
        with torch.no_grad():
            meas.append(float(kl_stats(ref, q(held).double().log_softmax(-1).flatten(0, 1))[0].mean()))
    assert pred == sorted(pred, reverse=True) and meas == sorted(meas, reverse=True)
    assert 0.2 < pred[1] / meas[1] < 5  # the proxy is on the scale of the measured KL (it is fitted anyway)


# ---- per-layer schemes (mixed precision) ---------------------------------------------------------------------
def test_overrides_reach_every_quantizer_and_round_trip(tmp_path):
    from slmkit.checkpoint import export_gguf, save_checkpoint
    from slmkit.gguf_io import read_header
    from slmkit.loader import load
    from test_cli import tiny_tokenizer

    tok = tiny_tokenizer()
    over = (LayerScheme("blocks.1.mlp.down_proj", QScheme(8, 32, True)), LayerScheme("*.attn.v_proj", QScheme(5, 32, True)))
    for cfg in (RTNConfig(QScheme(4, 32, True), overrides=over), GPTQConfig(QScheme(4, 32, True), overrides=over)):
        assert step_from_record(step_record(cfg)) == cfg
        model = _tiny(vocab_size=tok.vocab_size)
        quantize_(model, cfg, tokens(4 * 64, vocab=tok.vocab_size).view(4, 64))
        b = model.blocks
        assert (b[1].mlp.down_proj.scheme.bits, b[0].mlp.down_proj.scheme.bits) == (8, 4)
        assert (b[0].attn.v_proj.scheme.bits, b[1].attn.v_proj.scheme.bits, b[0].attn.q_proj.scheme.bits) == (5, 5, 4)
    back = load(save_checkpoint(model, tok, tmp_path / "ckpt")).model
    assert back.blocks[1].mlp.down_proj.scheme.bits == 8 and back.compression[-1]["overrides"][0]["pattern"] == \
        "blocks.1.mlp.down_proj"
    _, infos, _ = read_header(export_gguf(model, tok, tmp_path / "m.gguf"))
    types = {t.name: t.ggml_type for t in infos}  # GGML ids: Q8_0 8, Q4_0 2, Q5_0 6
    assert (types["blk.1.ffn_down.weight"], types["blk.0.ffn_down.weight"], types["blk.0.attn_v.weight"]) == (8, 2, 6)


# ---- the search space ----------------------------------------------------------------------------------------
def test_space_is_read_from_the_table():
    space = read_space()
    assert set(space.rows) == {t.name for t in TECHNIQUES}  # every row has a verdict
    assert all(v == "searched" or v.startswith("not searched: ") or "backend" in v or "formats" in v
               for v in space.rows.values())
    assert {c.method for c in space.uniform} == {"rtn", "gptq", "awq+gptq"} and space.kv_bits == [16, 8, 4]
    assert "Q5_1" in space.mixed_formats and read_space(("rtn",)).mixed_methods == ["rtn"]
    naive = {c.name for c in space.uniform if c.naive}
    assert naive == {"rtn Q8_0 [torch]", "rtn Q4_0 [torch]", "awq+gptq Q4_0 [torch]"}


def test_variants_respect_each_backend():
    int3 = Candidate("rtn", QScheme(3, 32, True))
    q4 = Candidate("rtn", FORMATS["Q4_0"], naive=True)
    assert {(c.backend, c.kv_bits) for c in variants(int3, [16, 8], ["torch", "llamacpp"])} == {("torch", 16), ("torch", 8)}
    got = variants(q4, [16, 8], ["torch", "llamacpp"])
    assert {(c.backend, c.kv_bits, c.naive) for c in got} == {("torch", 16, True), ("torch", 8, False),
                                                              ("llamacpp", 16, True)}


def test_candidate_steps_are_pipeline_data():
    c = mixed_candidate("awq+gptq", {"blocks.0.attn.q_proj": "Q8_0", "blocks.0.mlp.up_proj": "Q4_0",
                                     "blocks.1.mlp.up_proj": "Q4_0", "embed": "Q5_1"}, "test")
    assert c.scheme == FORMATS["Q4_0"] and c.table == FORMATS["Q5_1"]
    assert c.overrides == (LayerScheme("blocks.0.attn.q_proj", FORMATS["Q8_0"]),)
    steps = replace(c, kv_bits=8).steps()
    assert [s.method for s in steps] == ["awq", "gptq", "kv_cache"]
    assert [step_from_record(step_record(s)) for s in steps] == steps


# ---- predictions and the search, with fake costs --------------------------------------------------------------
SHAPES = Shapes({"embed": (1000, 64), "blocks.0.attn.q_proj": (64, 64), "blocks.0.mlp.up_proj": (256, 64)},
                n_layers=1, kv_heads=2, head_size=32, compute_bytes=4)


def _scores():
    return {n: {"Q4_0": 1.0 * o * i / 1e4, "Q4_1": 0.7 * o * i / 1e4, "Q5_0": 0.45 * o * i / 1e4,
                "Q5_1": 0.3 * o * i / 1e4, "Q8_0": 0.01 * o * i / 1e4, "int3 sym g32": 4.0 * o * i / 1e4,
                "int3 asym g32": 3.0 * o * i / 1e4}
            for n, (o, i) in SHAPES.tensors.items()}


def _cal():
    cal = Calibration(overhead_bytes={"torch": 5000.0}, runtime_mb={"torch": 100.0})
    for f, k in {"Q8_0": 1e-5, "Q4_0": 1.4e-5, "Q4_1": 1.5e-5, "Q5_0": 1.6e-5, "Q5_1": 1.7e-5, "int3 sym g32": 2e-5,
              "int3 asym g32": 2.1e-5}.items():
        cal.decode_ms_per_byte[f"torch/{f}"] = k
        cal.ttft_ms_per_weight[f"torch/{f}"] = 1e-5
    cal.kv_kl.update({8: 0.001, 4: 0.02})
    return cal


def test_predictions():
    cal, sc = _cal(), _scores()
    q8, q4 = Candidate("rtn", FORMATS["Q8_0"]), Candidate("rtn", FORMATS["Q4_0"])
    p8, p4 = predict(q8, SHAPES, sc, cal, 256), predict(q4, SHAPES, sc, cal, 256)
    n_block = 64 * 64 + 256 * 64
    assert p8["file_mb"] == pytest.approx((1000 * 64 * 34 / 32 + n_block * 34 / 32 + 5000) / 1e6)
    assert p4["file_mb"] < p8["file_mb"] and p4["kl"] > p8["kl"]
    kv = 2 * 1 * 2 * 32 * 256 * 4
    assert p8["memory_mb"] == pytest.approx((p8["file_mb"] * 1e6 - 5000 + kv) / 1e6 + 100)
    assert predict(replace(q8, kv_bits=8), SHAPES, sc, cal, 256)["memory_mb"] < p8["memory_mb"]
    learn(cal, q4, sc, {"kl": 0.5, "ppl_increase_pct": 40.0})  # the proxy refits to what was measured
    assert predict(q4, SHAPES, sc, cal, 256)["kl"] == pytest.approx(0.5)
    g = Candidate("gptq", FORMATS["Q4_0"])
    learn(cal, g, sc, {"kl": 0.2})
    assert predict(g, SHAPES, sc, cal, 256)["kl"] == pytest.approx(0.2) and cal.measured_factors["gptq"] == pytest.approx(0.4)


class FakeBuilder:
    """Measures a candidate as its prediction times a fixed per-name error; `fail` re-measures worse."""

    def __init__(self, search, error=1.0, fail=()):
        self.search, self.error, self.fail, self.built, self.calls = search, error, set(fail), {}, []

    def artifact(self, cand):
        return self.built.setdefault(cand.name, cand.name)

    def measure(self, artifact, backend, quality=True, tag="probe"):
        self.calls.append((artifact, tag))
        e = next(e for e in self.search.entries if e.cand.name == artifact)
        fig = {k: v for k, v in e.predicted.items()}
        fig["kl"] *= self.error
        if tag == "remeasured" and artifact in self.fail:
            fig["file_mb"] *= 10
        return fig


def _search(budget):
    space = read_space(("rtn", "gptq"))
    space.kv_bits = [16, 8]
    s = Search(budget, SHAPES, _scores(), _cal(), space, ["torch"])
    s.enumerate(mixed_points=3)
    return s


def test_search_returns_the_best_measured_within_budget():
    budget = Budget(max_file_mb=0.078, max_kl=10.0).validate()
    s = _search(budget)
    ranked = run_search(s, FakeBuilder(s, error=1.1), finalists=2, max_builds=8)
    assert ranked and all(budget.met(e.measured) for e in ranked)
    measured = [e for e in s.entries if e.measured]
    assert {e.cand.name for e in measured if e.cand.naive} == {e.cand.name for e in s.entries if e.cand.naive
                                                               and s.feasible(e)}  # naive recipes always measured
    best = ranked[0]
    assert best.measured["kl"] == min(e.measured["kl"] for e in measured if budget.met(e.measured))
    assert any(e.cand.label.startswith("@") for e in measured)  # mixed precision competes
    weights = [(e.cand.method, e.cand.scheme, e.cand.table, e.cand.overrides) for e in measured if e.finalist ==
               "predicted best"]
    assert len(weights) == len(set(weights))  # finalists differ in their weights, not only in the KV width


def test_guarantee_skips_a_candidate_whose_remeasurement_fails(tmp_path):
    from slmkit.plan.run import guarantee

    budget = Budget(max_file_mb=0.078, max_kl=10.0).validate()
    s = _search(budget)
    fb = FakeBuilder(s)
    ranked = run_search(s, fb, finalists=2, max_builds=8)
    fb.fail = {ranked[0].cand.name}
    (tmp_path / "src").mkdir()
    for i, e in enumerate(ranked):
        fb.built[e.cand.name] = tmp_path / "src" / f"{i}.bin"
        fb.built[e.cand.name].write_text("x")
    fb.measure = lambda artifact, backend, quality=True, tag="probe": (
        {"file_mb": 99.0, "kl": 0.0} if artifact.name == fb.built[ranked[0].cand.name].name else
        {"file_mb": 0.05, "kl": 0.0})
    (tmp_path / "out").mkdir()
    chosen, again = guarantee(s, ranked, fb, tmp_path / "out", budget)
    assert chosen is ranked[1] and budget.met(again) and "failed its re-measurement" in ranked[0].finalist
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["1.bin"]  # the failed copy is not left behind


def test_binding_names_the_limit_and_the_nearest_point():
    budget = Budget(max_file_mb=0.02, max_kl=10.0).validate()  # smaller than any candidate can be
    s = _search(budget)
    assert not run_search(s, FakeBuilder(s), finalists=2, max_builds=4)
    msg = binding(s)
    assert "file_mb at most 0.02 is binding" in msg and "nearest achievable point" in msg
    smallest = min(e.predicted["file_mb"] for e in s.entries)
    assert f"{smallest:.4g}" in msg


def test_entry_defaults():
    e = Entry(Candidate("rtn", FORMATS["Q4_0"]), {"file_mb": 1.0})
    assert e.measured is None and e.finalist == ""


# ---- slm plan end to end on a tiny model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from slmkit.checkpoint import save_checkpoint
    from test_cli import tiny_tokenizer

    tok = tiny_tokenizer()
    model = _tiny(vocab_size=tok.vocab_size, max_seq_len=256, eos_token_id=tok.eos_token_id)
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("plan") / "tiny")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("plancache")


def _plan(capsys, monkeypatch, cache, *argv):
    monkeypatch.setenv("SLMKIT_CACHE", str(cache))
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


BASE = ["--context", "128", "--prompt-tokens", "16", "--methods", "rtn", "--kv-bits", "16,8", "--eval-windows", "2",
        "--finalists", "1", "--max-builds", "3"]


def test_plan_end_to_end_meets_its_budget(tiny_ckpt, cache, tmp_path, capsys, monkeypatch):
    from slmkit.loader import load

    out = tmp_path / "plan"
    code, stdout, err = _plan(capsys, monkeypatch, cache, str(tiny_ckpt), "--max-file-mb", "0.12", "--max-memory-mb",
                              "5000", *BASE, "-o", str(out), "--explain")
    assert code == 0, err
    report = json.loads((out / "plan.json").read_text())
    chosen = report["chosen"]
    assert report["schema"] == "slmkit.plan/1" and chosen["remeasured"]["file_mb"] <= 0.12
    assert all(m >= 0 for m in chosen["margins"].values()) and "model" in stdout
    assert (out / "plan.md").is_file() and (out / "plan.png").stat().st_size > 1000
    back = load(out / "model")
    assert back.model.compression and chosen["remeasured"]["file_mb"] * 1e6 == pytest.approx(
        sum(p.stat().st_size for p in (out / "model").rglob("*") if p.is_file()))
    measured = [c for c in report["candidates"] if c["measured"]]
    assert any(c["candidate"]["naive"] for c in measured) and "kept:" in err and "not searched:" in err
    assert not list(tmp_path.glob(".plan*"))  # no work folder or temporary left behind


def test_plan_infeasible_exits_2_with_the_binding_limit(tiny_ckpt, cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "none"
    code, stdout, err = _plan(capsys, monkeypatch, cache, str(tiny_ckpt), "--max-file-mb", "0.01", *BASE, "-o", str(out))
    errors = [line for line in err.strip().splitlines() if not line.startswith("[plan: ")]  # progress notes aside
    assert code == 2 and len(errors) == 1 and "file_mb at most 0.01 is binding" in errors[0]
    report = json.loads((out / "plan.json").read_text())
    assert report["chosen"] is None and report["infeasible"] and not (out / "model").exists()


@pytest.mark.parametrize("argv,match", [(["--max-file-mb", "60 furlongs"], "unknown unit"),
                                        (["--max-file-mb", "50", "--context", "0"], "positive"),
                                        (["--max-file-mb", "50", "--min-task-acc", "nope.jsonl:0.5"], "task"),
                                        (["--max-file-mb", "50", "--methods", "magic"], "methods"),
                                        (["--max-file-mb", "50", "--kv-bits", "2"], "kv-bits"),
                                        (["--max-energy-j-per-token", "0.5"], "energy counter")])
def test_plan_refusals_write_nothing(tiny_ckpt, cache, tmp_path, capsys, monkeypatch, argv, match):
    import slmkit.eval.cost as cost

    monkeypatch.setattr(cost, "find_meter", lambda device: (None, "unavailable: no RAPL or NVML counter"))
    out = tmp_path / "p"
    code, _, err = _plan(capsys, monkeypatch, cache, str(tiny_ckpt), *argv, "-o", str(out))
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_plan_refuses_a_missing_backend(tiny_ckpt, cache, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    code, _, err = _plan(capsys, monkeypatch, cache, str(tiny_ckpt), "--max-file-mb", "50", "--backend", "llamacpp",
                         "-o", str(tmp_path / "p"))
    assert code == 2 and "llama-cpp-python is not installed" in err and not (tmp_path / "p").exists()


def test_plan_refuses_contradictory_quality_budgets(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--max-kl", "0.1", "--max-ppl-increase", "5", "-o", "x"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_a_method_that_loses_where_rtn_is_exact_gets_a_floor():
    cal, sc = _cal(), {n: {**v, "Q4_1": 0.0} for n, v in _scores().items()}  # the base sits on Q4_1's grid
    awq = Candidate("awq+gptq", FORMATS["Q4_1"], FORMATS["Q4_1"])
    assert predict(awq, SHAPES, sc, cal, 256)["kl"] == 0.0
    learn(cal, awq, sc, {"kl": 0.03})
    assert predict(awq, SHAPES, sc, cal, 256)["kl"] == pytest.approx(0.03)
    assert predict(Candidate("rtn", FORMATS["Q4_1"], FORMATS["Q4_1"]), SHAPES, sc, cal, 256)["kl"] == 0.0


def test_the_cost_calibration_builds_are_measured_candidates():
    budget = Budget(max_file_mb=0.078, max_kl=10.0).validate()
    cal = _cal()
    cal.measured["rtn Q4_0 [torch]"] = {"file_mb": 0.03, "kl": 0.5, "ppl_increase_pct": 40.0, "decode_tps": 10.0,
                                         "ttft_ms": 5.0, "memory_mb": 100.0}
    space = read_space(("rtn",))
    space.kv_bits = [16]
    s = Search(budget, SHAPES, _scores(), cal, space, ["torch"])
    s.enumerate(mixed_points=2)
    e = next(e for e in s.entries if e.cand.name == "rtn Q4_0 [torch]")
    assert e.measured["kl"] == 0.5 and e.finalist == "cost calibration build" and e.predicted_then is not None
    assert cal.proxy_scale is not None and e.predicted["kl"] == pytest.approx(0.5)  # the model was fitted on it
    assert e not in s.finalists(3)  # not built twice


def test_plan_with_a_task_accuracy_floor(tiny_ckpt, cache, tmp_path, capsys, monkeypatch):
    """A --min-task-acc budget is measured on every finalist (fresh process) and on the base; a floor above what
    the base reaches leaves no model, and says so."""
    task = tmp_path / "mc.jsonl"
    qs = [{"context": f"question {i}:", "choices": [" yes", " no", " maybe"], "answer": i % 3} for i in range(6)]
    task.write_text("\n".join(json.dumps(q) for q in qs) + "\n")
    out = tmp_path / "acc"
    code, _, err = _plan(capsys, monkeypatch, cache, str(tiny_ckpt), "--max-file-mb", "0.12", "--min-task-acc",
                         f"{task}:0.01", *BASE, "-o", str(out))
    assert code == 0, err
    report = json.loads((out / "plan.json").read_text())
    assert f"acc:{task}" in report["chosen"]["remeasured"] and report["chosen"]["margins"][f"acc:{task}"] >= 0
    code, _, err = _plan(capsys, monkeypatch, cache, str(tiny_ckpt), "--max-file-mb", "0.12", "--min-task-acc",
                         f"{task}:1.0", *BASE, "-o", str(tmp_path / "none"))
    assert code == 2 and f"acc:{task} at least 1 is binding" in err


def test_report_marks_finalists_left_unbuilt(tmp_path):
    from slmkit.plan.report import make_report, markdown
    from slmkit.plan.run import PlanSettings

    budget = Budget(max_file_mb=0.078, max_kl=10.0).validate()
    s = _search(budget)
    run_search(s, FakeBuilder(s), finalists=3, max_builds=1)
    report = make_report(s, None, None, "tiny", PlanSettings(), 1.0, ["slm", "plan"])
    labels = {c["finalist"] for c in report["candidates"] if not c["measured"]}
    assert "a finalist, not built (--max-builds)" in labels and "predicted best" not in labels
    assert sum(1 for c in report["candidates"] if c["measured"]) == 1
    assert report["chosen"] is None and "binding" in report["infeasible"]
    assert "No model meets the budget" in markdown(report)
