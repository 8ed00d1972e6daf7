"""Cascades: the confidence signals, the quality-vs-escalated curve and RouteLLM's APGR against direct
computations, calibration end to end on tiny models, and slm serve --cascade with a local large model, an
OpenAI-compatible URL (another slm serve on loopback) and a URL that does not answer."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from slmkit.batching import Engine
from slmkit.cli import main
from slmkit.collab.calibrate import calibrate, write_report
from slmkit.collab.cascade import apgr, cascade_curve, choose_threshold, margin_confidence, quantile_confidence
from slmkit.errors import SlmError
from slmkit.loader import LoadedModel
from slmkit.serve import ServeConfig, ServerThread, create_app
from slmkit.serve.cascade import CascadeRoute
from test_serve import tiny_model, tok  # noqa: F401 (tok: a fixture)


def test_quantile_and_margin():
    assert quantile_confidence([-1.0, -3.0, -2.0, -0.5, -4.0], 0.0) == -4.0
    assert quantile_confidence([-1.0, -3.0, -2.0, -0.5, -4.0], 0.5) == -2.0
    assert quantile_confidence([-1.0, -3.0], 0.25) == pytest.approx(-2.5)
    assert quantile_confidence([], 0.1) == float("-inf")
    # the signal does not drift with length: a long confident answer with one unsure token equals a short one
    assert quantile_confidence([-0.01] * 9 + [-3.0], 0.0) == quantile_confidence([-3.0, -0.01], 0.0)
    assert margin_confidence([-1.0, -0.2, -0.7]) == pytest.approx(0.5)
    with pytest.raises(SlmError, match="quantile"):
        quantile_confidence([-1.0], 1.5)


def test_curve_and_apgr_against_a_direct_computation():
    conf = [0.9, 0.1, 0.5, 0.3]
    small = [1.0, 0.0, 1.0, 0.0]
    large = [1.0, 1.0, 0.0, 1.0]
    curve = cascade_curve(conf, small, large)
    # escalate the k least confident: order 1 (0.1), 3 (0.3), 2 (0.5), 0 (0.9)
    assert [p.quality for p in curve] == [0.5, 0.75, 1.0, 0.75, 0.75]
    assert [p.escalated for p in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for p in curve:  # the threshold escalates exactly that share
        assert sum(c < p.threshold for c in conf) / 4 == p.escalated
    weak, strong = 0.5, 0.75
    pgr = [(q - weak) / (strong - weak) for q in [0.5, 0.75, 1.0, 0.75, 0.75]]
    direct = sum(0.25 * (a + b) / 2 for a, b in zip(pgr, pgr[1:]))
    assert apgr(curve, weak, strong) == pytest.approx(direct)
    assert choose_threshold(curve, escalate=0.6).escalated == 0.5
    assert choose_threshold(curve, quality=0.9).escalated == 0.5
    with pytest.raises(SlmError, match="no threshold reaches"):
        choose_threshold(curve, quality=1.5)


def test_ties_escalate_together_and_random_routing_gives_half():
    curve = cascade_curve([0.2, 0.2, 0.7], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert [p.escalated for p in curve] == [0.0, pytest.approx(2 / 3), 1.0]
    n = 400  # a confidence that says nothing: APGR near the random router's 0.5
    import random
    rng = random.Random(0)
    small = [float(rng.random() < 0.4) for _ in range(n)]
    large = [float(rng.random() < 0.7) for _ in range(n)]
    curve = cascade_curve([rng.random() for _ in range(n)], small, large)
    assert abs(apgr(curve, sum(small) / n, sum(large) / n) - 0.5) < 0.15


def _lm(model, tok, name):
    return LoadedModel(model, tok, name, "slmkit", 0)


def test_calibrate_multiple_choice_and_generation(tmp_path, tok):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"context": f"w{5 + i} w{9 + i}", "choices": ["w10 w11", "w12", "w13 w14 w15"],
                                      "answer": i % 3}) + "\n" for i in range(12)))
    small, large = _lm(tiny_model(seed=0), tok, "small"), _lm(tiny_model(seed=1), tok, "large")
    report = calibrate(small, large, str(mc), escalate=0.5)
    assert report["examples"] == 12 and report["kind"].startswith("multiple choice")
    assert report["escalated"] <= 0.5 and len(report["curve"]) >= 2
    assert report["curve"][0]["quality"] == report["weak_quality"]
    assert report["curve"][-1]["quality"] == report["strong_quality"]
    inst = tmp_path / "inst.jsonl"
    inst.write_text("".join(json.dumps({"instruction": f"w{20 + i} w{30 + i}", "input": "", "output": f"w{40 + i} w41"})
                            + "\n" for i in range(6)))
    report = calibrate(small, large, str(inst), quality=0.0, max_new_tokens=6)
    assert report["kind"].startswith("generation") and report["escalated"] == 0.0
    assert all(c <= 0 for c in report["per_example"]["confidence"])
    paths = write_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["cascade.json", "cascade.md", "cascade.png"]
    assert paths[2].read_bytes()[:4] == b"\x89PNG" and "APGR" in paths[1].read_text()


def _post(url, body):
    return httpx.post(url + "/v1/completions", json=body, timeout=30)


def test_serve_cascade_local_and_url(tok):
    small, large = tiny_model(seed=0), tiny_model(seed=1)
    never = CascadeRoute(threshold=-1e8, engine=Engine(large, tok, 2, 2, 64)).validate()
    always = CascadeRoute(threshold=0.0, engine=Engine(large, tok, 2, 2, 64)).validate()
    body = {"prompt": "w5 w6", "max_tokens": 6, "temperature": 0}
    answers = {}
    for name, route in (("never", never), ("always", always)):
        app = create_app(Engine(small, tok, 2, 2, 64), ServeConfig("tiny", cascade=route))
        with ServerThread(app) as srv:
            r = _post(srv.url, body)
            assert r.status_code == 200
            answers[name] = (r.headers["x-slmkit-route"], r.json()["choices"][0]["text"])
            s = httpx.post(srv.url + "/v1/completions", json={**body, "stream": True}, timeout=30)
            assert "[DONE]" in s.text and s.headers["x-slmkit-route"] == answers[name][0]
    assert answers["never"][0] == "small" and answers["always"][0] == "large"
    assert answers["never"][1] != answers["always"][1]  # two different random models
    # the large model behind a URL: another slm serve on loopback
    with ServerThread(create_app(Engine(large, tok, 2, 2, 64), ServeConfig("large"))) as big:
        route = CascadeRoute(threshold=0.0, url=big.url + "/v1").validate()
        with ServerThread(create_app(Engine(small, tok, 2, 2, 64), ServeConfig("tiny", cascade=route))) as srv:
            r = _post(srv.url, body)
            assert r.headers["x-slmkit-route"] == "large" and r.json()["choices"][0]["text"] == answers["always"][1]
            assert r.json()["model"] == "tiny" and r.json()["usage"]["completion_tokens"] > 0


def test_a_cascade_url_that_does_not_answer(tok):
    quiet = socket.socket()
    quiet.bind(("127.0.0.1", 0))
    quiet.listen(1)  # accepts the connection, never answers
    route = CascadeRoute(threshold=0.0, url=f"http://127.0.0.1:{quiet.getsockname()[1]}", timeout_s=1).validate()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
    gone = CascadeRoute(threshold=0.0, url=f"http://127.0.0.1:{dead.getsockname()[1]}").validate()
    try:
        for route, status, code in ((route, 504, "upstream_timeout"), (gone, 502, "upstream_unreachable")):
            with ServerThread(create_app(Engine(tiny_model(), tok, 2, 2, 64), ServeConfig("tiny", cascade=route))) as srv:
                r = _post(srv.url, {"prompt": "w5", "max_tokens": 3, "temperature": 0})
                assert r.status_code == status and r.json()["error"]["code"] == code
                assert httpx.get(srv.url + "/health").json()["status"] == "ok"  # still up
    finally:
        quiet.close()
        dead.close()


@pytest.mark.parametrize("argv,message", [
    (["serve", "--cascade", "x"], "--cascade and --threshold go together"),
    (["serve", "--cascade", "x", "--threshold", "0.5"], "--threshold is a log-probability"),
    (["serve", "--cascade", "x", "--threshold", "-1", "--cascade-quantile", "2"], "--cascade-quantile must be"),
    (["cascade", "calibrate", "a", "--escalate", "1.5", "-o", "o"], "--escalate must be in [0, 1]"),
    (["cascade", "calibrate", "a", "--limit", "0", "-o", "o"], "--limit must be positive"),
])
def test_cli_refusals(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_calibrate_end_to_end(tmp_path, tok, capsys):
    from slmkit.checkpoint import save_checkpoint

    save_checkpoint(tiny_model(seed=0), tok, tmp_path / "small")
    save_checkpoint(tiny_model(seed=1), tok, tmp_path / "large")
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"context": f"w{5 + i}", "choices": ["w10", "w12 w13"], "answer": i % 2}) + "\n"
                          for i in range(10)))
    out = tmp_path / "out"
    assert main(["cascade", "calibrate", str(tmp_path / "small"), str(tmp_path / "large"), "--task", str(mc),
                 "--escalate", "0.4", "--dtype", "float32", "-o", str(out)]) == 0
    report = json.loads((out / "cascade.json").read_text())
    assert report["examples"] == 10 and report["escalated"] <= 0.4
    assert "threshold" in capsys.readouterr().out
