"""Bounded work per request: an oversized message is refused before any model work and without the
engine's lock, long histories are trimmed in few tokenizations, replies have a deadline, stats
snapshots fall between tokens, and malformed input gets a message that says what is wrong."""

from __future__ import annotations

import threading
import time

import pytest

import app
from moe_runtime import GenerationSettings, RoutingTrace
from webapp.service import build_messages, prompt_within_context, public_name


def _hold_the_engine(service):
    """A reply that streams until released: the engine's lock stays taken meanwhile."""
    release, started = threading.Event(), threading.Event()

    def run():
        for _ in service.chat([{"role": "user", "content": "To be"}], GenerationSettings(max_new_tokens=200)):
            started.set()
            release.wait(30)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30)
    return release, thread


def test_an_oversized_message_is_refused_in_tokens_before_any_model_work_and_without_the_lock(service):
    context = service.engine.model.config.max_position_embeddings
    huge = "To be, or not to be, that is the question. " * 2500  # ~110 KB, thousands of tokens
    release, thread = _hold_the_engine(service)  # another user's reply holds the engine
    try:
        before = service.stats(trace=False).selections
        start = time.monotonic()
        with pytest.raises(ValueError, match=rf"the message is too long: \d+ tokens, and the model's context holds "
                                             rf"{context} tokens"):
            list(service.chat([{"role": "user", "content": huge}], GenerationSettings(max_new_tokens=8)))
        assert time.monotonic() - start < 10  # did not wait for the reply in progress
    finally:
        release.set()
        thread.join(30)
    assert service.stats(trace=False).selections[0] >= before[0]  # (the other reply went on)
    counts = service.stats(trace=False)
    list(service.chat([{"role": "user", "content": "hi"}], GenerationSettings(max_new_tokens=2, temperature=0)))
    assert service.stats(trace=False).selections[0] > counts.selections[0]  # the engine still serves


def test_a_reply_that_would_overflow_the_context_is_clipped_and_says_so(service):
    context = service.engine.model.config.max_position_embeddings
    message = "To be, or not to be, that is the question. " * 12
    updates = list(service.chat([{"role": "user", "content": message}],
                                GenerationSettings(max_new_tokens=context, temperature=0)))
    prompt = service.engine.chat_prompt([{"role": "user", "content": message}]).shape[-1]
    last = updates[-1]
    assert last.finish_reason in ("context", "stop")
    assert prompt + last.new_tokens <= context
    if last.finish_reason == "context":
        assert app.FINISH_REASONS["context"] == "context window full"


def _reference_cut(engine, messages, max_new_tokens):
    """Plain reference: drop the oldest turn (then leading assistant turns) until the prompt fits."""
    context = engine.model.config.max_position_embeddings
    first = 1 if messages[0]["role"] == "system" else 0
    while len(messages) - first > 1 and engine.chat_prompt(messages).shape[-1] + max_new_tokens > context:
        messages = messages[:first] + messages[first + 1:]
        while messages[first]["role"] == "assistant":
            messages = messages[:first] + messages[first + 1:]
    return engine.chat_prompt(messages)


@pytest.mark.parametrize("turns", [3, 40, 1000])
def test_long_histories_are_trimmed_in_few_tokenizations_like_the_plain_cut(service, turns, monkeypatch):
    engine = service.engine
    history = [{"role": role, "content": f"turn {i}: to be or not to be, {'that is ' * (i % 5)}the question"}
               for i in range(turns) for role in ("user", "assistant")]
    messages = build_messages("and then?", history, "be brief")
    expected = _reference_cut(engine, messages, 16) if turns <= 40 else None
    calls = []
    real = engine.chat_prompt
    monkeypatch.setattr(engine, "chat_prompt", lambda m: calls.append(len(m)) or real(m))
    ids = prompt_within_context(engine, messages, 16)
    assert ids.shape[-1] + 16 <= engine.model.config.max_position_embeddings
    assert len(calls) <= 3 + (2 * turns).bit_length(), calls  # O(log n) renders of the chat
    if expected is not None:
        assert ids.tolist() == expected.tolist()
    else:  # the newest turns that fit: one more user turn would not
        monkeypatch.setattr(engine, "chat_prompt", real)
        kept = engine.tokenizer.decode(ids[0])
        assert "and then?" in kept and "turn 999" in kept and "turn 0:" not in kept


def test_a_reply_ends_at_its_deadline(service):
    # a deadline shorter than one token: greedy decoding's first token is not an end of speech, so the reply
    # cannot end by itself before the deadline stops it (a sampled reply could, and made this test flaky)
    updates = list(service.chat([{"role": "user", "content": "To be"}],
                                GenerationSettings(max_new_tokens=4000, temperature=0), seconds=1e-3))
    assert updates[-1].finish_reason == "time" and updates[-1].new_tokens < 4000
    assert app.FINISH_REASONS["time"] == "time limit reached"


def test_waiting_for_a_busy_engine_ends_at_the_deadline(service):
    release, thread = _hold_the_engine(service)
    try:
        start = time.monotonic()
        with pytest.raises(ValueError, match="busy"):
            list(service.chat([{"role": "user", "content": "hi"}], GenerationSettings(max_new_tokens=2), seconds=1.0))
        assert time.monotonic() - start < 10
    finally:
        release.set()
        thread.join(30)


def test_stats_snapshots_fall_between_tokens(service):
    """Every snapshot taken while a reply streams holds every layer of a token or none."""
    service.reset_stats()
    done = threading.Event()
    snapshots = []

    def hammer():
        while not done.is_set():
            snapshots.append(service.stats())

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        for _ in range(3):
            list(service.chat([{"role": "user", "content": "To be, or not"}],
                              GenerationSettings(max_new_tokens=24, temperature=0.7)))
    finally:
        done.set()
        thread.join(30)
    assert len(snapshots) > 20
    for s in snapshots:
        lengths = {len(rows) for rows in s.trace.selected} | {len(s.trace.phase)}
        assert len(lengths) == 1, lengths
        per_layer = {sum(counts) for counts in s.expert_counts}
        assert len(per_layer) == 1, per_layer  # each layer counted the same tokens


@pytest.mark.parametrize("args,message", [
    (dict(message=12345), "the message must be text, not int"),
    (dict(system_prompt=5), "system_prompt must be text, not int"),
    (dict(history=[{"role": "user", "content": [[[["deep"]]]]}]), "content parts must be text"),
])
def test_wrong_types_get_messages_that_say_what_is_wrong(args, message):
    call = {"message": "hi", "history": [], "system_prompt": "", **args}
    with pytest.raises(ValueError, match=message):
        build_messages(call["message"], call["history"], call["system_prompt"])


def test_deeply_nested_content_is_refused_without_recursion():
    content = "x"
    for _ in range(900):
        content = [content]
    with pytest.raises(ValueError, match="content parts must be text"):
        build_messages("hi", [{"role": "user", "content": content}])


def test_max_new_tokens_true_is_not_called_empty():
    with pytest.raises(ValueError, match=r"max_new_tokens=True is not allowed: give a whole number"):
        app.generation_settings(0.7, 0.95, True)


def test_a_trace_names_the_model_without_the_servers_path(service, tiny_dir):
    assert public_name(str(tiny_dir)) == tiny_dir.name
    assert public_name("mistralai/Mixtral-8x7B-v0.1") == "mistralai/Mixtral-8x7B-v0.1"
    list(service.chat([{"role": "user", "content": "To be"}], GenerationSettings(max_new_tokens=3)))
    path = service.trace_file(every=0)
    assert RoutingTrace.load(path).model == tiny_dir.name
    assert str(tiny_dir) not in path.read_text()
