"""What a visitor may read of an error: the message with the server's paths taken out.

Errors reach visitors through the Chat tab, the What-if notes, gradio's API and /v1. Their text can
name the working directory, the temp directory (an upload's copy, the trace folder), the model's or
the store's folder, or the home directory. `shown` replaces each such path by a short placeholder
(a file keeps its last name) and logs the full message to the server's log (logger "moe-offload"),
where the operator finds it.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

LOG = logging.getLogger("moe-offload")
MAX_SHOWN_CHARS = 2000  # a longer message is cut (an error may quote a whole input)
# an absolute path (POSIX or Windows) of two parts or more, or one under ~
_PATH = re.compile(r"(?<![\w.:/\\>~])(?:~|[A-Za-z]:)?[/\\](?:[\w.@+-]+[/\\])+[\w.@+-]*")


def server_paths(service=None) -> list[str]:
    """The folders whose names must not show, longest first."""
    found = {os.getcwd(), tempfile.gettempdir(), str(Path.home()), os.environ.get("GRADIO_TEMP_DIR", "")}
    if service is not None:
        found.add(str(getattr(service, "model", "") or ""))
        trace_dir = getattr(getattr(service, "_trace_dir", None), "name", None)
        found.add(trace_dir or "")
        config = getattr(service, "config", None)
        store = getattr(config, "store_dir", None)
        if store:
            found.update({store, str(Path(store).expanduser().resolve())})
    for name in list(found):
        if name:
            found.add(os.path.realpath(name))
    return sorted((f for f in found if len(f) > 1 and os.path.isabs(os.path.expanduser(f))), key=len, reverse=True)


def redact(text: str, service=None) -> str:
    """`text` without server paths: known folders become <server folder>, other absolute paths keep
    only their last part (`<path>/name`)."""
    for folder in server_paths(service):
        text = text.replace(folder, "<server folder>")
    text = _PATH.sub(lambda m: "<path>/" + re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1], text)
    if len(text) > MAX_SHOWN_CHARS:
        text = text[:MAX_SHOWN_CHARS] + "…"
    return text


def shown(err: BaseException | str, service=None) -> str:
    """The error's text for a visitor (`redact`); the full text goes to the server's log."""
    full = err if isinstance(err, str) else (str(err) or type(err).__name__)
    short = redact(full, service)
    if short != full:
        LOG.warning("error shown without server paths; in full: %s", full)
    return short
