"""The inference worker's HTTP endpoint (`tunequeue worker --inference`): the API forwards each completion
request here and relays what comes back.

    POST /generate   {"base", "adapter", "messages" | "prompt", "max_tokens", "temperature", "top_p", "stop",
                      "seed", "n"}  ->  newline-delimited JSON events:
                     {"type": "start", "prompt_tokens"}, {"type": "text", "index", "text"},
                     {"type": "end", "index", "finish_reason", "tokens"}, or {"type": "error", "message"}
    GET  /health     what the worker holds, its requests in flight, its memory

Every call carries `Authorization: Bearer <token>`, a token derived from the deployment's secret key
(`shared.secrets.derived_token`), so only the API (or whoever holds the key) can use a worker. A client that
disconnects cancels its request: the decoding thread drops its rows at the next token."""

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from worker.inference.decoding import Sampling
from worker.inference.engine import AdapterSource, Engine, Request

log = logging.getLogger("tunequeue.inference")
TOKEN_PURPOSE = "tunequeue inference worker"


class Refused(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def create_app(engine: Engine, token: str) -> Starlette:
    async def generate(http: HttpRequest):
        if not _authorised(http, token):
            return JSONResponse({"error": {"message": "unauthorised"}}, status_code=401)
        body = await http.json()
        try:
            request, events = await asyncio.to_thread(_prepare, engine, body, asyncio.get_running_loop())
        except Refused as refused:
            return JSONResponse(
                {"error": {"message": refused.message, "param": refused.param}}, status_code=refused.status
            )
        engine.submit(request)
        return StreamingResponse(_relay(request, events), media_type="application/x-ndjson")

    async def health(http: HttpRequest):
        if not _authorised(http, token):
            return JSONResponse({"error": {"message": "unauthorised"}}, status_code=401)
        return JSONResponse({**engine.describe(), **memory()})

    return Starlette(routes=[Route("/generate", generate, methods=["POST"]), Route("/health", health)])


def _authorised(http: HttpRequest, token: str) -> bool:
    given = http.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), token.encode())


def _prepare(engine: Engine, body: dict, loop: asyncio.AbstractEventLoop) -> tuple[Request, asyncio.Queue]:
    """Load the base if this worker does not hold it yet, render the prompt with its tokenizer, check the length."""
    loaded = engine.base(body["base"])
    tokenizer = loaded.tokenizer
    if body.get("messages") is not None:
        if not tokenizer.chat_template:
            raise Refused(f"{body['base']} has no chat template: use /v1/completions with a prompt", "messages")
        rendered: Any = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_dict=True)
        prompt = list(rendered["input_ids"])
    else:
        prompt = list(tokenizer(body["prompt"])["input_ids"])
    if not prompt:
        raise Refused("The prompt is empty", "prompt")
    context = int(getattr(loaded.base.config, "max_position_embeddings", 0) or 0)
    if context and len(prompt) + body["max_tokens"] > context:
        raise Refused(
            f"The prompt ({len(prompt)} tokens) and max_tokens ({body['max_tokens']}) exceed the model's context of "
            f"{context} tokens: lower max_tokens or shorten the prompt",
            "max_tokens",
        )
    events: asyncio.Queue = asyncio.Queue()

    def emit(event: dict) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the request's loop is gone (the server is stopping)
            pass

    adapter = AdapterSource(**body["adapter"]) if body.get("adapter") else None
    sampling = Sampling(
        max_tokens=body["max_tokens"],
        temperature=body["temperature"],
        top_p=body["top_p"],
        stop=tuple(body.get("stop") or ()),
        seed=body.get("seed"),
    )
    return Request(body["base"], adapter, prompt, sampling, int(body.get("n") or 1), emit), events


async def _relay(request: Request, events: asyncio.Queue):
    ended = 0
    try:
        while ended < request.n:
            event = await events.get()
            yield json.dumps(event) + "\n"
            if event["type"] == "error":
                return
            ended += event["type"] == "end"
    finally:
        request.cancelled.set()  # the client went away, or all ended: either way no more tokens for it


def memory() -> dict:
    """This process's resident memory now and at its peak (Linux), for /health and the registry."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":")
                fields["rss_bytes" if name == "VmRSS" else "peak_rss_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields


def devices() -> list[str]:
    """The GPUs this worker may use (`--devices`, pinned through CUDA_VISIBLE_DEVICES), or its CPU."""
    pinned = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    return [f"gpu:{d}" for d in pinned] if pinned else ["cpu"]


def serve(host: str, port: int, advertise: str | None, models: list[str]) -> int:
    """Load `models` (if any), listen, and report the endpoint to the database until stopped."""
    import uvicorn

    from shared.secrets import derived_token
    from shared.settings import get_settings

    settings = get_settings()
    engine = build_engine(settings)
    for model_id in models:
        engine.base(model_id)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    url = advertise or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{bound}"
    name = f"inference-{os.getpid()}@{socket.gethostname()}"
    print(f"inference worker {name} listening on {url}", flush=True)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat_loop, args=(engine, name, url, models or None, stop, settings.inference_heartbeat_seconds),
        daemon=True, name="tunequeue-inference-heartbeat",
    )  # fmt: skip
    beat.start()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, derived_token(TOKEN_PURPOSE)), log_level="info", timeout_graceful_shutdown=10)
    )
    try:
        server.run(sockets=[sock])
    finally:
        stop.set()
        engine.stop()
        _forget(name)
    return 0


def build_engine(settings) -> Engine:
    from shared.basemodels.service import ensure_local_copy, get_base_model
    from shared.db import session_scope
    from shared.storage import download_verified, get_storage
    from worker.inference.engine import fetch_adapter_to

    storage = get_storage()

    def locate_base(model_id: str) -> Path:
        with session_scope() as session:
            record = get_base_model(session, model_id)
            session.expunge(record)
        return ensure_local_copy(record, storage, settings.resolved_model_dir)

    def download(key: str, path: Path, sha256: str | None) -> None:
        if sha256:
            download_verified(storage, key, path, sha256)
        else:
            storage.download(key, path)

    cache = settings.resolved_data_dir / "inference-adapters"
    return Engine(
        locate_base,
        fetch_adapter_to(cache, download),
        quantization=settings.inference_quantization,
        adapters_per_base=settings.inference_adapters,
        max_batch=settings.inference_max_batch,
    )


def _heartbeat_loop(engine: Engine, name: str, url: str, models, stop: threading.Event, seconds: float) -> None:
    from shared.db import session_scope
    from shared.inference.registry import record_endpoint

    started = int(time.time())
    while not stop.is_set():
        try:
            with session_scope() as session:
                held = {**engine.describe(), **memory(), "devices": devices()}
                record_endpoint(session, name, pid=os.getpid(), started_at=started, url=url, models=models, held=held)
        except Exception as exc:  # the database may be briefly away; the next beat retries
            log.warning("inference heartbeat failed: %s", exc)
        stop.wait(seconds)


def _forget(name: str) -> None:
    from shared.db import session_scope
    from shared.inference.registry import forget

    try:
        with session_scope() as session:
            forget(session, name)
    except Exception as exc:
        log.warning("could not remove %s from the registry: %s", name, exc)
