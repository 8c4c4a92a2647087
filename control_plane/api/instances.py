"""Admin routes for instances: thin handlers over commands (writes) and queries (reads)."""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy import text

from control_plane import queries, registration
from control_plane.agents import AgentConflict, enqueue_command
from control_plane.api.schemas import (
    Accepted,
    ActionPage,
    AgentCommandBody,
    AgentCommandOut,
    AgentCommandPage,
    CreateInstanceBody,
    Error,
    Fleet,
    HistoryPage,
    InstanceOut,
    InstancePage,
    JoinTokenBody,
    JoinTokenCreated,
    JoinTokenPage,
    MetricsPage,
    MetricsPoint,
    ReasonBody,
    VolumePage,
)
from control_plane.commands.apply import resolve_offers
from control_plane.commands.producer import publish
from control_plane.commands.schema import (
    CreateInstance,
    CreatePayload,
    DrainInstance,
    DrainPayload,
    TerminateInstance,
    TerminatePayload,
)
from control_plane.feed.events import emit
from control_plane.lifecycle.states import Status
from control_plane.queries import NotFound


def error_responses(*codes: int, **described: str) -> dict[int, ResponseSpec]:
    """Documented error answers; `described` overrides a description (`e401="..."`)."""
    text = {400: "Invalid request (fields in `extra`)", 401: "Missing, invalid or revoked API key",
            403: "This API key may only read", 404: "No such instance",
            409: "The instance id exists already", 503: "Redis or Postgres unavailable; retry"}
    text |= {int(key.removeprefix("e")): value for key, value in described.items()}
    return {c: ResponseSpec(Error, description=text[c], generate_examples=False) for c in codes}


READ_ERRORS = error_responses(400, 401, 404)
WRITE_ERRORS = error_responses(400, 401, 403, 404, 503)

Limit = Annotated[int, QueryParameter(ge=1, le=1000, description="Page size")]
Cursor = Annotated[str | None, QueryParameter(max_length=200, description="`next` of the previous page")]
InstanceId = FromPath[uuid.UUID]


@get("/v1/fleet", summary="The fleet at a glance: instances by status and provider, and cost",
     responses=error_responses(401))
async def fleet(request: Request) -> Fleet:
    runtime = request.app.state.runtime
    async with runtime.sessions() as session:
        return await queries.fleet(session, runtime.providers.names)


class InstanceController(Controller):
    path = "/v1/instances"
    tags = ["instances"]

    @post("/", status_code=202, summary="Request a GPU instance", responses=error_responses(400, 401, 403, 409, 503))
    async def create(self, request: Request, data: JSONBody[CreateInstanceBody]) -> Accepted:
        runtime = request.app.state.runtime
        fields = msgspec.structs.asdict(data)
        del fields["idempotency_key"]  # HTTP only: not part of the command
        payload = CreatePayload(**fields)
        await resolve_offers(runtime.providers, payload)  # refuse at the edge what the consumer would
        command_id = f"api:create:{data.idempotency_key or uuid.uuid4()}"
        command = CreateInstance(version=1, id=command_id, payload=payload)
        if data.instance_id is not None:
            await _ensure_new(runtime, data.instance_id, command_id)
        await publish(runtime.redis, runtime.settings.command_stream, command)
        return Accepted(id=command.instance_id, command_id=command_id)

    @get("/", summary="List instances", responses=error_responses(400, 401))
    async def list(
        self, request: Request,
        status: Annotated[list[Status] | None, QueryParameter(description="Filter by status (repeatable)")] = None,
        provider: Annotated[str | None, QueryParameter(max_length=32)] = None,
        label: Annotated[list[str] | None, QueryParameter(description="key=value (repeatable)")] = None,
        limit: Limit = 100, cursor: Cursor = None,
    ) -> InstancePage:
        labels = dict(_label(v) for v in label or [])
        async with request.app.state.runtime.sessions() as session:
            return await queries.list_instances(
                session, statuses=[s.value for s in status or []], provider=provider,
                labels=labels, limit=limit, cursor=cursor)

    @get("/{instance_id:uuid}", summary="Show an instance with its status, progress and phase", responses=READ_ERRORS)
    async def show(self, request: Request, instance_id: InstanceId) -> InstanceOut:
        async with request.app.state.runtime.sessions() as session:
            return await queries.get_instance(session, instance_id)

    @get("/{instance_id:uuid}/history", summary="State changes, oldest first", responses=READ_ERRORS)
    async def history(self, request: Request, instance_id: InstanceId, limit: Limit = 100,
                      cursor: Cursor = None) -> HistoryPage:
        async with request.app.state.runtime.sessions() as session:
            return await queries.history(session, instance_id, limit, cursor)

    @get("/{instance_id:uuid}/actions", summary="Actions with durations and errors, oldest first", responses=READ_ERRORS)
    async def actions(self, request: Request, instance_id: InstanceId, limit: Limit = 100,
                      cursor: Cursor = None) -> ActionPage:
        async with request.app.state.runtime.sessions() as session:
            return await queries.actions(session, instance_id, limit, cursor)

    @get("/{instance_id:uuid}/volumes", summary="Volumes and what became of them", responses=READ_ERRORS)
    async def volumes(self, request: Request, instance_id: InstanceId, limit: Limit = 100,
                      cursor: Cursor = None) -> VolumePage:
        async with request.app.state.runtime.sessions() as session:
            return await queries.volumes(session, instance_id, limit, cursor)

    @post("/{instance_id:uuid}/drain", status_code=202, summary="Drain, then terminate", responses=WRITE_ERRORS)
    async def drain(self, request: Request, instance_id: InstanceId,
                    data: JSONBody[ReasonBody | None] = None) -> Accepted:
        runtime = request.app.state.runtime
        await _ensure_exists(runtime, instance_id)
        command_id = f"api:drain:{uuid.uuid4()}"
        await publish(runtime.redis, runtime.settings.command_stream, DrainInstance(
            version=1, id=command_id,
            payload=DrainPayload(instance_id=instance_id, reason=(data and data.reason) or "Drain requested via API")))
        return Accepted(id=instance_id, command_id=command_id)

    @delete("/{instance_id:uuid}", status_code=202, summary="Terminate", responses=WRITE_ERRORS)
    async def terminate(self, request: Request, instance_id: InstanceId) -> Accepted:
        runtime = request.app.state.runtime
        await _ensure_exists(runtime, instance_id)
        command_id = f"api:terminate:{uuid.uuid4()}"
        await publish(runtime.redis, runtime.settings.command_stream, TerminateInstance(
            version=1, id=command_id,
            payload=TerminatePayload(instance_id=instance_id, reason="Termination requested via API")))
        return Accepted(id=instance_id, command_id=command_id)


    @post("/{instance_id:uuid}/agent-commands", status_code=202,
          summary="Send a command to the instance's agent (drain, restart_engine, upgrade, stop)",
          responses=error_responses(400, 401, 403, 404, 409, 503))
    async def send_agent_command(self, request: Request, instance_id: InstanceId,
                                 data: JSONBody[AgentCommandBody]) -> dict[str, uuid.UUID]:
        async with request.app.state.runtime.sessions.begin() as session:
            status = await _live_status(session, instance_id)
            if status not in ("booting", "ready", "draining"):
                raise AgentConflict(f"instance is {status}: its agent takes no commands")
            command_id = await enqueue_command(session, instance_id, data.kind,
                                               reason=data.reason or "Requested via API")
        return {"id": command_id}

    @get("/{instance_id:uuid}/agent-commands", summary="Commands sent to the agent and their outcome",
         responses=READ_ERRORS)
    async def agent_commands(self, request: Request, instance_id: InstanceId) -> AgentCommandPage:
        async with request.app.state.runtime.sessions() as session:
            await _live_status(session, instance_id)
            rows = await session.execute(text(
                "SELECT id, kind, reason, created_at, acked_at, outcome, detail FROM agent_commands"
                " WHERE instance_id = :id ORDER BY created_at DESC LIMIT 200"), {"id": instance_id})
            return AgentCommandPage(items=[AgentCommandOut(**r._mapping) for r in rows])

    @post("/{instance_id:uuid}/revoke-credential", status_code=200,
          summary="Revoke the agent's credential: its requests are refused from now on",
          responses=WRITE_ERRORS)
    async def revoke_credential(self, request: Request, instance_id: InstanceId) -> InstanceOut:
        runtime = request.app.state.runtime
        async with runtime.sessions.begin() as session:
            await _live_status(session, instance_id)
            await session.execute(text(
                "UPDATE instances SET credential_revoked_at = coalesce(credential_revoked_at, now())"
                " WHERE id = :id"), {"id": instance_id})
            await emit(session, "instance.credential_revoked",
                       {"instance_id": str(instance_id), "message": "Agent credential revoked"}, instance_id)
        runtime.agent_token_cache.pop(instance_id, None)
        async with runtime.sessions() as session:
            return await queries.get_instance(session, instance_id)

    @get("/{instance_id:uuid}/metrics", summary="Heartbeat metrics, newest first", responses=READ_ERRORS)
    async def metrics(self, request: Request, instance_id: InstanceId, limit: Limit = 100) -> MetricsPage:
        async with request.app.state.runtime.sessions() as session:
            await _live_status(session, instance_id)
            rows = await session.execute(text(
                "SELECT at, gpus, vllm, engine FROM instance_metrics WHERE instance_id = :id"
                " ORDER BY at DESC LIMIT :limit"), {"id": instance_id, "limit": limit})
            return MetricsPage(items=[MetricsPoint(**r._mapping) for r in rows])


class JoinTokenController(Controller):
    path = "/v1/join-tokens"
    tags = ["join tokens"]

    @post("/", status_code=201, summary="Create a one-time join token for an on-prem host",
          responses=error_responses(400, 401, 403, 503))
    async def create(self, request: Request, data: JSONBody[JoinTokenBody]) -> JoinTokenCreated:
        runtime = request.app.state.runtime
        return await registration.create_join_token(runtime.sessions, data, runtime.settings.agent_url)

    @get("/", summary="List join tokens (the tokens themselves are not stored)",
         responses=error_responses(401))
    async def list(self, request: Request) -> JoinTokenPage:
        async with request.app.state.runtime.sessions() as session:
            return JoinTokenPage(items=await registration.list_join_tokens(session))

    @delete("/{token_id:uuid}", status_code=204, summary="Revoke an unused join token",
            responses=error_responses(401, 403, 404))
    async def revoke(self, request: Request, token_id: FromPath[uuid.UUID]) -> None:
        if not await registration.revoke_join_token(request.app.state.runtime.sessions, token_id):
            raise NotFound(f"no unused, unrevoked join token {token_id}")


async def _live_status(session, instance_id: uuid.UUID) -> str:
    status = (await session.execute(text("SELECT status FROM instances WHERE id = :id"),
                                    {"id": instance_id})).scalar_one_or_none()
    if status is None:
        raise NotFound(f"instance {instance_id} not found")
    return status


class InstanceExists(Exception):
    """An instance with this id exists already."""


def _label(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise ValidationException(f"label filter {value!r} is not key=value",
                                  extra=[{"key": "label", "message": "expected key=value"}])
    return key, val


async def _ensure_exists(runtime, instance_id: InstanceId) -> None:
    async with runtime.sessions() as session:
        await queries.get_instance(session, instance_id)


async def _ensure_new(runtime, instance_id: InstanceId, command_id: str) -> None:
    """A client-chosen id must be new, unless this very request created it (a retry)."""
    async with runtime.sessions() as session:
        creator = (await session.execute(
            text("SELECT created_by_command FROM instances WHERE id = :id"),
            {"id": instance_id})).one_or_none()
    if creator is not None and creator[0] != command_id:
        raise InstanceExists(f"instance {instance_id} already exists")
