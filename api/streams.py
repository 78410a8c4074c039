"""A job's events as a server-sent event stream (`GET /v1/fine_tuning/jobs/{id}/events?stream=true`).

The stream polls the database once a second for events written after the last one it sent: one short read on
a pooled connection per poll, no connection held between polls, and it works the same on Postgres and SQLite
and whichever process wrote the events (a worker on another node). Every event carries its id, so a client
that reconnects with `Last-Event-ID` (browsers' EventSource does it by itself) gets exactly the events it
missed.

What a client receives, in this order:
- `retry: 2000`, then `event: job` with the job object;
- each event, oldest first, as a default (`message`) event whose data is the same JSON object the paged
  list returns, with `id:` set to the event's id;
- `event: job` again whenever the job's status or progress changes;
- a comment line (`: heartbeat`) every 15 seconds without news, so proxies keep the connection open;
- at a terminal status, the last events, `event: end` with the final job object, and the response ends.
A stream also ends after TUNEQUEUE_EVENT_STREAM_MAX_SECONDS (without `end`): the client reconnects."""

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from api.deps import read
from shared.jobs import service, state
from shared.jobs.models import Job, JobEvent
from shared.jobs.schemas import FineTuningJob, JobEventObject
from shared.settings import get_settings

POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 15.0
BATCH = 500  # events read per poll; a backlog (a reconnect after a long gap) drains without waiting


def _frame(data: str, event: str | None = None, event_id: str | None = None) -> bytes:
    lines = []
    if event_id:
        lines.append(f"id: {event_id}")
    if event:
        lines.append(f"event: {event}")
    lines.append(f"data: {data}")  # JSON from pydantic: one line, no raw newlines
    return ("\n".join(lines) + "\n\n").encode()


def _job_frame(job: Job, event: str) -> bytes:
    return _frame(FineTuningJob.of(job).model_dump_json(), event=event)


async def event_stream(request: Request, tenant: str, job_id: str, last_event_id: str | None) -> StreamingResponse:
    """Checks the job (404) and the resume point (404 naming Last-Event-ID) before the response starts, so
    that errors keep their status codes; then streams."""
    after = await read(service.event_seq, tenant, job_id, last_event_id) if last_event_id else 0
    job, events = await read(service.read_events_since, tenant, job_id, after_seq=after, limit=BATCH)
    return StreamingResponse(
        _frames(request, tenant, job, events, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _frames(request: Request, tenant: str, job: Job, events: list[JobEvent], after: int) -> AsyncIterator[bytes]:
    deadline = time.monotonic() + get_settings().event_stream_max_seconds
    yield b"retry: 2000\n\n"
    yield _job_frame(job, "job")
    shown = (job.status, json.dumps(job.progress, sort_keys=True))
    quiet_since = time.monotonic()
    while True:
        for event in events:
            after = event.seq
            yield _frame(JobEventObject.of(event).model_dump_json(), event_id=event.public_id)
        if events:
            quiet_since = time.monotonic()
        now = (job.status, json.dumps(job.progress, sort_keys=True))
        if now != shown:
            shown = now
            yield _job_frame(job, "job")
        if job.status in state.TERMINAL and len(events) < BATCH:
            yield _job_frame(job, "end")
            return
        if len(events) < BATCH:  # caught up: wait for news
            if time.monotonic() >= deadline or await _gone(request, POLL_SECONDS):
                return
            if time.monotonic() - quiet_since >= HEARTBEAT_SECONDS:
                quiet_since = time.monotonic()
                yield b": heartbeat\n\n"
        job, events = await read(service.read_events_since, tenant, job.id, after_seq=after, limit=BATCH)


async def _gone(request: Request, seconds: float) -> bool:
    """Waits up to `seconds`; True as soon as the client has disconnected."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if await request.is_disconnected():
            return True
        await asyncio.sleep(min(0.25, max(0.0, end - time.monotonic())))
    return await request.is_disconnected()
