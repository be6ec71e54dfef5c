"""`moekit serve` over real HTTP on loopback, driven by the official openai client and raw httpx: concurrent
requests equal the model's own generate alone, the SSE chunk sequence field by field, errors in OpenAI's envelope,
overload, disconnects, the API key, metrics."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, settings
from serve_fixture import free_port, start_server, tiny_model_dir, wait_healthy

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server(tiny_model_dir(tmp_path_factory.mktemp("served")))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _encode(server, text: str) -> list[int]:
    return server.served.tokenizer.encode(text)


def test_sixteen_concurrent_completions_each_equal_generate_alone(server, client):
    prompts = [f"def f{i}(x):\n    return x * {i}" for i in range(16)]

    def ask(prompt: str) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(ask, prompts))
    assert texts == [server.text(server.alone(_encode(server, p), 20)) for p in prompts]


def test_seeded_sampling_repeats_whatever_runs_beside_it(server, client):
    def ask(seed: int):
        r = client.completions.create(model="tiny", prompt="import os", max_tokens=12, temperature=0.9, seed=seed)
        return r.choices[0].text

    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(ask, [7, 7, 8, 8, 7, 8]))
    alone = server.text(server.alone(_encode(server, "import os"), 12, temperature=0.9, seed=7))
    assert texts[0] == texts[1] == texts[4] == alone and texts[2] == texts[3] == texts[5]


def test_chat_with_the_template_streamed_and_not(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=15, temperature=0)
    prompt = _encode(server, "<|system|>Be brief.\n<|user|>Hi!\n<|assistant|>")
    expected = server.alone(prompt, 15)
    assert whole.choices[0].message.content == server.text(expected)
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(prompt) and whole.usage.completion_tokens == len(expected)
    assert whole.choices[0].finish_reason == ("length" if len(expected) == 15 else "stop")
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=15,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == server.text(expected)
    assert chunks[-1].usage.completion_tokens == len(expected) and chunks[-1].choices == []


def test_sse_chunks_field_by_field(server):
    body = {"model": "tiny", "prompt": "class A:", "max_tokens": 8, "temperature": 0, "stream": True}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "temperature": 0}
    for path, payload in (("completions", body), ("chat/completions", {**chat, "stream": True})):
        with httpx.stream("POST", f"{server.url}/v1/{path}", json=payload, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = "".join(r.iter_text())
        events = raw.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
        assert all(e.startswith("data: ") for e in events[:-1])
        assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
        finishes = [c["choices"][0]["finish_reason"] for c in chunks]
        assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
        assert all("usage" not in c for c in chunks)  # not asked for
        if path == "chat/completions":
            assert chunks[0]["object"] == "chat.completion.chunk"
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
            assert chunks[-1]["choices"][0]["delta"] == {}
        else:
            assert chunks[0]["object"] == "text_completion"


def test_stop_strings_n_and_logprobs(server, client):
    prompt = "for i in range(3):"
    full = server.text(server.alone(_encode(server, prompt), 30))
    stop = full[5:7]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=[stop], n=2)
    assert [c.text for c in r.choices] == [full[: full.index(stop)]] * 2
    assert {c.finish_reason for c in r.choices} == {"stop"} and [c.index for c in r.choices] == [0, 1]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 4
    assert all(
        len(top) == 3 and max(top.values()) >= lp.token_logprobs[i] - 1e-5 for i, top in enumerate(lp.top_logprobs)
    )
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "a"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_bad_requests_get_openai_errors(server):
    url = f"{server.url}/v1/completions"
    assert _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert _error(httpx.post(url, json={"prompt": "a", "max_tokens": "many"}), 400)["param"] == "max_tokens"
    assert _error(httpx.post(url, json={"prompt": "a", "temperature": 9}), 400)["param"] == "temperature"
    assert _error(httpx.post(url, json={"prompt": "a", "model": "gpt-9"}), 404)["code"] == "model_not_found"
    too_long = _error(httpx.post(url, json={"prompt": "a" * 100, "max_tokens": 50}), 400)
    assert too_long["code"] == "context_length_exceeded"
    assert too_long["message"].startswith("This model's maximum context length is 128 tokens.")
    assert _error(httpx.post(url, json={"prompt": [500], "max_tokens": 2}), 400)["param"] == "prompt"
    assert _error(httpx.post(url, json={"prompt": "a", "stream_options": {"include_usage": True}}), 400)
    ok = httpx.post(url, json={"prompt": "a", "max_tokens": 2, "temperature": 0, "some_future_field": 1})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
    chat = f"{server.url}/v1/chat/completions"
    assert _error(httpx.post(chat, json={"messages": []}), 400)["param"] == "messages"
    assert _error(httpx.post(chat, json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
    template, server.served.chat_template = server.served.chat_template, None
    try:
        assert (
            "no chat template"
            in _error(httpx.post(chat, json={"messages": [{"role": "user", "content": "x"}]}), 400)["message"]
        )
    finally:
        server.served.chat_template = template


def test_models_tokenize_detokenize_health(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 128
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello"}).json()
    assert tokens == {"count": 5, "max_model_len": 128, "tokens": _encode(server, "hello")}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == _encode(server, "<|user|>hi\n<|assistant|>")
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "hello"}
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_overload_answers_503_with_retry_after(server):
    engine = server.served.engine
    engine.max_queue, before = 1, engine.max_queue
    body = {"prompt": "while True:", "max_tokens": 60, "temperature": 0}
    try:
        with ThreadPoolExecutor(12) as pool:
            replies = list(
                pool.map(lambda _: httpx.post(f"{server.url}/v1/completions", json=body, timeout=60), range(12))
            )
    finally:
        engine.max_queue = before
    refused = [r for r in replies if r.status_code == 503]
    assert refused and all(r.headers["retry-after"] == "1" for r in refused)
    assert all(_error(r, 503)["code"] == "queue_full" for r in refused)
    assert all(r.status_code == 200 for r in replies if r not in refused)


def _idle(server, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.served.engine.has_work():
            return server.served.engine.cache.used_tokens() == 0
        time.sleep(0.01)
    return False


@contextlib.contextmanager
def _slow_steps(server, seconds: float):
    """Each engine step takes at least `seconds` (a larger model): a 120-token generation lasts 120 x that."""
    engine = server.served.engine
    on_step = engine.on_step

    def slow(stats):
        time.sleep(seconds)
        on_step(stats)

    engine.on_step = slow
    try:
        yield
    finally:
        engine.on_step = on_step


def test_a_client_that_leaves_frees_its_slot(server):
    """Generating 120 tokens would take 1.2 s; the client leaves after its first chunk (streamed) or after 0.2 s
    (not streamed), and the engine is idle with its cache empty well before."""
    body = {"prompt": "x", "max_tokens": 120, "temperature": 0, "stream": True, "stop": ["never said"]}
    assert server.served.engine.cache.used_tokens() == 0
    with _slow_steps(server, 0.01):
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            next(r.iter_lines())
        e = server.served.engine
        assert _idle(server, 0.5), (
            e.waiting,
            [(q.cancelled, q.finished, len(q.generated), q.params) for q in e.slots if q],
        )
        with pytest.raises(httpx.ReadTimeout):  # not streamed: the handler watches for the disconnect itself
            httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=0.2)
        assert _idle(server, 0.5)


def test_metrics_show_requests_latencies_and_experts(server, client):
    client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for series in (
        "moekit:num_requests_running",
        "moekit:num_requests_waiting",
        "moekit:kv_cache_usage_perc",
        "moekit:time_to_first_token_seconds_bucket",
        "moekit:inter_token_latency_seconds_bucket",
        "moekit:e2e_request_latency_seconds_count",
        "moekit:prompt_tokens_total",
        "moekit:generation_tokens_total",
        'moekit:request_success_total{finished_reason="length"',
        'moekit:expert_tokens_total{expert="0",layer="0"',
        "moekit:expert_batching_factor",
        'moekit:moe_maxvio{layer="0"',
    ):
        assert series in text.replace('model_name="tiny",', ""), series


def test_api_key(tmp_path):
    running = start_server(tiny_model_dir(tmp_path), api_key="sekrit")
    try:
        url = f"{running.url}/v1/models"
        assert _error(httpx.get(url), 401)["code"] == "invalid_api_key"
        assert httpx.get(url, headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert httpx.get(f"{running.url}/health").status_code == 200
    finally:
        running.stop()


def _fuzz():
    """schemathesis's tests over the server's own OpenAPI document (the app's, no model needed to write it)."""
    try:
        import schemathesis
    except ImportError:
        return lambda f: pytest.mark.skip(reason="schemathesis is not installed")(f)
    from moekit.serve.api import build_app

    return schemathesis.openapi.from_dict(build_app(lambda: None)[0].openapi()).parametrize()


@_fuzz()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_server_error(case, server):
    """Requests generated from the OpenAPI document, valid and not: no 5xx, every error in OpenAI's envelope."""
    response = case.call(base_url=server.url, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json().get("error", ())) == {"message", "type", "param", "code"}, (case.path, response.text)


def test_sigterm_drains_running_requests_then_exits_0(tmp_path):
    """`moekit serve` as users start it: a SIGTERM while a request streams stops new connections, lets the request
    finish (its [DONE] arrives), then the process exits 0."""
    directory = tiny_model_dir(tmp_path)
    port = free_port()
    command = [sys.executable, "-m", "moekit", "serve", str(directory), "--port", str(port), "--max-batch", "1"]
    proc = subprocess.Popen([*command, "--served-model-name", "tiny", "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        body = {"model": "tiny", "prompt": "x", "max_tokens": 100, "n": 6, "stream": True, "stop": ["never said"]}
        after_signal = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            after_signal = [line for line in lines if line]
        assert after_signal[-1] == "data: [DONE]" and len(after_signal) > 10
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_a_model_that_does_not_load_stops_the_server_with_its_reason(tmp_path):
    directory = tiny_model_dir(tmp_path)
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    command = [sys.executable, "-m", "moekit", "serve", str(directory), "--port", str(free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "moekit serve: error: loading the model failed" in done.stderr.splitlines()[-1]
