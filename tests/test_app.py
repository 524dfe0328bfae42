"""The web app: its command line, the engine service, the event handlers called directly (baby model),
and `python app.py` itself, launched once and driven through gradio_client (embedded model)."""

import inspect
import json
import threading
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from servers import free_port

import app
from moe_runtime import OffloadConfig, RoutingTrace
from moe_runtime.paths import EMBEDDED_MODEL_DIR, REPO_ROOT
from webapp import plots
from webapp.service import EMBEDDED_MODEL, KNOWN_MODELS, EngineService, ModelPolicy, build_messages

EMBEDDED_DIR = EMBEDDED_MODEL_DIR


# --- command line -----------------------------------------------------------------------------------
def test_defaults_serve_the_embedded_model_on_localhost_only(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app.parse_args([])
    assert args.model == EMBEDDED_MODEL
    assert (args.host, args.port, args.share, args.allow_local_paths) == ("127.0.0.1", 7860, False, False)
    assert app.config_from_args(args) == OffloadConfig()
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what Hugging Face Spaces sets
    assert app.parse_args([]).host == "0.0.0.0"


def test_every_offload_setting_has_a_flag_and_help(capsys):
    args = vars(app.parse_args([]))
    assert {f.name for f in fields(OffloadConfig)} <= set(args), "an OffloadConfig field has no flag"
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--model", "--device", "--offload", "--cache-size", "--prefetch", "--expert-bits", "--attn-bits",
                 "--store-dir", "--policy", "--host", "--port", "--share", "--allow-local-paths", "--no-trace"):
        assert flag in help_text


def test_flags_map_to_the_config():
    args = app.parse_args(["--model", "mistralai/Mixtral-8x7B-Instruct-v0.1", "--expert-bits", "2", "--attn-bits",
                           "4", "--cache-size", "4", "--offload", "disk", "--policy", "lfu", "--no-trace"])
    config = app.config_from_args(args)
    assert (config.expert_bits, config.attn_bits, config.cache_size) == (2, 4, 4)
    assert (config.offload, config.policy, config.record_trace) == ("disk", "lfu", False)
    assert app.config_from_args(app.parse_args(["--expert-bits", "none"])).expert_bits is None
    flags = app.config_from_args(app.parse_args(["--delete-shards"]))
    assert flags.delete_shards


def test_bad_flags_stop_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(["--expert-bits", "two"])
    assert exit_info.value.code == 2 and "expert" in capsys.readouterr().err.lower()
    with pytest.raises(SystemExit, match="cache_size=0 is not allowed"):
        app.main(["--cache-size", "0"])
    with pytest.raises(SystemExit, match="max_new_tokens=0 is not allowed"):
        app.main(["--max-new-tokens", "0"])
    with pytest.raises(SystemExit):
        app.parse_args(["--policy", "fifo"])
    assert "invalid choice: 'fifo'" in capsys.readouterr().err


def test_widget_values_are_parsed_with_clear_messages():
    assert app.parse_bits("expert_bits", "none") is None and app.parse_bits("expert_bits", "4") == 4
    with pytest.raises(ValueError, match="expert_bits='four'"):
        app.parse_bits("expert_bits", "four")
    assert app.whole_number("cache_size", 3.0) == 3
    for bad in (None, "", 2.5, "two", True):
        with pytest.raises(ValueError, match="cache_size"):
            app.whole_number("cache_size", bad)
    with pytest.raises(ValueError, match="top_p"):
        app.generation_settings(0.7, 1.5, 16)


# --- model policy and chat messages ---------------------------------------------------------------------
def test_model_policy_allows_listed_models_and_local_folders_only_with_the_flag(tmp_path):
    strict = ModelPolicy("some/startup-model")
    assert strict.choices[:2] == [EMBEDDED_MODEL, "some/startup-model"]
    assert set(KNOWN_MODELS) <= set(strict.choices)
    assert strict.check(f" {KNOWN_MODELS[0]} ") == KNOWN_MODELS[0]
    for bad in (str(tmp_path), "/etc", "other/model", "", None):
        with pytest.raises(ValueError, match="not allowed|empty"):
            strict.check(bad)
    loose = ModelPolicy(allow_local_paths=True)
    assert loose.check(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(ValueError, match="not a local folder"):
        loose.check(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="home folder does not exist"):
        loose.check("~no-such-user-here/model")


def test_build_messages_keeps_role_and_content_only():
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
               {"role": "assistant", "content": "hello", "footer": "3 tokens/s"}]
    messages = build_messages("again", history, "  be brief ")
    assert messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    assert build_messages("x", None, "") == [{"role": "user", "content": "x"}]
    for bad_history in ("text", [{"role": "tool", "content": "x"}], [["hi", "there"]]):
        with pytest.raises(ValueError, match="history"):
            build_messages("x", bad_history)
    with pytest.raises(ValueError, match="empty"):
        build_messages("  ", [])


# --- reloads that fail: a fake loader stands in for the engine ------------------------------------------
class FakeEngine:
    device = torch.device("cpu")

    def __init__(self, name, config):
        self.name, self.config, self.closed = name, config, False

    def close(self):
        self.closed = True


def scripted_loader(*outcomes):
    """A loader that returns FakeEngines or raises, in order; records what it was asked for."""
    calls, queue = [], list(outcomes)

    def loader(name, config):
        calls.append((name, config.cache_size))
        outcome = queue.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return FakeEngine(name, config)

    return loader, calls


def test_reload_keeps_the_running_engine_on_any_failure():
    loader, calls = scripted_loader("ok", ValueError("cache_size=9 is not allowed"), RuntimeError("disk full"))
    service = EngineService("a/model", OffloadConfig(), loader=loader)
    old = service.start()
    with pytest.raises(ValueError, match="cache_size=9"):
        service.reload("a/model", service.settings(cache_size=9))
    with pytest.raises(ValueError, match="RuntimeError: disk full"):
        service.reload("a/model", service.settings(cache_size=3))
    with pytest.raises(ValueError, match="not allowed"):
        service.reload("not/listed", service.settings())
    with pytest.raises(ValueError, match="unknown settings: colour"):
        service.settings(colour="red")
    assert service.engine is old and not old.closed and service.config.cache_size == 2
    assert len(calls) == 3  # the model policy refused before loading


def test_reload_releases_the_old_engine_when_two_do_not_fit():
    loader, calls = scripted_loader("ok", torch.OutOfMemoryError("CUDA out of memory"), "ok")
    service = EngineService("a/model", OffloadConfig(), loader=loader)
    old = service.start()
    new = service.reload("a/model", service.settings(cache_size=4))
    assert old.closed and service.engine is new and service.config.cache_size == 4
    assert [c[1] for c in calls] == [2, 4, 4]


def test_reload_loads_the_old_engine_back_when_the_new_one_never_fits():
    oom = torch.OutOfMemoryError("CUDA out of memory")
    loader, calls = scripted_loader("ok", oom, RuntimeError("still out of memory"), "ok")
    service = EngineService("a/model", OffloadConfig(), loader=loader)
    old = service.start()
    with pytest.raises(ValueError, match="previous engine was loaded back"):
        service.reload("a/model", service.settings(cache_size=4))
    assert old.closed and service.engine is not old and service.config.cache_size == 2
    assert [c[1] for c in calls] == [2, 4, 4, 2]


# --- handlers called directly, on a baby model -------------------------------------------------------
@pytest.fixture(scope="module")
def service(tiny_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    service = EngineService(str(tiny_dir), OffloadConfig(device="cpu", store_dir=str(store)))
    service.start()
    yield service
    service.close()


@pytest.fixture
def handlers(service):
    return app.Handlers(service)


def test_respond_streams_a_reply_with_tokens_per_second_and_hit_rate(handlers):
    steps = list(handlers.respond("To be", [], "", 0.7, 0.95, 8))
    assert len(steps) >= 3  # a placeholder, then the reply as it grows
    shown, history, textbox = steps[-1]
    assert textbox == "" and [m["role"] for m in history] == ["user", "assistant"]
    footer = history[-1]["footer"]
    assert "tokens/s" in footer and "cache hit rate" in footer
    assert footer.endswith(("finished", "max new tokens reached"))
    assert "waiting" in steps[0][1][-1]["footer"]
    assert shown[-1]["content"].startswith(history[-1]["content"]) and "tokens/s" in shown[-1]["content"]
    again = list(handlers.respond("more", history, "be brief", 0, 1, 4))[-1][1]
    assert len(again) == 4 and again[:2] == history


def test_bad_chat_input_loses_nothing(handlers):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.warns(UserWarning, match="empty"):
        steps = list(handlers.respond("   ", history, "", 0.7, 0.95, 8))
    assert steps == [(app.chatbot_messages(history), history, "   ")]
    with pytest.warns(UserWarning, match="max_new_tokens"):
        steps = list(handlers.respond("keep me", history, "", 0.7, 0.95, 0))
    assert steps[-1][1] == history and steps[-1][2] == "keep me"


def test_long_chats_keep_the_newest_turns_that_fit_the_context(handlers, service):
    context = service.engine.model.config.max_position_embeddings
    turn = "To be, or not to be, that is the question. " * 3
    history = [{"role": role, "content": turn} for _ in range(40) for role in ("user", "assistant")]
    service.reset_stats()
    *_, (_, new_history, _) = handlers.respond("and then?", history, "be brief", 0.7, 0.95, 8)
    assert new_history[:-2] == history and new_history[-1]["footer"]  # the UI keeps the whole chat
    prompt_tokens = service.stats().trace.phase.count("prefill")
    assert 0 < prompt_tokens <= context - 8


def test_a_chat_template_refusal_is_a_message_not_a_crash(handlers, service):
    tokenizer = service.engine.tokenizer
    template = tokenizer.chat_template
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    try:
        with pytest.warns(UserWarning, match="chat template .* refused .* must alternate"):
            *_, (_, history, textbox) = handlers.respond("hi", [], "a system prompt", 0.7, 0.95, 4)
    finally:
        tokenizer.chat_template = template
    assert history == [] and textbox == "hi"


def test_stop_ends_the_reply_early(handlers):
    handlers.service.reset_stats()
    replies = handlers.respond("To be", [], "", 0.7, 0.95, 400)
    next(replies), next(replies)
    handlers.stop()
    *_, (_, history, _) = replies
    assert history[-1]["footer"].endswith("stopped")
    assert handlers.service.stats().tokens_generated < 400


def test_leaving_a_reply_early_frees_the_engine(handlers):
    replies = handlers.respond("To be", [], "", 0.7, 0.95, 400)
    next(replies), next(replies)
    replies.close()  # what happens when a browser goes away mid-reply
    done = threading.Event()
    threading.Thread(target=lambda: (list(handlers.respond("hi", [], "", 0, 1, 2)), done.set()), daemon=True).start()
    assert done.wait(20), "the next reply waited for the abandoned one"


def test_stats_figures_and_trace_file(handlers):
    list(handlers.respond("To be", [], "", 0.7, 0.95, 6))
    counters, table, *figures = handlers.stats_view()
    assert counters["tokens_generated"] > 0 and len(figures) == len(app.STATS_FIGURES)
    assert json.loads(Path(handlers.counters_download()).read_text())["tokens_generated"] == counters["tokens_generated"]
    assert dict((row[0], row[1]) for row in table)["tokens generated"] == f"{counters['tokens_generated']} tokens"
    assert json.loads(figures[0].plot)["data"][0]["type"] == "heatmap"  # sent as JSON, built once
    trace = RoutingTrace.load(handlers.service.trace_file(every=0))
    assert trace.num_tokens == counters["trace_tokens"] > 0
    assert handlers.reset_stats()[0]["tokens_generated"] == 0


def test_what_if_replays_the_session_or_an_uploaded_trace(handlers, service):
    list(handlers.respond("To be", [], "", 0, 1, 6))
    c = service.config
    rows, notes = handlers.what_if(app.WHATIF_SESSION, None, c.policy, c.cache_size, c.prefetch, "t4-pcie3",
                                   "mixtral-8x7b", True)
    table = {row[0]: row[1:] for row in rows}
    assert table["cache hit rate"][1].endswith("%") and table["decode speed"][2].endswith("tokens/s")
    assert "Predicted on t4-pcie3" in notes and "mixtral-8x7b" in notes
    trace_file = service.trace_file(every=0)
    rows, _ = handlers.what_if(app.WHATIF_UPLOAD, str(trace_file), "belady", 1, 0, "a100", "served model", True)
    assert {row[0]: row[2] for row in rows}["cache per layer"].startswith("1 of")
    for args, message in [((app.WHATIF_UPLOAD, None, "lru", 2, 2, "a100", "served model", True), "no trace file"),
                          ((app.WHATIF_SESSION, None, "lru", 2.5, 2, "a100", "served model", True), "whole number"),
                          ((app.WHATIF_SESSION, None, "lru", 2, 2, "a100", "gpt-9", True), "model shape")]:
        with pytest.warns(UserWarning, match="Not replayed"):
            _, notes = handlers.what_if(*args)
        assert message in notes


def test_only_the_newest_trace_files_are_kept(service):
    paths = [service.save_trace(service.stats()) for _ in range(12)]
    assert all(p.parent == paths[0].parent for p in paths)
    kept = sorted(paths[0].parent.glob("routing-trace-*.json"))
    assert len(kept) == 8 and paths[-1] in kept and not paths[0].exists()


def test_apply_bad_settings_keeps_serving(handlers, service):
    engine = service.engine
    experts = engine.shape.num_experts
    bad = [
        (dict(cache_size=experts + 1), f"use 1..{experts}"),
        (dict(device="cuda:x"), "device='cuda:x' is not allowed"),
        (dict(expert_bits="5"), "expert_bits=5 is not allowed"),
        (dict(prefetch="many"), "prefetch='many'"),
        (dict(model="/etc"), "not allowed"),
        (dict(offload="disk", host_cache_gb="100000"), "host_cache_gb=100000 is more than this machine has"),
        (dict(host_cache_gb="lots"), "host_cache_gb='lots' is not allowed"),
    ]
    if not torch.cuda.is_available():
        bad.append((dict(device="cuda"), "no CUDA GPU"))
    for change, message in bad:
        values = {**dict(model=service.model, expert_bits="none", attn_bits="none", cache_size=2, prefetch=2,
                         offload="ram", device="cpu", policy="lru"), **change}
        with pytest.warns(UserWarning, match="not applied"):
            status, facts, _ = handlers.apply(**values)
        assert message in status and "keeps serving" in status, change
        assert service.engine is engine
    assert list(handlers.respond("still there?", [], "", 0.7, 0.95, 3))[-1][1][-1]["content"] is not None


def test_apply_good_settings_swaps_the_engine(handlers, service):
    engine = service.engine
    status, facts, header = handlers.apply(service.model, "4", "none", 3, 1, "disk", "cpu", "lfu")
    try:
        assert status.startswith("**Applied.**") and service.engine is not engine
        assert service.config.expert_bits == 4 and service.config.offload == "disk"
        assert "4 / none" in facts and "cpu / float32" in facts and "disk" in header
        assert handlers.current_settings()[:8] == (service.model, "4", "none", 3, 1, "disk", "cpu", "lfu")
        assert list(handlers.respond("To be", [], "", 0.7, 0.95, 3))[-1][1][-1]["footer"]
    finally:
        handlers.apply(service.model, "none", "none", 2, 2, "ram", "cpu", "lru")


# --- `python app.py`, launched once, driven through gradio_client ----------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app as `python app.py` starts it (the embedded model on 127.0.0.1; only the port and the
    store folder differ), in this process to spare a second import of torch and gradio."""
    if not (EMBEDDED_DIR / "config.json").exists():
        pytest.skip(f"the embedded model {EMBEDDED_MODEL} is missing (it is trained by tools.train_tiny)")
    port, store = free_port(), tmp_path_factory.mktemp("served-store")
    demo = app.main(["--port", str(port), "--store-dir", str(store)], block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    from gradio_client import Client

    return Client(served, verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("downloads")))


def test_served_app_has_the_named_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/chat", "/stats", "/trace", "/apply_settings", "/reset_stats"} <= set(endpoints)


def test_served_app_streams_a_reply_and_reports_stats(client):
    client.predict(api_name="/reset_stats")
    job = client.submit("To be, or not to be", [], max_new_tokens=12, api_name="/chat")  # as in the README
    streamed = list(job)
    assert len(streamed) >= 2 and streamed[-1] == job.outputs()[-1]
    assert all(later.startswith(earlier) for earlier, later in zip(streamed, streamed[1:]))
    history = [{"role": "user", "content": "To be, or not to be"}, {"role": "assistant", "content": streamed[-1]}]
    assert isinstance(client.predict("and then?", history, "", 0, 1, 4, api_name="/chat"), str)

    counters, table, heatmap, *others = client.predict(api_name="/stats")
    assert counters["tokens_generated"] > 0 and 0 <= counters["hit_rate"] <= 1
    assert table["headers"] == plots.COUNTER_COLUMNS and len(table["data"]) > 5
    assert heatmap["type"] == "plotly" and '"heatmap"' in heatmap["plot"] and len(others) == len(app.STATS_FIGURES) - 1
    trace = RoutingTrace.load(client.predict(api_name="/trace"))  # made on request, not with every /stats
    assert trace.num_tokens == counters["trace_tokens"]
    assert trace.model == EMBEDDED_MODEL  # the name users see, not the server's absolute path


def test_served_app_applies_settings_and_survives_bad_input(client):
    from gradio_client.exceptions import AppError

    experts = client.predict(api_name="/stats")[0]["experts_per_layer"]
    base = [EMBEDDED_MODEL, "none", "none", 2, 2, "ram", "cpu", "lru"]
    status, _, _ = client.predict(*base[:3], experts + 1, *base[4:], api_name="/apply_settings")
    assert "Not applied" in status and f"use 1..{experts}" in status
    with pytest.raises(AppError, match="not in the list of choices"):  # Gradio checks the dropdown's choices
        client.predict("/etc", *base[1:], api_name="/apply_settings")
    with pytest.raises(AppError, match="empty"):
        client.predict("", [], "", 0.7, 0.95, 4, api_name="/chat")
    with pytest.raises(AppError, match="history"):
        client.predict("hi", "not a list", "", 0.7, 0.95, 4, api_name="/chat")
    assert client.predict("still there?", [], "", 0.7, 0.95, 4, api_name="/chat") is not None

    status, facts, header = client.predict(*base[:3], 3, 1, "ram", "cpu", "lfu", api_name="/apply_settings")
    assert status.startswith("**Applied.**") and "3 per layer" in facts and "3 cached per layer" in header
    assert client.predict(api_name="/stats")[0]["cache_size"] == 3
    assert isinstance(client.predict("To be", [], "", 0.7, 0.95, 4, api_name="/chat"), str)


# --- the deployment files run the app with flags it has -------------------------------------------------
def test_dockerfile_and_colab_notebook_start_the_app_with_valid_flags():
    import json

    cmd = json.loads(next(line for line in (REPO_ROOT / "Dockerfile").read_text().splitlines()
                          if line.startswith("CMD "))[4:])
    assert cmd[:2] == ["python", "app.py"] and app.parse_args(cmd[2:]).host == "0.0.0.0"

    notebook = json.loads((REPO_ROOT / "notebooks" / "colab_t4.ipynb").read_text())
    assert notebook["nbformat"] == 4
    settings = {}  # the first code cell: the settings the notebook builds and serves with (tests/test_notebook.py runs it all)
    exec("".join(next(c for c in notebook["cells"] if c["cell_type"] == "code")["source"]), settings)
    args = app.parse_args(["--model", settings["MODEL"], *settings["QUANT_FLAGS"], *settings["RUN_FLAGS"], "--share"])
    config = app.config_from_args(args)
    assert (args.model, settings["SHARE"]) == (KNOWN_MODELS[0], True)
    assert (config.expert_bits, config.expert_group, config.attn_bits, config.cache_size, config.offload,
            config.host_cache_gb) == (2, 32, 4, 4, "auto", "auto")  # the engine sizes the host cache itself (issue 9)


def test_the_settings_declaration_gives_apply_its_parameters_and_round_trips_every_value():
    from webapp.settings_form import SETTINGS

    names = [setting.name for setting in SETTINGS]
    assert list(inspect.signature(app.Handlers.apply).parameters) == ["self", "model", *names, "operator_token",
                                                                       "progress"]
    assert app.LOCKABLE == ("model", *names, "apply", "reset")
    defaults = OffloadConfig()
    for setting in SETTINGS:  # a field's value shown in its widget parses back to the same value
        assert setting.value(setting.show(getattr(defaults, setting.name))) == getattr(defaults, setting.name)
        assert setting.help == OffloadConfig.field_docs()[setting.name]
