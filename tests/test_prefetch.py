"""Speculative prefetch: loads really start ahead of use, and a wrong guess changes no output."""

import threading
import time

import torch
from transformers import AutoModelForCausalLM

from moe_runtime import OffloadConfig, load
from moe_runtime.cache import PREFETCH_THREAD
from moe_runtime.store import SlowTier as Tier


class SlowTier(Tier):
    """Wraps the engine's tier: every load (a copy, or on a CPU an attach) takes `delay` seconds and is
    logged with its thread."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.nbytes, self.shares_memory = inner.nbytes, inner.shares_memory
        self.log: list[tuple[int, int, str, float]] = []
        self.lock = threading.Lock()

    def _slow(self, layer, expert):
        with self.lock:
            self.log.append((layer, expert, threading.current_thread().name, time.perf_counter()))
        time.sleep(self.delay)

    def copy_to(self, layer, expert, dst):
        self._slow(layer, expert)
        self.inner.copy_to(layer, expert, dst)

    def attach(self, layer, expert):
        self._slow(layer, expert)
        return self.inner.attach(layer, expert)

    def detach(self, layer, expert):
        self.inner.detach(layer, expert)


def _slow_engine(path, tmp_path, prefetch, delay=0.03):
    engine = load(path, OffloadConfig(device="cpu", offload="disk", cache_size=2, prefetch=prefetch,
                                      store_dir=str(tmp_path)))
    slow = SlowTier(engine.transfer.tier, delay)
    engine.transfer.tier = slow
    starts: dict[int, list[float]] = {}
    for module in engine.experts:
        module.register_forward_pre_hook(
            lambda m, args: starts.setdefault(m.layer, []).append(time.perf_counter()))
    return engine, slow, starts


def test_prefetch_loads_start_before_the_layer_runs(tiny_dir, tmp_path):
    engine, slow, starts = _slow_engine(tiny_dir, tmp_path, prefetch=2)
    try:
        ids = engine.tokenizer("To be, or not", return_tensors="pt")["input_ids"]
        engine.model.generate(ids, max_new_tokens=4, do_sample=False)
        ahead = [(layer, t) for layer, _, thread, t in slow.log if thread.startswith(PREFETCH_THREAD)]
        assert ahead, "no prefetch load was issued"
        # a prefetch for layer L+1 is issued during layer L, i.e. before layer L+1's experts start
        early = 0
        for layer, t in ahead:
            later_starts = [s for s in starts[layer] if s > t]
            early += bool(later_starts) and (later_starts[0] - t) > 0
        assert early >= len(ahead) // 2
        stats = engine.stats()
        assert sum(stats.prefetch_issued) == len(ahead)
        assert sum(stats.prefetch_used) > 0
    finally:
        engine.close()


def test_wrong_guesses_change_no_output(tiny_dir, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    engine = load(tiny_dir, OffloadConfig(device="cpu", offload="ram", cache_size=1, prefetch=2,
                                          store_dir=str(tmp_path)))
    try:
        for module in engine.experts:
            if module.speculator is not None:
                module.speculator.fold.weight.neg_()  # now it guesses the least likely experts
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 7))
        with torch.no_grad():
            torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        ours = engine.model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(ours, reference.generate(ids, max_new_tokens=8, do_sample=False))
        stats = engine.stats()
        assert sum(stats.prefetch_issued) > 0
        assert stats.prefetch_recall < 0.5
    finally:
        engine.close()


def test_prefetch_on_the_real_guess_has_useful_recall(tiny_dir, tmp_path):
    engine = load(tiny_dir, OffloadConfig(device="cpu", cache_size=2, prefetch=2, store_dir=str(tmp_path)))
    try:
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 5))
        engine.model.generate(ids, max_new_tokens=12, do_sample=False)
        stats = engine.stats()
        assert sum(stats.guess_total) > 0 and stats.guess_total[0] == 0  # no guess for layer 0
        assert stats.prefetch_recall > 0.5  # 2 of 4 experts would be 0.5 by chance
    finally:
        engine.close()
