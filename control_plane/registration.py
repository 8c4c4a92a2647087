"""On-prem hosts joining by themselves: one-time join tokens exchanged for an instance.

An admin creates a join token (random, stored hashed, single use, expiring) naming the model
the host will serve. The install script on the host sends it to `POST /v1/agent/register`;
the control plane creates the instance (provider `onprem`, already `booting`: the machine
exists and the agent is being installed) and answers the agent's settings, including its own
credential, once. The join token is spent in the same transaction.
"""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import UTC, datetime, timedelta

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.agents import agent_env
from control_plane.api.schemas import (
    JoinTokenBody,
    JoinTokenCreated,
    JoinTokenOut,
    RegisterBody,
    Registration,
)
from control_plane.feed.events import emit
from control_plane.lifecycle.actions import complete_step
from control_plane.lifecycle.progress import Step
from control_plane.lifecycle.transitions import wake_worker
from control_plane.security import agent_token, digest
from control_plane.settings import Settings

JOIN_TOKEN_PREFIX = "cpj_"
ONPREM = "onprem"


class JoinRefused(Exception):
    """The join token is unknown, spent, expired or revoked (one message for all: no oracle)."""

    MESSAGE = "join token unknown, already used, expired or revoked"

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


async def create_join_token(sessions: async_sessionmaker[AsyncSession], body: JoinTokenBody,
                            base_url: str) -> JoinTokenCreated:
    token = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
    token_id = uuid.uuid4()
    expires = datetime.now(UTC) + timedelta(seconds=body.ttl_seconds)
    async with sessions.begin() as session:
        await session.execute(
            text("INSERT INTO join_tokens (id, name, token_hash, instance_type, model, model_spec,"
                 " labels, expires_at) VALUES (:id, :n, :h, :t, :m, CAST(:s AS jsonb),"
                 " CAST(:l AS jsonb), :e)"),
            {"id": token_id, "n": body.name, "h": digest(token), "t": body.instance_type,
             "m": body.model, "s": msgspec.json.encode(body.model_spec).decode(),
             "l": json.dumps(body.labels), "e": expires})
    command = (f"curl -fsSL {base_url}/v1/agent/install.sh"
               f" | sudo bash -s -- --control-plane {base_url} --token {token}")
    return JoinTokenCreated(id=token_id, token=token, expires_at=expires, install_command=command)


async def list_join_tokens(session: AsyncSession) -> list[JoinTokenOut]:
    rows = await session.execute(text(
        "SELECT id, name, instance_type, model, created_at, expires_at, used_at, instance_id,"
        " revoked_at FROM join_tokens ORDER BY created_at DESC LIMIT 1000"))
    return [JoinTokenOut(**r._mapping) for r in rows]


async def revoke_join_token(sessions: async_sessionmaker[AsyncSession], token_id: uuid.UUID) -> bool:
    async with sessions.begin() as session:
        return (await session.execute(
            text("UPDATE join_tokens SET revoked_at = now() WHERE id = :id AND revoked_at IS NULL"
                 " AND used_at IS NULL RETURNING id"), {"id": token_id})).first() is not None


async def join_token_usable(session: AsyncSession, join_token: str) -> bool:
    return (await session.execute(
        text("SELECT 1 FROM join_tokens WHERE token_hash = :h AND used_at IS NULL"
             " AND revoked_at IS NULL AND expires_at > now()"), {"h": digest(join_token)})).first() is not None


async def register(sessions: async_sessionmaker[AsyncSession], settings: Settings,
                   secret: bytes, join_token: str, body: RegisterBody) -> Registration:
    """Spend `join_token` and create the host's instance; raises `JoinRefused`."""
    instance_id = uuid.uuid4()
    token = agent_token(secret, instance_id)
    async with sessions.begin() as session:
        spent = (await session.execute(
            text("UPDATE join_tokens SET used_at = now(), instance_id = :i WHERE token_hash = :h"
                 " AND used_at IS NULL AND revoked_at IS NULL AND expires_at > now()"
                 " RETURNING id, name, instance_type, model, model_spec, labels"),
            {"i": instance_id, "h": digest(join_token)})).one_or_none()
        if spent is None:
            raise JoinRefused
        await session.execute(
            text("INSERT INTO instances (id, provider, instance_type, model, model_spec, labels,"
                 " status, provider_instance_id, ip, agent_token_hash, created_by_command, boot_deadline_at,"
                 " billed_from)"
                 " VALUES (:id, :p, :t, :m, CAST(:s AS jsonb), CAST(:l AS jsonb), 'booting', :pid, :ip,"
                 " :h, :cmd, now() + make_interval(secs => :boot), now())"),
            {"id": instance_id, "p": ONPREM, "t": spent.instance_type, "m": spent.model,
             "s": json.dumps(spent.model_spec), "l": json.dumps(spent.labels),
             "pid": f"{ONPREM}:{body.hostname}:{instance_id.hex[:8]}", "ip": body.address,
             "h": digest(token), "cmd": f"join-token:{spent.id}",
             "boot": settings.boot_timeout_seconds})
        await session.execute(
            text("INSERT INTO instance_state_history (instance_id, from_status, to_status, transition,"
                 " reason, actor) VALUES (:id, NULL, 'booting', 'register', :r, :a)"),
            {"id": instance_id, "r": f"Host {body.hostname} joined with join token {spent.name!r}",
             "a": f"join-token:{spent.id}"})
        gpus = ", ".join(body.gpus) or "no GPU reported"
        for step, message in ((Step.REQUEST_CREATED, f"Join token {spent.name!r} presented"),
                              (Step.PROVIDER_CREATE, f"Host {body.hostname} registered ({gpus})"),
                              (Step.PROVIDER_START, "The host is running"),
                              (Step.IP_ASSIGNED, f"Address {body.address or 'not reported'}"),
                              (Step.AGENT_INSTALLED, "Agent installed by the install script")):
            await complete_step(session, instance_id, step, message=message)
        await wake_worker(session, instance_id)
        await emit(session, "instance.status",
                   {"instance_id": str(instance_id), "status": "booting", "from_status": None,
                    "transition": "register", "message": f"Host {body.hostname} joined"}, instance_id)
    return Registration(instance_id=instance_id, env=agent_env(settings, instance_id, token,
                                                                 spent.model, spent.model_spec))
