"""The OpenAI-compatible HTTP API over an Engine (FastAPI on uvicorn).

/v1/chat/completions and /v1/completions (streaming SSE or one JSON body), /v1/models, /health, /metrics. Every
error is OpenAI's body {"error": {"message", "type", "code"}} with a 4xx status: malformed JSON, a wrong type,
an unknown model, a prompt the context cannot hold (400), a wrong API key (401), a full server (503 with
Retry-After). A client that disconnects frees its row at the next token boundary.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import SlmError
from ..generate import GenerationConfig
from ..batching import Busy, Engine, Event, Request as EngineRequest
from ..collab.cascade import quantile_confidence
from .cascade import CascadeRoute, UpstreamError, ask_upstream
from .metrics import Metrics
from .schemas import ChatRequest, CompletionRequest, Sampling


@dataclass
class ServeConfig:
    model_id: str  # the name /v1/models lists and requests must use
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    max_tokens: int = 1024  # cap of a request's max_tokens (and its default)
    retry_after_s: int = 1  # what a 503 tells the client to wait
    max_in_flight: int | None = None  # HTTP requests at once before a 503 (default: rows + queue + 16)
    cascade: CascadeRoute | None = None  # escalate unconfident answers to a large model (serve/cascade.py)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def error_response(status: int, message: str, type_: str, code: str | None, headers: dict | None = None):
    return JSONResponse({"error": {"message": message, "type": type_, "code": code, "param": None}},
                        status_code=status, headers=headers)


def create_app(engine: Engine, config: ServeConfig, own_engine: bool = True) -> FastAPI:
    """The ASGI app. With own_engine, the app starts the engine's thread on start-up and stops it on shut-down."""
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(_app):
        engines = [engine] * own_engine + ([config.cascade.engine] if config.cascade and config.cascade.engine else [])
        for e in engines:
            e.start()
        yield
        for e in engines:
            e.stop()

    app = FastAPI(title="slmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.state.stop_ids = engine.tokenizer.stop_ids()  # renders the chat template: once, not per request
    _error_handlers(app)
    auth = _auth(config)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.n_active, "queued": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": 0,
                                            "owned_by": "slmkit"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatRequest, request: Request):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            ids = engine.tokenizer.encode(engine.tokenizer.render_chat(messages))
        except SlmError as e:  # no chat template, or the template refuses these messages
            raise ApiError(400, f"{e} (use /v1/completions)", code="invalid_messages") from None
        return await _complete(app, request, body, ids, chat=True, max_tokens=body.max_completion_tokens)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request):
        return await _complete(app, request, body, engine.tokenizer.encode(body.prompt), chat=False)

    limit = config.max_in_flight or engine.max_active + engine.max_queue + 16
    return CountRequests(app, metrics, limit, config.retry_after_s)


def _auth(config: ServeConfig):
    async def check(request: Request):
        if config.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error",
                           "invalid_api_key")
    return check


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "the body is not valid JSON", ""
        elif not where:
            message = f"the body must be a JSON object ({message})"
        return error_response(400, f"{where}: {message}" if where else message, "invalid_request_error",
                              "invalid_value" if where else "invalid_json")

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error", None)

    @app.exception_handler(Exception)
    async def internal(_request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error", None)


async def _complete(app: FastAPI, request: Request, body: Sampling, ids: list[int], chat: bool,
                    max_tokens: int | None = None):
    engine, config = app.state.engine, app.state.config
    if body.model not in (None, "", config.model_id):
        raise ApiError(400, f"model {body.model!r} is not served here; this server serves {config.model_id!r}",
                       code="model_not_found")
    gen = GenerationConfig(min(max_tokens or body.max_tokens or config.max_tokens, config.max_tokens),
                           body.temperature, 0, body.top_p, app.state.stop_ids, body.seed)
    reply = Reply(config.model_id, chat, body.include_usage)
    if config.cascade is not None:
        return await _cascade(app, request, body, ids, gen, reply)
    handle, events = _submit(engine, ids, gen, body, config)
    if body.stream:
        return StreamingResponse(_sse(reply, events, handle, app.state.metrics), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    got = await _collect(handle, events, request, app.state.metrics)
    return Response(status_code=499) if got is None else reply.whole(got[0], got[1])


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _submit(engine: Engine, ids: list[int], gen: GenerationConfig, body: Sampling, config: ServeConfig):
    """Queue the request on `engine`; (handle, an asyncio queue its events arrive on)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    try:
        handle = engine.submit(EngineRequest(ids, gen, tuple(body.stop or ())),
                               lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    except Busy as e:
        raise ApiError(503, str(e), "server_error", "server_busy",
                       {"Retry-After": str(config.retry_after_s)}) from None
    except SlmError as e:
        raise ApiError(400, str(e), code="context_length_exceeded") from None
    return handle, events


async def _collect(handle, events: asyncio.Queue, request: Request, metrics: Metrics):
    """Wait for the whole completion (checking every second that the client is still there): (text, final
    event, token log-probabilities), or None when the client left."""
    pieces, logprobs = [], []
    while True:
        try:
            ev: Event = await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                handle.cancel()
                return None
            continue
        pieces.append(ev.text)
        if ev.logprob is not None:
            logprobs.append(ev.logprob)
        if ev.done:
            metrics.finished(ev)
            if ev.finish_reason in ("error", "cancelled"):
                raise ApiError(500 if ev.error else 503, ev.error or "the server is shutting down", "server_error",
                               ev.finish_reason)
            return "".join(pieces), ev, logprobs


async def _cascade(app: FastAPI, request: Request, body: Sampling, ids: list[int], gen: GenerationConfig,
                   reply: "Reply"):
    """The small model answers in full; below the threshold the large one answers instead. The response says
    which (X-Slmkit-Route) and the small answer's confidence (X-Slmkit-Confidence); a streamed response
    starts once the route is known."""
    config, metrics = app.state.config, app.state.metrics
    route: CascadeRoute = config.cascade
    got = await _collect(*_submit(app.state.engine, ids, gen, body, config), request, metrics)
    if got is None:
        return Response(status_code=499)
    text, ev, logprobs = got
    confidence = quantile_confidence(logprobs, route.quantile)
    escalate = confidence < route.threshold
    if escalate and route.engine is not None:
        got = await _collect(*_submit(route.engine, ids, gen, body, config), request, metrics)
        if got is None:
            return Response(status_code=499)
        text, ev, _ = got
    elif escalate:
        try:
            text, ev = await ask_upstream(route, request.url.path, body.model_dump(exclude_none=True))
        except UpstreamError as e:
            raise ApiError(e.status, e.message, "server_error", e.code) from None
    metrics.routed.labels("large" if escalate else "small").inc()
    headers = {"X-Slmkit-Route": "large" if escalate else "small", "X-Slmkit-Confidence": f"{confidence:.4f}"}
    if body.stream:
        return StreamingResponse(_sse_whole(reply, text, ev), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **headers})
    return JSONResponse(reply.whole(text, ev), headers=headers)


async def _sse_whole(reply: "Reply", text: str, ev: Event):
    """A finished answer as server-sent events."""
    if reply.chat:
        yield reply.sse(reply.chunk({"role": "assistant", "content": ""}, None))
    yield reply.sse(reply.chunk({"content": text} if reply.chat else text, None))
    yield reply.sse(reply.chunk({} if reply.chat else "", ev.finish_reason))
    if reply.include_usage:
        yield reply.sse(reply.usage_chunk(ev))
    yield "data: [DONE]\n\n"


async def _sse(reply: "Reply", events: asyncio.Queue, handle, metrics: Metrics):
    """Server-sent events: a role chunk (chat), content chunks, a finish chunk, a usage chunk if asked, [DONE]."""
    try:
        if reply.chat:
            yield reply.sse(reply.chunk({"role": "assistant", "content": ""}, None))
        while True:
            ev: Event = await events.get()
            if ev.text:
                yield reply.sse(reply.chunk({"content": ev.text} if reply.chat else ev.text, None))
            if ev.done:
                metrics.finished(ev)
                if ev.finish_reason in ("error", "cancelled"):
                    yield reply.sse({"error": {"message": ev.error or "the server is shutting down",
                                               "type": "server_error", "code": ev.finish_reason}})
                else:
                    yield reply.sse(reply.chunk({} if reply.chat else "", ev.finish_reason))
                    if reply.include_usage:
                        yield reply.sse(reply.usage_chunk(ev))
                yield "data: [DONE]\n\n"
                return
    finally:
        handle.cancel()  # the client left (or we are done): the row is freed at the next token boundary


class Reply:
    """OpenAI's response shapes for one request."""

    def __init__(self, model_id: str, chat: bool, include_usage: bool):
        self.model_id, self.chat, self.include_usage = model_id, chat, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    @staticmethod
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    @staticmethod
    def usage(ev: Event) -> dict:
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id}

    def chunk(self, delta, finish_reason: str | None) -> dict:
        choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason} if self.chat
                  else {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason})
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        return {**out, "usage": None} if self.include_usage else out

    def usage_chunk(self, ev: Event) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage(ev)}

    def whole(self, text: str, ev: Event) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": ev.finish_reason} if self.chat
                  else {"index": 0, "text": text, "logprobs": None, "finish_reason": ev.finish_reason})
        return {**self._head(self.object), "choices": [choice], "usage": self.usage(ev)}


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class CountRequests:
    """ASGI middleware (plain ASGI: it never buffers a streaming body): counts each HTTP response by endpoint
    and status into the metrics, and answers 503 at once, without reading the body, while `limit` requests are
    already in flight (a burst of connections costs a few bytes each, not a parse and a queue place)."""

    def __init__(self, app: FastAPI, metrics: Metrics, limit: int, retry_after_s: int):
        self.app, self.metrics, self.state, self.limit, self.retry_after_s = app, metrics, app.state, limit, retry_after_s
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"  # bounded label values, whatever clients ask for

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        if self.in_flight >= self.limit and path not in ("/health", "/metrics"):
            busy = error_response(503, f"{self.in_flight} requests in flight: the server is full", "server_error",
                                  "server_busy", {"Retry-After": str(self.retry_after_s)})
            return await busy(scope, receive, counting_send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.in_flight -= 1
