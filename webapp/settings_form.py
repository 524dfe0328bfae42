"""The Settings tab's engine settings, declared once.

Each `Setting` names an `OffloadConfig` field and says which widget shows it, how a widget's value is
parsed into the field's value (ValueError naming what is allowed) and how a field's value is shown;
its help is the field's own doc (`OffloadConfig.field_docs()`). From `SETTINGS` the app derives the
widgets and their rows, the parameters of Apply (and so of the /apply_settings API, in this order
after the model), the values of the running engine for a page that opens, and what Unlock makes
editable. A new setting is a new entry here, nothing else.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import gradio as gr

from moe_runtime.config import ATTN_BITS, EXPERT_BITS, OFFLOAD_TIERS, OffloadConfig
from moe_runtime.policies import POLICIES
from webapp.service import device_choices

FIELD_DOCS = OffloadConfig.field_docs()


# --- widget values -> settings (each a ValueError naming what is wrong and what is allowed) ---------
def bits_text(bits: int | None) -> str:
    return "none" if bits is None else str(bits)


def bits_choices(allowed: tuple) -> list[tuple[str, str]]:
    return [("none (full precision)" if b is None else f"{b}-bit", bits_text(b)) for b in allowed]


def parse_bits(name: str, value) -> int | None:
    text = str(value).strip().lower() if value is not None else "none"
    if text in ("none", ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not allowed: use none or a number of bits") from None


def host_cache_value(name: str, value) -> float | str:
    """The host-cache box: "auto" or a number of GB."""
    text = str(value).strip().lower() if value is not None else "auto"
    if text in ("auto", ""):
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not allowed: use a number of GB or auto") from None


def whole_number(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not allowed: give a whole number")
    if value is None or value == "":
        raise ValueError(f"{name} is empty: give a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not allowed: give a whole number") from None
    if not number.is_integer():
        raise ValueError(f"{name}={value!r} is not allowed: give a whole number")
    return int(number)


def stripped(name: str, value) -> str:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}={value!r:.40} is not allowed: give it as text (e.g. cpu or cuda:0)")
    return (value or "").strip()


def as_given(name: str, value):
    return value  # OffloadConfig.validate names the allowed values


# --- the declaration -------------------------------------------------------------------------------
INFO_CHARS = 120  # a widget's info line; longer help is cut at a word, the full text is in --help


@dataclass(frozen=True)
class Setting:
    """One engine setting on the Settings tab. `widget(value, label=, info=, interactive=)` makes its
    widget; `parse(name, widget value)` -> the field's value; `show(field value)` -> the widget's value.
    `text`: a free-text value, bounded in size before it is parsed (webapp.limits.check_text)."""

    name: str  # the OffloadConfig field, and Apply's parameter
    label: str
    row: int  # the Settings tab's row it sits in (row 0 holds the model too)
    widget: Callable[..., gr.components.Component]
    parse: Callable[[str, object], object]
    show: Callable[[object], object] = lambda value: value
    text: bool = True
    default: object = inspect.Parameter.empty  # Apply's value when a caller omits it (added after the API)

    @property
    def help(self) -> str:
        return FIELD_DOCS[self.name]

    @property
    def info(self) -> str:
        """The line under the widget: the help's first sentence (the whole text is `app.py --help`'s)."""
        first = re.split(r"(?<=[.;:])\s", self.help, maxsplit=1)[0].rstrip(".;:")
        return first if len(first) <= INFO_CHARS else first[: INFO_CHARS - 1].rsplit(" ", 1)[0] + "…"

    def make(self, config: OffloadConfig, editable: bool) -> gr.components.Component:
        return self.widget(self.show(getattr(config, self.name)), label=self.label, info=self.info,
                           interactive=editable)

    def value(self, widget_value):
        return self.parse(self.name, widget_value)


def _dropdown(choices: Callable[[], list], value, **kw) -> gr.Dropdown:
    return gr.Dropdown(choices(), value=value, **kw)


SETTINGS: tuple[Setting, ...] = (
    Setting("expert_bits", "Expert bits (HQQ)", 1, partial(_dropdown, partial(bits_choices, EXPERT_BITS)),
            parse_bits, bits_text),
    Setting("attn_bits", "Attention bits (HQQ)", 1, partial(_dropdown, partial(bits_choices, ATTN_BITS)),
            parse_bits, bits_text),
    Setting("cache_size", "Cache size per layer", 1, partial(gr.Number, precision=0), whole_number, text=False),
    Setting("prefetch", "Prefetch", 1, partial(gr.Number, precision=0), whole_number, text=False),
    Setting("offload", "Offload tier", 2, partial(gr.Radio, list(OFFLOAD_TIERS)), as_given),
    Setting("device", "Device", 0, partial(_dropdown, device_choices, allow_custom_value=True), stripped),
    Setting("policy", "Eviction policy", 2, partial(gr.Radio, list(POLICIES)), as_given),
    Setting("host_cache_gb", "Host RAM cache (GB)", 2, gr.Textbox, host_cache_value, str, default="auto"),
)
ROWS = sorted({s.row for s in SETTINGS})


def apply_signature(progress) -> inspect.Signature:
    """Apply's parameters: self, model, each setting by name in the declaration's order (the
    /apply_settings API's order), operator_token, then gradio's `progress` tracker."""
    def parameter(name: str, default=inspect.Parameter.empty) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)

    return inspect.Signature([parameter("self"), parameter("model"), *(parameter(s.name, s.default) for s in SETTINGS),
                              parameter("operator_token", ""), parameter("progress", progress)])
