"""One engine per process, shared by every user of a UI or server, and swapped safely.

`EngineService` owns the engine's lifecycle: the first load, reloads with new settings (the running
engine keeps serving when the new settings or model fail), serialized replies, stats and the routing
trace. `ModelPolicy` decides which models a remote user may load: the embedded model, the model the
operator started with and a list of known hub ids, and arbitrary local folders only when the operator
allows it. `Operator` decides who may change the shared engine: on a public host only whoever has
the operator token. Nothing here imports a UI library.
"""

from __future__ import annotations

import gc
import hmac
import itertools
import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moe_runtime.arch import ADAPTERS
from moe_runtime.config import OffloadConfig
from moe_runtime.engine import Engine, GenerationSettings, StreamUpdate
from moe_runtime.loading import load
from moe_runtime.paths import EMBEDDED_MODEL_DIR, REPO_ROOT
from moe_runtime.sim.throughput import ModelShape
from moe_runtime.stats import RoutingTrace, Stats
from webapp.limits import (
    MAX_CONTENT_PARTS,
    MAX_HISTORY_BYTES,
    MAX_HISTORY_MESSAGES,
    MAX_MESSAGE_BYTES,
    MAX_SYSTEM_PROMPT_BYTES,
    check_text,
    text_bytes,
)
from webapp.whatif import served_shape

EMBEDDED_MODEL = str(EMBEDDED_MODEL_DIR.relative_to(REPO_ROOT))  # the name users see and pick
# hub checkpoints of every supported family (each adapter lists its own), Mixtral first
KNOWN_MODELS = tuple(hub_id for adapter in ADAPTERS.values() for hub_id in adapter.hub_ids)
ROLES = ("user", "assistant")
KEEP_TRACES = 8
TRACE_EVERY_SECONDS = 30.0  # at most one new trace file per this many seconds (the disk stays bounded)
REQUEST_SECONDS = 300.0  # one reply's deadline, counted from its arrival (waiting for the engine included)
MAX_TRACE_TOKENS = 20_000  # a trace download holds at most the newest this many tokens (~2-4 MB of JSON)


def device_choices() -> list[str]:
    """Devices a UI can offer; "cuda" is listed even without a GPU so choosing it explains why not."""
    count = torch.cuda.device_count()
    return ["auto", "cpu", "cuda", *(f"cuda:{i}" for i in range(count) if count > 1)]


def model_location(name: str) -> str:
    """What `load` gets for a model name: the embedded model's folder inside this checkout (wherever
    the process was started from); any other name as given."""
    return str(EMBEDDED_MODEL_DIR) if name == EMBEDDED_MODEL else name


@dataclass
class ModelPolicy:
    """Which model names a (possibly remote) user may load."""

    startup_model: str = EMBEDDED_MODEL
    allow_local_paths: bool = False
    known_models: tuple[str, ...] = KNOWN_MODELS

    @property
    def choices(self) -> list[str]:
        return list(dict.fromkeys([EMBEDDED_MODEL, self.startup_model, *self.known_models]))

    def check(self, name) -> str:
        """The name to load, or ValueError saying what is allowed."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("model is empty: pick a model from the list")
        name = name.strip()
        if name in self.choices:
            return name
        if self.allow_local_paths:
            try:
                path = Path(name).expanduser()
            except RuntimeError:  # "~nosuchuser/..."
                raise ValueError(f"model {name!r} is not allowed: its home folder does not exist") from None
            if path.is_dir():
                return str(path.resolve())
            raise ValueError(f"model {name!r} is not allowed: it is not a local folder, nor one of "
                             f"{', '.join(self.choices)}")
        raise ValueError(f"model {name!r} is not allowed: use one of {', '.join(self.choices)} "
                         "(local folders only when the app is started with --allow-local-paths)")


@dataclass(frozen=True)
class Operator:
    """Who may change the engine everyone shares (settings and model reloads, hub downloads, stats
    reset). A local launch (127.0.0.1, not shared) is the operator's own: everyone may. On a public
    host only a caller with `token` may, and nobody when no token is configured."""

    public: bool = False
    token: str | None = None

    def allows(self, token) -> bool:
        if not self.public:
            return True
        if not self.token or not isinstance(token, str):
            return False
        return hmac.compare_digest(token.encode(), self.token.encode())

    def check(self, token, what: str) -> None:
        if not self.allows(token):
            how = "give the operator token" if self.token else \
                "this host was started without an operator token (MOE_OPERATOR_TOKEN), so nobody can"
            raise ValueError(f"{what} is for the operator of this public host: {how}")


def message_text(content) -> str:
    """The text of a chat message's content: a string, a {"text": ...} part, or Gradio's list of
    such parts (one level: parts are strings or {"type": "text", "text"} dicts; others are skipped)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return content["text"]
    if isinstance(content, (list, tuple)):
        if len(content) > MAX_CONTENT_PARTS:
            raise ValueError(f"a chat message has {len(content)} content parts: at most {MAX_CONTENT_PARTS}")
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif not isinstance(part, dict) or "text" in part:
                raise ValueError("chat message content parts must be text or {'type': 'text', 'text': ...}, "
                                 f"not {type(part).__name__}")
        return "".join(texts)
    raise ValueError(f"chat message content must be text, not {type(content).__name__}")


def build_messages(message: str, history: list | None = None, system_prompt: str | None = None) -> list[dict]:
    """Chat messages for the model: optional system prompt, the history (only role and content
    are kept, so a UI may store extra keys), then the new user message. ValueError on bad input,
    sizes included (webapp.limits: checked here, before anything is tokenized)."""
    if not isinstance(message, str):
        raise ValueError(f"the message must be text, not {type(message).__name__}")
    check_text("the message", message, MAX_MESSAGE_BYTES)
    check_text("the system prompt", system_prompt, MAX_SYSTEM_PROMPT_BYTES)
    if not message.strip():
        raise ValueError("the message is empty: type something to send")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError(f"system_prompt must be text, not {type(system_prompt).__name__}")
    if history is None:
        history = []
    if not isinstance(history, (list, tuple)):
        raise ValueError("history must be a list of {'role', 'content'} messages")
    if len(history) > MAX_HISTORY_MESSAGES:
        raise ValueError(f"the history has {len(history)} messages: at most {MAX_HISTORY_MESSAGES} (clear the chat)")
    history_bytes = 0
    messages = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for index, item in enumerate(history):
        if not isinstance(item, dict) or item.get("role") not in ROLES or "content" not in item:
            raise ValueError(f"history[{index}] must be a dict with role 'user' or 'assistant' and content")
        text = message_text(item["content"])
        check_text(f"history[{index}]", text, MAX_MESSAGE_BYTES)
        history_bytes += text_bytes(text, MAX_MESSAGE_BYTES)
        if history_bytes > MAX_HISTORY_BYTES:
            raise ValueError(f"the history is too long: at most {MAX_HISTORY_BYTES >> 10} KiB in all (clear the chat)")
        messages.append({"role": item["role"], "content": text})
    messages.append({"role": "user", "content": message})
    return messages


class EngineService:
    """The process's engine, its settings, and the lock that serializes replies and reloads.

    A reply holds the lock while it streams, so a reload waits for it and never pulls the engine
    from under it. Reloads load the new engine next to the old one and swap only on success; when
    the device runs out of memory for two engines, the old one is released first and, if the new
    one still fails, loaded back.
    """

    def __init__(self, model: str = EMBEDDED_MODEL, config: OffloadConfig | None = None, *,
                 allow_local_paths: bool = False, loader: Callable[[str, OffloadConfig], Engine] = load) -> None:
        self.model = model
        self.config = config or OffloadConfig()
        self.policy = ModelPolicy(model, allow_local_paths)
        self._loader = loader
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self._trace_dir = tempfile.TemporaryDirectory(prefix="moe-trace-")  # removed at exit
        self._trace_lock = threading.Lock()
        self._trace_count = 0
        self._last_trace: tuple[float, Path] | None = None
        self._versions = itertools.count(1)  # next() is atomic: any thread may bump
        self._version = 0

    # --- what the Stats views follow ----------------------------------------------------------
    @property
    def version(self) -> int:
        """Changes whenever what the stats show may have changed: per streamed token, at a reply's
        end, a reset and a reload. Equal versions: nothing new to build."""
        return self._version

    def _bump(self) -> None:
        self._version = next(self._versions)

    @property
    def busy(self) -> bool:
        """A reply (or a reload) holds the engine now."""
        return self._lock.locked()

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Engine:
        """Load the startup model (the operator's choice: any folder or hub id is allowed)."""
        with self._lock:
            if self._engine is None:
                self._engine = self._loader(model_location(self.model), self.config)
            return self._engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise ValueError("no model is loaded: apply settings in the Settings tab to load one")
        return self._engine

    def settings(self, **changes) -> OffloadConfig:
        """The current settings with `changes` applied; ValueError naming the allowed values."""
        unknown = sorted(set(changes) - set(self.config.to_dict()))
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(unknown)}")
        return replace(self.config, **changes)

    def reload(self, model: str, config: OffloadConfig) -> Engine:
        """Swap in an engine for `model` with `config`. On any failure the running engine keeps
        serving and ValueError says why.

        An engine with a host-RAM cache is closed first (its arena freed, and loaded back if the new
        one fails): the new engine plans its host cache from the RAM available, which the old arena
        would otherwise still hold."""
        name = self.policy.check(model)
        config.validate()
        with self._lock:
            try:
                engine = self._load_replacing(name, config)
                self._engine, self.model, self.config = engine, name, config
                return engine
            finally:
                self._bump()

    def _load_replacing(self, name: str, config: OffloadConfig) -> Engine:
        if self._engine is not None and getattr(self._engine, "host_cache", None) is not None:
            return self._reload_after_release(name, config, None)
        out_of_memory = None
        try:
            engine = self._loader(model_location(name), config)
        except ValueError:
            raise
        except (torch.OutOfMemoryError, MemoryError) as err:
            # handled outside this block: the traceback pins the half-built engine's tensors
            out_of_memory = f"{type(err).__name__}: {err}"
        except Exception as err:
            raise ValueError(f"could not load {name}: {type(err).__name__}: {err}") from err
        if out_of_memory is not None:
            return self._reload_after_release(name, config, out_of_memory)
        self._drop_engine()
        return engine

    def _reload_after_release(self, name: str, config: OffloadConfig, first_error: str | None) -> Engine:
        """Close the running engine, then load `name`; on failure load the previous one back.
        `first_error`: why loading beside the running engine failed (None: not tried)."""
        if self._engine is None:
            raise ValueError(f"could not load {name}: out of memory ({first_error})")
        self._drop_engine()
        try:
            return self._loader(model_location(name), config)
        except Exception as err:
            after = "even after releasing the running engine" if first_error else "(the running engine was closed first)"
            message = f"could not load {name} {after}: {type(err).__name__}: {err}"
        try:
            self._engine = self._loader(model_location(self.model), self.config)
        except Exception as err:
            raise ValueError(f"{message}; reloading the previous model failed too ({err}): apply settings "
                             "again to load a model") from None
        raise ValueError(f"{message}. The previous engine was loaded back.")

    def _drop_engine(self) -> None:
        """Close the running engine and free its memory (no reference to it may remain)."""
        if self._engine is None:
            return
        on_cuda = self._engine.device.type == "cuda"
        self._engine.close()
        self._engine = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def close(self) -> None:
        with self._lock:
            self._drop_engine()

    # --- replies ------------------------------------------------------------------------------
    def chat(self, messages: list[dict], settings: GenerationSettings,
             stop: threading.Event | None = None, seconds: float = REQUEST_SECONDS,
             waited: float = 0.0) -> Iterator[StreamUpdate]:
        """Stream one reply; replies from all users run one at a time. Leaving the loop early (or
        closing the iterator) stops the generation instead of letting it run to max_new_tokens.

        The prompt is prepared (tokenized, old turns dropped to fit the context; a new message that
        cannot fit is refused) before the engine's lock is taken, so a huge input delays nobody. The
        reply ends within `seconds` of its arrival: `waited` seconds already spent in a queue before
        this call (gradio's) count, and so does waiting for the engine."""
        settings.validate()
        stop = stop or threading.Event()
        deadline = time.monotonic() + seconds - max(waited, 0.0)
        if deadline <= time.monotonic():
            raise ValueError(f"the request waited {waited:.0f} s in the queue, over its {seconds:g} s: try again later")
        for _ in range(3):  # a reload between preparing and locking: prepare again for the new engine
            engine = self.engine
            prompt = self._prepare(engine, messages, settings.max_new_tokens)
            if not self._lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
                raise ValueError(f"the engine stayed busy for {seconds:g} s: try again later")
            if self._engine is engine:
                break
            self._lock.release()
        else:
            raise ValueError("the engine was reloaded while this message was prepared: send it again")
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ValueError(f"the engine stayed busy for {seconds:g} s: try again later")
            context = getattr(engine.model.config, "max_position_embeddings", None)
            room = context - prompt.shape[-1] if context else settings.max_new_tokens
            clipped = room < settings.max_new_tokens  # the reply ends where the context is full
            updates = engine.stream(prompt, replace(settings, max_seconds=left,
                                                    max_new_tokens=min(room, settings.max_new_tokens)), stop)
            try:
                for update in updates:
                    self._bump()
                    if clipped and update.finish_reason == "length":
                        update = replace(update, finish_reason="context")
                    yield update
            finally:
                updates.close()  # stops the generation if the caller left early
        finally:
            self._lock.release()
            self._bump()

    def _prepare(self, engine: Engine, messages: list[dict], max_new_tokens: int):
        try:
            return prompt_within_context(engine, messages, max_new_tokens)
        except ValueError:
            raise
        except Exception as err:  # e.g. a jinja TemplateError: "roles must alternate user/assistant"
            raise ValueError(f"the chat template of {self.model} refused these messages: {err}") from err

    # --- statistics ---------------------------------------------------------------------------
    def stats(self, trace: bool = True) -> Stats:
        return self.engine.stats(trace)

    def cache_map(self) -> list[list[str]]:
        """`Engine.cache_map()`: where each expert is now, [L][E]."""
        return self.engine.cache_map()

    def reset_stats(self) -> None:
        self.engine.reset_stats()
        self._bump()

    def describe(self) -> dict:
        """`Engine.describe()` under the name the user picked."""
        return {**self.engine.describe(), "model": self.model}

    def served_shape(self) -> ModelShape:
        """The throughput model's shape of the model served now, with its quantization (What-if)."""
        engine, c = self.engine, self.config
        return served_shape(engine.shape, engine.model.config, c.expert_bits, c.attn_bits,
                            expert_group_size=c.expert_group_size, attn_group_size=c.attn_group_size)

    def save_trace(self, stats: Stats) -> Path | None:
        """The routing trace of `stats` (its newest MAX_TRACE_TOKENS tokens) as JSON in a fresh temp
        file (None when trace recording is off). The newest KEEP_TRACES files are kept, so a web
        server has time to copy one before it goes."""
        trace = stats.trace
        if trace is None:
            return None
        keep = min(trace.num_tokens, MAX_TRACE_TOKENS)  # the newest tokens: a download has a bounded size
        trace = RoutingTrace(trace.num_layers, trace.num_experts, trace.top_k, public_name(self.model),
                             selected=[rows[len(rows) - keep:] for rows in trace.selected],
                             guess=[rows[len(rows) - keep:] for rows in trace.guess],
                             phase=trace.phase[len(trace.phase) - keep:])
        folder = Path(self._trace_dir.name)
        with self._trace_lock:
            self._trace_count += 1
            path = trace.save(folder / f"routing-trace-{self._trace_count}.json")
            _keep_newest(folder, "routing-trace-*.json")
        return path

    def trace_file(self, every: float = TRACE_EVERY_SECONDS) -> Path | None:
        """The routing trace as a file for a download: a new one at most every `every` seconds,
        otherwise the last one again (a server that copies each file it hands out then writes at
        most one file per `every` seconds, whoever asks and however often)."""
        with self._trace_lock:
            last = self._last_trace
            if last is not None and time.monotonic() - last[0] < every and last[1].exists():
                return last[1]
        path = self.save_trace(self.stats())
        if path is not None:
            with self._trace_lock:
                self._last_trace = (time.monotonic(), path)
        return path

    def save_counters(self, counters: dict) -> Path:
        """`counters` (plain values) as JSON in a fresh temp file; the newest KEEP_TRACES are kept."""
        folder = Path(self._trace_dir.name)
        with self._trace_lock:
            self._trace_count += 1
            path = folder / f"counters-{self._trace_count}.json"
            path.write_text(json.dumps(counters, indent=1))
            _keep_newest(folder, "counters-*.json")
        return path



def public_name(model: str) -> str:
    """A model's name as others may see it: the embedded model's and hub ids as they are, a local
    folder by its last part only (never the server's absolute path)."""
    if model == EMBEDDED_MODEL or (model.count("/") == 1 and not model.startswith(("/", ".", "~"))
                                   and not Path(model).is_dir()):
        return model
    return Path(model).name or model


def prompt_within_context(engine: Engine, messages: list[dict], max_new_tokens: int):
    """Token ids of the chat, dropping the oldest turns (never the system prompt or the newest
    message) while prompt + reply would overflow the model's context window. When the newest
    message leaves less room than max_new_tokens the caller clips the reply; a message that leaves
    no room at all is refused (ValueError with its size in tokens).

    The cut is found by bisection over the turns (a kept part starts with a user message), so a
    long history costs O(log n) tokenizations, not one per dropped turn."""
    context = getattr(engine.model.config, "max_position_embeddings", None)
    first = 1 if messages[0]["role"] == "system" else 0
    if not context:
        return engine.chat_prompt(messages)
    room = context - max_new_tokens
    shortest = engine.chat_prompt(messages[:first] + messages[-1:])
    if shortest.shape[-1] >= context:
        alone = len(engine.tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"])
        raise ValueError(f"the message is too long: {alone} tokens, and the model's context holds {context} "
                         f"tokens in all{' (with the system prompt)' if first else ''}: it was not sent; shorten it")
    if shortest.shape[-1] > room:
        return shortest
    ids = engine.chat_prompt(messages)
    if ids.shape[-1] <= room:
        return ids
    # cuts: where the kept part may start (a user turn after the system prompt; the newest message last)
    cuts = [i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"]
    if not cuts or cuts[-1] != len(messages) - 1:
        cuts.append(len(messages) - 1)
    low, high, best = 0, len(cuts) - 1, shortest  # cuts[high] fits (best is its prompt); find the first that does
    while low < high:
        mid = (low + high) // 2
        trial = engine.chat_prompt(messages[:first] + messages[cuts[mid]:])
        if trial.shape[-1] <= room:
            high, best = mid, trial
        else:
            low = mid + 1
    return best


def _keep_newest(folder: Path, pattern: str, keep: int = KEEP_TRACES) -> None:
    """Delete all but the newest `keep` files of `folder` matching `pattern` (numbered as saved)."""
    for old in sorted(folder.glob(pattern), key=_trace_number)[:-keep]:
        old.unlink(missing_ok=True)


def _trace_number(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])
