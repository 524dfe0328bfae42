"""Bounds on every request the app's server takes, checked before any work is done for it.

- `check_text` / `text_bytes`: a byte cap per text input (chat message, history, system prompt,
  settings fields), checked before anything is tokenized or parsed further.
- `RequestGuard`, an ASGI middleware in front of gradio and the /v1 routes:
  * a request body over MAX_BODY_BYTES is refused (413) before it is read whole (uploads have
    gradio's own 1 MiB cap below this one);
  * a browser session may have at most MAX_EVENTS_PER_SESSION events in gradio's queue (429);
  * it keeps count of the sessions that listen for their results (gradio's /queue/data stream or
    the /call/<api>/<event> stream), so that work queued by someone who never listens can be
    dropped when its turn comes (`Listeners.wait_for`).
- `queue_wait`: how long a request has waited in gradio's queue, so the reply deadline counts it.

Gradio's queue itself is capped (`launch(max_size=MAX_QUEUE)` in app.py).
"""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import parse_qs

MAX_BODY_BYTES = 2 << 20  # any request body (gradio's JSON, an upload's multipart, /v1 has 1 MiB itself)
MAX_MESSAGE_BYTES = 64 << 10  # one chat message (the new one or one in the history)
MAX_SYSTEM_PROMPT_BYTES = 16 << 10
MAX_HISTORY_BYTES = 512 << 10  # the whole history, all messages together
MAX_HISTORY_MESSAGES = 4096  # (long chats are cut by bisection: O(log n) tokenizations)
MAX_CONTENT_PARTS = 64  # parts of one message's content (OpenAI's list form)
MAX_FIELD_BYTES = 1 << 10  # a settings field (model name, device, bits, token, ...)
MAX_QUEUE = 64  # events waiting in gradio's queue, all sessions together; more get "queue full"
MAX_EVENTS_PER_SESSION = 4  # events one browser session may have in gradio's queue at once
LISTEN_GRACE_S = 3.0  # queued work whose session has not started listening this long after it joined is dropped


def text_bytes(text: str, cap: int) -> int:
    """UTF-8 size of `text`, counted only up to what the cap needs (a huge string is not encoded)."""
    if len(text) > cap:  # a character is at least one byte
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def check_text(name: str, value, cap: int) -> None:
    """ValueError when `value` (a string; others pass: their type is checked where they are used)
    is larger than `cap` bytes, saying the limit."""
    if isinstance(value, str) and text_bytes(value, cap) > cap:
        raise ValueError(f"{name} is too long: at most {_size(cap)} (UTF-8), this one is over that")


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n >> 10} KiB" if n >= 1024 else f"{n} bytes"


class Listeners:
    """Sessions with an open result stream right now (counted by `RequestGuard`)."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}
        self._changed = threading.Condition()

    def opened(self, session: str) -> None:
        with self._changed:
            self._open[session] = self._open.get(session, 0) + 1
            self._changed.notify_all()

    def closed(self, session: str) -> None:
        with self._changed:
            left = self._open.get(session, 1) - 1
            if left > 0:
                self._open[session] = left
            else:
                self._open.pop(session, None)

    def wait_for(self, session: str, until: float) -> bool:
        """Whether `session` listens (or starts to, before the monotonic time `until`)."""
        with self._changed:
            return self._changed.wait_for(lambda: session in self._open, timeout=max(until - time.monotonic(), 0))


def queue_wait(blocks, session: str | None, fn_name: str) -> tuple[float, float | None]:
    """(seconds the oldest queued event of `session` for the function `fn_name` has waited, its
    enqueue time on the monotonic clock); (0, None) when gradio's queue does not know it (a direct call)."""
    queue = getattr(blocks, "_queue", None)
    if queue is None or session is None:
        return 0.0, None
    times = [event.enqueue_time for event in list(getattr(queue, "event_ids_to_events", {}).values())
             if event.session_hash == session and getattr(event.fn, "name", None) == fn_name]
    if not times:
        return 0.0, None
    joined = min(times)
    return max(time.monotonic() - joined, 0.0), joined


class RequestGuard:
    """ASGI middleware: body cap, per-session queue limit, listener count (see the module docstring).
    `blocks` (set once the app is built) gives the queue; without it only the body cap applies."""

    def __init__(self, app, guard: GuardState) -> None:
        self.app, self.state = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            return await _refuse(send, 413, f"the request body is over {_size(MAX_BODY_BYTES)}")
        if scope.get("method") == "POST" and path.endswith("/queue/join"):
            return await self._join(scope, receive, send)
        if scope.get("method") == "POST":
            receive = _capped(receive)
        session = self._listener(scope, path)
        if session is None:
            return await self._guarded(scope, receive, send)
        self.state.listeners.opened(session)
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.listeners.closed(session)

    async def _guarded(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except _TooLarge:
            await _refuse(send, 413, f"the request body is over {_size(MAX_BODY_BYTES)}")

    async def _join(self, scope, receive, send):
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                return await _refuse(send, 413, f"the request body is over {_size(MAX_BODY_BYTES)}")
        try:
            session = json.loads(body).get("session_hash")
        except (ValueError, AttributeError, RecursionError):
            session = None
        if isinstance(session, str) and self.state.queued(session) >= MAX_EVENTS_PER_SESSION:
            return await _refuse(send, 429, f"this session already has {MAX_EVENTS_PER_SESSION} requests waiting: "
                                            "wait for them to finish")
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _listener(self, scope, path: str) -> str | None:
        if scope.get("method") != "GET":
            return None
        if path.endswith("/queue/data"):
            found = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash")
            return found[0] if found else None
        parts = path.rstrip("/").split("/")
        if "call" in parts and len(parts) >= parts.index("call") + 3:  # /call/<api>/<event id>
            return self.state.session_of(parts[-1])
        return None


class _TooLarge(Exception):
    pass


def _capped(receive):
    """`receive` that raises _TooLarge once more than MAX_BODY_BYTES have come (a body without a length)."""
    count = 0

    async def wrapped():
        nonlocal count
        message = await receive()
        count += len(message.get("body", b""))
        if count > MAX_BODY_BYTES:
            raise _TooLarge
        return message
    return wrapped


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": None}, "detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class GuardState:
    """What the middleware and the handlers share: the listener count and the gradio app's queue."""

    def __init__(self) -> None:
        self.listeners = Listeners()
        self.blocks = None  # gradio.Blocks, set by app.launch
        self.public = False  # a public host (app.build_app sets it): unworded errors are not shown

    def _queue(self):
        return getattr(self.blocks, "_queue", None)

    def queued(self, session: str) -> int:
        queue = self._queue()
        if queue is None:
            return 0
        return sum(1 for e in list(getattr(queue, "event_ids_to_events", {}).values()) if e.session_hash == session)

    def session_of(self, event_id: str) -> str | None:
        queue = self._queue()
        event = getattr(queue, "event_ids_to_events", {}).get(event_id) if queue is not None else None
        return event.session_hash if event is not None else event_id  # gradio: an event without a session is its own

    def abandoned(self, session: str | None, joined: float | None) -> bool:
        """Whether queued work of `session` (which joined at `joined`, monotonic) has nobody to
        receive it: no result stream opened within LISTEN_GRACE_S of joining. Direct calls
        (no session, no queue) are never abandoned."""
        if session is None or joined is None or self.blocks is None:
            return False
        return not self.listeners.wait_for(session, joined + LISTEN_GRACE_S)
