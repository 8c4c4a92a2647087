"""What a lifecycle worker does to one claimed instance, one status at a time.

Each handler looks at the instance (claimed, lease held), makes at most one provider call with
no transaction open, records the outcome in a short transaction guarded by the lease, and says
when the instance should be looked at again (`Next`). Provider errors are classified once
(`_failed`): temporary ones retry with backoff, permanent ones (or too many attempts) fail the
start; during termination they only retry, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.base import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    CircuitOpen,
    MachineSpec,
    PermanentProviderError,
    ProviderUnavailable,
    RateLimited,
    TemporaryProviderError,
    Volume,
)
from control_plane.agent_bootstrap import user_data
from control_plane.agents import agent_env, enqueue_command
from control_plane.feed.events import emit
from control_plane.lifecycle import transitions as t
from control_plane.lifecycle.actions import (
    complete_step,
    finish_action,
    record_occurrence,
    start_action,
)
from control_plane.lifecycle.progress import Step
from control_plane.lifecycle.states import Status
from control_plane.providers import Providers
from control_plane.security import agent_token, digest
from control_plane.settings import Settings

log = structlog.get_logger(__name__)

CREATE_SETTLE_CALLS = 4
"""A create's HTTP request may be retried by the provider's client (botocore: 1 + 3 attempts,
each bounded by the call timeout) after we stopped waiting: a machine can appear until then."""

RENEW = text(
    "UPDATE instances SET lock_expires_at = now() + make_interval(secs => :lease)"
    " WHERE id = :id AND lock_token = :token"
)


@dataclass(frozen=True, slots=True)
class Next:
    """When the instance should be looked at again (0 = at once, while we hold it)."""

    delay: float


NOW = Next(0.0)


class LostLease(Exception):
    """Another worker owns the instance now; stop working on it."""



class Steps:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], providers: Providers,
                 settings: Settings, token_secret: bytes) -> None:
        self._sessions = sessions
        self._providers = providers
        self._s = settings
        self._secret = token_secret

    async def run(self, row: Any) -> Next:
        """One step for the claimed instance `row`; raises `LostLease` if it was taken."""
        handler = {
            Status.PROVISIONING: self._provisioning,
            Status.BOOTING: self._booting,
            Status.READY: self._ready,
            Status.DRAINING: self._draining,
            Status.STARTUP_FAILED: self._startup_failed,
            Status.TERMINATING: self._terminating,
        }[Status(row.status)]
        try:
            return await handler(row)
        except _Retry as retry:
            return retry.next

    # --- one handler per status -------------------------------------------------------

    async def _provisioning(self, row: Any) -> Next:
        if row.desired_state != "running":
            return await self._move(t.to_terminating, row, Status.PROVISIONING,
                                    reason=row.desired_reason or "Termination requested")
        adapter = self._providers.get(row.provider)
        token = agent_token(self._secret, row.id)
        env = agent_env(self._s, row.id, token, row.model, row.model_spec)
        spec = MachineSpec(
            instance_id=str(row.id), instance_type=row.instance_type, zone=row.zone,
            model=row.model, tags=self._tags(row.id), agent_env=env,
            user_data=user_data(self._s, env),
        )
        if row.agent_token_hash is None:  # before create: some providers boot the machine at once
            async with self._sessions.begin() as session:
                await self._owned(session, row)
                await session.execute(text("UPDATE instances SET agent_token_hash = :h WHERE id = :id"),
                                      {"h": digest(token), "id": row.id})
        result = await self._act(row, Step.PROVIDER_CREATE.value, adapter.create(spec),
                                 metadata=_offer_of(row))
        if isinstance(result, Next):
            return result
        volumes = await self._call(row, adapter.list_volumes(result.provider_instance_id))
        async with self._sessions.begin() as session:
            await self._owned(session, row)
            await session.execute(
                text("UPDATE instances SET provider_instance_id = :p, ip = :ip, zone = coalesce(zone, :z),"
                     " attempts = 0 WHERE id = :id"),
                {"p": result.provider_instance_id, "ip": result.ip, "z": result.zone, "id": row.id})
            await _record_volumes(session, row.id, volumes)
            deadline = datetime.now(UTC) + timedelta(seconds=self._s.boot_timeout_seconds)
            await t.provisioning_to_booting(session, row.id, lease=row.lock_token,
                                            boot_deadline_at=deadline)
        return NOW

    async def _booting(self, row: Any) -> Next:
        if row.desired_state != "running":
            return await self._move(t.to_terminating, row, Status.BOOTING,
                                    reason=row.desired_reason or "Termination requested")
        done = await self._completed_steps(row.id)
        if row.failure_reason:
            return await self._move(t.to_startup_failed, row, Status.BOOTING, reason=row.failure_reason)
        if row.boot_deadline_at and datetime.now(UTC) > row.boot_deadline_at:
            return await self._move(t.to_startup_failed, row, Status.BOOTING,
                                    reason=f"Boot timed out after {self._s.boot_timeout_seconds:.0f} s"
                                    f" (last phase: {row.phase})")
        adapter = self._providers.get(row.provider)
        if Step.PROVIDER_START not in done:
            result = await self._act(row, Step.PROVIDER_START.value, adapter.start(row.provider_instance_id))
            return result if isinstance(result, Next) else NOW
        if Step.IP_ASSIGNED not in done:
            machine = await self._call(row, adapter.describe(row.provider_instance_id))
            if machine is None:
                return await self._move(t.mark_provider_deleted, row, Status.BOOTING,
                                        reason="The provider no longer knows the machine")
            if not machine.ip or machine.state != "running":
                return Next(1.0)
            async with self._sessions.begin() as session:
                await self._owned(session, row)
                await session.execute(text("UPDATE instances SET ip = :ip WHERE id = :id"),
                                      {"ip": machine.ip, "id": row.id})
                await complete_step(session, row.id, Step.IP_ASSIGNED, message=f"IP {machine.ip}")
                # The adapter injects the agent at boot (cloud-init, or a process on `local`).
                await complete_step(session, row.id, Step.AGENT_INSTALLED,
                                    message="Agent started with the machine")
            return NOW
        if Step.HEALTH_CHECK_PASSED in done:
            if row.agent_integrity == "mismatch":
                return await self._move(t.to_startup_failed, row, Status.BOOTING,
                                        reason=f"Agent integrity check failed: {row.agent_integrity_detail}")
            if row.agent_integrity != "verified":
                return Next(2.0)  # its first heartbeat (which wakes us) says what runs there
            async with self._sessions.begin() as session:
                await self._owned(session, row)
                await complete_step(session, row.id, Step.READY, message="Ready")
                await t.booting_to_ready(session, row.id, lease=row.lock_token)
            return NOW
        remaining = (row.boot_deadline_at - datetime.now(UTC)).total_seconds() if row.boot_deadline_at else 5
        return Next(max(0.5, min(5.0, remaining)))  # agent progress wakes us sooner

    async def _ready(self, row: Any) -> Next:
        if row.desired_state == "terminated":
            return await self._move(t.to_terminating, row, Status.READY,
                                    reason=row.desired_reason or "Termination requested")
        if row.desired_state == "drained":
            reason = row.desired_reason or "Drain requested"
            async with self._sessions.begin() as session:
                if not await t.ready_to_draining(session, row.id, lease=row.lock_token, reason=reason):
                    raise LostLease
                await enqueue_command(session, row.id, "drain", reason=reason)
            return NOW
        return Next(300.0)  # commands wake it at once; health checks come with the health loop

    async def _draining(self, row: Any) -> Next:
        if row.desired_state == "terminated":
            return await self._move(t.to_terminating, row, Status.DRAINING,
                                    reason=row.desired_reason or "Termination requested")
        drained = await self._acked(row.id, "drain", since=row.status_changed_at)
        if drained is not None:
            return await self._move(t.to_terminating, row, Status.DRAINING,
                                    reason=f"Drained by the agent ({drained})")
        vllm = (row.last_metrics or {}).get("vllm") or {}
        fresh = row.last_heartbeat_at and row.last_heartbeat_at > row.status_changed_at
        if fresh and vllm.get("num_requests_running") == 0 and vllm.get("num_requests_waiting") == 0:
            return await self._move(t.to_terminating, row, Status.DRAINING,
                                    reason="Drained: no request in flight or waiting")
        waited = (datetime.now(UTC) - row.status_changed_at).total_seconds()
        if waited > self._s.drain_timeout_seconds:
            return await self._move(t.to_terminating, row, Status.DRAINING,
                                    reason=f"Drain timed out after {waited:.0f} s")
        return Next(2.0)

    async def _startup_failed(self, row: Any) -> Next:
        return await self._move(t.to_terminating, row, Status.STARTUP_FAILED,
                                reason="Cleaning up after failed startup")

    async def _terminating(self, row: Any) -> Next:
        adapter = self._providers.get(row.provider)
        done = await self._completed_steps(row.id)
        pid = row.provider_instance_id
        if pid is None:
            # A crash between provider create and recording it leaves a tagged machine.
            found = await self._call(row, adapter.list_by_tags({TAG_INSTANCE: str(row.id)}))
            if found:
                async with self._sessions.begin() as session:
                    await self._owned(session, row)
                    await session.execute(
                        text("UPDATE instances SET provider_instance_id = :p WHERE id = :id"),
                        {"p": found[0].provider_instance_id, "id": row.id})
                return NOW
            if await self._create_may_land(row):
                return Next(5.0)
        elif "PROVIDER_TERMINATE" not in done:
            if not adapter.owns_machines and not await self._agent_stopped(row):
                return Next(2.0)  # the acknowledgement wakes us
            volumes = await self._call(row, adapter.list_volumes(pid))  # discover again
            async with self._sessions.begin() as session:
                await self._owned(session, row)
                await _record_volumes(session, row.id, volumes)
            result = await self._act(row, "PROVIDER_TERMINATE", adapter.terminate(pid))
            return result if isinstance(result, Next) else NOW
        elif adapter.owns_machines:  # a released host keeps running: nothing to wait for
            machine = await self._call(row, adapter.describe(pid))
            if machine is not None and machine.state != "terminated":
                return Next(1.0)
        pending = await self._volumes_to_delete(row.id)
        for volume_id, provider_volume_id in pending:
            result = await self._act(row, "PROVIDER_DELETE_VOLUME",
                                     adapter.delete_volume(provider_volume_id),
                                     metadata={"provider_volume_id": provider_volume_id})
            if isinstance(result, Next):
                return result
            async with self._sessions.begin() as session:
                await session.execute(
                    text("UPDATE instance_volumes SET status = 'deleted', deleted_at = now() WHERE id = :id"),
                    {"id": volume_id})
        async with self._sessions.begin() as session:
            await self._owned(session, row)
            await session.execute(
                text("UPDATE instance_volumes SET status = 'kept' WHERE instance_id = :id"
                     " AND NOT delete_on_terminate AND status IN ('attached', 'detached')"),
                {"id": row.id})
            await session.execute(text("UPDATE instances SET credential_revoked_at = now()"
                                       " WHERE id = :id AND credential_revoked_at IS NULL"), {"id": row.id})
            await t.terminating_to_terminated(session, row.id, lease=row.lock_token)
        return NOW

    # --- helpers ------------------------------------------------------------------------

    async def _agent_stopped(self, row: Any) -> bool:
        """On a machine we do not own (on-prem), the agent must stop its engine before we
        let go: send `stop` once, then wait for the acknowledgement, at most
        `agent_stop_timeout_seconds` (an unreachable host must not block termination)."""
        async with self._sessions.begin() as session:
            await self._owned(session, row)
            sent = (await session.execute(
                text("SELECT acked_at IS NOT NULL FROM agent_commands WHERE instance_id = :i"
                     " AND kind = 'stop' AND created_at >= :since ORDER BY created_at DESC LIMIT 1"),
                {"i": row.id, "since": row.status_changed_at})).scalar_one_or_none()
            if sent:
                return True
            if sent is None:  # not yet sent (an acknowledged one is never sent again)
                await enqueue_command(session, row.id, "stop", reason="Instance terminating")
        waited = (datetime.now(UTC) - row.status_changed_at).total_seconds()
        if waited > self._s.agent_stop_timeout_seconds:
            log.warning("Agent did not confirm stop; releasing the host anyway",
                        instance_id=str(row.id), waited_seconds=round(waited))
            return True
        return False

    async def _acked(self, instance_id: uuid.UUID, kind: str, since: datetime) -> str | None:
        """The outcome of the agent's acknowledgement of `kind` sent after `since`, if any."""
        async with self._sessions() as session:
            return (await session.execute(
                text("SELECT outcome FROM agent_commands WHERE instance_id = :i AND kind = :k"
                     " AND created_at >= :since AND acked_at IS NOT NULL ORDER BY acked_at DESC LIMIT 1"),
                {"i": instance_id, "k": kind, "since": since})).scalar_one_or_none()

    def _tags(self, instance_id: uuid.UUID) -> dict[str, str]:
        return {TAG_CLUSTER: self._s.cluster_name, TAG_INSTANCE: str(instance_id)}

    async def _act(self, row: Any, action_type: str, call: Any, metadata: dict | None = None) -> Any:
        """Run one provider call as a logged action. Returns its result, or `Next` on failure."""
        async with self._sessions.begin() as session:
            await self._owned(session, row)
            action_id = await start_action(session, row.id, action_type, metadata)
        try:
            async with self._lease_kept(row):
                result = await asyncio.wait_for(call, self._call_bound)
        except (TimeoutError, TemporaryProviderError, PermanentProviderError) as exc:
            return await self._failed(row, action_id, exc)
        async with self._sessions.begin() as session:
            await self._owned(session, row)
            await finish_action(session, row.id, action_id)
            await session.execute(text("UPDATE instances SET attempts = 0 WHERE id = :id"), {"id": row.id})
        return result

    async def _call(self, row: Any, call: Any) -> Any:
        """A read-only provider call (not logged as an action); failures retry later."""
        try:
            async with self._lease_kept(row):
                return await asyncio.wait_for(call, self._call_bound)
        except (TimeoutError, TemporaryProviderError, PermanentProviderError) as exc:
            raise _Retry(await self._failed(row, None, exc)) from exc

    @property
    def _call_bound(self) -> float:
        """Past the providers' own budget (`ResilientProvider`), whose timeout the breaker
        counts and retries: this one only guards against an adapter that ignores it."""
        return self._s.provider_call_timeout_seconds + 5.0

    @contextlib.asynccontextmanager
    async def _lease_kept(self, row: Any) -> AsyncIterator[None]:
        """Renew our lease while a provider call runs: a slow call must not let another worker
        take the instance meanwhile and act on what the call has not yet told us."""
        async def renew() -> None:
            while True:
                await asyncio.sleep(self._s.lease_seconds / 3)
                try:
                    async with self._sessions.begin() as session:
                        await session.execute(RENEW, {"id": row.id, "token": row.lock_token,
                                                      "lease": self._s.lease_seconds})
                except (OSError, SQLAlchemyError) as exc:  # the step's own writes will tell
                    log.warning("Lease not renewed", instance_id=str(row.id), error=repr(exc)[:200])

        renewing = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing

    async def _failed(self, row: Any, action_id: int | None, exc: BaseException) -> Next:
        message = _describe(exc)
        permanent = isinstance(exc, PermanentProviderError)
        attempts = row.attempts + 1
        status = Status(row.status)
        give_up = permanent or attempts >= self._s.provider_max_attempts
        creating = status is Status.PROVISIONING and action_id is not None
        # A create that timed out or hit a server error may have created the machine anyway.
        unsure = creating and isinstance(exc, (TimeoutError, ProviderUnavailable))
        switch = (creating and row.offer_index + 1 < len(row.offers)
                  and (permanent or isinstance(exc, CircuitOpen) or give_up))
        if switch and (unsure or (row.offers[row.offer_index] or {}).get("unsure")):
            nothing = await self._nothing_created(row)
            switch = bool(nothing)
            give_up = give_up and nothing is not None  # could not tell: retry, not give up
        async with self._sessions.begin() as session:
            await self._owned(session, row)
            if action_id is not None:
                await finish_action(session, row.id, action_id, error=message)
            if unsure:
                await session.execute(
                    text("UPDATE instances SET offers = jsonb_set(offers, ARRAY[offer_index::text, 'unsure'],"
                         " 'true') WHERE id = :id AND jsonb_array_length(offers) > offer_index"),
                    {"id": row.id})
            if switch:
                await self._fail_over(session, row, message)
                return NOW
            await session.execute(text("UPDATE instances SET attempts = :a WHERE id = :id"),
                                  {"a": attempts, "id": row.id})
            if give_up and status in (Status.PROVISIONING, Status.BOOTING):
                reason = message if permanent else f"{message} (gave up after {attempts} attempts)"
                if creating and len(row.offers) > 1:
                    reason = await _attempts_summary(session, row.id)
                await t.to_startup_failed(session, row.id, status, lease=row.lock_token, reason=reason)
                return NOW
        log.warning("Provider call failed; will retry", instance_id=str(row.id), error=message,
                    attempt=attempts)
        if isinstance(exc, RateLimited) and exc.retry_after:
            return Next(exc.retry_after)
        return Next(min(60.0, 2 ** min(attempts, 6)) * random.uniform(0.5, 1.0))

    async def _create_may_land(self, row: Any) -> bool:
        """Whether a create we gave up on may still make a machine: it failed unsure (timed
        out, server error) less than `CREATE_SETTLE_CALLS` call timeouts after it started, and
        the provider's client may still be retrying it, under the same token. (A create whose
        worker died died with it: the tag lookup after the lease expired sees what it made.)"""
        async with self._sessions() as session:
            latest = (await session.execute(
                text("SELECT status, extract(epoch FROM now() - started_at) AS age FROM instance_actions"
                     " WHERE instance_id = :id AND action_type = :t ORDER BY id DESC LIMIT 1"),
                {"id": row.id, "t": Step.PROVIDER_CREATE.value})).one_or_none()
        if latest is None:
            return False
        offer = row.offers[row.offer_index] if row.offer_index < len(row.offers) else {}
        unsure = latest.status == "failed" and bool((offer or {}).get("unsure"))
        return unsure and latest.age < CREATE_SETTLE_CALLS * self._s.provider_call_timeout_seconds

    async def _nothing_created(self, row: Any) -> bool | None:
        """Whether the provider we are leaving surely has no machine of ours: only then may
        the next offer be tried (else we could pay for two machines). None: it could not
        be asked; the step is retried later."""
        try:
            found = await asyncio.wait_for(
                self._providers.get(row.provider).list_by_tags({TAG_INSTANCE: str(row.id)}),
                self._s.provider_call_timeout_seconds)
        except (TimeoutError, TemporaryProviderError, PermanentProviderError) as exc:
            log.warning("Not failing over yet: cannot confirm that no machine was created",
                        instance_id=str(row.id), provider=row.provider, error=_describe(exc))
            return None
        return not found  # found: the next create (idempotent) adopts it

    async def _fail_over(self, session: AsyncSession, row: Any, message: str) -> None:
        """Move to the next acceptable offer, recorded as an action with the reason."""
        nxt = row.offers[row.offer_index + 1]
        await session.execute(
            text("UPDATE instances SET offer_index = offer_index + 1, provider = :p, zone = :z,"
                 " instance_type = :t, hourly_price = :price, currency = :c, attempts = 0"
                 " WHERE id = :id"),
            {"p": nxt["provider"], "z": nxt["zone"], "t": nxt["instance_type"],
             "price": nxt["hourly_price"], "c": nxt["currency"], "id": row.id})
        detail = (f"{_offer_text(row.offers[row.offer_index])} failed ({message});"
                  f" trying {_offer_text(nxt)}")
        await record_occurrence(session, row.id, "FAILOVER", metadata={
            "from": row.offers[row.offer_index], "to": nxt, "reason": message, "message": detail})
        await emit(session, "instance.failover", {
            "instance_id": str(row.id), "status": row.status, "message": detail,
            "from": row.offers[row.offer_index], "to": nxt, "reason": message}, row.id)
        log.info("Failing over to the next offer", instance_id=str(row.id), detail=detail)

    async def _move(self, fn: Any, row: Any, *args: Any, **kwargs: Any) -> Next:
        async with self._sessions.begin() as session:
            moved = await fn(session, row.id, *args, lease=row.lock_token, **kwargs)
        if not moved:
            raise LostLease
        return NOW

    async def _owned(self, session: AsyncSession, row: Any) -> None:
        """Renew our lease inside `session`; raise `LostLease` if it is not ours any more."""
        renewed = (await session.execute(RENEW, {"id": row.id, "token": row.lock_token,
                                                  "lease": self._s.lease_seconds})).rowcount
        if not renewed:
            raise LostLease

    async def _completed_steps(self, instance_id: uuid.UUID) -> set[str]:
        async with self._sessions() as session:
            rows = await session.execute(
                text("SELECT DISTINCT action_type FROM instance_actions"
                     " WHERE instance_id = :id AND status = 'succeeded'"), {"id": instance_id})
            return {r[0] for r in rows}

    async def _volumes_to_delete(self, instance_id: uuid.UUID) -> list[tuple[int, str]]:
        async with self._sessions() as session:
            rows = await session.execute(
                text("SELECT id, provider_volume_id FROM instance_volumes WHERE instance_id = :id"
                     " AND delete_on_terminate AND status NOT IN ('deleted', 'gone') ORDER BY id"),
                {"id": instance_id})
            return [(r[0], r[1]) for r in rows]


class _Retry(Exception):
    def __init__(self, next_: Next) -> None:
        self.next = next_


def _offer_of(row: Any) -> dict[str, Any]:
    return {"provider": row.provider, "zone": row.zone, "instance_type": row.instance_type,
            "offer_index": row.offer_index}


def _offer_text(offer: dict[str, Any]) -> str:
    return f"{offer['provider']} {offer['instance_type']}" + (f" in {offer['zone']}" if offer.get("zone") else "")


async def _attempts_summary(session: AsyncSession, instance_id: uuid.UUID) -> str:
    """Why no offer worked: the last error of each offer tried, in order."""
    rows = (await session.execute(
        text("SELECT DISTINCT ON ((metadata->>'offer_index')::int) metadata, error"
             " FROM instance_actions WHERE instance_id = :id AND action_type = :t AND status = 'failed'"
             " ORDER BY (metadata->>'offer_index')::int, id DESC"),
        {"id": instance_id, "t": Step.PROVIDER_CREATE.value})).all()
    tried = "; ".join(f"{n}) {_offer_text(r.metadata)}: {r.error}" for n, r in enumerate(rows, 1))
    return f"No acceptable offer could be created ({len(rows)} tried): {tried}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "provider call timed out"
    return f"{type(exc).__name__}: {exc}"


async def _record_volumes(session: AsyncSession, instance_id: uuid.UUID, volumes: list[Volume]) -> None:
    for v in volumes:
        await session.execute(
            text("INSERT INTO instance_volumes (instance_id, provider_volume_id, volume_type, size_gb,"
                 " is_boot, delete_on_terminate) VALUES (:i, :p, :t, :s, :b, :d)"
                 " ON CONFLICT (instance_id, provider_volume_id) DO UPDATE SET"
                 " volume_type = excluded.volume_type, size_gb = excluded.size_gb,"
                 " delete_on_terminate = excluded.delete_on_terminate"),
            {"i": instance_id, "p": v.provider_volume_id, "t": v.volume_type, "s": v.size_gb,
             "b": v.is_boot, "d": v.delete_on_terminate})

