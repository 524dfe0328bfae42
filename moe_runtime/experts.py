"""The offloaded experts module that replaces transformers' fused experts in every MoE layer.

Pipeline of one MoE layer, as named stages (T tokens, H hidden, K experts per token, E experts,
S = T*K assignments):

    Router (transformers)  -> top_k_index [T, K], top_k_weights [T, K]
    Speculate              -> guess layer L+1's experts from this layer's input; prefetch them
    Dispatch               -> one sort of the S assignments by expert: each expert's tokens and
                              routing weights are a span of it (the layer's one host sync: the counts)
    Fetch                  -> cache.acquire(expert): a resident slot, or a load from the slow tier (one
                              copy, or on a CPU a view of the record where it lies); records are in
                              the device's compute form already (kernels.forms): nothing converts
    Compute                -> the family's expert function (the adapter's `fn(x, ExpertWeights, linear)`,
                              SwiGLU for most) on the expert's tokens through kernels.linear (fused
                              low-bit kernels for quantized slots)
    Combine                -> one weighted scatter-add of all experts' outputs into out [T, H]

`dispatch` and `combine` are shared with `reference_moe`, the plain in-memory path the tests compare
against. The slow tier (store.SlowTier), the eviction policy (policies.EvictionPolicy) and the
speculator (speculation.Speculation: returns the `Guess` the next layer receives) are declared seams.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .cache import ExpertCache, Transfer
from .device import Device, device_guard
from .kernels import linear
from .policies import make_policy
from .quant import ExpertCodec
from .speculation import Guess, Speculation
from .stats import StatsCollector
from .store import SlowTier, aligned_empty, round_up
from .types import dense_linear


@dataclass
class DispatchPlan:
    """The S = T*K assignments sorted by expert: rows `spans[e]` of token_idx / k_pos are expert e's."""

    token_idx: torch.Tensor  # [S] the token of each assignment, grouped by expert
    k_pos: torch.Tensor  # [S] its position in the token's top-k
    spans: dict[int, slice]  # expert -> its rows, for the experts used at all (ascending)

    def __getitem__(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.spans[expert]
        return self.token_idx[rows], self.k_pos[rows]

    def __iter__(self):
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)

    def items(self):
        """(expert, (token_idx, k_pos)) for the experts used, ascending."""
        return ((expert, self[expert]) for expert in self.spans)

    def rows(self, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """token_idx, k_pos of `experts`' assignments, concatenated in that order."""
        if list(experts) == list(self.spans):  # already in this order: no gather
            used = slice(0, max((s.stop for s in self.spans.values()), default=0))
            return self.token_idx[used], self.k_pos[used]
        return (torch.cat([self.token_idx[self.spans[e]] for e in experts]),
                torch.cat([self.k_pos[self.spans[e]] for e in experts]))


def dispatch(top_k_index: torch.Tensor, num_experts: int) -> DispatchPlan:
    """One stable sort of the assignments by expert; experts outside 0..E-1 are dropped."""
    _, k = top_k_index.shape
    flat = top_k_index.reshape(-1)  # [S]
    keyed = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # dropped ones sort last
    order = torch.argsort(keyed, stable=True)  # [S]
    counts = torch.bincount(keyed, minlength=num_experts + 1).tolist()  # the one host sync
    spans, start = {}, 0
    for expert, count in enumerate(counts[:num_experts]):
        if count:
            spans[expert] = slice(start, start + count)
        start += count
    return DispatchPlan(order // k, order % k, spans)


def combine(out: torch.Tensor, y: torch.Tensor, token_idx: torch.Tensor, k_pos: torch.Tensor,
            top_k_weights: torch.Tensor) -> None:
    """out [T, H] += y [t, H] * w [t, 1] at rows token_idx, w = top_k_weights [T, K] at (token_idx, k_pos)."""
    out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out.dtype))


def reference_moe(hidden_states, top_k_index, top_k_weights, weights, expert_fn, linear=dense_linear) -> torch.Tensor:
    """The plain path (tests, the accelerate baseline): every expert's `ExpertWeights` at hand as
    `weights[e]`, run by `expert_fn(x, weights[e], linear)`. hidden_states [T, H], top_k_index /
    top_k_weights [T, K] -> [T, H]."""
    out = torch.zeros_like(hidden_states)
    for expert, (token_idx, k_pos) in dispatch(top_k_index, len(weights)).items():
        y = expert_fn(hidden_states[token_idx], weights[expert], linear)
        combine(out, y, token_idx, k_pos, top_k_weights)
    return out


class OffloadedExperts(nn.Module):
    """forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]."""

    def __init__(self, layer: int, cache: ExpertCache, codec: ExpertCodec, expert_fn, stats: StatsCollector,
                 num_experts: int, top_k: int, prefetch: int) -> None:
        super().__init__()
        self.layer = layer
        self.cache = cache
        self.codec = codec  # the record's layout, in the device's compute form: codec.weights(slot) are views
        self.expert_fn = expert_fn  # the family's: fn(x [t, H], ExpertWeights, linear) -> [t, H]
        self.stats = stats
        self.num_experts = num_experts
        self.top_k = top_k
        self.guess_width = prefetch or top_k
        self.speculator: Speculation | None = None  # guesses layer + 1 (link_speculators)
        self.send_guess: Callable[[Guess | None], None] | None = None  # hands the guess to layer + 1
        self.guess: Guess | None = None  # this layer's experts as layer - 1 guessed them this step

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, cache_size={self.cache.cache_size}"

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        start = time.perf_counter()
        if self.speculator is not None:
            self.send_guess(self.speculator(hidden_states))
        routing = top_k_index.cpu()  # [T, K]: the layer's one host sync (stats and dispatch read it)
        self._record(routing)
        plan = dispatch(routing, self.num_experts)
        if plan.token_idx.device != hidden_states.device:
            plan.token_idx = plan.token_idx.to(hidden_states.device, non_blocking=True)
            plan.k_pos = plan.k_pos.to(hidden_states.device, non_blocking=True)
        resident = self.cache.resident()
        # resident experts first, so that loads for the others cannot evict them before their turn;
        # when the layer's experts fit in the cache they stay pinned until the layer is done, so no
        # load of this step evicts an expert this step already used
        order = sorted(plan, key=lambda e: e not in resident)
        keep_pinned = len(plan) <= self.cache.cache_size
        ys = []  # per expert in `order`: y [t_e, H]
        pinned = []  # experts acquired and not yet released
        try:
            for expert in order:
                token_idx, _ = plan[expert]
                slot = self.cache.acquire(expert)
                pinned.append(expert)
                ys.append(self.expert_fn(hidden_states[token_idx], self.codec.weights(slot), linear))  # [t, H]
                if self.codec.converted_bytes_per_use:  # the hqq fallback dequantizes on every use
                    self.stats.record_converted(self.layer, self.codec.converted_bytes_per_use)
                if not keep_pinned:
                    self.cache.release(pinned.pop())
        finally:
            for expert in pinned:
                self.cache.release(expert)
        out = torch.zeros_like(hidden_states)
        if ys:
            token_idx, k_pos = plan.rows(order)
            combine(out, torch.cat(ys), token_idx, k_pos, top_k_weights)
        self.stats.record_span("compute", self.layer, -1, start, time.perf_counter())
        return out

    def receive_guess(self, guess: Guess | None) -> None:
        self.guess = guess

    def _record(self, top_k_index: torch.Tensor) -> None:
        selected = top_k_index.tolist()
        guess = self.guess if self.guess is not None and len(self.guess.ranking) == len(selected) else None
        ranking, resident = (guess.ranking, guess.resident) if guess is not None else (None, None)
        self.stats.record_routing(self.layer, selected, ranking, self.guess_width, resident)


def build_offloaded_experts(tier: SlowTier, codec: ExpertCodec, *, num_layers: int, num_experts: int, top_k: int,
                            cache_size: int, prefetch: int, policy: str, stats: StatsCollector,
                            expert_fn, device: torch.device, dev: Device | None = None):
    """(transfer, modules): one `OffloadedExperts` per MoE layer over one slow tier, each with
    its own cache of `cache_size` slots, one `Transfer` for all. Where the tier shares its memory with
    the device (CPU) a slot is a view of the record where the tier holds it; otherwise the slots are a
    pool preallocated on the device (`dev.empty`; `dev`: the engine's Device, None on a CPU), each
    holding one record as stored (the device's compute form)."""
    transfer = Transfer(tier, device, stats, dev)
    stride = round_up(codec.nbytes)
    modules = []
    for layer in range(num_layers):
        if tier.shares_memory:
            slots = None
        elif dev is None:
            slots = aligned_empty(cache_size * stride, device).view(cache_size, stride)
        else:
            with device_guard(dev):
                slots = dev.empty(cache_size * stride).view(cache_size, stride)
        cache = ExpertCache(layer, slots, codec.nbytes, make_policy(policy), transfer, stats, cache_size=cache_size)
        modules.append(OffloadedExperts(layer, cache, codec, expert_fn, stats, num_experts, top_k, prefetch))
    return transfer, modules


def link_speculators(modules: list[OffloadedExperts], speculators: list[Speculation]) -> None:
    """speculators[i] guesses layer i + 1's experts while layer i runs; layer i + 1 receives the guess."""
    for layer, speculator in enumerate(speculators):
        modules[layer].speculator = speculator
        modules[layer].send_guess = modules[layer + 1].receive_guess
