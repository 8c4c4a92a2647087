"""`GET /v1/events`: the live feed over Server-Sent Events, resumable with `Last-Event-ID`.

A client that reconnects with the id of the last event it saw receives every later event
exactly once: the handler subscribes to the hub first, then replays stored events after that
id, then streams live ones, skipping any id it already sent.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from litestar import Controller, Request, get
from litestar.exceptions import ValidationException
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import Stream

from control_plane.api.instances import error_responses
from control_plane.feed.hub import FeedFilter, FeedHub

_BACKFILL_PAGE = 1000
_MAX_ID = 2**63 - 1  # event ids are bigint


class EventController(Controller):
    path = "/v1/events"
    tags = ["events"]

    @get("/", summary="Live event feed (text/event-stream)", responses=error_responses(400, 401))
    async def stream(
        self, request: Request,
        instance_id: Annotated[uuid.UUID | None, QueryParameter()] = None,
        type: Annotated[list[str] | None, QueryParameter(description="Event type or prefix* (repeatable)")] = None,
        last_event_id_header: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
        last_event_id: Annotated[int | None, QueryParameter(ge=0, le=_MAX_ID, description="Resume after this id (for clients that cannot set the header)")] = None,
    ) -> Stream:
        resume = last_event_id
        if last_event_id_header is not None:
            try:
                resume = int(last_event_id_header)
            except ValueError:
                resume = -1
            if not 0 <= resume <= _MAX_ID:
                raise ValidationException("Last-Event-ID must be an event id (an integer)")
        types = tuple(t for raw in type or [] for t in raw.split(",") if t)
        runtime = request.app.state.runtime
        feed = _feed(runtime.hub, FeedFilter(instance_id, types), resume,
                     runtime.settings.sse_keepalive_seconds)
        return Stream(feed, media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _feed(hub: FeedHub, feed_filter: FeedFilter, resume: int | None,
                keepalive: float) -> AsyncIterator[bytes]:
    """SSE frames: each event's frame is encoded once (`FeedEvent.frame`), and the events
    waiting in a subscriber's queue go out as one chunk (one write for a burst)."""
    sub = hub.subscribe(feed_filter)
    try:
        last = hub.position if resume is None else resume
        # The id tells a client where its stream starts, so it can resume from here.
        yield f": connected\r\nid: {last}\r\n\r\n".encode()
        if resume is not None:
            while True:
                events = await hub.fetch_since(last, feed_filter, _BACKFILL_PAGE)
                if events:
                    yield b"".join(e.frame for e in events)
                    last = events[-1].id
                if len(events) < _BACKFILL_PAGE:
                    break
        while True:
            if sub.overflowed and sub.queue.empty():
                return  # too slow: the client reconnects with Last-Event-ID
            waiting = []
            if sub.queue.empty():
                try:
                    async with asyncio.timeout(keepalive):
                        waiting.append(await sub.queue.get())
                except TimeoutError:
                    yield _KEEPALIVE
                    continue
            while not sub.queue.empty():
                waiting.append(sub.queue.get_nowait())
            frames = []
            for event in waiting:
                if event is None:
                    if frames:
                        yield b"".join(frames)
                    return  # server shutting down
                if event.id > last:
                    frames.append(event.frame)
                    last = event.id
            if frames:
                yield b"".join(frames)
    finally:
        hub.unsubscribe(sub)


_KEEPALIVE = b": keep-alive\r\n\r\n"
