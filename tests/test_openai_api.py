"""The OpenAI-compatible API: request checks and stop sequences (no server), then `python app.py`
launched once (embedded model, an API key set) and driven by the official `openai` client —
replies compared with transformers' own greedy generation of the same chat."""

from __future__ import annotations

import threading
import time

import pytest
from servers import free_port, transformers_greedy

import app
from moe_runtime.engine import StreamUpdate
from moe_runtime.paths import EMBEDDED_MODEL_DIR
from webapp.openai_api import APIError, OpenAIServer, StopScanner, parse_chat_request
from webapp.service import EMBEDDED_MODEL

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (requirements.txt)")
httpx = pytest.importorskip("httpx")

KEY = "test-key-123"
USER = [{"role": "user", "content": "To be, or not to be"}]


# --- request checks (no server) --------------------------------------------------------------------
def test_a_request_becomes_the_chat_tabs_messages_and_settings():
    chat = parse_chat_request({"messages": [{"role": "developer", "content": "Speak."}, *USER,
                                            {"role": "assistant", "content": [{"type": "text", "text": "Ay"}]},
                                            {"role": "user", "content": "Again"}],
                               "max_tokens": 7, "temperature": 0, "top_p": 0.5, "stop": "\n", "stream": True,
                               "stream_options": {"include_usage": True}, "seed": 3, "frequency_penalty": 0})
    assert chat.messages == [{"role": "system", "content": "Speak."}, *USER, {"role": "assistant", "content": "Ay"},
                             {"role": "user", "content": "Again"}]
    s = chat.settings
    assert (s.max_new_tokens, s.temperature, s.top_p, s.seed) == (7, 0, 0.5, 3)
    assert (chat.stop, chat.stream, chat.include_usage) == (("\n",), True, True)
    defaults = parse_chat_request({"messages": USER}, default_max_tokens=33)
    assert (defaults.settings.max_new_tokens, defaults.stream, defaults.stop) == (33, False, ())
    assert parse_chat_request({"messages": USER, "max_completion_tokens": 5}).settings.max_new_tokens == 5


@pytest.mark.parametrize("body, names", [
    ([], "JSON object"),
    ({}, "messages must be a non-empty list"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be an object"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool' is not allowed"),
    ({"messages": [*USER, {"role": "system", "content": "late"}, *USER]}, "allowed only first"),
    ({"messages": [*USER, {"role": "assistant", "content": "x"}]}, "last message must be the user's"),
    ({"messages": [{"role": "system", "content": "only"}]}, "last message must be the user's"),
    ({"messages": [{"role": "user", "content": "  "}]}, "the message is empty"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens=0 is not allowed"),
    ({"messages": USER, "max_tokens": 5000}, "max_tokens=5000 is not allowed"),
    ({"messages": USER, "max_tokens": True}, "max_tokens=True"),
    ({"messages": USER, "temperature": 9}, "temperature=9 is not allowed"),
    ({"messages": USER, "temperature": "hot"}, "temperature='hot'"),
    ({"messages": USER, "top_p": 0}, "top_p=0 is not allowed"),
    ({"messages": USER, "stop": ["a", ""]}, "stop=['a', '']"),
    ({"messages": USER, "stop": ["a"] * 5}, "up to 4"),
    ({"messages": USER, "n": 2}, "n=2 is not allowed"),
    ({"messages": USER, "stream": "yes"}, "stream='yes'"),
    ({"messages": USER, "seed": 1.5}, "seed=1.5"),
])
def test_bad_requests_are_refused_naming_the_field(body, names):
    with pytest.raises(APIError) as info:
        parse_chat_request(body)
    assert info.value.status == 400 and names in info.value.message


@pytest.mark.parametrize("stops, pieces, shown, stopped", [
    ((), ["To", "To be", "To be or"], ["To", " be", " or"], False),
    (("END",), ["ab", "abE", "abEN", "abENx"], ["", "a", "b", "ENx"], False),  # held while it may start "END"
    (("END",), ["ab", "abEN", "abENDzz"], ["", "ab", ""], True),
    (("\n", "be"), ["To ", "To b", "To be\nx"], ["To", " ", ""], True),
])
def test_stop_sequences_cut_the_reply_and_never_leak(stops, pieces, shown, stopped):
    scanner = StopScanner(stops)
    out = [scanner.delta(text) for text in pieces]
    out[-1] += scanner.delta(pieces[-1], final=True)
    assert out == shown and scanner.stopped == stopped
    full = pieces[-1]
    cut = min([full.find(s) for s in stops if s in full], default=len(full))
    assert "".join(out) == full[:cut]


# --- the launched app, through the openai client -----------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    port = free_port()
    demo = app.main(["--port", str(port), "--store-dir", str(tmp_path_factory.mktemp("store")),
                     "--api-key", KEY], block=False)
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """transformers' own model and tokenizer of the embedded checkpoint: greedy replies to compare with."""
    return transformers_greedy(EMBEDDED_MODEL_DIR)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [EMBEDDED_MODEL]


def test_a_reply_equals_transformers_greedy_generation(client, reference):
    text, prompt_tokens, new_tokens = reference(USER, 10)
    reply = client.chat.completions.create(model=EMBEDDED_MODEL, messages=USER, max_tokens=10, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("length" if new_tokens == 10 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, new_tokens)
    assert reply.usage.total_tokens == prompt_tokens + new_tokens and reply.model == EMBEDDED_MODEL


def test_a_streamed_reply_arrives_in_pieces_that_add_up(client, reference):
    messages = [{"role": "system", "content": "You are Hamlet."}, *USER]
    text, prompt_tokens, new_tokens = reference(messages, 16)
    stream = client.chat.completions.create(model=EMBEDDED_MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text and len(pieces) >= 2, pieces
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == new_tokens and chunks[-1].usage.prompt_tokens == prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_ends_the_reply_before_it(client, reference, stream):
    text, _, _ = reference(USER, 16)
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    expected = text[:text.find(stop)]
    reply = client.chat.completions.create(model=EMBEDDED_MODEL, messages=USER, max_tokens=16, temperature=0,
                                           stop=[stop], stream=stream)
    if stream:
        chunks = [c for c in reply if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        content, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert content == expected and finish == "stop"


def test_bad_requests_get_4xx_json_and_the_app_keeps_serving(client, served):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=EMBEDDED_MODEL, messages=USER, temperature=9)
    assert info.value.status_code == 400 and "temperature=9 is not allowed" in info.value.message
    with pytest.raises(openai.BadRequestError, match="last message must be the user's"):
        client.chat.completions.create(model=EMBEDDED_MODEL, messages=[{"role": "assistant", "content": "x"}],
                                       stream=True)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served}/v1", api_key="wrong", max_retries=0).models.list()
    headers = {"Authorization": f"Bearer {KEY}"}
    raw = httpx.post(f"{served}/v1/chat/completions", content=b"{not json", headers=headers)
    assert raw.status_code == 400 and "not JSON" in raw.json()["error"]["message"]
    huge = httpx.post(f"{served}/v1/chat/completions", content=b"x" * (2 << 20), headers=headers)
    assert huge.status_code == 413 and huge.json()["error"]["message"]
    assert httpx.post(f"{served}/v1/chat/completions", json={"messages": USER}).status_code == 401
    reply = client.chat.completions.create(model=EMBEDDED_MODEL, messages=USER, max_tokens=3)
    assert reply.usage.completion_tokens >= 1
    assert httpx.get(f"{served}/").status_code == 200  # the UI is still there


def test_a_client_that_leaves_mid_stream_frees_the_engine(client):
    stream = client.chat.completions.create(model=EMBEDDED_MODEL, messages=USER, max_tokens=200, stream=True)
    for _ in zip(range(3), stream):
        pass
    stream.close()
    done = threading.Event()
    start = time.perf_counter()
    threading.Thread(target=lambda: (client.chat.completions.create(model=EMBEDDED_MODEL, messages=USER,
                                                                    max_tokens=2), done.set()), daemon=True).start()
    assert done.wait(30), "the next request waited for the abandoned 200-token reply"
    assert time.perf_counter() - start < 30


def test_the_readme_snippets_run_against_the_app(served, capsys):
    import re
    import shlex
    import shutil
    import subprocess

    from moe_runtime.paths import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from openai import" in b)
    exec(snippet.replace("http://127.0.0.1:7860", served).replace('"unused"', repr(KEY)), {})
    assert capsys.readouterr().out.strip()
    curl = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "/v1/chat/completions" in b)
    if shutil.which("curl"):
        argv = shlex.split(curl.replace("\\\n", " ").replace("http://127.0.0.1:7860", served))
        out = subprocess.run([*argv, "-s", "-H", f"Authorization: Bearer {KEY}"], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        assert '"chat.completion"' in out and '"completion_tokens"' in out


class BlockedService:
    """Stands in for EngineService: every reply waits for `go`, then says "ok"."""

    model = EMBEDDED_MODEL

    def __init__(self) -> None:
        self.go, self.started = threading.Event(), threading.Semaphore(0)

    def chat(self, messages, settings, stop):
        self.started.release()
        assert self.go.wait(30)
        yield StreamUpdate("ok", 1, 1.0, 1.0, finished=True, finish_reason="stop", prompt_tokens=3)


def test_requests_beyond_the_pending_limit_get_429_until_a_place_frees():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    service, api = BlockedService(), FastAPI()
    OpenAIServer(service, max_pending=1).mount(api)
    with TestClient(api) as http:
        first = {}
        waiting = threading.Thread(target=lambda: first.update(r=http.post("/v1/chat/completions",
                                                                          json={"messages": USER})))
        waiting.start()
        assert service.started.acquire(timeout=30)  # the first reply holds the one place
        refused = http.post("/v1/chat/completions", json={"messages": USER})
        assert refused.status_code == 429 and "try again later" in refused.json()["error"]["message"]
        service.go.set()
        waiting.join(30)
        assert first["r"].status_code == 200 and first["r"].json()["usage"]["total_tokens"] == 4
        assert http.post("/v1/chat/completions", json={"messages": USER}).status_code == 200  # the place is free


# --- edge cases: bounded before work, errors short and clean, a client that leaves stops its reply ---------
class SlowService:
    """Stands in for EngineService: a reply grows a word every 20 ms until its stop event is set."""

    model = EMBEDDED_MODEL

    def __init__(self) -> None:
        self.stopped = threading.Event()

    def chat(self, messages, settings, stop):
        text = ""
        for _ in range(3000):  # at most 60 s
            if stop.is_set():
                self.stopped.set()
                return
            text += " word"
            yield StreamUpdate(text, len(text) // 5, 50.0, 1.0, prompt_tokens=3)
            time.sleep(0.02)


@pytest.fixture()
def slow_server():
    import uvicorn
    from fastapi import FastAPI

    service, api = SlowService(), FastAPI()
    OpenAIServer(service).mount(api)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", service
    server.should_exit = True
    thread.join(10)


def test_a_non_streaming_client_that_leaves_stops_its_reply(slow_server):
    url, service = slow_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json={"messages": USER}, timeout=httpx.Timeout(5, read=0.5))
    assert service.stopped.wait(10), "the reply kept generating after its client left"


@pytest.mark.parametrize("body, status, names", [
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", 400, "number too long"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', 400, "0..2**63-1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": -1}', 400, "0..2**63-1"),
])
def test_odd_json_gets_a_clean_400(body, status, names):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    api = FastAPI()
    OpenAIServer(BlockedService()).mount(api)
    with TestClient(api) as http:
        response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status and names in response.json()["error"]["message"]


def test_errors_never_echo_a_whole_submitted_value():
    for stop in (["x" * 100_000] * 5, {"deep": "y" * 100_000}, ["z" * 100_000]):
        with pytest.raises(APIError) as info:
            parse_chat_request({"messages": USER, "stop": stop})
        assert info.value.status == 400 and len(info.value.message) < 300, info.value.message
    with pytest.raises(APIError) as info:
        parse_chat_request({"messages": USER, "temperature": "w" * 100_000})
    assert len(info.value.message) < 300
    with pytest.raises(APIError, match="the message is too long"):
        parse_chat_request({"messages": [{"role": "user", "content": "m" * (65 << 10)}]})
