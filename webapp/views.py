"""The Stats tab's views, built once per engine state and shared by every open tab and API caller.

A Stats view (counters, counter table, figures) costs a snapshot, a cache-map query and seven Plotly
figures: tens to hundreds of ms of CPU that the generating thread needs on a 2-vCPU host. So:

- a view is rebuilt only when `EngineService.version` moved (it moves per streamed token, at a
  reply's end, a reset and a reload); a poll with nothing new returns the view it already has;
- one build runs at a time; a poll that arrives meanwhile gets the previous view (or, when there
  is none yet, waits for the build);
- while a reply streams, a view is rebuilt at most every `busy_interval` seconds: BUSY_FACTOR times
  the last build's duration, and at least MIN_BUSY_INTERVAL_S, so the stats take a bounded share of
  the CPU whatever the number of viewers;
- figures are kept as their JSON (gradio's `PlotData`), so sending a view to six tabs serializes it
  once, not six times.

Builds run on the polling request's thread, never on the token path. Nothing here imports a UI
library but gradio's `PlotData` container (what `gr.Plot` sends).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gradio.components.plot import PlotData

from webapp import plots

BUSY_FACTOR = 20.0  # while a reply streams: at most one build per this many build durations (<= 5% of a core)
MIN_BUSY_INTERVAL_S = 2.0  # ... and at most one per this many seconds
KEEP_VIEWS = 4  # views kept for this many timeline lengths (the slider's values); the oldest goes first


@dataclass(frozen=True)
class View:
    """One built view: `values` are (counters, counter rows, *figures as PlotData) in `figure_names` order."""

    version: int  # the engine state it shows (EngineService.version read before the snapshot)
    timeline_tokens: int
    values: tuple
    built_at: float  # monotonic clock
    build_seconds: float

    @property
    def key(self) -> tuple[int, int]:
        """What a tab that received this view has: equal keys mean nothing new to send."""
        return self.version, self.timeline_tokens


def plot_data(figure) -> PlotData:
    """A Plotly figure as gr.Plot sends it (serialized once, here)."""
    return PlotData(type="plotly", plot=figure.to_json())


def build_values(service, figure_names: tuple[str, ...], timeline_tokens: int) -> tuple:
    """(counters, counter rows, *figures) of the service's engine now."""
    stats = service.stats(trace=False)
    figures = plots.dashboard(stats, timeline_tokens=timeline_tokens, levels=service.cache_map())
    return (plots.counters(stats), plots.counter_rows(stats), *(plot_data(figures[n]) for n in figure_names))


class StatsViews:
    """The shared views of one `EngineService` (see the module's docstring)."""

    def __init__(self, service, figure_names: tuple[str, ...], *, busy_factor: float = BUSY_FACTOR,
                 min_busy_interval: float = MIN_BUSY_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 build: Callable[[int], tuple] | None = None) -> None:
        self.service = service
        self.busy_factor, self.min_busy_interval, self.clock = busy_factor, min_busy_interval, clock
        self._build = build or (lambda tokens: build_values(service, figure_names, tokens))
        self._building = threading.Lock()  # one build at a time
        self._views: OrderedDict[int, View] = OrderedDict()  # timeline tokens -> newest view
        self.builds = 0  # views built so far (tests and the benchmark read it)

    def busy_interval(self, last: View) -> float:
        return max(self.min_busy_interval, self.busy_factor * last.build_seconds)

    def _fresh_enough(self, last: View | None) -> bool:
        if last is None:
            return False
        if last.version == self.service.version:
            return True
        return self.service.busy and self.clock() - last.built_at < self.busy_interval(last)

    def view(self, timeline_tokens: int = plots.TIMELINE_TOKENS) -> View:
        """The view for `timeline_tokens`: the last one while it is fresh enough, else a new build
        (or the last one while another thread builds). ValueError when no engine is loaded."""
        last = self._views.get(timeline_tokens)
        if self._fresh_enough(last):
            return last
        if not self._building.acquire(blocking=last is None):
            return last  # another thread is building: the previous view now, the new one next poll
        try:
            last = self._views.get(timeline_tokens)  # built while this thread waited?
            if self._fresh_enough(last):
                return last
            version, start = self.service.version, self.clock()
            values = self._build(timeline_tokens)
            end = self.clock()
            view = View(version, timeline_tokens, values, end, end - start)
            self._views[timeline_tokens] = view
            self._views.move_to_end(timeline_tokens)
            while len(self._views) > KEEP_VIEWS:
                self._views.popitem(last=False)
            self.builds += 1
            return view
        finally:
            self._building.release()
