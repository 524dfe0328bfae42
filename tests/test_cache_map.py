"""The live cache map: where each expert is (device, loading, slow tier), checked against the routing
trace (LRU with a cache of top-k holds exactly the last token's experts) and against a load held
in flight; its figure at 8 and at 128 experts."""

import threading

import pytest
import torch
from test_plots import make_stats

from moe_runtime import GenerationSettings, OffloadConfig, load
from moe_runtime.cache import ExpertCache, Transfer
from moe_runtime.policies import LRU
from moe_runtime.stats import StatsCollector
from moe_runtime.store import RamTier, SlowTier
from webapp import plots


@pytest.mark.parametrize("offload, host_cache_gb, elsewhere", [("ram", "auto", {"ram"}), ("disk", 0, {"disk"}),
                                                              ("disk", "auto", {"host"})])
def test_after_a_reply_the_device_holds_each_layers_last_experts(tiny_dir, tmp_path, offload, host_cache_gb,
                                                                 elsewhere):
    engine = load(tiny_dir, OffloadConfig(device="cpu", offload=offload, cache_size=2, prefetch=0,
                                          host_cache_gb=host_cache_gb, store_dir=str(tmp_path / "store")))
    try:
        list(engine.chat([{"role": "user", "content": "To be"}], GenerationSettings(5, temperature=0)))
        levels, stats = engine.cache_map(), engine.stats()
    finally:
        engine.close()
    assert len(levels) == stats.num_layers and all(len(row) == stats.num_experts for row in levels)
    for layer, row in enumerate(levels):  # LRU, 2 slots, top-2: the last token's two experts
        on_device = {e for e, place in enumerate(row) if place == "device"}
        assert on_device == set(stats.trace.selected[layer][-1])
        # the rest: in RAM, on disk only, or (a host cache that holds every record read) in the host cache
        assert {place for place in row if place != "device"} <= elsewhere | ({"disk"} if "host" in elsewhere else set())
    if "host" in elsewhere:
        assert any(place == "host" for row in levels for place in row)
    last = stats.expert_last_use
    for layer in range(stats.num_layers):
        for e in stats.trace.selected[layer][-1]:
            assert last[layer][e] == stats.tokens_seen - 1 == stats.trace.num_tokens - 1
        assert sum(stats.expert_hits[layer]) == stats.hits[layer]


class HeldTier(SlowTier):
    """A RAM tier whose copies wait until `go` is set."""

    def __init__(self) -> None:
        self.inner = RamTier([torch.zeros(4, 64, dtype=torch.uint8)], 64)
        self.go = threading.Event()

    def copy_to(self, layer, expert, dst):
        assert self.go.wait(10)
        self.inner.copy_to(layer, expert, dst)

    def level_of(self, layer, expert):
        return "host" if expert == 3 else "disk"


def test_a_prefetch_in_flight_shows_as_loading_then_on_the_device():
    tier = HeldTier()
    cache = ExpertCache(0, torch.zeros(2, 64, dtype=torch.uint8), 64, LRU(), Transfer(tier, torch.device("cpu")),
                        StatsCollector(1, 4, 2, 2, 1))
    try:
        cache.prefetch([1])
        assert cache.states() == {1: "loading (prefetch)"}
        tier.go.set()
        cache.drain()
        assert cache.states() == {1: "device"}
    finally:
        tier.go.set()
        cache.transfer.close()


def test_the_figure_colours_each_place_and_says_so_on_hover():
    stats = make_stats(layers=2, experts=4)
    stats.expert_hits, stats.expert_last_use, stats.tokens_seen = [[1, 0, 0, 0], [0] * 4], [[9, None, 3, 0], [0] * 4], 10
    levels = [["device", "loading (prefetch)", "ram", "disk"], ["loading (demand)", "host", "tape", "device"]]
    heat = plots.cache_map(levels, stats).data[0]
    names = list(plots.PLACES)
    assert [list(row) for row in heat.z] == [[names.index(p) for p in ("device", "loading (prefetch)", "ram", "disk")],
                                             [names.index(p) for p in ("loading (demand)", "host", "slow tier",
                                                                       "device")]]
    assert heat.text[0][0] == "on the device" and heat.text[1][2] == "in the slow tier"
    assert [list(cell) for cell in heat.customdata[0]] == [[1, 1, 0], [2, 0, None], [3, 0, 6], [4, 0, 9]]
    assert "selections" in heat.hovertemplate and "hits" in heat.hovertemplate
    assert plots.EMPTY_HINT not in [a.text for a in plots.cache_map(levels, stats).layout.annotations]


@pytest.mark.parametrize("layers, experts", [(32, 8), (48, 128)])
def test_the_map_stays_readable_with_many_experts_and_layers(layers, experts):
    stats = make_stats(layers=3, experts=4)
    stats.num_layers, stats.num_experts = layers, experts
    stats.expert_counts = [[0] * experts for _ in range(layers)]
    levels = [["device" if e < 4 else "disk" for e in range(experts)] for _ in range(layers)]
    fig = plots.cache_map(levels, stats)
    assert fig.layout.height >= 16 * layers  # a row per layer stays tall enough to point at (the app scrolls)
    assert experts / fig.layout.xaxis.dtick <= 16  # at most 16 expert labels, whatever the count
    assert f"({4 * layers} on the device)" in fig.layout.title.text
