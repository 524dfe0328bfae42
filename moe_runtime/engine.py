"""The engine: a transformers model with offloaded experts, plus streaming generation and stats.

Generation is transformers' `generate` (KV cache, sampling, chat template); the engine adds a
streaming iterator that yields `StreamUpdate`s a UI can show directly, with tokens/s and the cache
hit rate of the reply so far.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .config import OffloadConfig
from .device import Device, device_thread
from .sampling import MAX_SEED, OwnGeneratorSampler, own_generator
from .stats import Counters, Stats, StatsCollector
from .store import round_up
from .types import MoEShape


@dataclass
class GenerationSettings:
    """Sampling settings of one reply. temperature 0 means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    max_seconds: float | None = None  # the reply ends (finish_reason "time") once it has run this long

    def validate(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or not 1 <= self.max_new_tokens <= 4096:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is not allowed: use an integer in 1..4096")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature={self.temperature!r} is not allowed: use a number in 0..5 (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is not allowed: use a number in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            shown = repr(self.seed) if len(repr(self.seed)) <= 30 else repr(self.seed)[:27] + "..."
            raise ValueError(f"seed={shown} is not allowed: use an integer in 0..2**63-1")
        if self.max_seconds is not None and (isinstance(self.max_seconds, bool)
                                             or not isinstance(self.max_seconds, (int, float))
                                             or not 0 < self.max_seconds <= 86400):
            raise ValueError(f"max_seconds={self.max_seconds!r} is not allowed: use a number of seconds in (0, 86400]")


@dataclass
class StreamUpdate:
    """The reply so far. `text` is the whole reply, not only the newest piece."""

    text: str
    new_tokens: int
    tokens_per_second: float
    hit_rate: float
    finished: bool = False
    finish_reason: str | None = None  # "length", "stop" (end of sequence), "cancelled", "time" (max_seconds)
    # or, from the app's service, "context" (the reply was clipped to the context window and filled it)
    prompt_tokens: int = 0  # tokens of the prompt the reply continues (for usage counts)


class _TimedStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that also timestamps every generated token in the stats."""

    def __init__(self, tokenizer, stats: StatsCollector, **kwargs) -> None:
        super().__init__(tokenizer, **kwargs)
        self.stats = stats
        self.count = 0

    def put(self, value) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.stats.mark_token()
            self.count += 1
        super().put(value)


class _StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once `event` is set or `deadline` (time.monotonic) has
    passed; `fired` / `timed_out` say whether it did."""

    def __init__(self, event: threading.Event, deadline: float | None = None) -> None:
        self.event = event
        self.deadline = deadline
        self.fired = False
        self.timed_out = False

    def __call__(self, input_ids, scores, **kwargs):
        self.fired = self.fired or self.event.is_set()
        self.timed_out = self.timed_out or (self.deadline is not None and time.monotonic() >= self.deadline)
        stop = self.fired or self.timed_out
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def bind_on_forward(model, dev: Device) -> None:
    """Whatever thread runs `model`'s forward runs it on `dev` (cuda:N: its kernels, Triton's included,
    and its loads); the thread's previous device is restored after."""
    previous = threading.local()

    def bind(module, args) -> None:
        previous.index = dev.current_index()
        dev.bind_thread()

    def restore(module, args, out) -> None:
        index = getattr(previous, "index", dev.index)
        if index != dev.index:
            dev.bind_device_index(index)

    model.register_forward_pre_hook(bind)
    model.register_forward_hook(restore, always_call=True)


class Engine:
    """What `moe_runtime.load` returns. `model` and `tokenizer` are plain transformers objects.
    `dev`: the Device the hierarchy's device memory goes through (device.py; None on a CPU)."""

    def __init__(self, model, tokenizer, config: OffloadConfig, shape: MoEShape, device: torch.device,
                 model_name: str, experts: list, transfer, tier, stats: StatsCollector,
                 store_path: Path | None, host_cache=None, host_plan=None, dev: Device | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.shape = shape
        self.device = device
        self.model_name = model_name
        self.experts = experts
        self.transfer = transfer
        self.tier = tier
        self.store_path = store_path
        self.host_cache = host_cache  # host_cache.HostCache between the device slots and the disk (or None)
        self.host_plan = host_plan  # host_cache.HostPlan: how the host-RAM settings were resolved
        self.dev = dev
        self._stats = stats
        self._lock = threading.Lock()
        # every forward pass (the prompt, then one per token) is a step of the stats: a snapshot is
        # taken between steps, so it holds every layer of a token or none
        model.register_forward_pre_hook(lambda module, args: stats.begin_step())
        model.register_forward_hook(lambda module, args, out: stats.end_step(), always_call=True)
        if dev is not None:
            bind_on_forward(model, dev)

    # --- statistics ---------------------------------------------------------------------------
    def stats(self, trace: bool = True) -> Stats:
        """A snapshot of the counters; `trace=False` leaves out the routing trace (a copy of every
        token's experts), for callers that poll."""
        return self._stats.snapshot(trace)

    def counters(self) -> Counters:
        """The cache counters now, without the rest of a snapshot (cheap); `end - start` is a window."""
        return self._stats.counters()

    def cache_map(self) -> list[list[str]]:
        """Where each expert is now, [L][E]: "device", "loading (demand)", "loading (prefetch)", or
        the slow tier's level of it ("ram", "disk"; a tier with more levels names them per expert)."""
        out = []
        for module in self.experts:
            states = module.cache.states()
            out.append([states.get(e) or self.tier.level_of(module.layer, e) for e in range(self.shape.num_experts)])
        return out

    def reset_stats(self) -> None:
        """Zero the counters and the trace. Waits for a reply in progress: a reset between two layers
        of one token would leave the trace's layers with different token counts."""
        with self._lock:
            self._stats.reset()

    def describe(self) -> dict:
        """Facts about the loaded engine, for UIs and benchmark reports."""
        expert_bytes = self.tier.nbytes  # one expert as stored and moved, in the device's compute form
        slot_bytes = round_up(expert_bytes)
        dense = sum(p.numel() * p.element_size() for p in self.model.parameters())
        dense += sum(b.numel() * b.element_size() for b in self.model.buffers())
        return {
            "model": self.model_name,
            "device": str(self.device),
            "dtype": str(self.experts[0].codec.dtype).replace("torch.", "") if self.experts else None,
            "layers": self.shape.num_layers,
            "experts": self.shape.num_experts,
            "top_k": self.shape.top_k,
            "expert_bytes": expert_bytes,
            "expert_form": self.experts[0].codec.form_name if self.experts else None,
            "all_experts_bytes": expert_bytes * self.shape.num_layers * self.shape.num_experts,
            "cache_bytes": slot_bytes * self.shape.num_layers * self.config.cache_size,
            "dense_bytes": dense,
            "offload": self.host_plan.offload if self.host_plan else self.config.offload,
            "levels": self._levels(slot_bytes, expert_bytes),
            "direct_io": self.tier.direct_io,
            "store": str(self.store_path) if self.store_path else None,
            **{k: v for k, v in self.config.to_dict().items() if k not in ("device", "offload", "dtype")},
        }

    def _levels(self, slot_bytes: int, expert_bytes: int) -> dict:
        """Bytes each level holds now, and its budget."""
        n = self.shape.num_layers * self.shape.num_experts
        device_held = sum(m.cache.describe()["held"] for m in self.experts) * slot_bytes
        # on a CPU the device level's slots are views of records the host (arena or RAM tier) holds
        levels = {"device": {"held_bytes": device_held,
                             "budget_bytes": slot_bytes * self.shape.num_layers * self.config.cache_size,
                             "shares_host_memory": self.tier.shares_memory}}
        host = self.host_cache
        if host is not None:
            levels["host"] = {**host.describe(), "setting_bytes": self.host_plan.budget_bytes}
            levels["disk"] = {"held_bytes": n * expert_bytes, "budget_bytes": None}
        else:
            levels["host"] = {"held_bytes": n * expert_bytes, "budget_bytes": n * expert_bytes,
                              "exclusive": False}
        return levels

    # --- generation ---------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict]) -> torch.Tensor:
        """Token ids of a chat (list of {"role", "content"}) through the model's chat template."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("each chat message must be a dict with 'role' and 'content'")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        return ids.to(self.device)

    def stream(self, input_ids: torch.Tensor, settings: GenerationSettings | None = None,
               stop: threading.Event | None = None) -> Iterator[StreamUpdate]:
        """Generate from `input_ids` [1, T], yielding the growing reply after every piece of text."""
        settings = settings or GenerationSettings()
        settings.validate()
        stop = stop or threading.Event()
        with self._lock:
            deadline = None if settings.max_seconds is None else time.monotonic() + settings.max_seconds
            self._stats.start_generation()
            streamer = _TimedStreamer(self.tokenizer, self._stats, skip_prompt=True, skip_special_tokens=True)
            stopper = _StopOnEvent(stop, deadline)
            kwargs = self._generate_kwargs(input_ids, settings, stopper, streamer)
            errors: list[BaseException] = []
            worker = (threading.Thread(target=self._generate_into, args=(kwargs, errors), daemon=True)
                      if self.dev is None  # else the generate thread binds itself to the engine's device
                      else device_thread(self.dev, self._generate_into, name="generate", args=(kwargs, errors)))
            start = self._stats.counters()
            worker.start()
            text = ""
            cancelled_here = False
            try:
                for piece in streamer:
                    text += piece
                    yield self._update(text, streamer.count, start, prompt_tokens=input_ids.shape[-1])
            except GeneratorExit:  # the consumer stopped early: end generation at the next token
                cancelled_here = True
                stop.set()
                raise
            finally:
                worker.join()
            if errors:
                raise RuntimeError(f"generation failed: {errors[0]}") from errors[0]
            cancelled = cancelled_here or stopper.fired  # not merely set after the reply had ended
            if cancelled:
                reason = "cancelled"
            elif stopper.timed_out and streamer.count < settings.max_new_tokens:
                reason = "time"
            else:
                reason = self._finish_reason(streamer.count, settings)
            yield self._update(text, streamer.count, start, finished=True, reason=reason,
                               prompt_tokens=input_ids.shape[-1])

    def chat(self, messages: list[dict], settings: GenerationSettings | None = None,
             stop: threading.Event | None = None) -> Iterator[StreamUpdate]:
        return self.stream(self.chat_prompt(messages), settings, stop)

    def _generate_kwargs(self, input_ids, settings, stopper: _StopOnEvent, streamer) -> dict:
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      max_new_tokens=settings.max_new_tokens, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([stopper]),
                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        # sampling draws from this reply's own generator (moe_runtime.sampling); generate runs greedy
        # over the drawn token, so no reply touches (or is touched by) the process-wide RNG
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if settings.temperature > 0:
            generator = own_generator(self.device, settings.seed)
            kwargs["logits_processor"] = LogitsProcessorList(
                [OwnGeneratorSampler(settings.temperature, settings.top_p, generator)])
        return kwargs

    def _generate_into(self, kwargs: dict, errors: list) -> None:
        try:
            with torch.inference_mode():
                self.model.generate(**kwargs)
        except BaseException as err:
            errors.append(err)
            kwargs["streamer"].end()

    def _update(self, text: str, count: int, start: Counters, finished=False, reason=None,
                prompt_tokens: int = 0) -> StreamUpdate:
        """The reply so far; its hit rate is over this reply's window of the counters."""
        return StreamUpdate(text, count, self._stats.tokens_per_second(), (self._stats.counters() - start).hit_rate,
                            finished, reason, prompt_tokens)

    def _finish_reason(self, count: int, settings: GenerationSettings) -> str:
        return "length" if count >= settings.max_new_tokens else "stop"

    def close(self) -> None:
        """Wait for the loads in flight; release the host arena, staging buffers and RAM records (pinned
        memory goes back to the system: `dev.pinned_bytes()` is 0 after)."""
        if self.host_cache is not None:
            self.host_cache.drain()
        self.transfer.close()
        for module in self.experts:
            module.cache.drain()
        self.tier.close()
