"""Mixtral-like synthetic routing traces, from statistics of real Mixtral-8x7B-Instruct decode routing.

The statistics (`assets/mixtral-routing-stats.json`, a copy of the project's `shared/data/` file; measured on 4 generations / 577 decode
tokens of the real model) give per layer L and expert E: the share of selections `expert_share[L][E]`,
the probability that an expert used at token t-1 is used again at t `stay_probability[L][E]`, and,
as references, the share of a token's experts also used by the previous token and LRU/LFU/Belady hit
rates at k cached experts per layer.

The generator is a per-layer Markov chain over the token's K experts:
  1. each expert of the previous token is kept with its stay probability (at most K kept);
  2. the remaining places are drawn, without replacement, from the experts not used by the previous
     token, with weights w[L][E];
  3. w starts at the measured shares and is corrected a few times (w *= target share / generated
     share, on a long calibration run) so the chain's stationary shares match the measured ones.
Nothing is fitted to the hit rates: that LRU at 4 of 8 lands near the real 0.61 is checked by
tests/test_synth.py, not built in. The trace has no speculator guesses (`guess` empty): real
guesses need the model's hidden states.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..paths import REPO_ROOT
from ..stats import RoutingTrace

STATS_FILE = "mixtral-routing-stats.json"
CALIBRATION_TOKENS = 4000
CALIBRATION_ROUNDS = 6


@dataclass(frozen=True)
class RoutingStats:
    """Per-layer routing statistics of a real model (lists indexed [layer][expert] or [layer])."""

    num_layers: int
    num_experts: int
    top_k: int
    expert_share: list[list[float]]
    stay_probability: list[list[float]]
    overlap_with_previous_token: list[float]
    reference_hit_rates: dict

    @classmethod
    def load(cls, path: str | Path | None = None) -> RoutingStats:
        path = Path(path) if path is not None else default_stats_path()
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read routing statistics {path}: {err}") from None
        try:
            stats = cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a routing-statistics file: missing {err}") from None
        for name in ("expert_share", "stay_probability"):
            rows = getattr(stats, name)
            if len(rows) != stats.num_layers or any(len(r) != stats.num_experts for r in rows):
                raise ValueError(f"{path}: {name} must be {stats.num_layers} layers x {stats.num_experts} experts")
        return stats


def default_stats_path() -> Path:
    """The copy shipped in `assets/` (from the project's shared data folder, `../shared/data/`)."""
    for candidate in (REPO_ROOT / "assets" / STATS_FILE, REPO_ROOT.parent / "shared" / "data" / STATS_FILE):
        if candidate.exists():
            return candidate
    raise ValueError(f"{STATS_FILE} not found next to the checkout (../shared/data/) or in assets/: pass --stats")


def _chain(share_weights: list[float], stay: list[float], top_k: int, num_tokens: int,
           rng: random.Random) -> list[list[int]]:
    """One layer, one generation: num_tokens rows of top_k distinct expert ids (ascending)."""
    experts = range(len(share_weights))
    rows, previous = [], []
    for _ in range(num_tokens):
        current = [e for e in previous if rng.random() < stay[e]][:top_k]
        while len(current) < top_k:
            candidates = [e for e in experts if e not in current and e not in previous]
            if not candidates:  # fewer than 2K experts: a dropped one may come back
                candidates = [e for e in experts if e not in current]
            current.append(rng.choices(candidates, [share_weights[e] for e in candidates])[0])
        rows.append(sorted(current))
        previous = current
    return rows


def _calibrated_weights(share: list[float], stay: list[float], top_k: int, rng: random.Random) -> list[float]:
    weights = list(share)
    for _ in range(CALIBRATION_ROUNDS):
        counts = [0] * len(share)
        for row in _chain(weights, stay, top_k, CALIBRATION_TOKENS, rng):
            for e in row:
                counts[e] += 1
        total = sum(counts)
        weights = [w * s / max(c / total, 1e-6) for w, s, c in zip(weights, share, counts)]
    return weights


def synthesize(stats: RoutingStats, num_tokens: int = 577, generations: int = 4, seed: int = 0) -> RoutingTrace:
    """A decode trace of `generations` independent generations of `num_tokens` tokens each (the
    statistics' own setting: 4 generations, 577 tokens in all), layer by layer from `stats`."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < generations:
        raise ValueError(f"num_tokens={num_tokens!r} is not allowed: use an integer >= generations ({generations})")
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise ValueError(f"generations={generations!r} is not allowed: use an integer >= 1")
    rng = random.Random(seed)
    lengths = [num_tokens // generations + (g < num_tokens % generations) for g in range(generations)]
    selected = []
    for layer in range(stats.num_layers):
        share, stay = stats.expert_share[layer], stats.stay_probability[layer]
        weights = _calibrated_weights(share, stay, stats.top_k, rng)
        selected.append([row for n in lengths for row in _chain(weights, stay, stats.top_k, n, rng)])
    return RoutingTrace(stats.num_layers, stats.num_experts, stats.top_k, "mixtral-8x7b-like synthetic",
                        selected=selected, phase=["decode"] * num_tokens)


def overlap_with_previous(trace: RoutingTrace) -> list[float]:
    """Per layer: the share of a token's experts also used by the previous token."""
    out = []
    for rows in trace.selected:
        pairs = list(zip(rows, rows[1:]))
        out.append(sum(len(set(a) & set(b)) for a, b in pairs) / (trace.top_k * len(pairs)) if pairs else 0.0)
    return out


def expert_shares(trace: RoutingTrace) -> list[list[float]]:
    """Per layer and expert: the share of that layer's selections."""
    out = []
    for rows in trace.selected:
        counts = [0] * trace.num_experts
        for row in rows:
            for e in row:
                counts[e] += 1
        total = sum(counts) or 1
        out.append([c / total for c in counts])
    return out
