"""Completions relayed from inference workers: pick a worker from the registry, forward the request, and answer
in OpenAI's shape, whole or as server-sent events.

A worker that cannot be reached before anything was generated is skipped for the next one; a worker lost
mid-answer ends a stream with an error event (OpenAI's SDK raises it as an APIError) and a whole answer with
503, and the client's retry goes to another worker. The tenant's place (its concurrency limit) is held from
admission until the answer's last frame (given back just before it, so that a client that reads the end and asks
again at once is admitted), and given back when the client disconnects."""

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import httpx
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from shared.db import session_scope
from shared.errors import InvalidRequest, TunequeueError
from shared.ids import new_id, now
from shared.inference import limits, registry, schemas
from shared.inference.service import Target, resolve
from shared.secrets import derived_token
from shared.settings import get_settings

TOKEN_PURPOSE = "tunequeue inference worker"  # the same purpose as worker.inference.server's
CONNECT_SECONDS = 5.0


class NoInferenceWorker(TunequeueError):
    status_code = 503
    type = "server_error"
    code = "no_inference_worker"


class InferenceFailed(TunequeueError):
    status_code = 503
    type = "server_error"
    code = "inference_worker_lost"


class InferenceTimeout(TunequeueError):
    status_code = 504
    type = "server_error"
    code = "inference_timeout"


_client: httpx.AsyncClient | None = None


def _http() -> httpx.AsyncClient:
    global _client
    if _client is None:
        _client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_SECONDS), trust_env=False)
    return _client


async def respond(body: schemas.ChatCompletionCreate | schemas.CompletionCreate, tenant: str, chat: bool):
    settings = get_settings()
    body.refuse_unsupported(settings.inference_max_n)
    worker_body = body.worker_body(settings.inference_max_tokens)
    target, endpoints, admitted = await run_in_threadpool(_admit, tenant, body.model)
    try:
        lines = await _open(endpoints, {**worker_body, **target.worker_fields()})
    except BaseException:
        await run_in_threadpool(_release, admitted)
        raise
    reply = _Reply(target, chat, worker_body["n"], deadline=time.monotonic() + settings.inference_timeout_seconds)
    if body.stream:
        # The place is given back before the stream's last frame, so that a client that reads the end (an error
        # included) and asks again at once is admitted; and in any case when the stream ends (a disconnect).
        events = reply.stream(lines, body.include_usage, ending=lambda: run_in_threadpool(_release, admitted))
        return StreamingResponse(_released(events, admitted), media_type="text/event-stream")
    try:
        return JSONResponse(await reply.whole(lines))
    finally:
        await run_in_threadpool(_release, admitted)


def _admit(tenant: str, model: str) -> tuple[Target, list[registry.Endpoint], str]:
    settings = get_settings()
    with session_scope() as session:
        target = resolve(session, tenant, model)
        endpoints = registry.endpoints_for(
            session,
            target.base,
            (target.adapter or {}).get("name"),
            heartbeat_seconds=settings.inference_heartbeat_seconds,
        )
        if not endpoints:
            raise NoInferenceWorker(
                f"No inference worker is running for {target.base}: start one with `tunequeue worker --inference`",
                param="model",
            )
        admitted = limits.admit(
            session,
            tenant,
            model,
            limit=settings.inference_concurrency_per_tenant,
            timeout_seconds=settings.inference_timeout_seconds,
        )
    return target, endpoints, admitted


def _release(admitted: str) -> None:
    with session_scope() as session:
        limits.release(session, admitted)


async def _released(events: AsyncIterator[bytes], admitted: str) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield event
    finally:
        await asyncio.shield(run_in_threadpool(_release, admitted))


async def _open(endpoints: list[registry.Endpoint], body: dict) -> "_Lines":
    """The first worker (best first) that accepts the request; refusals of the request itself are the caller's."""
    headers = {"Authorization": f"Bearer {derived_token(TOKEN_PURPOSE)}"}
    failures = []
    for endpoint in endpoints:
        request = _http().build_request("POST", f"{endpoint.url}/generate", json=body, headers=headers)
        try:
            response = await _http().send(request, stream=True)
        except httpx.TransportError as exc:
            failures.append(f"{endpoint.name}: {type(exc).__name__}")
            continue
        if response.status_code == 400:
            error = json.loads(await response.aread())["error"]
            await response.aclose()
            raise InvalidRequest(error["message"], param=error.get("param"))
        if response.status_code != 200:
            failures.append(f"{endpoint.name}: HTTP {response.status_code}")
            await response.aclose()
            continue
        return _Lines(response, endpoint.name)
    raise NoInferenceWorker("No inference worker could take the request (" + "; ".join(failures) + "); retry shortly")


class _Lines:
    """A worker's events, one JSON object per line, until the worker ends them or is lost."""

    def __init__(self, response: httpx.Response, worker: str):
        self.response, self.worker = response, worker

    async def events(self) -> AsyncGenerator[dict, None]:
        try:
            async for line in self.response.aiter_lines():
                if line:
                    yield json.loads(line)
        except httpx.TransportError as exc:
            yield {"type": "error", "message": f"the inference worker {self.worker} was lost ({type(exc).__name__})"}
        finally:
            await self.response.aclose()


class _Reply:
    """The worker's events shaped as one OpenAI completion or as its chunks."""

    def __init__(self, target: Target, chat: bool, n: int, deadline: float):
        self.target, self.chat, self.n, self.deadline = target, chat, n, deadline
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), now()
        self.prompt_tokens, self.completion_tokens = 0, 0
        self.texts: dict[int, str] = {}
        self.reasons: dict[int, str] = {}

    def _take(self, event: dict) -> None:
        if event["type"] == "start":
            self.prompt_tokens = event["prompt_tokens"]
        elif event["type"] == "text":
            self.texts[event["index"]] = self.texts.get(event["index"], "") + event["text"]
        elif event["type"] == "end":
            self.reasons[event["index"]] = event["finish_reason"]
            self.completion_tokens += len(event["tokens"])

    async def _timed(self, lines: _Lines) -> AsyncIterator[dict]:
        """The worker's events until all choices ended; an error or timeout event in place of the rest."""
        events = lines.events()
        try:
            while len(self.reasons) < self.n:
                left = self.deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(anext(events), timeout=max(left, 0.001))
                except TimeoutError:
                    yield {"type": "timeout"}
                    return
                except StopAsyncIteration:
                    yield {"type": "error", "message": f"the inference worker {lines.worker} ended the answer early"}
                    return
                self._take(event)
                yield event
                if event["type"] == "error":
                    return
        finally:
            await events.aclose()

    @property
    def usage(self) -> dict:
        return schemas.usage(self.prompt_tokens, self.completion_tokens)

    async def whole(self, lines: _Lines) -> dict:
        async for event in self._timed(lines):
            if event["type"] == "timeout":
                raise InferenceTimeout(
                    f"The completion took longer than {get_settings().inference_timeout_seconds:g} s"
                )
            if event["type"] == "error":
                raise InferenceFailed(f"The completion failed: {event['message']}; retry it")
        shape: Callable[..., dict] = schemas.chat_completion if self.chat else schemas.text_completion
        return shape(self.id, self.created, self.target.model, self.texts, self.reasons, self.usage)

    async def stream(
        self, lines: _Lines, include_usage: bool, ending: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncIterator[bytes]:
        """The answer as server-sent events; `ending` is awaited before the last frame ([DONE] or an error)."""
        if self.chat:
            for index in range(self.n):
                yield self._frame(self._chunk(index, {"role": "assistant", "content": ""}, None))
        async for event in self._timed(lines):
            if event["type"] == "text":
                delta = {"content": event["text"]} if self.chat else event["text"]
                yield self._frame(self._chunk(event["index"], delta, None))
            elif event["type"] == "end":
                yield self._frame(self._chunk(event["index"], {} if self.chat else "", event["finish_reason"]))
            elif event["type"] in ("error", "timeout"):
                if ending is not None:
                    await ending()
                yield self._frame(self._error(event))
                return
        if include_usage:
            kind = "chat.completion.chunk" if self.chat else "text_completion"
            yield self._frame(schemas.usage_chunk(self.id, self.created, self.target.model, kind, self.usage))
        if ending is not None:
            await ending()
        yield b"data: [DONE]\n\n"

    def _chunk(self, index: int, delta, finish_reason: str | None) -> dict:
        if self.chat:
            return schemas.chat_chunk(self.id, self.created, self.target.model, index, delta, finish_reason)
        return schemas.text_chunk(self.id, self.created, self.target.model, index, delta, finish_reason)

    def _error(self, event: dict) -> dict:
        error: TunequeueError
        if event["type"] == "timeout":
            error = InferenceTimeout(f"The completion took longer than {get_settings().inference_timeout_seconds:g} s")
        else:
            error = InferenceFailed(f"The completion failed: {event['message']}; retry it")
        return error.to_dict()

    @staticmethod
    def _frame(payload: dict) -> bytes:
        return f"data: {json.dumps(payload)}\n\n".encode()
