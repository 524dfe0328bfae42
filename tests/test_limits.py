"""The request bounds of webapp.limits, unit by unit: byte caps, the queue wait a reply's deadline
counts, work nobody listens for, and the listener count (the launched app is tested in
test_public_host.py)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from moe_runtime import GenerationSettings
from webapp import limits
from webapp.service import build_messages


def test_text_caps_count_bytes_and_say_the_limit():
    limits.check_text("x", "é" * 512, 1024)  # 1024 bytes: at the cap
    with pytest.raises(ValueError, match="x is too long: at most 1 KiB"):
        limits.check_text("x", "é" * 513, 1024)
    with pytest.raises(ValueError, match="at most 64 KiB"):
        build_messages("m" * (64 << 10) + "m")
    with pytest.raises(ValueError, match="65 content parts: at most 64"):
        build_messages("hi", [{"role": "user", "content": ["a"] * 65}])
    assert limits.text_bytes("x" * 10_000_000, 100) == 10_000_000  # not encoded: over the cap by length


def fake_blocks(*events):
    return SimpleNamespace(_queue=SimpleNamespace(event_ids_to_events={str(i): e for i, e in enumerate(events)}))


def event(session, fn, seconds_ago):
    return SimpleNamespace(session_hash=session, fn=SimpleNamespace(name=fn), enqueue_time=time.monotonic() - seconds_ago)


def test_the_queue_wait_is_the_oldest_event_of_that_session_and_function():
    blocks = fake_blocks(event("s", "respond", 40), event("s", "respond", 5), event("s", "stats_view", 90),
                         event("other", "respond", 200))
    waited, joined = limits.queue_wait(blocks, "s", "respond")
    assert waited == pytest.approx(40, abs=1) and joined is not None
    assert limits.queue_wait(blocks, "nobody", "respond") == (0.0, None)
    assert limits.queue_wait(None, "s", "respond") == (0.0, None)  # a direct call


def test_queue_wait_counts_toward_the_reply_deadline(service):
    prompt = [{"role": "user", "content": "To be"}]
    with pytest.raises(ValueError, match="waited 301 s in the queue, over its 300 s"):
        next(service.chat(prompt, GenerationSettings(max_new_tokens=8), waited=301))
    updates = list(service.chat(prompt, GenerationSettings(max_new_tokens=4000, temperature=0), seconds=300,
                                waited=300 - 0.05))
    assert updates[-1].finish_reason == "time"  # what was left of the 300 s after the wait


def test_work_nobody_listens_for_is_abandoned_after_the_grace(monkeypatch):
    monkeypatch.setattr(limits, "LISTEN_GRACE_S", 0.2)
    guard = limits.GuardState()
    guard.blocks = fake_blocks()
    joined = time.monotonic()
    assert guard.abandoned("never-listens", joined)
    guard.listeners.opened("listens")
    assert not guard.abandoned("listens", joined)
    guard.listeners.closed("listens")
    threading.Timer(0.05, guard.listeners.opened, args=("late",)).start()
    assert not guard.abandoned("late", time.monotonic())  # a listener that comes within the grace
    assert not guard.abandoned(None, None)  # a direct call: never
