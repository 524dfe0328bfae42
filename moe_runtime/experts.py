"""The offloaded experts module that replaces transformers' fused experts in every MoE layer.

Pipeline of one MoE layer, as named stages (T tokens, H hidden, K experts per token, E experts):

    Router (transformers)  -> top_k_index [T, K], top_k_weights [T, K]
    Speculate              -> guess layer L+1's experts from this layer's input; prefetch them
    Dispatch               -> per expert: the tokens routed to it and their routing weights
    Fetch                  -> cache.acquire(expert): resident slot, or a load from the slow tier
    Compute                -> expert_ffn on the expert's tokens
    Combine                -> weighted scatter-add into the output [T, H]

`expert_ffn`, `dispatch` and `combine` are shared with `reference_moe`, the plain in-memory path
the tests compare against. The slow tier (store.SlowTier), the eviction policy (policies.EvictionPolicy)
and the speculator (`Speculation` below) are declared seams.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .cache import ExpertCache, Transfer
from .policies import make_policy
from .quant import ExpertCodec
from .stats import StatsCollector
from .store import DecodingTier, aligned_empty, round_up

MAX_GUESS_RECORDED = 8


def expert_ffn(x: torch.Tensor, gate, up, down, act, linear=F.linear) -> torch.Tensor:
    """SwiGLU expert: down(act(gate x) * up x). x [t, H]; gate, up [I, H]; down [H, I].
    `linear(x, w)` = x @ w.T, for whatever form the weights are in."""
    return linear(act(linear(x, gate)) * linear(x, up), down)


def dispatch(top_k_index: torch.Tensor, num_experts: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """expert -> (token_idx [t], k_pos [t]): the tokens routed to it and the position of the expert in
    each token's top-k, for the experts used at all. top_k_index [T, K]."""
    plan = {}
    for expert in torch.unique(top_k_index).tolist():
        if 0 <= expert < num_experts:
            token_idx, k_pos = torch.where(top_k_index == expert)
            plan[expert] = (token_idx, k_pos)
    return plan


def combine(out: torch.Tensor, y: torch.Tensor, token_idx: torch.Tensor, k_pos: torch.Tensor,
            top_k_weights: torch.Tensor) -> None:
    """out [T, H] += y [t, H] * w [t, 1] at rows token_idx, w = top_k_weights [T, K] at (token_idx, k_pos)."""
    out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out.dtype))


def reference_moe(hidden_states, top_k_index, top_k_weights, weights, act, linear=F.linear) -> torch.Tensor:
    """The plain path (tests, the accelerate baseline): every expert's (gate, up, down) at hand as
    `weights[e]`. hidden_states [T, H], top_k_index / top_k_weights [T, K] -> [T, H]."""
    out = torch.zeros_like(hidden_states)
    for expert, (token_idx, k_pos) in dispatch(top_k_index, len(weights)).items():
        y = expert_ffn(hidden_states[token_idx], *weights[expert], act, linear)
        combine(out, y, token_idx, k_pos, top_k_weights)
    return out


class Speculation(Protocol):
    """Guesses the next layer's experts while this layer runs, and may start loading them.

    Called with this layer's MoE input hidden_states [T, H]; afterwards `last_guess` holds, per token,
    the next layer's experts ranked most likely first (None: no guess), which the next layer records
    for the prefetch-recall statistics.
    """

    last_guess: list[list[int]] | None

    def __call__(self, hidden_states: torch.Tensor) -> None: ...


class Speculator:
    """Guesses layer L+1's experts from layer L's MoE input and starts loading them.

    Layer L's MoE input is x = r / rms(r) * w_L (r: residual stream, w_L: L's norm weight). Layer
    L+1's router would see r' / rms(r') * w_{L+1}; taking r' ~ r, that is x * (w_{L+1} / w_L), so
    the ratio is folded into the next router's weight once, and a guess is one small matmul.
    """

    def __init__(self, next_router: torch.Tensor, norm_here: torch.Tensor, norm_next: torch.Tensor,
                 next_cache: ExpertCache, prefetch: int) -> None:
        ratio = norm_next.float() / torch.where(norm_here.float().abs() < 1e-6, 1e-6, norm_here.float())
        self.weight = (next_router.float() * ratio[None, :]).to(next_router.dtype)  # [E, H]
        self.next_cache = next_cache
        self.prefetch = prefetch
        self.last_guess: list[list[int]] | None = None  # per token, ranking of L+1's experts

    def __call__(self, hidden_states: torch.Tensor) -> None:
        logits = F.linear(hidden_states.to(self.weight.dtype), self.weight)  # [T, E]
        ranking = torch.argsort(logits, dim=-1, descending=True)
        self.last_guess = ranking[:, :MAX_GUESS_RECORDED].tolist()
        if self.prefetch:
            # one token: its ranking; a prompt: experts ranked by mean routing probability
            mean_prob = torch.softmax(logits.float(), dim=-1).mean(dim=0)
            wanted = torch.argsort(mean_prob, descending=True)[: self.prefetch].tolist()
            self.next_cache.prefetch(wanted)


class OffloadedExperts(nn.Module):
    """forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]."""

    def __init__(self, layer: int, cache: ExpertCache, codec: ExpertCodec, act, stats: StatsCollector,
                 num_experts: int, top_k: int, prefetch: int) -> None:
        super().__init__()
        self.layer = layer
        self.cache = cache
        self.codec = codec
        self.act_fn = act
        self.stats = stats
        self.num_experts = num_experts
        self.top_k = top_k
        self.guess_width = prefetch or top_k
        self.speculator: Speculation | None = None  # guesses layer + 1 (set by the loader)
        self.previous_speculator: Speculation | None = None  # guessed this layer, from layer - 1

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, cache_size={self.cache.cache_size}"

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        start = time.perf_counter()
        if self.speculator is not None:
            self.speculator(hidden_states)
        self._record(top_k_index)
        plan = dispatch(top_k_index, self.num_experts)
        resident = self.cache.resident()
        # resident experts first, so that loads for the others cannot evict them before their turn;
        # when the layer's experts fit in the cache they stay pinned until the layer is done, so no
        # load of this step evicts an expert this step already used
        order = sorted(plan, key=lambda e: e not in resident)
        keep_pinned = len(plan) <= self.cache.cache_size
        out = torch.zeros_like(hidden_states)  # [T, H]
        pinned = []  # experts acquired and not yet released
        try:
            for expert in order:
                token_idx, k_pos = plan[expert]
                record = self.cache.acquire(expert)
                pinned.append(expert)
                y = expert_ffn(hidden_states[token_idx], *self.codec.decode(record), self.act_fn)  # [t, H]
                combine(out, y, token_idx, k_pos, top_k_weights)
                if not keep_pinned:
                    self.cache.release(pinned.pop())
        finally:
            for expert in pinned:
                self.cache.release(expert)
            self.stats.record_span("compute", self.layer, -1, start, time.perf_counter())
        return out

    def _record(self, top_k_index: torch.Tensor) -> None:
        selected = top_k_index.tolist()
        guess = self.previous_speculator.last_guess if self.previous_speculator is not None else None
        if guess is not None and len(guess) != len(selected):
            guess = None
        self.stats.record_routing(self.layer, selected, guess, self.guess_width)


def build_offloaded_experts(tier, codec: ExpertCodec, *, num_layers: int, num_experts: int, top_k: int,
                            cache_size: int, prefetch: int, policy: str, decoded: bool, stats: StatsCollector,
                            act_fn, device: torch.device):
    """(tier, transfer, modules): one `OffloadedExperts` per MoE layer over one slow tier, each with
    its own preallocated slot pool and cache, one `Transfer` for all. With `decoded` and a quantized
    codec the slots hold dequantized experts (`DecodingTier` wraps the tier)."""
    compute_codec = codec
    if decoded and codec.bits is not None:
        compute_codec = codec.plain()
        tier = DecodingTier(tier, codec, compute_codec)
    transfer = Transfer(tier, device, stats)
    stride = round_up(compute_codec.nbytes)
    modules = []
    for layer in range(num_layers):
        slots = aligned_empty(cache_size * stride, device).view(cache_size, stride)
        # bytes moved per load: the record as stored, whatever the slot holds
        cache = ExpertCache(layer, slots, codec.nbytes, make_policy(policy), transfer, stats)
        modules.append(OffloadedExperts(layer, cache, compute_codec, act_fn, stats, num_experts, top_k, prefetch))
    return tier, transfer, modules


def link_speculators(modules: list[OffloadedExperts], speculators: list[Speculation]) -> None:
    """speculators[i] guesses layer i + 1's experts while layer i runs."""
    for layer, speculator in enumerate(speculators):
        modules[layer].speculator = speculator
        modules[layer + 1].previous_speculator = speculator

