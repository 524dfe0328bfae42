"""The OpenAI-compatible chat API, served by the app's own server (same host and port as the UI).

    POST /v1/chat/completions   messages, max_tokens (or max_completion_tokens), temperature, top_p,
                                stop, stream (server-sent events), stream_options.include_usage, seed
    GET  /v1/models             the one model being served

Replies go through the same `EngineService.chat` as the Chat tab: the same engine, one reply at a
time, the same input checks (`build_messages`, `GenerationSettings.validate`) and the same refusals,
here as OpenAI-style JSON errors (`{"error": {"message", "type", "param", "code"}}`) with HTTP 4xx
for bad input, 401 for a missing or wrong API key (only when the operator set one), 503 when no
engine can take the reply. Fields this server does not use (`frequency_penalty`, `user`, ...) are
ignored, as other OpenAI-compatible servers do; `n` must be 1. The `model` field is not checked:
one model is served, and its name is what the responses carry.

A reply runs on its own thread and hands its updates to the event loop; a client that goes away
mid-stream stops the generation at the next token (the engine is never left held). At most
MAX_PENDING replies run or wait for the engine at once; more get HTTP 429.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from moe_runtime.engine import GenerationSettings, StreamUpdate
from webapp import redact
from webapp.service import EngineService, build_messages, message_text, public_name

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused before it is parsed
MAX_PENDING = 16  # replies running or waiting for the engine at once; more get 429 (each holds a thread)
MAX_STOP = 4  # stop sequences per request (as OpenAI's API)
MAX_STOP_CHARS = 256  # characters per stop sequence (each is searched for at every token)
DISCONNECT_POLL_S = 0.25  # how often a non-streaming reply checks that its client is still there
SYSTEM_ROLES = ("system", "developer")  # "developer" is the newer OpenAI name of the system message
# the engine's and service's reasons -> OpenAI's ("context": the reply was clipped to the context window)
FINISH_REASONS = {"stop": "stop", "cancelled": "stop", "length": "length", "time": "length", "context": "length"}


class APIError(Exception):
    """A refusal the client gets as `{"error": {...}}` with HTTP `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class ChatRequest:
    """A checked /v1/chat/completions request: what the engine gets, and how to answer."""

    messages: list[dict]  # as build_messages returns them (system, history, the new user message)
    settings: GenerationSettings
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body, default_max_tokens: int = 128, default_temperature: float = 0.7,
                       default_top_p: float = 0.95) -> ChatRequest:
    """Check a decoded JSON body; APIError (400, naming the field and what is allowed) on bad input.
    Defaults are the Chat tab's."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = _chat_messages(body.get("messages"))
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise APIError(400, f"n={_short(n)} is not allowed: this server returns one choice (n=1)", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    settings = GenerationSettings(
        max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature", default_temperature),
        top_p=_number(body, "top_p", default_top_p),
        seed=body.get("seed"),
    )
    if settings.seed is not None and (isinstance(settings.seed, bool) or not isinstance(settings.seed, int)):
        raise APIError(400, f"seed={_short(settings.seed)} is not allowed: use an integer in 0..2**63-1", "seed")
    try:
        settings.validate()
    except ValueError as err:
        param = str(err).split("=", 1)[0]
        raise APIError(400, str(err).replace("max_new_tokens", "max_tokens"),
                       "max_tokens" if param == "max_new_tokens" else param) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, f"stream={_short(stream)} is not allowed: use true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    return ChatRequest(messages, settings, _stop_sequences(body.get("stop")), bool(stream),
                       bool(options.get("include_usage")))


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"{name}={_short(value)} is not allowed: use a number", name)
    return value


def _stop_sequences(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"stop={_short(stop)} is not allowed: use a non-empty string or a list of up to "
                            f"{MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"a stop sequence is longer than {MAX_STOP_CHARS} characters", "stop")
    return tuple(stops)


def _short(value, most: int = 60) -> str:
    """A submitted value for an error message, cut: an error never echoes a whole request."""
    if isinstance(value, list) and len(value) > 8:
        value = [*value[:8], "..."]
    text = repr(value)
    return text if len(text) <= most else text[:most - 3] + "..."


def _chat_messages(messages) -> list[dict]:
    """OpenAI messages -> the Chat tab's (system prompt, history, new message), checked by the same
    `build_messages`. Optional system (or developer) message first; the last message is the user's."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    for index, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m.get("content") is None:
            raise APIError(400, f"messages[{index}] must be an object with a role and a text content", "messages")
        if m["role"] in SYSTEM_ROLES and index > 0:
            raise APIError(400, f"messages[{index}]: a {m['role']} message is allowed only first", "messages")
        if m["role"] not in (*SYSTEM_ROLES, "user", "assistant"):
            raise APIError(400, f"messages[{index}]: role {m['role']!r} is not allowed: use system, user or "
                                "assistant (tools are not supported)", "messages")
    system = messages[0] if messages[0]["role"] in SYSTEM_ROLES else None
    if messages[-1]["role"] != "user" or messages[-1] is system:
        raise APIError(400, "the last message must be the user's: the reply continues it", "messages")
    try:
        return build_messages(message_text(messages[-1]["content"]), messages[1 if system else 0:-1],
                              message_text(system["content"]) if system else None)
    except ValueError as err:
        raise APIError(400, str(err), "messages") from None


class StopScanner:
    """Turns the growing reply into the deltas a client may see: text is held back while it could
    be the start of a stop sequence, and cut before the first stop sequence found."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0
        self.stopped = False

    def delta(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        found = [i for i in (text.find(s, max(self.sent - self.hold, 0)) for s in self.stops) if i >= 0]
        if found:
            self.stopped, end = True, min(found)
        else:
            end = len(text) if final else max(len(text) - self.hold, self.sent)
        piece, self.sent = text[self.sent:end], max(self.sent, end)
        return piece


_END = object()


class _Reply:
    """One reply on its own thread, which hands each StreamUpdate to the event loop; `next()` (async)
    returns them, then None. `done` is called when the thread ends (it frees the request's place)."""

    def __init__(self, service: EngineService, request: ChatRequest, done) -> None:
        self.stop = threading.Event()
        self.service = service
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, args=(service, request, done), daemon=True,
                                        name="openai-reply")
        self._thread.start()

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the server's loop has closed: nobody is waiting
            self.stop.set()

    def _run(self, service: EngineService, request: ChatRequest, done) -> None:
        try:
            for update in service.chat(request.messages, request.settings, self.stop):
                self._put(update)
        except BaseException as err:  # handed to the client as an error
            self._put(err)
        finally:
            done()
        self._put(_END)

    async def next(self) -> StreamUpdate | None:
        item = await self._items.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise _api_error(item, self.service)
        return item


async def _stop_when_gone(request: Request, reply: _Reply) -> None:
    """Ends `reply` at its next token once the client has disconnected (a non-streaming request
    notices no failed write, so it asks)."""
    while not reply.stop.is_set():
        if await request.is_disconnected():
            reply.stop.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def _api_error(err: BaseException, service=None) -> APIError:
    text = redact.shown(err, service)  # no server paths; the full text goes to the server's log
    if isinstance(err, ValueError):
        if "busy" in text or "no model is loaded" in text:
            return APIError(503, text, kind="server_error", code="engine_unavailable")
        return APIError(400, text)
    return APIError(500, f"the reply failed: {type(err).__name__}: {text}", kind="server_error")


class OpenAIServer:
    """The /v1 routes over one `EngineService`; `api_key` (None: open) is required as a Bearer token."""

    def __init__(self, service: EngineService, *, api_key: str | None = None, default_max_tokens: int = 128,
                 max_pending: int = MAX_PENDING) -> None:
        self.service = service
        self.max_pending = max_pending
        self._pending = threading.BoundedSemaphore(max_pending)
        self.api_key = api_key or None
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/v1")
        router.add_api_route("/models", self.models, methods=["GET"])
        router.add_api_route("/chat/completions", self.chat_completions, methods=["POST"])
        return router

    def mount(self, app: FastAPI) -> None:
        """Add the routes to a (running) FastAPI app, e.g. the gradio server's."""
        app.include_router(self.router())

    # --- endpoints --------------------------------------------------------------------------------
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except APIError as err:
            return err.response()
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "moe-offload"}]}

    async def chat_completions(self, request: Request):
        try:
            self._authorize(request)
            chat = parse_chat_request(await self._json(request), self.default_max_tokens)
            if not self._pending.acquire(blocking=False):
                raise APIError(429, f"{self.max_pending} requests are already running or waiting for the engine: "
                                    "try again later", kind="rate_limit_error", code="too_many_requests")
            reply = _Reply(self.service, chat, self._pending.release)
            first = await reply.next()  # input refusals come before any token: a real 4xx, also when streaming
        except APIError as err:
            return err.response()
        if chat.stream:
            return StreamingResponse(self._events(chat, reply, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_stop_when_gone(request, reply))  # a client that leaves stops the reply
        try:
            return await self._complete(chat, reply, first)
        except APIError as err:
            return err.response()
        finally:
            watcher.cancel()

    @property
    def model_id(self) -> str:
        return public_name(self.service.model)

    # --- helpers ----------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key")

    @staticmethod
    async def _json(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not JSON: {_short(str(err), 120)}") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        except ValueError:  # an integer of more than 4300 digits
            raise APIError(400, "the request body has a number too long to read (over 4300 digits)") from None

    def _head(self, kind: str) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_id}

    async def _complete(self, chat: ChatRequest, reply: _Reply, update: StreamUpdate | None) -> dict:
        scanner, last = StopScanner(chat.stop), update
        while update is not None:
            last = update
            scanner.delta(update.text, update.finished)
            if scanner.stopped:
                reply.stop.set()  # the engine ends the reply at its next token
            update = await reply.next()
        text = last.text if last is not None else ""
        content = text[:scanner.sent] if scanner.stopped else text
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": _finish(last, scanner), "logprobs": None}],
                "usage": _usage(last)}

    async def _events(self, chat: ChatRequest, reply: _Reply, update: StreamUpdate | None) -> AsyncIterator[str]:
        head, scanner, last = self._head("chat.completion.chunk"), StopScanner(chat.stop), update

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while update is not None:
                last = update
                piece = scanner.delta(update.text, update.finished)
                if piece:
                    yield chunk({"content": piece})
                if scanner.stopped:
                    reply.stop.set()
                update = await reply.next()
            yield chunk({}, _finish(last, scanner))
            if chat.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(last)})}\n\n"
        except APIError as err:  # the reply failed after it started: an error event ends the stream
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind, 'code': err.code}})}\n\n"
        finally:
            reply.stop.set()  # a client that left ends the generation at the next token
        yield "data: [DONE]\n\n"


def _finish(last: StreamUpdate | None, scanner: StopScanner) -> str:
    if scanner.stopped or last is None:
        return "stop"
    return FINISH_REASONS.get(last.finish_reason or "stop", "stop")


def _usage(last: StreamUpdate | None) -> dict:
    prompt, completion = (last.prompt_tokens, last.new_tokens) if last is not None else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
