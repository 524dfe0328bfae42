"""Web app: chat with an offloaded Mixture-of-Experts model and watch its expert cache at work.

    python app.py                       # the embedded tiny Mixtral, offline, http://127.0.0.1:7860
    python app.py --model mistralai/Mixtral-8x7B-Instruct-v0.1 --expert-bits 2 --attn-bits 4 --cache-size 4
    python app.py --help                # every flag

Tabs: Chat (streaming replies, stop, system prompt, sampling; tokens/s and cache hit rate under
each reply), Settings (reload the engine; a bad combination keeps the running one), Stats (a table of
the counters and Plotly figures, each with a line on how to read it, refreshed every second while the
tab is open and the page visible, from views every tab shares (webapp.views); routing-trace and
counters downloads on request, reset). Every request is bounded before work (webapp.limits) and no
error shows a server path (webapp.redact).
API (gradio_client): /chat (message, history -> streamed reply), /stats (counters, counter table,
figures), /trace (the routing-trace file), /apply_settings, /reset_stats. OpenAI-compatible, on the
same port: POST /v1/chat/completions, GET /v1/models (webapp.openai_api; --api-key to require a key).

Public host (listening beyond 127.0.0.1, --share, a Hugging Face Space, or --public): settings,
reloads (hence hub downloads) and stats reset need the operator token (MOE_OPERATOR_TOKEN, or
--operator-token); visitors see the settings read-only. A local launch keeps full control.

UI only: the engine's lifecycle is `webapp.service`, the figures are `webapp.plots`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
from collections import OrderedDict
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # works offline, sends nothing

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from moe_runtime import GenerationSettings, OffloadConfig  # noqa: E402
from moe_runtime.config import DTYPES, OFFLOAD_TIERS  # noqa: E402
from moe_runtime.policies import HOST_POLICIES, POLICIES  # noqa: E402
from webapp import limits, plots, redact, views, whatif  # noqa: E402
from webapp.openai_api import OpenAIServer  # noqa: E402
from webapp.service import EMBEDDED_MODEL, EngineService, Operator, build_messages, public_name  # noqa: E402
from webapp.settings_form import (  # noqa: E402
    ROWS,
    SETTINGS,
    apply_signature,
    bits_text,
    host_cache_value,
    parse_bits,
    whole_number,
)

TITLE = "Mixture-of-Experts with expert offloading"
THEME = gr.themes.Soft(primary_hue="indigo", font=["ui-sans-serif", "system-ui", "sans-serif"],
                       font_mono=["ui-monospace", "monospace"])  # system fonts: no font download
CSS = (".reply-footer { opacity: 0.7; } .caption { opacity: 0.75; font-size: 0.9em; margin-top: -0.5em; } "
       "#cache-map { max-height: 640px; overflow-y: auto; }")  # a map of many layers scrolls
STATS_FIGURES = ("experts", "hit_rate", "prefetch_recall", "tokens_per_second", "bytes_moved", "timeline",
                 "cache_map")
MAX_TIMELINE_TOKENS = 256  # the Timeline slider's end
STATS_POLL_SECONDS = 1.0  # the Stats tab's timer, while that tab is open
MAX_SESSIONS_TRACKED = 4096  # sessions whose last Stats view is remembered (the oldest are forgotten)
MAX_POLLS_AT_ONCE = 2  # Stats timer ticks served at once; more get nothing this tick (they run outside the queue)
PAGE_VISIBLE_JS = "(tokens, visible) => [tokens, document.visibilityState !== 'hidden']"
LOCKABLE = ("model", *(setting.name for setting in SETTINGS), "apply", "reset")  # what Unlock makes editable
DEFAULT_SYSTEM_PROMPT = ""
FINISH_REASONS = {"stop": "finished", "length": "max new tokens reached", "cancelled": "stopped",
                  "context": "context window full", "time": "time limit reached"}
LOADING_PROGRESS = gr.Progress(track_tqdm=True)  # the engine reports loading through tqdm
ENGINE = "engine"  # concurrency group of everything that uses or replaces the engine: one at a time
STATS_VIEW = "stats-view"  # concurrency group of every Stats view request: one at a time (webapp.views)
MAX_UPLOAD = "1mb"  # the only upload is a What-if trace file (webapp.whatif caps it too)
CACHE_SECONDS = 600  # gradio's copies of trace files are deleted after this long
WHATIF_SESSION, WHATIF_UPLOAD = "this session's trace", "an uploaded trace file"
PRIVATE = {"api_visibility": "private"}  # an event that is no API endpoint
TOKEN_ENV = "MOE_OPERATOR_TOKEN"  # the operator token on a public host (a Space: a secret of that name)


# --- values between widgets and the engine --------------------------------------------------------
def generation_settings(temperature, top_p, max_new_tokens) -> GenerationSettings:
    try:
        temperature, top_p = float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise ValueError("temperature and top-p must be numbers") from None
    settings = GenerationSettings(whole_number("max_new_tokens", max_new_tokens), temperature, top_p)
    settings.validate()
    return settings


def reply_footer(update) -> str:
    parts = [f"{update.tokens_per_second:.1f} tokens/s", f"cache hit rate {update.hit_rate:.0%}",
             f"{update.new_tokens} tokens"]
    if update.finished:
        parts.append(FINISH_REASONS.get(update.finish_reason, "finished"))
    return " · ".join(parts)


def chatbot_messages(history: list[dict]) -> list[dict]:
    """What the Chatbot shows: the history, each reply followed by its footer."""
    shown = []
    for m in history:
        content = m["content"] or "…"
        if m.get("footer"):
            content += f'\n\n<span class="reply-footer"><sub>{m["footer"]}</sub></span>'
        shown.append({"role": m["role"], "content": content})
    return shown


def byte_size(n: float) -> str:
    scale, unit = plots.byte_unit(n)
    return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n:.0f} B"


def engine_markdown(facts: dict, public: bool = False) -> str:
    rows = [
        ("model", f"`{facts['model']}`"),
        ("device / dtype", f"{facts['device']} / {facts.get('dtype')}"),
        ("layers × experts (top-k)", f"{facts['layers']} × {facts['experts']} (top-{facts['top_k']})"),
        ("one expert", byte_size(facts["expert_bytes"])),
        ("all experts (slow tier)", f"{byte_size(facts['all_experts_bytes'])} in {facts['offload']}"),
        ("expert cache on the device", f"{byte_size(facts['cache_bytes'])} ({facts['cache_size']} per layer)"),
        ("dense weights", byte_size(facts["dense_bytes"])),
        ("expert / attention bits", f"{bits_text(facts['expert_bits'])} / {bits_text(facts['attn_bits'])}"),
        ("prefetch / policy", f"{facts['prefetch']} / {facts['policy']}"),
    ]
    if facts.get("store"):  # a visitor of a public host sees no server paths
        rows.append(("expert store", f"`{os.path.basename(facts['store']) if public else facts['store']}`"))
    return "| | |\n|:--|:--|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


# --- event handlers (plain methods, so tests can call them without a browser) ----------------------
class Handlers:
    def __init__(self, service: EngineService, operator: Operator | None = None) -> None:
        self.service = service
        self.operator = operator or Operator()
        self._stops: dict[str, threading.Event] = {}  # browser session -> its running reply
        self.guard = limits.GuardState()  # the request bounds' shared state (webapp.limits)
        self.views = views.StatsViews(service, STATS_FIGURES)  # shared by every tab and /stats
        self._seen: OrderedDict[str, tuple] = OrderedDict()  # browser session -> key of the view it has
        self._polls = threading.BoundedSemaphore(MAX_POLLS_AT_ONCE)  # Stats ticks at work at once

    # chat ------------------------------------------------------------------------------------------
    def respond(self, message: str, history: list[dict], system_prompt: str, temperature: float, top_p: float,
                max_new_tokens: int, request: gr.Request = None):
        """Stream a reply. Yields (chatbot, history, textbox); on bad input or a failed reply the
        history is unchanged and the message goes back into the textbox."""
        history = list(history) if isinstance(history, (list, tuple)) else []
        kept = message if isinstance(message, str) and len(message) <= limits.MAX_MESSAGE_BYTES else ""
        try:
            messages = build_messages(message, history, system_prompt)
            settings = generation_settings(temperature, top_p, max_new_tokens)
            waited = self._queued(request, "respond")
        except ValueError as err:
            gr.Warning(self.shown(err))
            yield chatbot_messages(history), history, kept
            return
        session, stop = _session(request), threading.Event()
        self._stops[session] = stop
        user = {"role": "user", "content": message}
        try:
            shown = chatbot_messages(history)  # once: per token only the new pair is rendered
            reply = {"role": "assistant", "content": "", "footer": "waiting for the model…"}
            yield shown + chatbot_messages([user, reply]), history + [user, reply], ""
            for update in self.service.chat(messages, settings, stop, waited=waited):
                reply = {"role": "assistant", "content": update.text, "footer": reply_footer(update)}
                yield shown + chatbot_messages([user, reply]), history + [user, reply], ""
        except Exception as err:  # the app keeps serving; the user keeps their message
            gr.Warning(f"The reply failed: {self.shown(err)}")
            yield chatbot_messages(history), history, kept
        finally:
            if self._stops.get(session) is stop:
                del self._stops[session]

    def stop(self, request: gr.Request = None) -> None:
        event = self._stops.get(_session(request))
        if event is not None:
            event.set()

    def clear(self, request: gr.Request = None):
        self.stop(request)
        return [], [], ""

    def chat_api(self, message: str, history: list[dict] | None = None, system_prompt: str = "",
                 temperature: float = 0.7, top_p: float = 0.95, max_new_tokens: int = 128,
                 request: gr.Request = None) -> str:
        """Stream a reply to `message` after `history` (a list of {"role", "content"} dicts); each
        streamed value is the whole reply so far."""
        try:
            messages = build_messages(message, history, system_prompt)
            settings = generation_settings(temperature, top_p, max_new_tokens)
            waited = self._queued(request, "chat_api")
            for update in self.service.chat(messages, settings, waited=waited):
                yield update.text
        except Exception as err:  # the caller gets the reason; the app keeps serving
            raise gr.Error(self.shown(err)) from None

    def _queued(self, request: gr.Request | None, fn_name: str) -> float:
        """Seconds this request waited in gradio's queue (they count toward its deadline);
        ValueError when nobody listens for its result (queued work of a client that left or never
        listened is dropped, not run)."""
        session = getattr(request, "session_hash", None)
        waited, joined = limits.queue_wait(self.guard.blocks, session, fn_name)
        if self.guard.abandoned(session, joined):
            raise ValueError("nobody is listening for this request's result: it was dropped")
        return waited

    def shown(self, err: BaseException | str) -> str:
        """An error as a visitor may read it: server paths replaced (the full text goes to the
        server's log)."""
        return redact.shown(err, self.service)

    # stats -----------------------------------------------------------------------------------------
    def stats_view(self, timeline_tokens: float = plots.TIMELINE_TOKENS):
        """(counters, counter table, *figures) of the running engine: the view every tab shares
        (`webapp.views`: built once per engine state, not per caller); the timeline shows the newest
        `timeline_tokens` tokens. Also the /stats endpoint."""
        try:
            return self._view(timeline_tokens).values
        except ValueError as err:
            gr.Warning(self.shown(err))
            return (gr.skip(),) * (2 + len(STATS_FIGURES))

    def stats_poll(self, timeline_tokens: float = plots.TIMELINE_TOKENS, visible: bool = True,
                   request: gr.Request = None):
        """The Stats timer's tick (the Stats tab open and the page visible): the stats view, or
        nothing (every output skipped) when the page is hidden or this tab already has the newest
        view, which is what most polls find: they cost well under a millisecond of the server."""
        skip = (gr.skip(),) * (2 + len(STATS_FIGURES))
        if visible is False or not self._polls.acquire(blocking=False):  # hidden, or enough polls at work
            return skip
        try:
            view = self._view(timeline_tokens)
        except ValueError:
            return skip
        finally:
            self._polls.release()
        session = _session(request)
        if self._seen.get(session) == view.key:
            return skip
        self._seen[session] = view.key
        self._seen.move_to_end(session)
        while len(self._seen) > MAX_SESSIONS_TRACKED:
            self._seen.popitem(last=False)
        return view.values

    def _view(self, timeline_tokens) -> views.View:
        try:
            tokens = min(max(whole_number("timeline tokens", timeline_tokens), 1), MAX_TIMELINE_TOKENS)
        except ValueError:
            tokens = plots.TIMELINE_TOKENS
        return self.views.view(tokens)

    def trace_download(self):
        """The routing trace as a JSON file, made on request (a new file at most every
        TRACE_EVERY_SECONDS; the newest MAX_TRACE_TOKENS tokens)."""
        try:
            return self.service.trace_file()
        except ValueError as err:
            raise gr.Error(self.shown(err)) from None

    def counters_download(self):
        """The counters as a JSON file, made on request."""
        try:
            return self.service.save_counters(plots.counters(self.service.stats(trace=False)))
        except ValueError as err:
            raise gr.Error(self.shown(err)) from None

    def reset_stats(self, operator_token: str = ""):
        """Zero the shared counters (the operator's, on a public host); returns the stats view."""
        try:
            self.operator.check(operator_token, "resetting the stats")
            self.service.reset_stats()
        except ValueError as err:
            gr.Warning(self.shown(err))
        return self.stats_view()

    # what-if ---------------------------------------------------------------------------------------
    def what_if(self, source: str, upload, policy: str, cache_size: float, prefetch: float, hardware: str,
                shape: str, include_prefill: bool):
        """Replay a routing trace with other cache settings: (table, notes). The session's trace, or
        an uploaded trace file (size-capped); bad input leaves the table and says why."""
        try:
            stats = self.service.stats()
            if source == WHATIF_UPLOAD:
                if not upload:
                    raise ValueError("no trace file uploaded: choose one, or replay this session's trace")
                trace = whatif.load_trace(upload)
            elif stats.trace is None:
                raise ValueError("this engine records no routing trace (started with --no-trace): upload one")
            else:
                trace = stats.trace
            model_shape = self.service.served_shape() if shape == whatif.SERVED_SHAPE else whatif.MODELS.get(shape)
            if model_shape is None:
                raise ValueError(f"model shape {shape!r} is not allowed: use one of {', '.join(whatif.model_choices())}")
            result = whatif.replay(trace, policy, whole_number("cache size", cache_size),
                                   whole_number("prefetch", prefetch), hardware, model_shape, stats,
                                   self.service.describe()["expert_bytes"], bool(include_prefill))
        except ValueError as err:
            gr.Warning(f"Not replayed: {self.shown(err)}")
            return gr.skip(), f"**Not replayed:** {self.shown(err)}"
        return whatif.rows(result), whatif.notes(result)

    # settings --------------------------------------------------------------------------------------
    def apply(self, *args, **kwargs):
        """Reload the engine: apply(model, <each settings_form.SETTINGS entry by name>, operator_token,
        progress) (`APPLY_SIGNATURE`); returns (status, engine facts, header). On failure the running
        engine keeps serving and the status says why. On a public host only the operator may."""
        given = APPLY_SIGNATURE.bind(self, *args, **kwargs)
        given.apply_defaults()
        values = given.arguments
        try:
            limits.check_text("model", values["model"], limits.MAX_FIELD_BYTES)
            limits.check_text("operator token", values["operator_token"], limits.MAX_FIELD_BYTES)
            for setting in SETTINGS:
                if setting.text:
                    limits.check_text(setting.name, values[setting.name], limits.MAX_FIELD_BYTES)
            self.operator.check(values["operator_token"], "changing the settings")
            model = values["model"]
            if not isinstance(model, str):
                raise ValueError(f"model={model!r:.40} is not allowed: give a model's name")
            model = self.model_names().get(model, model)  # a display name -> the name to load
            config = self.service.settings(**{setting.name: setting.value(values[setting.name])
                                              for setting in SETTINGS})
            values["progress"](0, desc=f"loading {model}")
            self.service.reload(model, config)
        except ValueError as err:
            gr.Warning(f"Settings not applied: {self.shown(err)}")
            status = f"**Not applied:** {self.shown(err)}\n\nThe running engine ({self._running()}) keeps serving."
            return status, self.engine_facts(), self.header()
        return f"**Applied.** Now serving `{self.display_name(self.service.model)}`.", self.engine_facts(), self.header()

    def current_settings(self):
        """Widget values of the running engine's settings (for a page that just opened): the model,
        each setting, the engine facts and the header."""
        c = self.service.config
        shown = (setting.show(getattr(c, setting.name)) for setting in SETTINGS)
        return (self.display_name(self.service.model), *shown, self.engine_facts(), self.header())

    def unlock(self, operator_token: str):
        """The settings widgets (`LOCKABLE`) made editable for this page when the token is the operator's."""
        allowed = self.operator.allows(operator_token)
        if not allowed:
            gr.Warning("That is not the operator token: the settings stay read-only")
        note = "**Unlocked**: you may change the settings." if allowed else "**Read-only.**"
        return (*(gr.update(interactive=allowed) for _ in LOCKABLE), note)

    def display_name(self, model: str) -> str:
        """A model as this host shows it: a public host never shows a server path."""
        return public_name(model) if self.operator.public else model

    def model_names(self) -> dict[str, str]:
        """Display name -> the name to load, for the Settings tab's choices."""
        return {self.display_name(name): name for name in self.service.policy.choices}

    def engine_facts(self) -> str:
        try:
            facts = self.service.describe()
            if self.operator.public:
                facts["model"] = public_name(facts["model"])
            return "### Running engine\n" + engine_markdown(facts, self.operator.public)
        except ValueError as err:
            return f"**No engine:** {err}"

    def header(self) -> str:
        return f"# {TITLE}\nServing `{self._running()}`, experts offloaded to " \
               f"{self.service.config.offload}, {self.service.config.cache_size} cached per layer."

    def _running(self) -> str:
        try:
            engine = self.service.engine
        except ValueError:
            return "no model"
        return f"{self.display_name(self.service.model)} on {engine.device}"


APPLY_SIGNATURE = apply_signature(LOADING_PROGRESS)
Handlers.apply.__signature__ = APPLY_SIGNATURE  # gradio reads Apply's (and /apply_settings') parameters here


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "direct-call"


# --- layout: one function per tab, then the events between them -------------------------------------
def chat_tab(default_max_new_tokens: int) -> SimpleNamespace:
    with gr.Tab("Chat", id="chat") as tab:
        chatbot = gr.Chatbot(label="Chat", height=440, elem_id="chatbot", buttons=["copy", "copy_all"],
                             feedback_options=None, placeholder="Replies stream here, with tokens/s "
                             "and the expert-cache hit rate under each one.")
        with gr.Row():
            message = gr.Textbox(show_label=False, placeholder="Type a message and press Enter",
                                 scale=6, elem_id="message", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            clear = gr.Button("Clear", scale=1, elem_id="clear")
        with gr.Accordion("System prompt and sampling", open=False):
            system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=2,
                                       placeholder="Optional; used only if the chat template supports it")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p")
                max_new_tokens = gr.Slider(1, 1024, value=default_max_new_tokens, step=1,
                                           label="Max new tokens", elem_id="max-new-tokens")
    return SimpleNamespace(tab=tab, chatbot=chatbot, message=message, send=send, stop=stop, clear=clear,
                           system_prompt=system_prompt, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens)


def settings_tab(h: Handlers, editable: bool) -> SimpleNamespace:
    """The model and every `SETTINGS` entry in its row; `inputs` in Apply's order."""
    service = h.service
    widgets = {}
    with gr.Tab("Settings", id="settings", elem_id="settings-tab") as tab:
        for row in ROWS:
            with gr.Row():
                if row == 0:
                    local = service.policy.allow_local_paths
                    widgets["model"] = gr.Dropdown(
                        list(h.model_names()), value=h.display_name(service.model), label="Model",
                        allow_custom_value=local, scale=3, interactive=editable,
                        info="A listed model or a local folder" if local
                        else "Local folders are accepted only with --allow-local-paths")
                for setting in SETTINGS:
                    if setting.row == row:
                        widgets[setting.name] = setting.make(service.config, editable)
        with gr.Row(visible=not editable):
            token = gr.Textbox("", label="Operator token", type="password", scale=4, elem_id="operator-token",
                               info="this is a public host: only its operator changes the shared engine")
            unlock = gr.Button("Unlock", scale=1, elem_id="unlock")
        apply = gr.Button("Apply", variant="primary", elem_id="apply", interactive=editable)
        status = gr.Markdown(elem_id="settings-status")
        facts = gr.Markdown(h.engine_facts())
    inputs = [widgets["model"], *(widgets[setting.name] for setting in SETTINGS)]
    return SimpleNamespace(tab=tab, inputs=inputs, token=token, unlock=unlock, apply=apply, status=status,
                           facts=facts)


def stats_tab(editable: bool) -> SimpleNamespace:
    with gr.Tab("Stats", id="stats") as tab:
        with gr.Row():
            refresh = gr.Button("Refresh", elem_id="refresh")
            reset = gr.Button("Reset stats", elem_id="reset", interactive=editable)
            prepare = gr.Button("Prepare downloads", elem_id="prepare-trace")
            download = gr.DownloadButton("Download routing trace (JSON)", elem_id="download-trace")
            download_counters = gr.DownloadButton("Download counters (JSON)", elem_id="download-counters")
        counters = gr.JSON(visible=False)  # the counters as data, for API clients (/stats)
        table = gr.Dataframe(headers=plots.COUNTER_COLUMNS, label="Counters", interactive=False, wrap=True,
                             elem_id="counters", column_widths=["22%", "22%", "56%"])
        plotted = {}  # figure name -> its gr.Plot

        def figure(name: str, label: str, elem_id: str | None = None) -> None:
            plotted[name] = gr.Plot(label=label, elem_id=elem_id)
            gr.Markdown(plots.CAPTIONS[name], elem_classes="caption")

        figure("cache_map", "Live cache map", "cache-map")
        timeline_tokens = gr.Slider(1, MAX_TIMELINE_TOKENS, value=plots.TIMELINE_TOKENS, step=1, elem_id="timeline-tokens",
                                    label="Timeline: newest tokens shown")
        figure("timeline", "Load/compute timeline", "timeline")
        figure("experts", "Expert selections", "expert-heatmap")
        side_by_side = ((("hit_rate", "Cache hit rate"), ("prefetch_recall", "Prefetch recall")),
                        (("tokens_per_second", "Tokens per second"), ("bytes_moved", "Bytes moved")))
        for pair in side_by_side:
            with gr.Row():
                for name, label in pair:
                    with gr.Column():
                        figure(name, label)
    return SimpleNamespace(tab=tab, refresh=refresh, reset=reset, prepare=prepare, download=download,
                           download_counters=download_counters, timeline_tokens=timeline_tokens,
                           outputs=[counters, table, *(plotted[name] for name in STATS_FIGURES)])


def whatif_tab(config: OffloadConfig) -> SimpleNamespace:
    with gr.Tab("What-if", id="whatif", elem_id="whatif-tab") as tab:
        gr.Markdown("Replay the routing trace through the simulator (`moe_runtime.sim`) with other cache "
                    "settings and predict tokens/s on other hardware, beside what this session measured.",
                    elem_classes="caption")
        with gr.Row():
            source = gr.Radio([WHATIF_SESSION, WHATIF_UPLOAD], value=WHATIF_SESSION, label="Routing trace")
            upload = gr.File(label="Trace file (JSON from Prepare downloads or moe_runtime; at most 1 MiB)",
                             file_types=[".json"], type="filepath", elem_id="whatif-upload")
        with gr.Row():
            policy = gr.Dropdown(whatif.policy_choices(), value=config.policy, label="Replay policy",
                                 info="belady: the optimum that knows the future", elem_id="whatif-policy")
            cache = gr.Number(config.cache_size, precision=0, label="Replay cache size per layer",
                              elem_id="whatif-cache")
            prefetch = gr.Number(config.prefetch, precision=0, label="Replay prefetch width", elem_id="whatif-prefetch")
            hardware = gr.Dropdown(list(whatif.HARDWARE), value="cpu-space", label="Hardware profile",
                                   elem_id="whatif-hardware")
            shape = gr.Dropdown(whatif.model_choices(), value=whatif.SERVED_SHAPE, label="Model shape",
                                info="whose bytes and compute the prediction uses", elem_id="whatif-shape")
            prefill = gr.Checkbox(True, label="include prompt tokens", info="the counters include them")
        run = gr.Button("Replay", variant="primary", elem_id="whatif-run")
        table = gr.Dataframe(headers=whatif.COLUMNS, label="Measured beside replayed", interactive=False,
                             wrap=True, elem_id="whatif-table")
        gr.Markdown("Each row: what this session measured, what the simulator counts when it replays the "
                    "same routing with the chosen settings, and what the throughput model predicts on "
                    "the chosen hardware.", elem_classes="caption")
        notes = gr.Markdown(elem_id="whatif-notes")
    return SimpleNamespace(tab=tab, run=run, inputs=[source, upload, policy, cache, prefetch, hardware, shape, prefill],
                           outputs=[table, notes])


def build_app(service: EngineService, *, default_max_new_tokens: int = 128, operator: Operator | None = None
              ) -> gr.Blocks:
    h = Handlers(service, operator)
    editable = not h.operator.public  # a visitor of a public host sees the settings read-only
    # trace files returned to the browser are copied into gradio's cache: drop copies older than CACHE_SECONDS
    with gr.Blocks(title=TITLE, delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        header = gr.Markdown(h.header())
        history = gr.State([])
        timer = gr.Timer(STATS_POLL_SECONDS, active=False)  # ticks while the Stats tab is open
        page_visible = gr.Checkbox(True, visible=False)  # set by PAGE_VISIBLE_JS at each tick
        with gr.Tabs():
            chat = chat_tab(default_max_new_tokens)
            settings = settings_tab(h, editable)
            stats = stats_tab(editable)
            what = whatif_tab(service.config)
        wire_chat(h, chat, history, stats)
        wire_stats(h, stats, timer, page_visible, (chat.tab, settings.tab, what.tab))
        what.run.click(h.what_if, what.inputs, what.outputs, api_name="what_if", concurrency_id="what-if",
                       concurrency_limit=1)
        wire_settings(h, settings, stats, header)
        demo.load(h.current_settings, None, [*settings.inputs, settings.facts, header], **PRIVATE)
        demo.load(h.stats_view, stats.timeline_tokens, stats.outputs, show_progress="hidden",
                  concurrency_id=STATS_VIEW, concurrency_limit=1, **PRIVATE)
    demo.request_guard = h.guard  # launch() installs it in front of the server
    h.guard.public = h.operator.public
    h.guard.blocks = demo
    return demo


def wire_chat(h: Handlers, chat: SimpleNamespace, history: gr.State, stats: SimpleNamespace) -> None:
    outputs = [chat.chatbot, history, chat.message]
    inputs = [chat.message, history, chat.system_prompt, chat.temperature, chat.top_p, chat.max_new_tokens]
    replies = []
    for trigger in (chat.message.submit, chat.send.click):
        reply = trigger(h.respond, inputs, outputs, concurrency_id=ENGINE, concurrency_limit=1,
                        show_progress="minimal", **PRIVATE)
        reply.then(h.stats_view, stats.timeline_tokens, stats.outputs, show_progress="hidden",
                   concurrency_id=STATS_VIEW, concurrency_limit=1, **PRIVATE)
        replies.append(reply)
    chat.stop.click(h.stop, None, None, queue=False, **PRIVATE)
    chat.clear.click(h.clear, None, outputs, cancels=replies, queue=False, **PRIVATE)
    chat.chatbot.clear(h.clear, None, outputs, cancels=replies, queue=False, **PRIVATE)
    gr.api(h.chat_api, api_name="chat", concurrency_id=ENGINE, concurrency_limit=1)


def wire_stats(h: Handlers, stats: SimpleNamespace, timer: gr.Timer, page_visible: gr.Checkbox,
               other_tabs: tuple) -> None:
    # the timer runs while the Stats tab is open; hidden pages skip; polls share one bounded lane
    stats.tab.select(lambda: gr.Timer(active=True), None, timer, queue=False, **PRIVATE)
    for tab in other_tabs:
        tab.select(lambda: gr.Timer(active=False), None, timer, queue=False, **PRIVATE)
    # the tick skips gradio's queue (a poll with nothing new then costs a few ms, not a queued event's
    # ~15): Handlers.stats_poll bounds it itself (MAX_POLLS_AT_ONCE; builds one at a time in views)
    timer.tick(h.stats_poll, [stats.timeline_tokens, page_visible], stats.outputs, js=PAGE_VISIBLE_JS,
               show_progress="hidden", queue=False, trigger_mode="once", **PRIVATE)
    stats.refresh.click(h.stats_view, stats.timeline_tokens, stats.outputs, api_name="stats",
                        concurrency_id=STATS_VIEW, concurrency_limit=1)
    stats.timeline_tokens.release(h.stats_view, stats.timeline_tokens, stats.outputs, show_progress="hidden",
                                  concurrency_id=STATS_VIEW, concurrency_limit=1, **PRIVATE)
    stats.prepare.click(h.trace_download, None, stats.download, api_name="trace", concurrency_id="trace",
                        concurrency_limit=1)
    stats.prepare.click(h.counters_download, None, stats.download_counters, concurrency_limit=4, **PRIVATE)


def wire_settings(h: Handlers, settings: SimpleNamespace, stats: SimpleNamespace, header: gr.Markdown) -> None:
    token = settings.token
    stats.reset.click(h.reset_stats, token, stats.outputs, api_name="reset_stats",
                      concurrency_id=ENGINE, concurrency_limit=1)  # after a reply in progress, not mid-token
    lockable = {"apply": settings.apply, "reset": stats.reset,
                **dict(zip(("model", *(s.name for s in SETTINGS)), settings.inputs, strict=True))}
    settings.unlock.click(h.unlock, token, [*(lockable[name] for name in LOCKABLE), settings.status],
                          queue=False, **PRIVATE)
    settings.apply.click(h.apply, [*settings.inputs, token], [settings.status, settings.facts, header],
                         api_name="apply_settings", concurrency_id=ENGINE, concurrency_limit=1,
                         show_progress="full").then(
        h.stats_view, stats.timeline_tokens, stats.outputs, show_progress="hidden", concurrency_id=STATS_VIEW,
        concurrency_limit=1, **PRIVATE)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True,
           api: OpenAIServer | None = None):
    """Serve `demo` behind Gradio's queue (replies run one at a time: see ENGINE), and `api`'s
    OpenAI-compatible routes on the same server (added to gradio's FastAPI app once it runs)."""
    guard = getattr(demo, "request_guard", None) or limits.GuardState()
    guard.blocks = demo
    # api_open=False: a queued function cannot be called around the queue (/gradio_api/run/...)
    demo.queue(default_concurrency_limit=1, max_size=limits.MAX_QUEUE, api_open=False)
    # a public host shows only the errors the handlers word (gr.Error, already without paths); others
    # say "Error" and go to the server's log
    public = getattr(getattr(demo, "request_guard", None), "public", False)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                theme=THEME, css=CSS, show_error=not public, quiet=not block, max_file_size=MAX_UPLOAD,
                app_kwargs={"middleware": [Middleware(limits.RequestGuard, guard=guard)]})
    if api is not None:
        api.mount(demo.server_app)
    if block:
        demo.block_thread()
    return demo


# --- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = OffloadConfig()
    p = argparse.ArgumentParser(
        prog="app.py",
        description="Chat with a Mixture-of-Experts model whose experts are offloaded to RAM or disk, with a "
                    "per-layer expert cache on the compute device and speculative prefetch; watch the cache work.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default=EMBEDDED_MODEL,
                   help="a local folder with config.json and *.safetensors, or a hub id such as "
                        f"mistralai/Mixtral-8x7B-Instruct-v0.1; {EMBEDDED_MODEL} is the embedded tiny Mixtral "
                        "trained on Tiny Shakespeare (works offline)")
    o = p.add_argument_group("offloading (moe_runtime.OffloadConfig; each help is the setting's own doc)")
    doc = OffloadConfig.field_docs()
    o.add_argument("--device", default=d.device, help=doc["device"])
    o.add_argument("--offload", default=d.offload, choices=OFFLOAD_TIERS, help=doc["offload"])
    o.add_argument("--host-cache-gb", type=_host_cache_arg, default=d.host_cache_gb, help=doc["host_cache_gb"])
    o.add_argument("--disk-prefetch-layers", type=int, default=d.disk_prefetch_layers,
                   help=doc["disk_prefetch_layers"])
    o.add_argument("--cache-size", type=int, default=d.cache_size, help=doc["cache_size"])
    o.add_argument("--prefetch", type=int, default=d.prefetch, help=doc["prefetch"])
    o.add_argument("--expert-bits", type=_bits_arg, default=d.expert_bits, metavar="{none,2,3,4,8}",
                   help=doc["expert_bits"])
    o.add_argument("--expert-group-size", type=int, default=d.expert_group_size, help=doc["expert_group_size"])
    o.add_argument("--attn-bits", type=_bits_arg, default=d.attn_bits, metavar="{none,4,8}", help=doc["attn_bits"])
    o.add_argument("--attn-group-size", type=int, default=d.attn_group_size, help=doc["attn_group_size"])
    o.add_argument("--no-quantize-meta", dest="quantize_meta", action="store_false",
                   help="turn off quantize_meta: " + doc["quantize_meta"])
    o.add_argument("--no-hqq-optimize", dest="hqq_optimize", action="store_false",
                   help="turn off hqq_optimize: " + doc["hqq_optimize"])
    o.add_argument("--store-dir", default=d.store_dir, help=doc["store_dir"])
    o.add_argument("--delete-shards", action="store_true", help=doc["delete_shards"])
    o.add_argument("--policy", default=d.policy, choices=list(POLICIES), help=doc["policy"])
    o.add_argument("--host-policy", default=d.host_policy, choices=list(HOST_POLICIES), help=doc["host_policy"])
    o.add_argument("--dtype", default=d.dtype, choices=DTYPES, help=doc["dtype"])
    o.add_argument("--no-trace", dest="record_trace", action="store_false",
                   help="turn off record_trace: " + doc["record_trace"])
    s = p.add_argument_group("server")
    s.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on; 0.0.0.0 accepts connections from other machines (default: "
                        "$GRADIO_SERVER_NAME, which Hugging Face Spaces sets, else 127.0.0.1)")
    s.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                   help="port to listen on (default: $GRADIO_SERVER_PORT, else 7860)")
    s.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    s.add_argument("--allow-local-paths", action="store_true",
                   help="let the Settings tab load any local model folder (otherwise only the embedded model, "
                        "--model and the known hub ids of every supported family)")
    s.add_argument("--max-new-tokens", type=int, default=128,
                   help="initial value of the Max new tokens slider, and the API's max_tokens when a request has none")
    s.add_argument("--api-key", default=os.environ.get("MOE_API_KEY") or None,
                   help="require this key (as 'Authorization: Bearer <key>') on the OpenAI-compatible API under "
                        "/v1 (default: $MOE_API_KEY; unset = open, like the Chat tab)")
    s.add_argument("--public", action="store_true",
                   help="treat this as a public host even on 127.0.0.1 (behind a proxy): settings, reloads and "
                        "stats reset need the operator token. Implied by a --host other than loopback, --share "
                        "and a Hugging Face Space")
    s.add_argument("--operator-token", default=os.environ.get(TOKEN_ENV),
                   help=f"the operator token of a public host (default: ${TOKEN_ENV}; on a Space, a secret of "
                        "that name). Without one a public host's settings cannot be changed")
    return p.parse_args(argv)


def _host_cache_arg(text: str):
    try:
        return host_cache_value("host_cache_gb", text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _bits_arg(text: str) -> int | None:
    try:
        return parse_bits("bits", text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def is_public(args: argparse.Namespace) -> bool:
    """Whether visitors other than the person at this machine can reach the app."""
    if args.public or args.share or os.environ.get("SPACE_ID"):
        return True
    if args.host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(args.host).is_loopback
    except ValueError:  # a host name: assume it is reachable
        return True


def config_from_args(args: argparse.Namespace) -> OffloadConfig:
    """The offloading flags' destinations are OffloadConfig's field names; the others are ignored."""
    return OffloadConfig.from_dict(vars(args))


def main(argv: list[str] | None = None, block: bool = True) -> gr.Blocks:
    """Parse the flags, load the engine, serve. With block=False (tests) return the running app;
    stop it with `.close()`."""
    args = parse_args(argv)
    try:
        config = config_from_args(args)
        GenerationSettings(max_new_tokens=args.max_new_tokens).validate()
    except ValueError as err:
        sys.exit(f"app.py: error: {err}")
    service = EngineService(args.model, config, allow_local_paths=args.allow_local_paths)
    print(f"Loading {args.model} ...", flush=True)
    try:
        service.start()
    except ValueError as err:
        sys.exit(f"app.py: error: {err}")
    operator = Operator(public=is_public(args), token=args.operator_token or None)
    if operator.public:
        print("Public host: settings, reloads and stats reset need the operator token"
              + ("" if operator.token else f" (none set: ${TOKEN_ENV}), so they are off"), flush=True)
    demo = build_app(service, default_max_new_tokens=args.max_new_tokens, operator=operator)
    if block:  # SIGTERM (docker stop, a Space restart) exits like Ctrl-C: temp files are removed
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    api = OpenAIServer(service, api_key=args.api_key, default_max_tokens=args.max_new_tokens)
    launch(demo, args.host, args.port, args.share, block=block, api=api)
    return demo


if __name__ == "__main__":
    main()
