"""The Stats views: built once per engine state and shared by every tab (webapp.views), polls that
find nothing new cost almost nothing, one build at a time, builds spaced out while a reply streams,
and every Stats endpoint of the app bounded."""

from __future__ import annotations

import json
import statistics
import threading
import time

import pytest

import app
from moe_runtime import GenerationSettings
from webapp import plots, views


class FakeService:
    """What StatsViews reads of an EngineService: a version and whether a reply holds the engine."""

    def __init__(self) -> None:
        self.version, self.busy = 1, False


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def counting_build(calls: list, seconds: float = 0.0, gate: threading.Event | None = None):
    def build(tokens):
        calls.append(tokens)
        if gate is not None:
            assert gate.wait(10)
        time.sleep(seconds)
        return ("view", len(calls))
    return build


def test_a_view_is_built_once_per_engine_state_and_shared():
    service, calls = FakeService(), []
    shared = views.StatsViews(service, (), build=counting_build(calls))
    first = shared.view(8)
    assert all(shared.view(8) is first for _ in range(6))  # six tabs, one build
    assert calls == [8]
    service.version = 2  # a token, a reset or a reload
    second = shared.view(8)
    assert second is not first and second.version == 2 and calls == [8, 8]
    shared.view(16)  # another timeline length is another view
    assert calls == [8, 8, 16] and shared.view(8) is second


def test_while_a_reply_streams_builds_are_spaced_by_their_cost():
    service, calls, clock = FakeService(), [], Clock()
    shared = views.StatsViews(service, (), build=counting_build(calls), clock=clock, busy_factor=10,
                              min_busy_interval=2.0)
    first = shared.view()
    service.busy = True
    service.version += 1
    clock.now += 1.0
    assert shared.view() is first  # new tokens, but the last build is younger than 2 s
    clock.now += 1.5
    assert shared.view() is not first and len(calls) == 2
    service.version += 1
    service.busy = False  # the reply ended: the final state is shown at once
    assert shared.view().version == service.version and len(calls) == 3


def test_the_busy_interval_grows_with_the_build_cost():
    shared = views.StatsViews(FakeService(), (), busy_factor=10, min_busy_interval=2.0, build=lambda t: ())
    cheap = views.View(1, 8, (), 0.0, 0.05)
    costly = views.View(1, 8, (), 0.0, 0.4)
    assert shared.busy_interval(cheap) == 2.0 and shared.busy_interval(costly) == pytest.approx(4.0)


def test_one_build_at_a_time_others_get_the_previous_view():
    service, calls, gate = FakeService(), [], threading.Event()
    gate.set()
    shared = views.StatsViews(service, (), build=counting_build(calls, gate=gate))
    old = shared.view()
    gate.clear()
    service.version += 1
    builder = threading.Thread(target=shared.view, daemon=True)
    builder.start()
    deadline = time.monotonic() + 10
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    got = [shared.view() for _ in range(5)]  # while the build runs: no second build, no wait
    assert all(v is old for v in got) and len(calls) == 2
    gate.set()
    builder.join(10)
    assert shared.view().version == service.version and len(calls) == 2


@pytest.fixture(scope="module")
def handlers(service):
    return app.Handlers(service)


class Request:
    def __init__(self, session: str) -> None:
        self.session_hash = session


def test_a_poll_with_nothing_new_sends_nothing_and_costs_well_under_10_ms(handlers):
    list(handlers.service.chat([{"role": "user", "content": "To be"}], GenerationSettings(max_new_tokens=4)))
    tab = Request("tab-1")
    values = handlers.stats_poll(8, True, tab)
    assert values[0]["tokens_generated"] > 0 and json.loads(values[2].plot)["data"]
    builds = handlers.views.builds
    times = []
    for _ in range(50):
        start = time.perf_counter()
        again = handlers.stats_poll(8, True, tab)
        times.append(time.perf_counter() - start)
    assert all(isinstance(v, type(app.gr.skip())) for v in again)  # nothing sent
    assert statistics.median(times) < 0.010 and handlers.views.builds == builds
    other = handlers.stats_poll(8, True, Request("tab-2"))  # another tab gets the same view, not a new build
    assert other[0] == values[0] and handlers.views.builds == builds
    hidden = handlers.stats_poll(8, False, Request("tab-3"))  # a hidden page gets nothing
    assert all(isinstance(v, type(app.gr.skip())) for v in hidden)
    handlers.service.reset_stats()
    assert handlers.stats_poll(8, True, tab)[0]["tokens_generated"] == 0  # a reset is new


def test_every_stats_endpoint_and_the_timer_are_bounded(service):
    demo = app.build_app(service)
    timer = [fn for fn in demo.fns.values() if fn.name == "stats_poll"]
    # outside gradio's queue (cheap), so bounded by its handler: see the next test
    assert len(timer) == 1 and timer[0].queue is False
    assert timer[0].trigger_mode == "once" and "visibilityState" in timer[0].js  # hidden pages skip
    stats = [fn for fn in demo.fns.values() if fn.name == "stats_view"]
    assert stats and all(fn.concurrency_id == app.STATS_VIEW and fn.concurrency_limit == 1 for fn in stats)
    for fn in demo.fns.values():  # nothing queued runs without a limit ("default": launch's, which is 1)
        if fn.queue:
            assert fn.concurrency_limit == "default" or 1 <= fn.concurrency_limit <= 4, fn.name


def test_the_timeline_length_is_clamped(handlers):
    assert handlers._view(10**9).timeline_tokens == app.MAX_TIMELINE_TOKENS
    assert handlers._view("x").timeline_tokens == plots.TIMELINE_TOKENS


def test_the_timers_handler_serves_at_most_two_ticks_at_once(service):
    handlers = app.Handlers(service)
    handlers.stats_poll(8, True, Request("warm"))
    gate, started, calls = threading.Event(), threading.Semaphore(0), []
    handlers.views = views.StatsViews(service, app.STATS_FIGURES, build=lambda tokens: (
        calls.append(tokens), started.release(), gate.wait(10), ("counters", "rows", *([None] * 7)))[-1])
    busy = [threading.Thread(target=handlers.stats_poll, args=(8, True, Request(f"t{i}")), daemon=True)
            for i in range(app.MAX_POLLS_AT_ONCE)]
    for t in busy:
        t.start()
    assert started.acquire(timeout=10)  # one builds; the other waits for that build (no view yet)
    time.sleep(0.2)
    start = time.perf_counter()
    refused = handlers.stats_poll(8, True, Request("third"))
    assert time.perf_counter() - start < 0.05 and all(isinstance(v, type(app.gr.skip())) for v in refused)
    gate.set()
    for t in busy:
        t.join(10)
    assert len(calls) == 1 and handlers.stats_poll(8, True, Request("later"))[0] == "counters"
