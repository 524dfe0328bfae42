"""EngineService reloads (issue 17, item 2): an engine holding a host-RAM arena is closed before
the next one is planned and loaded (the planner sees the RAM the arena held), and loaded back when
the next one fails. Fake engines: what is checked is the order of close and load."""

from __future__ import annotations

import pytest
import torch

from moe_runtime import OffloadConfig
from webapp.service import EngineService

RAM = {"free": 10}  # GB the fake machine has free


class FakeEngine:
    def __init__(self, name: str, arena_gb: int) -> None:
        self.name, self.arena_gb, self.closed = name, arena_gb, False
        self.device = torch.device("cpu")
        self.host_cache = object() if arena_gb else None
        RAM["free"] -= arena_gb

    def close(self) -> None:
        self.closed = True
        RAM["free"] += self.arena_gb


def loader(calls: list, fail: set = frozenset()):
    def load(model, config: OffloadConfig):
        calls.append((model, RAM["free"]))  # what a host-memory plan would see now
        if model in fail:
            raise RuntimeError(f"{model} is broken")
        return FakeEngine(model, arena_gb=6 if config.offload == "disk" else 0)
    return load


def _serving_a(offload: str, fail: set = frozenset(), calls: list | None = None, **kw):
    """An EngineService serving fake model "a" (it may reload "b"), and its engine."""
    service = EngineService("a", OffloadConfig(offload=offload), loader=loader([] if calls is None else calls, fail),
                            **kw)
    service.policy.known_models = ("a", "b")
    return service, service.start()


@pytest.fixture(autouse=True)
def _machine():
    RAM["free"] = 10


def test_a_reload_frees_the_old_arena_before_planning_the_new_one(tmp_path):
    calls = []
    service, old = _serving_a("disk", calls=calls, allow_local_paths=True)
    assert RAM["free"] == 4
    new = service.reload("b", OffloadConfig(offload="disk"))
    assert old.closed and not new.closed and service.engine is new
    assert calls[-1] == ("b", 10)  # the new engine was planned with the old arena already freed
    assert RAM["free"] == 4


def test_when_the_new_engine_fails_the_old_one_is_loaded_back(tmp_path):
    service, old = _serving_a("disk", fail={"b"})
    with pytest.raises(ValueError, match="could not load b .*closed first.*The previous engine was loaded back"):
        service.reload("b", OffloadConfig(offload="disk"))
    assert old.closed and service.engine is not old and service.engine.name == "a" and service.model == "a"
    assert RAM["free"] == 4


def test_an_engine_without_a_host_arena_keeps_serving_while_the_next_loads(tmp_path):
    service, old = _serving_a("ram", fail={"b"})
    with pytest.raises(ValueError, match="could not load b"):
        service.reload("b", OffloadConfig(offload="ram"))
    assert service.engine is old and not old.closed  # loaded beside it, never closed
