"""Replay a routing trace against expert-cache policies: the simulator's core.

Dimension names: L layers, E experts per layer, K experts per token (top-k), T tokens, C cache slots
per layer, P experts prefetched per layer (the top-P of the guess).

Per token and layer, in this order (experts.py runs a layer's experts in the same order):
  1. prefetch: the top-P guessed experts that are not resident are loaded; the guessed experts already
     resident or just prefetched are pinned, so a prefetch never evicts its own guesses (when every
     resident expert is pinned, the remaining guesses are skipped);
  2. the token's K experts run in ascending id, the resident ones (hits; a prefetched expert that is
     used is a hit: no stall) first, then each missing one is loaded (a miss). The victim is chosen
     among the resident experts this token does not need. When C < K the experts run one at a time
     and any resident expert may be evicted (this token's resident ones have already run).
Memory is bounded by the trace's real size: Belady's future is kept as one sorted list of use times
per expert that is used (O(T*K) per layer, never a (T+1) x E table), and `check_trace` refuses shapes
beyond MAX_LAYERS, MAX_EXPERTS, MAX_TOP_K and MAX_TOKENS, naming the limit.
Belady's MIN (evict the expert whose next use is farthest away) needs the future, so it lives here,
not in policies.py; with prefetch its prefetch loads use the MIN victim too. Without prefetch and with
C >= K it is the optimum, an upper bound for every policy (the tests check it against exhaustive
search). With prefetch (forced loads) or C < K (forced load order) it is a strong reference, not a bound.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import asdict, dataclass

from ..policies import POLICIES, RankedPolicy, make_policy
from ..stats import Counters, RoutingTrace
from .throughput import HardwareProfile, ModelShape, Throughput, predict_from_loads

SIM_POLICIES = (*POLICIES, "belady")
MAX_LAYERS = 1024  # a trace's shape limits (the largest MoE models have < 100 layers and <= 512 experts)
MAX_EXPERTS = 1 << 16
MAX_TOP_K = 256
MAX_TOKENS = 1_000_000


# --- cache replay ------------------------------------------------------------------------------
class Belady(RankedPolicy):
    """MIN: evict the key whose next use is farthest in the future (never used again: first)."""

    def __init__(self, uses: dict[int, list[int]]) -> None:
        super().__init__()
        self.uses = uses  # uses[e]: the tokens that select e, ascending (an expert never selected: absent)
        self.now = 0

    def _access(self, key: int) -> None:
        pass

    def _forget(self, key: int) -> None:
        pass

    def next_use(self, key: int) -> float:
        """The first token >= now that selects `key` (inf if none): a bisection, O(log uses)."""
        times = self.uses.get(key, ())
        i = bisect_left(times, self.now)
        return times[i] if i < len(times) else math.inf

    def _rank(self, key: int):
        return -self.next_use(key)


def use_times(selected: list[list[int]]) -> dict[int, list[int]]:
    """Expert -> the tokens that select it, ascending: T*K entries in all, whatever E is."""
    uses: dict[int, list[int]] = {}
    for t, experts in enumerate(selected):
        for e in experts:
            uses.setdefault(e, []).append(t)
    return uses


class _LayerCache:
    """One layer's resident set, ranked by a policy, with the counters of the replay."""

    def __init__(self, policy: RankedPolicy, size: int) -> None:
        self.policy, self.size = policy, size
        self.resident: set[int] = set()
        self.unused_prefetch: set[int] = set()
        self.hits = self.misses = self.prefetch_loads = self.prefetch_used = 0

    def _load(self, key: int, candidates: set[int]) -> bool:
        if len(self.resident) >= self.size:
            if not candidates:
                return False
            victim = self.policy.victim(sorted(candidates))  # sorted: ties break the same every run
            self.policy.evict(victim)
            self.resident.discard(victim)
            self.unused_prefetch.discard(victim)
        self.resident.add(key)
        self.policy.insert(key)
        return True

    def prefetch(self, guessed: list[int]) -> None:
        pinned = self.resident.intersection(guessed)
        for e in guessed:
            if e in self.resident:
                continue
            if not self._load(e, self.resident - pinned):
                return
            pinned.add(e)
            self.unused_prefetch.add(e)
            self.prefetch_loads += 1

    def run(self, needed: list[int]) -> None:
        needed = sorted(needed)  # the engine's dispatch order (torch.unique), resident ones first
        missing = [e for e in needed if e not in self.resident]
        for e in needed:
            if e in self.resident:
                self.hits += 1
                self.policy.access(e)
                if e in self.unused_prefetch:
                    self.unused_prefetch.discard(e)
                    self.prefetch_used += 1
        # C >= K: the token's experts stay pinned; C < K: they run one at a time, so once run any
        # of them may make room for the next.
        pinned = set(needed) if self.size >= len(needed) else set()
        for e in missing:
            self.misses += 1
            self._load(e, self.resident - pinned)
            self.policy.access(e)


@dataclass
class SimResult:
    """Counters of one replay; lists are indexed by layer. Rates come from `counters` (stats.Counters)."""

    policy: str
    cache_size: int
    prefetch: int
    num_tokens: int
    hits: list[int]
    misses: list[int]
    prefetch_loads: list[int]
    prefetch_used: list[int]
    guess_hits: list[int]
    guess_total: list[int]

    @property
    def num_layers(self) -> int:
        return len(self.hits)

    @property
    def selections(self) -> list[int]:
        return [h + m for h, m in zip(self.hits, self.misses)]

    @property
    def loads(self) -> list[int]:
        """Experts moved per layer: demand loads (misses) plus prefetch loads."""
        return [m + p for m, p in zip(self.misses, self.prefetch_loads)]

    @property
    def counters(self) -> Counters:
        return Counters.of(self.num_layers, selections=self.selections, hits=self.hits, misses=self.misses,
                           prefetch_issued=self.prefetch_loads, prefetch_used=self.prefetch_used,
                           guess_hits=self.guess_hits, guess_total=self.guess_total)

    @property
    def hit_rate(self) -> float:
        return self.counters.hit_rate

    @property
    def layer_hit_rate(self) -> list[float]:
        return self.counters.layer_hit_rate

    @property
    def prefetch_recall(self) -> float | None:
        """Fraction of selected experts (at layers with a guess) that were in the top-P guess."""
        return self.counters.prefetch_recall

    @property
    def wasted_prefetch(self) -> int:
        """Prefetch loads never used (evicted first, or still unused when the trace ends)."""
        return sum(self.prefetch_loads) - sum(self.prefetch_used)

    def per_layer_token(self, counts: list[int]) -> float:
        """Mean of a per-layer counter over layers and tokens."""
        return sum(counts) / (self.num_layers * self.num_tokens) if self.num_tokens else 0.0

    def to_dict(self, expert_bytes: int | None = None) -> dict:
        out = asdict(self)
        out.update(hit_rate=self.hit_rate, loads=sum(self.loads), prefetch_recall=self.prefetch_recall,
                   wasted_prefetch=self.wasted_prefetch)
        if expert_bytes is not None:
            out["bytes_loaded"] = sum(self.loads) * expert_bytes
        return out


def check_trace(trace: RoutingTrace) -> None:
    """Raise ValueError naming the first malformed part of a trace."""
    shape = {"num_layers": (trace.num_layers, MAX_LAYERS), "num_experts": (trace.num_experts, MAX_EXPERTS),
             "top_k": (trace.top_k, MAX_TOP_K)}
    for name, (value, most) in shape.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise ValueError(f"trace {name}={_short(value)}: expected an integer in 1..{most} (the simulator's "
                             f"limits: {MAX_LAYERS} layers, {MAX_EXPERTS} experts, top-{MAX_TOP_K}, "
                             f"{MAX_TOKENS} tokens)")
    n_experts, top_k, n_tokens = trace.num_experts, trace.top_k, trace.num_tokens
    if not isinstance(n_tokens, int) or n_tokens > MAX_TOKENS:
        raise ValueError(f"the trace has {n_tokens} tokens: the simulator replays at most {MAX_TOKENS}")
    if top_k > n_experts:
        raise ValueError(f"trace top_k={top_k} exceeds num_experts={n_experts}")
    for key in ("selected", "guess"):
        layers = getattr(trace, key)
        if not isinstance(layers, list) or len(layers) != trace.num_layers:
            raise ValueError(f"trace '{key}' must be a list of {trace.num_layers} layers")
        for i, layer in enumerate(layers):
            if key == "guess" and layer == []:
                continue  # this layer has no guess (layer 0, or a trace recorded without prefetch)
            if not isinstance(layer, list) or len(layer) != n_tokens:
                raise ValueError(f"trace {key}[{i}] must list {n_tokens} tokens, like layer 0")
            for n, experts in enumerate(layer):
                if not _are_expert_ids(experts, n_experts) or (key == "selected" and (
                        len(experts) != top_k or len(set(experts)) != top_k)):
                    want = f"{top_k} distinct expert ids" if key == "selected" else "expert ids"
                    raise ValueError(f"trace {key}[{i}][{n}]={_short(experts)}: expected {want} in 0..{n_experts - 1}")
    if trace.phase and (not isinstance(trace.phase, list) or len(trace.phase) != n_tokens
                        or not set(trace.phase) <= {"prefill", "decode"}):
        raise ValueError(f"trace 'phase' must list 'prefill' or 'decode' for each of the {n_tokens} tokens")


def _short(value) -> str:
    """A value for an error message, cut: an error never echoes a whole submitted value."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _are_expert_ids(experts, n_experts: int) -> bool:
    return isinstance(experts, list) and all(
        isinstance(e, int) and not isinstance(e, bool) and 0 <= e < n_experts for e in experts)


def simulate(trace: RoutingTrace, policy: str, cache_size: int, prefetch: int = 0) -> SimResult:
    """Replay every token of `trace` against one cache of `cache_size` experts per layer."""
    check_trace(trace)
    _check_knobs(trace, [policy], [cache_size], [prefetch])
    return _simulate(trace, policy, cache_size, prefetch)


def sweep(trace: RoutingTrace, policies, cache_sizes, prefetches) -> list[SimResult]:
    """`simulate` over a grid (policy-major order), checking the trace once."""
    check_trace(trace)
    _check_knobs(trace, policies, cache_sizes, prefetches)
    return [_simulate(trace, name, c, p) for name in policies for p in prefetches for c in cache_sizes]


def _check_knobs(trace: RoutingTrace, policies, cache_sizes, prefetches) -> None:
    n_experts = trace.num_experts
    for name in policies:
        if name not in SIM_POLICIES:
            raise ValueError(f"policy={name!r} is not allowed: use one of {', '.join(SIM_POLICIES)}")
    for c in cache_sizes:
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= n_experts:
            raise ValueError(f"cache_size={c!r} is not allowed: use 1..{n_experts} (experts per layer)")
    for p in prefetches:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= n_experts:
            raise ValueError(f"prefetch={p!r} is not allowed: use 0..{n_experts}")


def _simulate(trace: RoutingTrace, policy: str, cache_size: int, prefetch: int) -> SimResult:
    per_layer = [_replay_layer(selected, guess, policy, cache_size, prefetch, trace.num_experts)
                 for selected, guess in zip(trace.selected, trace.guess)]
    hits, misses, prefetch_loads, prefetch_used, guess_hits, guess_total = (list(c) for c in zip(*per_layer))
    return SimResult(policy, cache_size, prefetch, trace.num_tokens, hits, misses, prefetch_loads,
                     prefetch_used, guess_hits, guess_total)


def _replay_layer(selected, guess, policy: str, cache_size: int, prefetch: int, num_experts: int):
    belady = Belady(use_times(selected)) if policy == "belady" else None
    cache = _LayerCache(belady or make_policy(policy), cache_size)
    guess_hits = guess_total = 0
    for t, needed in enumerate(selected):
        guessed = list(dict.fromkeys(guess[t]))[:prefetch] if prefetch and guess else []
        if guessed:
            if belady:
                belady.now = t  # this token's own experts are still ahead
            cache.prefetch(guessed)
            guess_total += len(needed)
            guess_hits += len(set(needed).intersection(guessed))
        if belady:
            belady.now = t + 1
        cache.run(needed)
    return cache.hits, cache.misses, cache.prefetch_loads, cache.prefetch_used, guess_hits, guess_total


def predict_throughput(result: SimResult, model: ModelShape, hardware: HardwareProfile) -> Throughput:
    """Apply a replay's mean loads per layer and token to `model` on `hardware`."""
    return predict_from_loads(model, hardware, result.per_layer_token(result.misses),
                              result.per_layer_token(result.prefetch_loads))
