"""Routes for worker agents and their installation.

Signed by the agent (`require_agent_signature`): progress, heartbeats, events, the command
stream and command acknowledgements. Public, because a host has nothing else yet and none of
it is secret: the release manifest, the artifact and the install script. Registration
authenticates with a one-time join token.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

from litestar import Controller, Request, Response, get, post
from litestar.exceptions import NotAuthorizedException, NotFoundException, ValidationException
from litestar.exceptions.responses import create_exception_response
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody
from litestar.response import ServerSentEvent, ServerSentEventMessage

from control_plane import agents, metrics, registration
from control_plane.agent_release import current_release, install_script
from control_plane.api.auth import AgentRefused, require_agent_signature, require_join_token
from control_plane.api.instances import error_responses
from control_plane.api.schemas import (
    AgentEventBody,
    AgentProgressBody,
    AgentReportAnswer,
    CommandAckBody,
    HeartbeatBody,
    Manifest,
    RegisterBody,
    Registration,
)
from control_plane.feed.hub import FeedFilter


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return error_responses(*codes, e400="Invalid report", e401="Unsigned, badly signed, replayed or revoked",
                           e404="No such command for this instance",
                           e409="The instance no longer accepts this report")


AGENT_ERRORS = _errors(400, 401, 409, 503)


def _heartbeat_refused(request: Request, exc: AgentRefused | ValidationException) -> Response:
    """Count a refused heartbeat (`cp_heartbeats_total`), then answer as for any request."""
    metrics.heartbeat_rejected(exc.reason if isinstance(exc, AgentRefused) else "invalid")
    return create_exception_response(request, exc)


class AgentController(Controller):
    path = "/v1/agent"
    tags = ["agent"]
    guards = [require_agent_signature]
    security = [{"agentSignature": []}]

    @post("/progress", status_code=200, summary="Report a boot phase", responses=AGENT_ERRORS)
    async def progress(self, request: Request, data: JSONBody[AgentProgressBody]) -> AgentReportAnswer:
        return await agents.record_progress(request.app.state.runtime.sessions,
                                            request.state.agent, data)

    @post("/heartbeat", status_code=200, summary="Report liveness, agent info and metrics",
          responses=AGENT_ERRORS,
          exception_handlers={AgentRefused: _heartbeat_refused, ValidationException: _heartbeat_refused})
    async def heartbeat(self, request: Request, data: JSONBody[HeartbeatBody]) -> AgentReportAnswer:
        runtime = request.app.state.runtime
        try:
            answer = await agents.record_heartbeat(runtime.heartbeats, runtime.sessions, request.state.agent,
                                                   data, current_release())
        except agents.AgentConflict:
            metrics.heartbeat_rejected("revoked")  # no longer live, or revoked since the guard
            raise
        metrics.HEARTBEAT_ACCEPTED.inc()
        return answer

    @post("/events", status_code=200, summary="Report an event on the node (engine crash, drain…)",
          responses=AGENT_ERRORS)
    async def event(self, request: Request, data: JSONBody[AgentEventBody]) -> AgentReportAnswer:
        return await agents.record_event(request.app.state.runtime.sessions, request.state.agent, data)

    @get("/commands", summary="Commands for this agent (text/event-stream, outbound only)",
         responses=_errors(401, 503))
    async def commands(self, request: Request) -> ServerSentEvent:
        runtime = request.app.state.runtime
        stream = _commands(runtime, request.state.agent.instance_id)
        return ServerSentEvent(stream, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @post("/commands/{command_id:uuid}/ack", status_code=200, summary="Acknowledge a command (idempotent)",
          responses=_errors(400, 401, 404, 503))
    async def ack(self, request: Request, command_id: FromPath[uuid.UUID],
                  data: JSONBody[CommandAckBody]) -> dict[str, bool]:
        try:
            first = await agents.ack_command(request.app.state.runtime.sessions, request.state.agent,
                                             command_id, data)
        except agents.UnknownAgentCommand as exc:
            raise NotFoundException(str(exc)) from None
        return {"recorded": first}


class AgentInstallController(Controller):
    path = "/v1/agent"
    tags = ["agent"]

    # Security per route: Litestar appends a route's to its controller's, so a controller-wide
    # "none" would document the join-token route as open too.
    @get("/manifest", security=[{}], summary="The agent release: version, build date, SHA-256, artifact URL")
    async def manifest(self, request: Request) -> Manifest:
        return Manifest(**current_release().manifest(request.app.state.runtime.settings.agent_url))

    @get("/artifact/{filename:str}", security=[{}], summary="The agent wheel (verify its SHA-256 against the manifest)",
         media_type="application/octet-stream", responses=error_responses(404, e404="Unknown artifact"))
    async def artifact(self, filename: FromPath[str]) -> Response[bytes]:
        release = current_release()
        if filename != release.filename:
            raise NotFoundException(f"this control plane serves {release.filename} only")
        return Response(release.artifact, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @get("/install.sh", security=[{}], summary="The agent install script", media_type="text/x-shellscript")
    async def install_script(self) -> Response[bytes]:
        return Response(install_script(), media_type="text/x-shellscript")

    @post("/register", status_code=201, guards=[require_join_token], security=[{"joinToken": []}],
          summary="Exchange a one-time join token for an instance and its credential",
          responses=error_responses(400, 401, e401="Join token unknown, used, expired or revoked"))
    async def register(self, request: Request, data: JSONBody[RegisterBody]) -> Registration:
        runtime = request.app.state.runtime
        try:
            return await registration.register(runtime.sessions, runtime.settings,
                                                runtime.agent_token_secret, request.state.join_token, data)
        except registration.JoinRefused as exc:  # spent by a concurrent request meanwhile
            raise NotAuthorizedException(str(exc)) from None



async def _commands(runtime, instance_id: uuid.UUID) -> AsyncIterator[ServerSentEventMessage]:
    """Pending commands at once, then each new one as its feed event arrives. Subscribing
    before reading the table means a command queued in between is not missed; the agent
    dedupes by command id, so a repeat is harmless."""
    sub = runtime.hub.subscribe(FeedFilter(instance_id, ("agent.command",)))
    sent: set[str] = set()
    try:
        yield ServerSentEventMessage(comment="connected")
        while True:  # the table is read at connection and when the feed says there is news
            for command in await agents.pending_commands(runtime.pool, instance_id):
                if command["id"] not in sent:
                    sent.add(command["id"])
                    yield ServerSentEventMessage(data=json.dumps(command), event="command", id=command["id"])
            while True:
                if sub.overflowed and sub.queue.empty():
                    return  # the agent reconnects and reads the table again
                try:
                    event = await asyncio.wait_for(sub.queue.get(), runtime.settings.sse_keepalive_seconds)
                except TimeoutError:
                    yield ServerSentEventMessage(comment="keep-alive")
                    continue
                if event is None:
                    return  # server shutting down
                break
    finally:
        runtime.hub.unsubscribe(sub)
