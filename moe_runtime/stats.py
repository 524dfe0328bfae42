"""Counters of the offloaded engine and the routing trace.

`StatsCollector` is written to by the experts modules, the cache and the prefetcher (from more than
one thread, hence the lock); `Stats` is an immutable-by-convention snapshot of plain Python values,
safe to hand to a UI, serialize or plot.

Dimension names: L layers, E experts per layer, K experts per token (top-k), N tokens seen.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

TRACE_FORMAT = "moe-routing-trace"
TRACE_VERSION = 1
MAX_SPANS = 20_000  # the timeline's ring buffer: the newest this many spans are kept
STEP_WAIT_S = 10.0  # the longest a snapshot waits for the forward pass in progress to end


@dataclass
class RoutingTrace:
    """Per token and layer, the experts the router selected (and the experts the prefetcher guessed).

    selected[L][N] is the list of K experts of token N at layer L; guess[L][N] is the ranking of
    layer L's experts predicted from layer L-1's hidden state (empty at layer 0 or without prefetch);
    phase[N] is "prefill" or "decode".
    """

    num_layers: int
    num_experts: int
    top_k: int
    model: str = ""
    selected: list[list[list[int]]] = field(default_factory=list)
    guess: list[list[list[int]]] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.selected:
            self.selected = [[] for _ in range(self.num_layers)]
        if not self.guess:
            self.guess = [[] for _ in range(self.num_layers)]

    @property
    def num_tokens(self) -> int:
        return len(self.selected[0]) if self.selected else 0

    def to_dict(self) -> dict:
        return {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "model": self.model,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "phase": self.phase,
            "selected": self.selected,
            "guess": self.guess,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read routing trace {path}: {err}") from None
        if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path} is not a routing trace (expected format {TRACE_FORMAT!r})")
        trace = cls(
            num_layers=data["num_layers"],
            num_experts=data["num_experts"],
            top_k=data["top_k"],
            model=data.get("model", ""),
            selected=data["selected"],
            guess=data.get("guess") or [],
            phase=data.get("phase", []),
        )
        if len(trace.selected) != trace.num_layers:
            raise ValueError(f"{path}: 'selected' has {len(trace.selected)} layers, expected {trace.num_layers}")
        return trace

    def decode_only(self) -> RoutingTrace:
        """The same trace restricted to decode tokens (what a chat spends most of its time on)."""
        keep = [i for i, p in enumerate(self.phase) if p == "decode"]
        return RoutingTrace(
            self.num_layers,
            self.num_experts,
            self.top_k,
            self.model,
            selected=[[layer[i] for i in keep] for layer in self.selected],
            guess=[[layer[i] for i in keep] if layer else [] for layer in self.guess],
            phase=["decode"] * len(keep),
        )


class Span(NamedTuple):
    """One interval of the load/compute timeline, in seconds (time.perf_counter; in a `Stats`
    snapshot, since the reply started).

    kind: "compute" (a MoE layer's forward, its waits included), "stall" (the layer waiting for
    `expert`: a demand load, or a prefetch still in flight), "demand" or "prefetch" (a load of
    `expert` into the layer's cache, from `level`: "ram", "disk", ...). expert is -1 for "compute".
    On CUDA a load's end is when its copy was queued on the side stream, not when it landed.
    """

    kind: str
    layer: int
    expert: int
    start: float
    end: float
    level: str = ""


@dataclass
class Counters:
    """Per-layer event counts of the expert caches, and the rates derived from them (computed here only).

    A snapshot holds totals since the last reset; `end - start` is what happened in between (a reply,
    a benchmark window), and has the same rates. Every list is indexed by layer.
    """

    selections: list[int]  # expert uses: one per distinct expert in a layer call (hits + misses)
    hits: list[int]  # selected experts already resident on the device (or being prefetched)
    misses: list[int]  # selected experts loaded on demand
    prefetch_issued: list[int]  # loads started by the speculator
    prefetch_used: list[int]  # of those, experts selected before being evicted
    guess_hits: list[int]  # selected experts that were in the speculator's top-P guess
    guess_total: list[int]  # selected experts at layers that had a guess
    bytes_moved: list[int]  # bytes of records brought to the device level (demand + prefetch; on a CPU a view, no copy)
    stall_seconds: list[float]  # time computation waited for experts
    # the levels below the device (host_cache.py); zero without a host cache (offload="ram": every
    # load comes from RAM)
    host_hits: list[int]  # device loads served from the host cache
    disk_reads: list[int]  # expert records read from disk (demand, host -> device prefetch, disk prefetch)
    disk_prefetch_reads: list[int]  # of those, read ahead by the disk -> host prefetcher
    disk_bytes: list[int]  # bytes read from disk
    write_back_bytes: list[int]  # device -> host copies of evicted experts (exclusive levels)
    guess_new_hits: list[int]  # like guess_hits, over selected experts not on the device when guessed
    guess_new_total: list[int]
    # proof that the bytes that move are the bytes that compute (goal: 0 converted anywhere but the hqq
    # fallback; 0 copied on a CPU, where the device computes from the host arena itself)
    converted_bytes: list[int]  # bytes of experts converted to another form (the hqq fallback's dequantization per use)
    level_copy_bytes: list[int]  # bytes copied into device slots from RAM (host arena, RAM tier, a staging buffer)

    @classmethod
    def of(cls, num_layers: int, **given: list) -> Counters:
        """Counters with the given lists, zeros for the rest (a source without some level)."""
        return cls(**{f.name: list(given.get(f.name, [0] * num_layers)) for f in fields(Counters)})

    @classmethod
    def zeros(cls, num_layers: int) -> Counters:
        return cls(**{f.name: [0] * num_layers for f in fields(Counters)})

    def counters(self) -> Counters:
        """Only the counters (a `Stats` snapshot carries more)."""
        return Counters(**{f.name: list(getattr(self, f.name)) for f in fields(Counters)})

    def __sub__(self, start: Counters) -> Counters:
        return Counters(**{f.name: [a - b for a, b in zip(getattr(self, f.name), getattr(start, f.name))]
                           for f in fields(Counters)})

    def total(self, name: str) -> float:
        return sum(getattr(self, name))

    def totals(self) -> dict:
        """Every counter summed over layers, plus the rates: a flat dict for reports and JSON."""
        out = {f.name: self.total(f.name) for f in fields(Counters)}
        out.update(hit_rate=self.hit_rate, prefetch_recall=self.prefetch_recall,
                   prefetch_recall_new=self.prefetch_recall_new, prefetch_precision=self.prefetch_precision)
        return out

    @property
    def hit_rate(self) -> float:
        """Hits per selected expert, all layers (0.0 before any selection)."""
        return _ratio(self.total("hits"), self.total("selections")) or 0.0

    @property
    def layer_hit_rate(self) -> list[float]:
        return [_ratio(h, s) or 0.0 for h, s in zip(self.hits, self.selections)]

    @property
    def prefetch_recall(self) -> float | None:
        """Of the experts selected at layers with a guess, the fraction the speculator had guessed
        (None without guesses: layer 0, or prefetch off and no guess recorded)."""
        return _ratio(self.total("guess_hits"), self.total("guess_total"))

    @property
    def prefetch_recall_new(self) -> float | None:
        """Recall over the selected experts that were NOT on the device when the guess was made (a
        guess of a resident expert is free and says nothing of the speculator); None without any."""
        return _ratio(self.total("guess_new_hits"), self.total("guess_new_total"))

    @property
    def layer_prefetch_recall(self) -> list[float | None]:
        return [_ratio(h, t) for h, t in zip(self.guess_hits, self.guess_total)]

    @property
    def prefetch_precision(self) -> float | None:
        """Of the experts loaded by prefetch, the fraction used before being evicted (None: no prefetch)."""
        return _ratio(self.total("prefetch_used"), self.total("prefetch_issued"))


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


@dataclass
class Stats(Counters):
    """A snapshot of the engine: the counters, plus usage per expert and decode timing.

    expert_counts[L][E]: selections of expert E at layer L; token_times: seconds since the reply's
    first token, per generated token.
    """

    num_layers: int
    num_experts: int
    top_k: int
    cache_size: int
    prefetch: int
    expert_counts: list[list[int]]
    tokens_generated: int
    decode_seconds: float
    token_times: list[float]
    trace: RoutingTrace | None = None
    trace_tokens: int = 0  # tokens in the engine's trace, also when the snapshot left the trace out
    expert_hits: list[list[int]] = field(default_factory=list)  # [L][E] uses of the expert that were hits
    expert_last_use: list[list[int | None]] = field(default_factory=list)  # [L][E] token number of its last selection
    tokens_seen: int = 0  # tokens routed since the reset (prompt and reply; the token numbers above count these)
    timeline: list[Span] = field(default_factory=list)  # the latest reply's spans, seconds since it started
    first_token_at: float | None = None  # when its first token left the model, seconds since it started

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def tokens_per_second_series(self, window: int = 4) -> list[float]:
        """Throughput over the course of a reply: tokens/s over a sliding window of token times."""
        times = self.token_times
        out = []
        for i in range(1, len(times)):
            j = max(0, i - window)
            dt = times[i] - times[j]
            out.append((i - j) / dt if dt > 0 else 0.0)
        return out

    def summary(self) -> dict:
        totals = self.totals()
        return {
            "tokens_generated": self.tokens_generated,
            "tokens_per_second": round(self.tokens_per_second, 3),
            **{k: None if v is None else round(v, 4) for k, v in totals.items()
               if k in ("hit_rate", "prefetch_recall", "prefetch_recall_new", "prefetch_precision")},
            "bytes_moved": totals["bytes_moved"],
            **{k: totals[k] for k in ("host_hits", "disk_reads", "disk_bytes", "write_back_bytes", "converted_bytes",
                                      "level_copy_bytes")},
            "stall_seconds": round(totals["stall_seconds"], 4),
        }


class StatsCollector:
    """Thread-safe counters; `snapshot()` returns a `Stats`."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, cache_size: int, prefetch: int,
                 record_trace: bool = True, model: str = "", max_trace_tokens: int = 100_000,
                 max_spans: int = MAX_SPANS) -> None:
        self.shape = (num_layers, num_experts, top_k, cache_size, prefetch)
        self.record_trace = record_trace
        self.max_trace_tokens = max_trace_tokens
        self.model = model
        self.spans: deque[Span] = deque(maxlen=max_spans)  # appended without the lock (deque.append is atomic)
        self._reply_start = time.perf_counter()
        self._lock = threading.Condition()
        self._in_step = False
        self.reset()

    def reset(self) -> None:
        n_layers, n_experts, top_k, _, _ = self.shape
        with self._lock:
            self.expert_counts = [[0] * n_experts for _ in range(n_layers)]
            self.expert_hits = [[0] * n_experts for _ in range(n_layers)]
            self.expert_last_use: list[list[int | None]] = [[None] * n_experts for _ in range(n_layers)]
            self.tokens_seen = 0
            self.counts = Counters.zeros(n_layers)
            self.spans.clear()
            self.tokens_generated = 0
            self.decode_seconds = 0.0
            self.token_times: list[float] = []
            self._last_token = None
            self.phase = "prefill"
            self.trace = RoutingTrace(n_layers, n_experts, top_k, self.model) if self.record_trace else None

    # --- written by the experts modules, cache and prefetcher -------------------------------
    def record_routing(self, layer: int, selected: list[list[int]], guess: list[list[int]] | None,
                       width: int, resident_at_guess: set[int] | None = None) -> None:
        """selected: per token, its K experts; guess: per token, the ranking predicted for this
        layer from the previous one (None at layer 0). Recall counts the top-`width` guesses; with
        `resident_at_guess` (the device's experts when the guess was made) also over the others."""
        with self._lock:
            counts, last = self.expert_counts[layer], self.expert_last_use[layer]
            if layer == 0:
                self.tokens_seen += len(selected)
            first = self.tokens_seen - len(selected)  # token number of selected[0] (from 0 since the reset)
            for i, experts in enumerate(selected):
                for e in experts:
                    counts[e] += 1
                    last[e] = first + i
            if guess is not None:
                for experts, ranking in zip(selected, guess):
                    self.counts.guess_hits[layer] += len(set(experts) & set(ranking[:width]))
                    self.counts.guess_total[layer] += len(experts)
                    if resident_at_guess is not None:
                        new = set(experts) - resident_at_guess
                        self.counts.guess_new_hits[layer] += len(new & set(ranking[:width]))
                        self.counts.guess_new_total[layer] += len(new)
            if self.trace is not None:
                if layer == 0:
                    self._trim_trace()
                    self.trace.phase.extend([self.phase] * len(selected))
                self.trace.selected[layer].extend(selected)
                self.trace.guess[layer].extend(guess if guess is not None else [[] for _ in selected])

    def _trim_trace(self) -> None:
        """Keep the newest `max_trace_tokens` tokens, so a long-running app's trace stays bounded.
        Called at layer 0, when every layer holds the same tokens; trims 10% at a time."""
        excess = len(self.trace.phase) - self.max_trace_tokens
        if excess <= self.max_trace_tokens // 10:
            return
        del self.trace.phase[:excess]
        for rows in (*self.trace.selected, *self.trace.guess):
            del rows[:excess]

    def record_access(self, layer: int, hit: bool, expert: int | None = None) -> None:
        with self._lock:
            self.counts.selections[layer] += 1
            if hit:
                self.counts.hits[layer] += 1
                if expert is not None:
                    self.expert_hits[layer][expert] += 1
            else:
                self.counts.misses[layer] += 1

    def record_load(self, layer: int, nbytes: int, prefetch: bool) -> None:
        with self._lock:
            self.counts.bytes_moved[layer] += nbytes
            if prefetch:
                self.counts.prefetch_issued[layer] += 1

    def record_prefetch_used(self, layer: int) -> None:
        with self._lock:
            self.counts.prefetch_used[layer] += 1

    def record_host_hit(self, layer: int) -> None:
        with self._lock:
            self.counts.host_hits[layer] += 1

    def record_disk_read(self, layer: int, nbytes: int, prefetch: bool = False) -> None:
        with self._lock:
            self.counts.disk_reads[layer] += 1
            self.counts.disk_bytes[layer] += nbytes
            if prefetch:
                self.counts.disk_prefetch_reads[layer] += 1

    def record_converted(self, layer: int, nbytes: int) -> None:
        with self._lock:
            self.counts.converted_bytes[layer] += nbytes

    def record_level_copy(self, layer: int, nbytes: int) -> None:
        with self._lock:
            self.counts.level_copy_bytes[layer] += nbytes

    def record_write_back(self, layer: int, nbytes: int) -> None:
        with self._lock:
            self.counts.write_back_bytes[layer] += nbytes

    def record_stall(self, layer: int, seconds: float, expert: int = -1) -> None:
        """The layer waited `seconds` (ending now) for `expert`; also a "stall" span of the timeline."""
        end = time.perf_counter()
        with self._lock:
            self.counts.stall_seconds[layer] += seconds
        self.spans.append(Span("stall", layer, expert, end - seconds, end))

    def record_span(self, kind: str, layer: int, expert: int, start: float, end: float, level: str = "") -> None:
        """One interval of the timeline (see `Span`); cheap enough for every layer and load."""
        self.spans.append(Span(kind, layer, expert, start, end, level))

    # --- written by the generation loop ------------------------------------------------------
    def begin_step(self) -> None:
        """A forward pass of the whole model starts (the prompt, or one token)."""
        with self._lock:
            self._in_step = True

    def end_step(self) -> None:
        """The forward pass ended (or failed): every layer of it is recorded."""
        with self._lock:
            self._in_step = False
            self._lock.notify_all()

    def start_generation(self) -> None:
        """A new reply starts: its prompt is prefill, and its token times start afresh."""
        with self._lock:
            self.phase = "prefill"
            self.token_times = []
            self._last_token: float | None = None
            self._reply_start = time.perf_counter()

    def mark_token(self) -> None:
        """A new token left the model. The first one ends the prefill; the gaps between later
        ones are decode time, so tokens/s is decode throughput, as the paper reports it."""
        now = time.perf_counter()
        with self._lock:
            if self._last_token is None:
                self.phase = "decode"
                self._first_token = now
            else:
                self.tokens_generated += 1
                self.decode_seconds += now - self._last_token
            self._last_token = now
            self.token_times.append(now - self._first_token)

    def tokens_per_second(self) -> float:
        """The reply in progress: tokens/s between its first token and its newest (0 before two)."""
        with self._lock:
            times = self.token_times
            elapsed = times[-1] if times else 0.0
            return (len(times) - 1) / elapsed if elapsed > 0 else 0.0

    def counters(self) -> Counters:
        """The counters now (cheap: no trace, no per-expert counts)."""
        with self._lock:
            return self.counts.counters()

    def snapshot(self, trace: bool = True) -> Stats:
        """The counters now; with `trace`, also a copy of the routing trace (the costly part)."""
        n_layers, n_experts, top_k, cache_size, prefetch = self.shape
        with self._lock:
            # between two forward passes, so every layer of a token is in or none; a step that takes
            # longer than STEP_WAIT_S (a huge model on a slow disk) gets a trace cut to the tokens
            # every layer has
            self._lock.wait_for(lambda: not self._in_step, timeout=STEP_WAIT_S)
            trace_tokens = len(self.trace.phase) if self.trace is not None else 0
            copy = None
            if trace and self.trace is not None:
                whole = min([len(self.trace.phase), *(len(rows) for rows in self.trace.selected)])
                copy = RoutingTrace(
                    n_layers, n_experts, top_k, self.model,
                    selected=[list(x[:whole]) for x in self.trace.selected],
                    guess=[list(x[:whole]) for x in self.trace.guess],
                    phase=list(self.trace.phase[:whole]),
                )
            origin = self._reply_start
            timeline = [span._replace(start=span.start - origin, end=span.end - origin)
                        for span in list(self.spans) if span.end >= origin]
            first_token = self._first_token - origin if self._last_token is not None else None
            return Stats(
                num_layers=n_layers, num_experts=n_experts, top_k=top_k,
                cache_size=cache_size, prefetch=prefetch,
                expert_counts=[list(c) for c in self.expert_counts], **vars(self.counts.counters()),
                tokens_generated=self.tokens_generated, decode_seconds=self.decode_seconds,
                token_times=list(self.token_times), trace=copy, trace_tokens=trace_tokens,
                timeline=timeline, first_token_at=first_token,
                expert_hits=[list(h) for h in self.expert_hits], tokens_seen=self.tokens_seen,
                expert_last_use=[list(u) for u in self.expert_last_use],
            )
