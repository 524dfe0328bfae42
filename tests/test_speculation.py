"""Speculation against plain references: the folded router equals the later router on the later layer's
normed input, and the disk prefetcher hands the host cache only what the device does not hold."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_runtime.speculation import DiskPrefetcher, Guess, RouterFold, Speculator, Speculators
from moe_runtime.types import RouterView

H, E, T = 16, 6, 3  # hidden size, experts, tokens


def view(seed: int, bias: bool) -> RouterView:
    gen = torch.Generator().manual_seed(seed)
    return RouterView(torch.randn(E, H, generator=gen), torch.randn(E, generator=gen) if bias else None,
                      torch.rand(H, generator=gen) + 0.5, torch.randn(H, generator=gen) if bias else None)


def test_the_fold_is_the_later_router_on_its_own_normed_input():
    for bias in (False, True):
        here, later = view(1, bias), view(2, bias)
        normed = F.layer_norm(torch.randn(T, H, generator=torch.Generator().manual_seed(3)), (H,))  # n(r) [T, H]
        zero = torch.zeros(H)
        x = normed * here.norm_weight + (here.norm_bias if bias else zero)  # this layer's MoE input
        later_input = normed * later.norm_weight + (later.norm_bias if bias else zero)  # what the later router sees
        reference = torch.softmax(F.linear(later_input, later.weight, later.bias), dim=-1)  # [T, E]
        torch.testing.assert_close(RouterFold(here, later)(x), reference, atol=1e-5, rtol=1e-5)


class DeviceCache:
    def __init__(self, resident: set[int]) -> None:
        self.held, self.asked = resident, []

    def resident(self) -> set[int]:
        return set(self.held)

    def prefetch(self, experts: list[int]) -> int:
        self.asked.append(experts)
        return len(experts)


class Host:
    def __init__(self) -> None:
        self.calls = []

    def prefetch(self, keys, on_device) -> None:
        self.calls.append((keys, on_device))


def test_the_device_guess_is_a_value_and_the_disk_prefetcher_skips_what_the_device_holds():
    here, nxt, far = view(1, False), view(2, False), view(3, False)
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(4))  # one token
    caches = [DeviceCache(set()), DeviceCache({0, 1}), DeviceCache({2})]
    host = Host()
    speculator = Speculators(Speculator(RouterFold(here, nxt), caches[1], prefetch=2),
                             DiskPrefetcher([(1, RouterFold(here, nxt)), (2, RouterFold(here, far))], host, 3, caches))
    guess = speculator(x)
    ranked = [torch.argsort(RouterFold(here, v)(x)[0], descending=True).tolist() for v in (nxt, far)]
    assert guess == Guess([ranked[0]], {0, 1})  # layer 1's ranking and what layer 1 held when guessed
    assert caches[1].asked == [ranked[0][:2]]
    keys, on_device = host.calls[-1]
    assert keys == [(1, e) for e in ranked[0][:3] if e not in {0, 1}] + [(2, e) for e in ranked[1][:3] if e != 2]
    assert on_device((1, 0)) and on_device((2, 2)) and not on_device((2, 0))
