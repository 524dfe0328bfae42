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
from dataclasses import dataclass, field
from pathlib import Path

TRACE_FORMAT = "moe-routing-trace"
TRACE_VERSION = 1


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


class CacheRates:
    """Hit rates from per-layer `hits` and `selections`: shared by engine stats and simulator results."""

    hits: list[int]
    selections: list[int]

    @property
    def hit_rate(self) -> float:
        total = sum(self.selections)
        return sum(self.hits) / total if total else 0.0

    @property
    def layer_hit_rate(self) -> list[float]:
        return [h / s if s else 0.0 for h, s in zip(self.hits, self.selections)]


@dataclass
class Stats(CacheRates):
    """A snapshot of the engine's counters. Lists are indexed by layer, then expert."""

    num_layers: int
    num_experts: int
    top_k: int
    cache_size: int
    prefetch: int
    expert_counts: list[list[int]]
    selections: list[int]
    hits: list[int]
    misses: list[int]
    prefetch_issued: list[int]
    prefetch_used: list[int]
    guess_hits: list[int]
    guess_total: list[int]
    bytes_moved: list[int]
    stall_seconds: list[float]
    tokens_generated: int
    decode_seconds: float
    token_times: list[float]
    trace: RoutingTrace | None = None
    trace_tokens: int = 0  # tokens in the engine's trace, also when the snapshot left the trace out

    @property
    def prefetch_recall(self) -> float:
        """Of the experts selected at layers 1.., the fraction the prefetcher had guessed."""
        total = sum(self.guess_total)
        return sum(self.guess_hits) / total if total else 0.0

    @property
    def layer_prefetch_recall(self) -> list[float]:
        return [h / t if t else 0.0 for h, t in zip(self.guess_hits, self.guess_total)]

    @property
    def prefetch_precision(self) -> float:
        """Of the experts loaded by prefetch, the fraction used before being evicted."""
        issued = sum(self.prefetch_issued)
        return sum(self.prefetch_used) / issued if issued else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def total_bytes_moved(self) -> int:
        return sum(self.bytes_moved)

    @property
    def total_stall_seconds(self) -> float:
        return sum(self.stall_seconds)

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
        return {
            "tokens_generated": self.tokens_generated,
            "tokens_per_second": round(self.tokens_per_second, 3),
            "hit_rate": round(self.hit_rate, 4),
            "prefetch_recall": round(self.prefetch_recall, 4),
            "prefetch_precision": round(self.prefetch_precision, 4),
            "bytes_moved": self.total_bytes_moved,
            "stall_seconds": round(self.total_stall_seconds, 4),
        }


class StatsCollector:
    """Thread-safe counters; `snapshot()` returns a `Stats`."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, cache_size: int, prefetch: int,
                 record_trace: bool = True, model: str = "", max_trace_tokens: int = 100_000) -> None:
        self.shape = (num_layers, num_experts, top_k, cache_size, prefetch)
        self.record_trace = record_trace
        self.max_trace_tokens = max_trace_tokens
        self.model = model
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        n_layers, n_experts, top_k, _, _ = self.shape
        with self._lock:
            self.expert_counts = [[0] * n_experts for _ in range(n_layers)]
            self.selections = [0] * n_layers
            self.hits = [0] * n_layers
            self.misses = [0] * n_layers
            self.prefetch_issued = [0] * n_layers
            self.prefetch_used = [0] * n_layers
            self.guess_hits = [0] * n_layers
            self.guess_total = [0] * n_layers
            self.bytes_moved = [0] * n_layers
            self.stall_seconds = [0.0] * n_layers
            self.tokens_generated = 0
            self.decode_seconds = 0.0
            self.token_times: list[float] = []
            self._last_token = None
            self.phase = "prefill"
            self.trace = RoutingTrace(n_layers, n_experts, top_k, self.model) if self.record_trace else None

    # --- written by the experts modules, cache and prefetcher -------------------------------
    def record_routing(self, layer: int, selected: list[list[int]], guess: list[list[int]] | None,
                       width: int) -> None:
        """selected: per token, its K experts; guess: per token, the ranking predicted for this
        layer from the previous one (None at layer 0). Recall counts the top-`width` guesses."""
        with self._lock:
            counts = self.expert_counts[layer]
            for experts in selected:
                for e in experts:
                    counts[e] += 1
            if guess is not None:
                for experts, ranking in zip(selected, guess):
                    self.guess_hits[layer] += len(set(experts) & set(ranking[:width]))
                    self.guess_total[layer] += len(experts)
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

    def record_access(self, layer: int, hit: bool) -> None:
        with self._lock:
            self.selections[layer] += 1
            if hit:
                self.hits[layer] += 1
            else:
                self.misses[layer] += 1

    def record_load(self, layer: int, nbytes: int, prefetch: bool) -> None:
        with self._lock:
            self.bytes_moved[layer] += nbytes
            if prefetch:
                self.prefetch_issued[layer] += 1

    def record_prefetch_used(self, layer: int) -> None:
        with self._lock:
            self.prefetch_used[layer] += 1

    def record_stall(self, layer: int, seconds: float) -> None:
        with self._lock:
            self.stall_seconds[layer] += seconds

    # --- written by the generation loop ------------------------------------------------------
    def start_generation(self) -> None:
        """A new reply starts: its prompt is prefill, and its token times start afresh."""
        with self._lock:
            self.phase = "prefill"
            self.token_times = []
            self._last_token: float | None = None

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

    def snapshot(self, trace: bool = True) -> Stats:
        """The counters now; with `trace`, also a copy of the routing trace (the costly part)."""
        n_layers, n_experts, top_k, cache_size, prefetch = self.shape
        with self._lock:
            trace_tokens = len(self.trace.phase) if self.trace is not None else 0
            copy = None
            if trace and self.trace is not None:
                copy = RoutingTrace(
                    n_layers, n_experts, top_k, self.model,
                    selected=[list(x) for x in self.trace.selected],
                    guess=[list(x) for x in self.trace.guess],
                    phase=list(self.trace.phase),
                )
            return Stats(
                num_layers=n_layers, num_experts=n_experts, top_k=top_k,
                cache_size=cache_size, prefetch=prefetch,
                expert_counts=[list(c) for c in self.expert_counts],
                selections=list(self.selections), hits=list(self.hits), misses=list(self.misses),
                prefetch_issued=list(self.prefetch_issued), prefetch_used=list(self.prefetch_used),
                guess_hits=list(self.guess_hits), guess_total=list(self.guess_total),
                bytes_moved=list(self.bytes_moved), stall_seconds=list(self.stall_seconds),
                tokens_generated=self.tokens_generated, decode_seconds=self.decode_seconds,
                token_times=list(self.token_times), trace=copy, trace_tokens=trace_tokens,
            )
