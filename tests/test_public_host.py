"""Public-host mode: only the operator changes the shared engine, visitors see the settings read-only,
trace files are made on request with bounded size and disk; nothing of the server shows in any
response, every input and gradio's queue are bounded; and two load tests on the embedded model (8
chatting clients, one hammering /stats, one trying /apply_settings without the operator token; and
issue 19's: Stats pollers, gradio and /v1 chatters, a What-if uploader of crafted traces and a queue
flooder at once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import free_port

import app
from moe_runtime import GenerationSettings, OffloadConfig, RoutingTrace
from webapp import service as service_module
from webapp.openai_api import OpenAIServer
from webapp.service import EMBEDDED_MODEL, EngineService, Operator

REPO = Path(__file__).resolve().parent.parent
TOKEN = "operator-secret-42"
BASE = dict(expert_bits="none", attn_bits="none", cache_size=2, prefetch=2, offload="ram", device="cpu",
            policy="lru")


@pytest.mark.parametrize("argv,env,public", [
    ([], {}, False),
    (["--host", "localhost"], {}, False),
    (["--host", "::1"], {}, False),
    (["--host", "0.0.0.0"], {}, True),
    (["--host", "192.168.1.5"], {}, True),
    (["--share"], {}, True),
    (["--public"], {}, True),
    ([], {"SPACE_ID": "someone/moe-offload"}, True),
])
def test_which_launches_are_public_hosts(monkeypatch, argv, env, public):
    for name in ("GRADIO_SERVER_NAME", "SPACE_ID", app.TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert app.is_public(app.parse_args(argv)) is public


def test_the_operator_token_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(app.TOKEN_ENV, TOKEN)
    assert app.parse_args([]).operator_token == TOKEN
    assert Operator(public=True, token=TOKEN).allows(TOKEN)
    assert not Operator(public=True, token=TOKEN).allows("guess") and not Operator(public=True).allows("")
    assert Operator(public=False).allows("")  # the person at the keyboard of a local launch


def test_visitors_cannot_change_settings_or_reset_stats(service):
    visitor = app.Handlers(service, Operator(public=True, token=TOKEN))
    engine = service.engine
    list(service.chat([{"role": "user", "content": "To be"}], GenerationSettings(max_new_tokens=3)))
    selections = service.stats(trace=False).selections
    for token in ("", "wrong", None):
        with pytest.warns(UserWarning, match="for the operator of this public host"):
            status, _, _ = visitor.apply(service.model, **{**BASE, "cache_size": 3}, operator_token=token)
        assert "Not applied" in status and service.engine is engine and service.config.cache_size == 2
        with pytest.warns(UserWarning, match="resetting the stats is for the operator"):
            visitor.reset_stats(token)
        assert service.stats(trace=False).selections == selections
    with pytest.warns(UserWarning, match="not the operator token"):
        updates = visitor.unlock("wrong")
    assert all(u["interactive"] is False for u in updates[:-1])
    assert all(u["interactive"] is True for u in visitor.unlock(TOKEN)[:-1])
    status, _, _ = visitor.apply(service.model, **{**BASE, "cache_size": 3}, operator_token=TOKEN)
    try:
        assert status.startswith("**Applied.**") and service.config.cache_size == 3
    finally:
        visitor.apply(service.model, **BASE, operator_token=TOKEN)


def test_without_a_token_nobody_changes_a_public_host(service):
    closed = app.Handlers(service, Operator(public=True, token=None))
    with pytest.warns(UserWarning, match="without an operator token"):
        status, _, _ = closed.apply(service.model, **BASE, operator_token="")
    assert "Not applied" in status


def test_a_public_page_shows_the_settings_read_only(service):
    def interactive(demo):
        return {c["props"].get("elem_id") or c["props"].get("label"): c["props"].get("interactive")
                for c in demo.config["components"] if c["type"] in ("dropdown", "number", "radio", "button")}

    public = interactive(app.build_app(service, operator=Operator(public=True, token=TOKEN)))
    for name in ("Model", "Device", "Cache size per layer", "Prefetch", "Offload tier", "Eviction policy", "apply",
                 "reset"):
        assert public[name] is False, name
    local = interactive(app.build_app(service))
    assert local["apply"] is not False and local["Model"] is not False


def test_trace_files_are_made_on_request_capped_and_rate_limited(service, monkeypatch):
    list(service.chat([{"role": "user", "content": "To be, or not to be"}], GenerationSettings(max_new_tokens=12)))
    monkeypatch.setattr(service_module, "MAX_TRACE_TOKENS", 5)
    first = service.trace_file(every=60)
    assert service.trace_file(every=60) == first  # within the interval: the same file again
    trace = RoutingTrace.load(first)
    assert trace.num_tokens == 5 and all(len(rows) == 5 for rows in trace.selected)
    assert service.trace_file(every=0) != first
    assert len(list(first.parent.glob("routing-trace-*.json"))) <= service_module.KEEP_TRACES


# --- the load test: `python app.py --public` on the embedded model, through gradio_client ---------------
def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def public_app(tmp_path_factory):
    if not (REPO / EMBEDDED_MODEL / "config.json").exists():
        pytest.skip(f"the embedded model {EMBEDDED_MODEL} is missing")
    gradio_tmp = tmp_path_factory.mktemp("gradio-tmp")
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(gradio_tmp)
    service = EngineService(EMBEDDED_MODEL, OffloadConfig(device="cpu", cache_size=2, prefetch=2,
                                                          store_dir=str(tmp_path_factory.mktemp("store"))))
    service.start()
    port = free_port()
    demo = app.build_app(service, operator=Operator(public=True, token=TOKEN))
    app.launch(demo, "127.0.0.1", port, block=False, api=OpenAIServer(service))
    yield f"http://127.0.0.1:{port}/", service, gradio_tmp
    demo.close()
    service.close()
    if old is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = old


def test_load_8_chatting_clients_a_stats_hammer_and_a_visitor_trying_settings(public_app, tmp_path):
    from gradio_client import Client

    url, service, gradio_tmp = public_app
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "dl"))
    client.predict(TOKEN, api_name="/reset_stats")
    engine = service.engine
    done = threading.Event()
    replies, errors, stats_seen, refusals = [], [], [], []

    def chatter(i):
        try:
            c = Client(url, verbose=False, analytics_enabled=False)
            history = []
            for turn in range(2):
                text = c.predict(f"Client {i} asks, turn {turn}: to be?", history, "", 0.7, 0.95, 12,
                                 api_name="/chat")
                replies.append(text)
                history += [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"client {i}: {err!r}")

    def hammer():
        c = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "dl2"))
        while not done.is_set():
            counters, *_ = c.predict(api_name="/stats")
            stats_seen.append(counters)
            if len(stats_seen) % 10 == 0:
                c.predict(api_name="/trace")

    def visitor():
        c = Client(url, verbose=False, analytics_enabled=False)
        for token in ("", "guess"):
            status, _, _ = c.predict(EMBEDDED_MODEL, "none", "none", 3, 1, "ram", "cpu", "lfu", token,
                                     api_name="/apply_settings")
            refusals.append(status)

    threads = [threading.Thread(target=chatter, args=(i,), daemon=True) for i in range(8)]
    threads += [threading.Thread(target=visitor, daemon=True)]
    hammer_thread = threading.Thread(target=hammer, daemon=True)
    start = time.monotonic()
    hammer_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, 240 - (time.monotonic() - start)))
    done.set()
    hammer_thread.join(30)
    assert not any(t.is_alive() for t in [*threads, hammer_thread]), "a client hung"
    assert not errors, errors
    assert len(replies) == 16 and all(isinstance(r, str) for r in replies)
    assert len(refusals) == 2 and all("Not applied" in s and "operator" in s for s in refusals)
    assert service.engine is engine and service.config.cache_size == 2  # the visitor changed nothing
    assert stats_seen and all(c["cache_hits"] + c["cache_misses"] == c["expert_selections"] for c in stats_seen)
    final = service.stats()
    assert all(h + m == s for h, m, s in zip(final.hits, final.misses, final.selections))
    lengths = {len(rows) for rows in final.trace.selected} | {len(final.trace.phase)}
    assert lengths == {final.trace_tokens}  # every layer saw every token
    assert {sum(row) for row in final.expert_counts} == {final.trace_tokens * final.top_k}
    temp = _folder_bytes(gradio_tmp) + _folder_bytes(service.trace_file().parent)
    assert temp < 20 * 2**20, f"{temp} bytes of temp files"


def test_uploads_are_capped(public_app):
    url, _, _ = public_app
    response = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.bin", b"\0" * (2 * 2**20))}, timeout=30)
    assert response.status_code == 413, response.status_code


def test_sigterm_removes_the_temp_trace_folder(tmp_path):
    if not (REPO / EMBEDDED_MODEL / "config.json").exists():
        pytest.skip(f"the embedded model {EMBEDDED_MODEL} is missing")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--store-dir", str(tmp_path / "s")],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "the app exited before serving"
            time.sleep(0.5)
        else:
            pytest.fail("the app did not start serving")
        assert list(tmp.glob("moe-trace-*")), "the app has no temp trace folder to remove"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) is not None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert not list(tmp.glob("moe-trace-*"))


# --- nothing of the server shows, every input bounded, gradio's queue bounded -------------------------
def _call(url: str, api: str, data: list, timeout: float = 120) -> str:
    """One call through gradio's REST API (/gradio_api/call/<api>): the raw text of both replies."""
    posted = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=timeout)
    if posted.status_code != 200:
        return posted.text
    return posted.text + httpx.get(f"{url}gradio_api/call/{api}/{posted.json()['event_id']}", timeout=timeout).text


def _without_gradio_file_addresses(text: str) -> str:
    """`text` without what gradio's file protocol carries: a FileData's "path" and "url" (gradio
    addresses a file it hands out, or was sent, by its copy under GRADIO_TEMP_DIR)."""
    import re

    return re.sub(r'"(path|url)": "[^"]*"', '"\\1": ""', text)


@pytest.fixture(scope="module")
def public_by_path(tmp_path_factory):
    """A public host started with --model as an absolute path (the embedded model's folder), and /v1."""
    from moe_runtime.paths import EMBEDDED_MODEL_DIR

    if not (EMBEDDED_MODEL_DIR / "config.json").exists():
        pytest.skip("the embedded model is missing")
    service = EngineService(str(EMBEDDED_MODEL_DIR), OffloadConfig(
        device="cpu", offload="disk", store_dir=str(tmp_path_factory.mktemp("store"))))
    service.start()
    port = free_port()
    demo = app.build_app(service, operator=Operator(public=True, token=TOKEN))
    app.launch(demo, "127.0.0.1", port, block=False, api=OpenAIServer(service))
    yield f"http://127.0.0.1:{port}/", service
    demo.close()
    service.close()


def test_no_response_of_a_public_session_shows_a_server_path(public_by_path, tmp_path, monkeypatch):
    import tempfile

    url, service = public_by_path
    crafted = tmp_path / "crafted.json"
    crafted.write_text('{"format": "moe-routing-trace", "num_layers": 1, "num_experts": 10000000, "top_k": 1}')
    replies = [httpx.get(url + path, timeout=30).text for path in ("", "config", "gradio_api/info", "v1/models")]
    replies.append(_call(url, "chat", ["To be", [], "", 0.7, 0.95, 4]))
    replies.append(_call(url, "stats", []))
    replies.append(_call(url, "trace", []))
    uploaded = httpx.post(f"{url}gradio_api/upload", files={"files": ("crafted.json", crafted.read_bytes())}).json()[0]
    replies.append(_call(url, "what_if", [app.WHATIF_UPLOAD, {"path": uploaded, "meta": {"_type": "gradio.FileData"}},
                                          "belady", 2, 0, "cpu-space", "served model", True]))
    replies.append(_call(url, "apply_settings", ["tiny-mixtral", "none", "none", 2, 1, "ram", "cpu", "lru", "auto",
                                                 "wrong"]))
    v1 = f"{url}v1/chat/completions"
    replies.append(httpx.post(v1, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).text)
    replies.append(httpx.post(v1, content=b"{nope").text)
    store = str(service.engine.store_path)

    def broken_stream(*args, **kwargs):  # what a damaged store gives: an error naming its file
        raise OSError(f"cannot read {store}/experts.bin at offset 4096: short read")
        yield

    monkeypatch.setattr(service.engine, "stream", broken_stream)
    replies.append(_call(url, "chat", ["To be", [], "", 0.7, 0.95, 4]))
    replies.append(httpx.post(v1, json={"messages": [{"role": "user", "content": "hi"}]}).text)
    replies.append(httpx.post(v1, json={"messages": [{"role": "user", "content": "hi"}], "stream": True}).text)
    monkeypatch.undo()
    assert "experts.bin" in replies[-1] and "cannot read" in replies[-3]  # the errors did come back
    forbidden = {"working directory": str(REPO), "model path": service.model, "store": store,
                 "temp dir": tempfile.gettempdir() + "/", "trace folder": service._trace_dir.name}
    for reply in map(_without_gradio_file_addresses, replies):
        for what, path in forbidden.items():
            assert path not in reply, f"the {what} ({path}) shows in: {reply[:300]}"
    assert "Not replayed" in replies[7] and "1..65536" in replies[7]  # the limit is stated


def test_every_gradio_input_is_bounded_before_tokenization(public_app):
    url, service, _ = public_app
    huge = httpx.post(f"{url}gradio_api/call/chat", json={"data": ["x" * 10_000_000, [], "", 0.7, 0.95, 8]},
                      timeout=60)
    assert huge.status_code == 413  # refused before it is read whole
    calls = []
    original = service.engine.chat_prompt
    service.engine.chat_prompt = lambda messages: calls.append(messages) or original(messages)
    try:
        for data, what in ((["m" * (1 << 20), [], "", 0.7, 0.95, 8], "the message is too long"),
                           (["hi", [], "s" * (100 << 10), 0.7, 0.95, 8], "the system prompt is too long"),
                           (["hi", [{"role": "user", "content": "h" * (60 << 10)}] * 12, "", 0.7, 0.95, 8],
                            "the history is too long")):
            start = time.monotonic()
            reply = _call(url, "chat", data)
            assert what in reply and time.monotonic() - start < 10, reply[-300:]
    finally:
        del service.engine.chat_prompt
    assert calls == []  # nothing was tokenized


def test_gradios_queue_is_capped_per_session(public_app, monkeypatch):
    from webapp import limits

    url, _, _ = public_app
    around = httpx.post(f"{url}gradio_api/run/chat", json={"data": ["hi", [], "", 0.7, 0.95, 4]}, timeout=30)
    assert around.status_code == 404  # a queued function cannot be called around the queue
    session = "flooding-session"
    body = {"data": ["To be", [], "", 0.7, 0.95, 200], "fn_index": _fn_index(url, "chat"), "session_hash": session}
    codes = [httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=30).status_code
             for _ in range(limits.MAX_EVENTS_PER_SESSION + 3)]
    assert codes[:limits.MAX_EVENTS_PER_SESSION] == [200] * limits.MAX_EVENTS_PER_SESSION
    assert set(codes[limits.MAX_EVENTS_PER_SESSION:]) == {429}
    # nobody listens for that session's results: its work is dropped, not run; a listener is served at once
    from gradio_client import Client

    start = time.monotonic()
    text = Client(url, verbose=False, analytics_enabled=False).predict("To be", [], "", 0.7, 0.95, 4,
                                                                       api_name="/chat")
    assert isinstance(text, str) and time.monotonic() - start < 4 * limits.LISTEN_GRACE_S + 30


def _fn_index(url: str, api_name: str) -> int:
    config = httpx.get(f"{url}config", timeout=30).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


# --- the load test of issue 19: every kind of visitor at once, through every door --------------------------
RSS_GROWTH_BOUND = 600 * 2**20  # the server (this process) may grow by at most this much during the load test


def test_load_pollers_chatters_api_clients_a_what_if_uploader_and_a_queue_flooder(public_app, tmp_path):
    """6 visitors polling Stats once a second, 4 chatting through gradio, 4 through /v1, 1 uploading
    crafted What-if traces, 1 flooding gradio's queue with work it never listens for. Not timed:
    every legitimate reply arrives and equals transformers' greedy reply, crafted traces are refused
    with their limit, and the server's RSS stays under a stated bound. Loopback only; every loop is
    bounded."""
    from gradio_client import Client, handle_file
    from servers import rss_bytes, transformers_greedy

    from moe_runtime.paths import EMBEDDED_MODEL_DIR
    from webapp import limits

    url, service, _ = public_app
    greedy = transformers_greedy(EMBEDDED_MODEL_DIR)
    prompts = [f"Visitor {i}: to be, or not to be?" for i in range(8)]
    expected = {p: greedy([{"role": "user", "content": p}], 10)[0] for p in prompts}
    rss_before = rss_bytes()
    done, problems, got, polls, refusals, flood_codes = threading.Event(), [], {}, [], [], []

    def poller(i):
        c = Client(url, verbose=False, analytics_enabled=False)
        for _ in range(120):  # at most two minutes
            if done.is_set():
                return
            counters, *_ = c.predict(api_name="/stats")
            polls.append(counters["cache_hits"] + counters["cache_misses"] == counters["expert_selections"])
            done.wait(1.0)

    def gradio_chatter(i):
        c = Client(url, verbose=False, analytics_enabled=False)
        for p in prompts[2 * (i % 4):2 * (i % 4) + 2]:
            got[f"gradio {i} {p}"] = (p, c.predict(p, [], "", 0, 1, 10, api_name="/chat"))

    def api_client(i):
        for p in prompts[2 * (i % 4):2 * (i % 4) + 2]:
            r = httpx.post(f"{url}v1/chat/completions", timeout=240,
                           json={"messages": [{"role": "user", "content": p}], "max_tokens": 10, "temperature": 0})
            got[f"api {i} {p}"] = (p, r.json()["choices"][0]["message"]["content"])

    def what_if_uploader():
        c = Client(url, verbose=False, analytics_enabled=False)
        head = '{"format": "moe-routing-trace", '
        for name, text in (("experts", head + '"num_layers": 1, "num_experts": 100000000, "top_k": 1}'),
                           ("layers", head + '"num_layers": 1000000000, "num_experts": 8, "top_k": 1}'),
                           ("deep", "[" * 50_000 + "]" * 50_000), ("digits", head + '"top_k": ' + "7" * 5000 + "}")):
            path = tmp_path / f"{name}.json"
            path.write_text(text)
            _, notes = c.predict(app.WHATIF_UPLOAD, handle_file(str(path)), "belady", 2, 0, "cpu-space",
                                 "served model", True, api_name="/what_if")
            refusals.append(notes)

    def flooder():
        index = _fn_index(url, "chat")
        for n in range(24):  # fresh sessions, nobody listening: the work is dropped when its turn comes
            body = {"data": [f"flood {n}", [], "", 0.7, 0.95, 200], "fn_index": index, "session_hash": f"flood-{n}"}
            flood_codes.append(httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=30).status_code)

    def guarded(fn, *args):
        def run():
            try:
                fn(*args)
            except Exception as err:  # noqa: BLE001 - reported below
                problems.append(f"{fn.__name__}{args}: {err!r}")
        return threading.Thread(target=run, daemon=True)

    pollers = [guarded(poller, i) for i in range(6)]
    workers = [guarded(flooder), guarded(what_if_uploader)]
    workers += [guarded(gradio_chatter, i) for i in range(4)] + [guarded(api_client, i) for i in range(4)]
    start = time.monotonic()
    for t in pollers + workers:
        t.start()
    for t in workers:
        t.join(max(1.0, 300 - (time.monotonic() - start)))
    done.set()
    for t in pollers:
        t.join(30)
    assert not any(t.is_alive() for t in pollers + workers), "a visitor hung"
    assert not problems, problems
    assert len(got) == 16 and all(reply == expected[p] for p, reply in got.values()), got
    assert polls and all(polls)
    assert len(refusals) == 4 and all("Not replayed" in n for n in refusals), refusals
    assert "1..65536" in refusals[0] and "1..1024" in refusals[1] and "not JSON" in refusals[2]
    assert flood_codes and set(flood_codes) <= {200, 503}  # queued (then dropped) or "queue full": never run
    grown = rss_bytes() - rss_before
    assert grown < RSS_GROWTH_BOUND, f"RSS grew by {grown / 2**20:.0f} MiB"
    stats = service.stats(trace=False)
    print(f"\nload test: {time.monotonic() - start:.1f} s, decode {stats.tokens_generated / max(stats.decode_seconds, 1e-9):.1f} "
          f"tokens/s over all replies since the reset, RSS grew {grown / 2**20:.0f} MiB, {len(polls)} polls, "
          f"{limits.MAX_QUEUE} queue places")

