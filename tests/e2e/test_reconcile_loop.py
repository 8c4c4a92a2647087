"""Reconciliation as the leader runs it, on the `local` provider: a machine deleted behind our
back and an unknown machine tagged as ours, found and handled with nobody asking."""

from __future__ import annotations

import dataclasses
import uuid

from adapters.base import TAG_CLUSTER, TAG_INSTANCE, MachineSpec
from tests.conftest import RunningControlPlane, eventually


async def test_the_leader_finds_lost_and_orphan_machines_on_its_own(settings, db):
    fast = dataclasses.replace(settings, reconcile_seconds=0.3, orphan_policy="terminate",
                               local_boot_seconds=0.5)
    async with RunningControlPlane(fast) as cp:
        local = cp.runtime.providers.get("local")
        async with cp.client() as client:
            created = await client.post("/v1/instances", json={
                "provider": "local", "instance_type": "local-gpu", "model": "Qwen/Qwen2.5-0.5B-Instruct"})
            assert created.status_code == 202, created.text
            instance_id = uuid.UUID(created.json()["id"])
            await eventually(lambda: _status_is(db, instance_id, "ready"), timeout=60, message="ready")
            machine = await db.fetchval("SELECT provider_instance_id FROM instances WHERE id = $1", instance_id)

            stranger = str(uuid.uuid4())
            stray = await local.create(MachineSpec(stranger, "local-gpu", None, "m", {
                TAG_CLUSTER: fast.cluster_name, TAG_INSTANCE: stranger}))
            await local.terminate(machine)  # behind our back: heartbeats are still fresh

            await eventually(lambda: _status_is(db, instance_id, "provider_deleted"), timeout=20,
                             message="lost machine found")
            history = await db.fetchrow("SELECT actor, reason FROM instance_state_history"
                                        " WHERE instance_id = $1 ORDER BY id DESC LIMIT 1", instance_id)
            assert history["actor"] == "reconciler" and machine in history["reason"]

            async def stray_terminated() -> bool:
                found = await local.describe(stray.provider_instance_id)
                return found is None or found.state == "terminated"

            await eventually(stray_terminated, timeout=20, message="orphan terminated")
            orphaned = await db.fetchrow("SELECT data FROM events WHERE type = 'machine.orphaned'")
            assert orphaned is not None and stranger in orphaned["data"]
            assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'machine.orphan_terminated'") == 1

            # The orphan list is what the last passes saw (a provider not configured here is
            # never reconciled, so its row stays put for the route to show).
            await db.execute("INSERT INTO orphan_machines (provider, provider_instance_id, reason)"
                             " VALUES ('elsewhere', 'm-9', 'it carries our cluster tag but no instance tag')")
            listed = (await client.get("/v1/orphans")).json()["items"]
            assert [(o["provider"], o["provider_instance_id"], o["terminated_at"]) for o in listed
                    if o["provider"] == "elsewhere"] == [("elsewhere", "m-9", None)]
        async with cp.client(key=None) as anonymous:
            assert (await anonymous.get("/v1/orphans")).status_code == 401


async def _status_is(db, instance_id: uuid.UUID, status: str) -> bool:
    return await db.fetchval("SELECT status FROM instances WHERE id = $1", instance_id) == status
