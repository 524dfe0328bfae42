"""Speculation: guessing the experts of the layers ahead from this layer's MoE input, and loading them early.

While MoE layer L runs, its input already says much of what the next routers will choose. Two users:

- the device speculator (`Speculator`): guesses layer L+1 and prefetches its likeliest experts into
  L+1's device cache; its `Guess` goes to layer L+1, which records it (prefetch recall);
- the disk prefetcher (`DiskPrefetcher`): guesses layers L+1..L+n and hands the records not on the
  device to the host cache's I/O thread (disk -> host RAM), nearest layer first.

Both fold a later layer's router into one small matmul on L's input (`RouterFold`), and both are
built by one factory, `build_speculators`, from the adapter's router views. What is on the device is
asked of the device caches, passed in.

Dimensions: T tokens, H hidden size, E experts of a layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from .types import RouterView, softmax_scores

MAX_GUESS_RECORDED = 8  # experts per token a guess keeps (what the recall statistics can read)


class Guess(NamedTuple):
    """A layer's experts as the layer before it guessed them: `ranking` per token, most likely first
    (at most MAX_GUESS_RECORDED); `resident`: that layer's experts on the device when guessed (None:
    not known)."""

    ranking: list[list[int]]
    resident: set[int] | None = None


class Speculation(Protocol):
    """Called with layer L's MoE input hidden_states [T, H] while L runs; may start loading experts of
    later layers; returns the guess of layer L+1 that L+1 receives (None: no guess)."""

    def __call__(self, hidden_states: torch.Tensor) -> Guess | None: ...


class Resident(Protocol):
    """What a device cache says about itself: the experts it holds now."""

    def resident(self) -> set[int]: ...

    def prefetch(self, experts: list[int]) -> int: ...


class RouterFold:
    """A later layer's router applied to this layer's MoE input: [T, H] -> [T, E] scores.

    Layer L's MoE input is x = n(r) * w_L + b_L (r: residual stream, n: RMS or layer normalization,
    w_L, b_L: L's norm weight and bias, b = 0 for RMSNorm). Layer j's router would see
    n(r') * w_j + b_j; taking r' ~ r, that is (x - b_L) * ratio + b_j with ratio = w_j / w_L, so the
    ratio and the biases are folded into j's router weight and bias once, and a guess is one small
    matmul. `scores` (the adapter's) turns the router's logits into scores that rank experts as the
    family's router does.
    """

    def __init__(self, here: RouterView, target: RouterView, scores=softmax_scores) -> None:
        router, norm_here, norm_next = (t.detach() for t in (target.weight, here.norm_weight, target.norm_weight))
        ratio = norm_next.float() / torch.where(norm_here.float().abs() < 1e-6, 1e-6, norm_here.float())
        self.weight = (router.float() * ratio[None, :]).to(router.dtype)  # [E, H]
        shift = torch.zeros_like(ratio)  # [H]: what the norms' biases add to the router's input
        if target.norm_bias is not None:
            shift += target.norm_bias.detach().float()
        if here.norm_bias is not None:
            shift -= here.norm_bias.detach().float() * ratio
        bias = router.float() @ shift  # [E]
        if target.bias is not None:
            bias += target.bias.detach().float()
        has_bias = target.bias is not None or here.norm_bias is not None or target.norm_bias is not None
        self.bias = bias.to(router.dtype) if has_bias else None
        self.scores = scores

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states.to(self.weight.dtype), self.weight, self.bias)  # [T, E]
        return self.scores(logits).float()  # [T, E]


class Speculator:
    """Guesses layer L+1's experts from layer L's MoE input and prefetches the `prefetch` likeliest
    into L+1's device cache: one token's ranking, or for a prompt the experts ranked by mean score."""

    def __init__(self, fold: RouterFold, next_cache: Resident, prefetch: int) -> None:
        self.fold, self.next_cache, self.prefetch = fold, next_cache, prefetch

    def __call__(self, hidden_states: torch.Tensor) -> Guess:
        scores = self.fold(hidden_states)  # [T, E]
        ranking = torch.argsort(scores, dim=-1, descending=True)  # [T, E]
        guess = Guess(ranking[:, :MAX_GUESS_RECORDED].tolist(), self.next_cache.resident())
        if self.prefetch:
            wanted = torch.argsort(scores.mean(dim=0), descending=True)[: self.prefetch].tolist()
            self.next_cache.prefetch(wanted)
        return guess


class HostPrefetch(Protocol):
    """The host cache's disk -> host prefetch (host_cache.HostCache.prefetch)."""

    def prefetch(self, keys: list[tuple[int, int]], on_device: Callable[[tuple[int, int]], bool]) -> None: ...


class DiskPrefetcher:
    """At layer L, guesses the experts of layers L+1..L+n (`far`: (layer j, j's router folded onto L's
    input)) and hands the ones not on the device to the host cache, nearest layer first, then most often
    ranked among a token's first `per_layer`. Returns no guess: the next layer records the device's."""

    def __init__(self, far: list[tuple[int, RouterFold]], host: HostPrefetch, per_layer: int,
                 device_caches: Sequence[Resident]) -> None:
        self.far, self.host, self.per_layer, self.device_caches = far, host, per_layer, device_caches

    def on_device(self, key: tuple[int, int]) -> bool:
        layer, expert = key
        return expert in self.device_caches[layer].resident()

    def __call__(self, hidden_states: torch.Tensor) -> None:
        keys = []
        for target, fold in self.far:
            ranking = torch.argsort(fold(hidden_states), dim=-1, descending=True)  # [T, E]
            resident = self.device_caches[target].resident()
            votes: dict[int, int] = {}
            for row in ranking[:, :MAX_GUESS_RECORDED].tolist():  # each token's first per_layer
                for e in row[: self.per_layer]:
                    votes[e] = votes.get(e, 0) + 1
            ranked = sorted(votes, key=lambda e: -votes[e])[: self.per_layer]
            keys += [(target, e) for e in ranked if e not in resident]
        self.host.prefetch(keys, self.on_device)
        return None


class Speculators:
    """Several speculators called in turn at one layer; the guess is the first one's (the device's)."""

    def __init__(self, first: Speculation, *others: Speculation) -> None:
        self.first, self.others = first, others

    def __call__(self, hidden_states: torch.Tensor) -> Guess | None:
        guess = self.first(hidden_states)
        for speculator in self.others:
            speculator(hidden_states)
        return guess


def build_speculators(adapter, hf_config, moe_layers: list, device_caches: Sequence[Resident], prefetch: int,
                      host: HostPrefetch | None = None, ahead: int = 0, per_layer: int = 0) -> list[Speculation]:
    """speculators[i] runs at MoE layer i and guesses layer i + 1 (for i < n - 1), from the adapter's
    router views and scores (`router_view`, `guess_scores`) of the decoder layers `moe_layers`.
    `device_caches[i]`: MoE layer i's device cache. With a host cache and `ahead` > 0, each layer also
    prefetches layers i+1..i+ahead from disk to host RAM (`per_layer` experts each)."""
    views = [adapter.router_view(layer) for layer in moe_layers]

    def fold(i: int, j: int) -> RouterFold:
        return RouterFold(views[i], views[j], adapter.guess_scores(hf_config, moe_layers[j]))

    speculators: list[Speculation] = []
    for i in range(len(views) - 1):
        device = Speculator(fold(i, i + 1), device_caches[i + 1], prefetch)
        if host is None or not ahead:
            speculators.append(device)
            continue
        far = [(j, fold(i, j)) for j in range(i + 1, min(len(views), i + 1 + ahead))]
        speculators.append(Speculators(device, DiskPrefetcher(far, host, per_layer, device_caches)))
    return speculators
