"""slm serve: per-row positions in the model, continuous batching against generate(), stop strings, and the
OpenAI HTTP API through the official `openai` client on a free loopback port (tiny random models)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from conftest import VOCAB, randomize, tiny_backend
from slmkit.cli import main
from slmkit.config import ModelConfig, preset
from slmkit.errors import SlmError
from slmkit.generate import GenerationConfig, generate
from slmkit.model import Decoder
from slmkit.quant.kvcache import use_quantized_cache_
from slmkit.quant.scheme import QScheme
from slmkit.serve import Busy, Engine, Request, ServeConfig, ServerThread, create_app
from slmkit.batching import StopText
from slmkit.tokenizer import Tokenizer

TEMPLATE = "{% for m in messages %}{{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}w3{% endif %}"


def tiny_model(sliding_window: int | None = None, seed: int = 0) -> Decoder:
    cfg = ModelConfig(**{**preset("tiny").__dict__, "vocab_size": VOCAB, "sliding_window": sliding_window,
                         "max_seq_len": 128})
    torch.manual_seed(seed)
    model = Decoder(cfg).eval()
    randomize(model, seed=seed)
    return model


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer(tiny_backend(), bos_token_id=1, eos_token_id=2, chat_template=TEMPLATE)


# ---- per-row positions -----------------------------------------------------------------------------
@pytest.mark.parametrize("window", [None, 5])
def test_rows_at_their_own_positions_equal_each_sequence_alone(window):
    model = tiny_model(window)
    prompts = [torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 14)]
    cache = model.new_cache(4, 32)
    alone = []
    with torch.no_grad():
        for row, p in enumerate(prompts):
            model(p, cache.rows(row, row + 1), 0)
            one = model.new_cache(1, 32)
            model(p, one, 0)
            alone.append(model(torch.tensor([[7]]), one, p.shape[1])[0, -1])  # [V]
        pos = torch.tensor([p.shape[1] for p in prompts])
        batched = model(torch.tensor([[7]] * 3), cache, pos)[:, -1]  # [3, V]
    for row in range(3):
        torch.testing.assert_close(batched[row], alone[row], atol=1e-5, rtol=1e-5)


def test_quantized_cache_rows_and_moves():
    model = tiny_model()
    use_quantized_cache_(model, QScheme(8, 0, False))
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), cache.rows(1, 2), 0)
        cache.move_row(1, 0)
        moved = model(torch.tensor([[8]]), cache.rows(0, 1), 3)[0, -1]
        one = model.new_cache(1, 16)
        model(torch.tensor([[5, 6, 7]]), one, 0)
        alone = model(torch.tensor([[8]]), one, 3)[0, -1]
    assert torch.equal(moved, alone)


# ---- stop strings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pieces,stops,shown,stopped", [
    (["Hello", " wor", "ld"], (), "Hello world", False),
    (["a", "b", "S", "T", "O", "P", "c"], ("STOP",), "ab", True),
    (["ab", "ST", "x"], ("STOP",), "abSTx", False),  # held back, then released
    (["xx\n", "\nyy"], ("\n\n",), "xx", True),  # a stop spanning two pieces
    (["one", "END two"], ("END", "two"), "one", True),  # the earliest stop wins
    (["S", "S", "TOP"], ("STOP",), "S", True),
])
def test_stop_text(pieces, stops, shown, stopped):
    st = StopText(stops)
    out = "".join(st.push(p) for p in pieces) + st.flush()
    assert (out, st.stopped) == (shown, stopped)


# ---- the engine -------------------------------------------------------------------------------------
class Collect:
    def __init__(self):
        self.tokens, self.text, self.done = [], "", None

    def __call__(self, ev):
        if ev.token is not None:
            self.tokens.append(ev.token)
        self.text += ev.text
        if ev.done:
            self.done = ev


@pytest.mark.parametrize("window,kv_bits,lookup", [(None, 0, 0), (6, 0, 0), (None, 8, 0), (None, 0, 3), (6, 0, 2),
                                                   (None, 0, "draft"), (6, 0, "itself")])
def test_continuous_batching_equals_generate_alone(tok, window, kv_bits, lookup):
    """Requests of different lengths arriving at different steps; each one's greedy output equals generate()
    (with a drafter: every row's drafts — prompt lookup, another model, the model itself — verified in the
    batch's one forward)."""
    from slmkit.batching import BatchDraftModel
    from slmkit.collab import PromptLookup

    model = tiny_model(window)
    if kv_bits:
        use_quantized_cache_(model, QScheme(kv_bits, 0, False))
    plan = [  # (arrival step, prompt, max tokens)
        (0, [5, 9, 13], 20), (0, list(range(3, 40)), 7), (3, [7] * 5, 30), (4, list(range(50, 61)), 12),
        (9, [11, 12], 16), (9, [100, 101, 102, 103], 5)]
    want = [list(generate(model, p, GenerationConfig(max_new_tokens=n))) for _, p, n in plan]
    drafter = (None if lookup == 0 else BatchDraftModel(tiny_model(window, seed=5), 3, 96) if lookup == "draft"
               else BatchDraftModel(model, 3, 96) if lookup == "itself" else PromptLookup(lookup))
    engine = Engine(model, tok, max_active=3, max_queue=8, context=96, drafter=drafter, draft_tokens=4)
    got = [Collect() for _ in plan]
    step = 0
    while step < 200 and not all(c.done for c in got):
        for (arrive, prompt, n), sink in zip(plan, got):
            if arrive == step:
                engine.submit(Request(prompt, GenerationConfig(max_new_tokens=n)), sink)
        engine.step()
        step += 1
        assert engine.n_active <= 3
    for c, w, (_, p, n) in zip(got, want, plan):
        assert c.tokens == w
        assert (c.done.finish_reason, c.done.completion_tokens, c.done.prompt_tokens) == ("length", n, len(p))
    if lookup:
        assert engine.accepted > 0  # drafts were kept (and the output is still each request's own)
    if lookup == "itself":
        assert engine.accepted == engine.drafted  # a draft equal to the target is always right


def test_seeded_sampling_equals_generate_alone(tok):
    model = tiny_model()
    cfg = GenerationConfig(max_new_tokens=15, temperature=0.9, top_p=0.9, seed=4)
    want = list(generate(model, [4, 5, 6], cfg))
    engine = Engine(model, tok, max_active=2, context=64)
    a, b = Collect(), Collect()
    engine.submit(Request([4, 5, 6], cfg), a)
    engine.submit(Request([9, 9], GenerationConfig(max_new_tokens=15, temperature=1.0, seed=1)), b)
    while engine.step():
        pass
    assert a.tokens == want


def test_stop_token_and_stop_string(tok):
    model = tiny_model()
    free = list(generate(model, [5, 6], GenerationConfig(max_new_tokens=10)))
    engine = Engine(model, tok, context=64)
    stop_at = tok.decode(free[3:4])  # the 4th token's word
    c = Collect()
    engine.submit(Request([5, 6], GenerationConfig(max_new_tokens=10), (stop_at,)), c)
    while engine.step():
        pass
    assert c.done.finish_reason == "stop" and stop_at not in c.text
    c2 = Collect()
    engine.submit(Request([5, 6], GenerationConfig(max_new_tokens=10, stop_ids={free[2]})), c2)
    while engine.step():
        pass
    assert c2.tokens == free[:2] and c2.done.finish_reason == "stop"


def test_bounded_queue_cancel_and_context(tok):
    model = tiny_model()
    engine = Engine(model, tok, max_active=1, max_queue=1, context=32)
    first, second = Collect(), Collect()
    h1 = engine.submit(Request([5, 6], GenerationConfig(max_new_tokens=50)), first)
    engine.submit(Request([5, 6], GenerationConfig(max_new_tokens=3)), second)
    with pytest.raises(Busy):
        engine.submit(Request([5], GenerationConfig(max_new_tokens=3)), Collect())
    engine.step()
    engine.step()
    h1.cancel()
    while engine.step():
        pass
    assert first.done.finish_reason == "cancelled" and len(first.tokens) == 3  # prefill + 2 decode steps
    assert second.done.finish_reason == "length" and engine.n_active == 0
    with pytest.raises(SlmError, match="context holds 32"):
        engine.submit(Request(list(range(3, 40)), GenerationConfig()), Collect())
    # max_tokens is capped by what the context has left
    c = Collect()
    engine.submit(Request(list(range(3, 30)), GenerationConfig(max_new_tokens=100)), c)
    while engine.step():
        pass
    assert (c.done.finish_reason, c.done.completion_tokens) == ("length", 32 - 27)


# ---- HTTP ---------------------------------------------------------------------------------------------
@pytest.fixture
def server(tok):
    model = tiny_model()
    engine = Engine(model, tok, max_active=4, max_queue=4, context=96)
    with ServerThread(create_app(engine, ServeConfig("tiny", api_key="sekrit", max_tokens=40))) as srv:
        srv.model, srv.tok = model, tok
        yield srv


def _client(server, key="sekrit"):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_openai_client_chat_and_completions(server):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    ids = server.tok.encode(server.tok.render_chat(messages))
    want = server.tok.decode(list(generate(server.model, ids, GenerationConfig(12, stop_ids=server.tok.stop_ids()))))
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and chunks[-1].choices == []
    c = client.completions.create(model="tiny", prompt="w9 w10", max_tokens=6, temperature=0)
    want = server.tok.decode(list(generate(server.model, server.tok.encode("w9 w10"), GenerationConfig(6, stop_ids={2}))))
    assert c.choices[0].text == want and c.choices[0].finish_reason in ("length", "stop")
    streamed = list(client.completions.create(model="tiny", prompt="w9 w10", max_tokens=6, temperature=0, stream=True))
    assert "".join(s.choices[0].text for s in streamed) == want


def _post(server, path, body, key="sekrit", raw=False):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(server.url + path, content=body if raw else json.dumps(body), headers=headers, timeout=30)


@pytest.mark.parametrize("body,code", [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    ({"model": "tiny", "prompt": 5}, "invalid_value"),
    ({"model": "tiny", "prompt": "w5", "max_tokens": "10"}, "invalid_value"),
    ({"model": "tiny", "prompt": "w5", "temperature": 9}, "invalid_value"),
    ({"model": "tiny", "prompt": "w5", "n": 2}, "invalid_value"),
    ({"model": "tiny", "prompt": "w5", "stop": ["a", "b", "c", "d", "e"]}, "invalid_value"),
    ({"model": "tiny", "prompt": ""}, "invalid_value"),
    ({"model": "other", "prompt": "w5"}, "model_not_found"),
    ({"model": "tiny", "prompt": " ".join(["w7"] * 200)}, "context_length_exceeded"),
])
def test_bad_requests_are_400_with_the_error_body(server, body, code):
    r = _post(server, "/v1/completions", body, raw=isinstance(body, str))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]


def test_chat_bad_messages_and_auth(server):
    r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    assert _post(server, "/v1/chat/completions", {"model": "tiny", "messages": []}).status_code == 400
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": "w5"}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/nowhere").status_code == 404
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_full_server_answers_503_with_retry_after(tok):
    engine = Engine(tiny_model(), tok, max_active=1, max_queue=0, context=64)  # not started: the row stays taken
    engine.submit(Request([5], GenerationConfig(max_new_tokens=5)), Collect())
    with ServerThread(create_app(engine, ServeConfig("tiny"), own_engine=False)) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "w5", "max_tokens": 3}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
        metrics = httpx.get(srv.url + "/metrics").text
    assert 'slm_requests_total{endpoint="/v1/completions",status="503"} 1.0' in metrics
    assert "slm_queue_depth 1.0" in metrics


def test_a_client_that_leaves_frees_its_row(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      headers={"Authorization": "Bearer sekrit"},
                      json={"prompt": "w5", "max_tokens": 40, "temperature": 0, "stream": True}) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["active"] == 0
    metrics = httpx.get(server.url + "/metrics").text
    assert "slm_time_to_first_token_seconds_count" in metrics and "slm_active_sequences 0.0" in metrics


@pytest.mark.parametrize("argv,message", [
    (["serve", "--port", "0"], "--port must be between 1 and 65535"),
    (["serve", "--parallel", "0"], "--parallel must be between 1 and 256"),
    (["serve", "--ctx", "1"], "--ctx must be between 2"),
    (["serve", "--draft", "x", "--prompt-lookup", "2"], "not both"),
    (["serve", "--prompt-lookup", "65"], "--prompt-lookup must be between 0 and 64"),
])
def test_cli_refuses_bad_numbers(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_requests_past_the_in_flight_bound_get_503_at_once(tok):
    import threading

    engine = Engine(tiny_model(), tok, max_active=4, max_queue=4, context=64)  # not started: requests wait
    with ServerThread(create_app(engine, ServeConfig("tiny", max_in_flight=2), own_engine=False)) as srv:
        waiting = [threading.Thread(target=httpx.post, args=(srv.url + "/v1/completions",),
                                    kwargs={"json": {"prompt": "w5", "max_tokens": 2}, "timeout": 30}) for _ in range(2)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 10
        while engine.queue_depth < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "w5", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy" and r.headers["retry-after"]
        assert httpx.get(srv.url + "/health").status_code == 200  # health and metrics are never turned away
        engine.stop()  # the waiting requests end (503: shutting down)
        for t in waiting:
            t.join(timeout=10)


def _mutations(seed: int, n: int):
    """Request bodies a broken or hostile client sends: valid ones with a field removed, retyped, blown up,
    nested or duplicated, plus raw junk."""
    import random

    rng = random.Random(seed)
    base = [{"model": "tiny", "prompt": "w5 w6", "max_tokens": 3, "temperature": 0},
            {"model": "tiny", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 3, "stream": True}]
    junk = [None, True, -1, 0, 1e308, -1e308, 2**70, "", "x" * 5000, [], {}, [[[]]], {"a": {"b": []}}, "NaN"]
    for _ in range(n):
        body = json.loads(json.dumps(rng.choice(base)))
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(list(body) + ["top_p", "stop", "seed", "n", "stream_options", "max_completion_tokens"])
            action = rng.random()
            if action < 0.25:
                body.pop(key, None)
            elif action < 0.8:
                body[key] = rng.choice(junk)
            else:
                body[key] = [body.get(key)] * rng.randint(0, 6)
        yield json.dumps(body) if rng.random() < 0.9 else json.dumps(body)[:rng.randint(0, 40)]


def test_no_request_body_gets_a_500(server):
    """300 mutated bodies on both endpoints: each answered 200 (it was still valid) or 400 with the error
    body — never a 500, never a hang."""
    seen = set()
    with httpx.Client(timeout=30, headers={"Authorization": "Bearer sekrit", "Content-Type": "application/json"}) as c:
        for i, raw in enumerate(_mutations(0, 300)):
            path = "/v1/chat/completions" if '"messages"' in raw else "/v1/completions"
            r = c.post(server.url + path, content=raw)
            seen.add(r.status_code)
            assert r.status_code in (200, 400), (raw[:200], r.status_code, r.text[:200])
            if r.status_code == 400:
                assert r.json()["error"]["message"]
    assert seen == {200, 400}
