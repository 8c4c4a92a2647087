"""Reconciliation against moto (through the counting fault proxy) and the local provider:
machines lost behind our back, orphans by every cause, the orphan policy, stuck instances,
listing by pages, and one provider failing while the others are reconciled."""

from __future__ import annotations

import dataclasses
import math
import uuid

import pytest

from adapters.base import TAG_CLUSTER, TAG_INSTANCE
from adapters.local import LocalProvider
from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.loops.reconcile import reconcile
from control_plane.providers import Providers
from control_plane.settings import Settings, SettingsError
from tests.integration.providers.conftest import CLUSTER

AUTH_FAILURE = ('<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
                "<Code>UnauthorizedOperation</Code><Message>You are not authorized to perform this"
                " operation.</Message></Error></Errors><RequestID>r</RequestID></Response>")


@pytest.fixture
async def sessions(settings, db):
    engine = make_engine(settings.database_url)
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture
def run_machine(ec2, ami):
    def run(tags: dict[str, str]) -> str:
        spec = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
        return ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1,
                                 TagSpecifications=spec)["Instances"][0]["InstanceId"]
    return run


async def add_instance(db, status: str, provider_instance_id: str | None, provider: str = "aws",
                       changed_ago_s: float = 3600) -> str:
    instance_id = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO instances (id, provider, instance_type, model, status, provider_instance_id,"
        " status_changed_at) VALUES ($1::uuid, $2, 'g5.xlarge', 'm', $3, $4,"
        " now() - make_interval(secs => $5))",
        instance_id, provider, status, provider_instance_id, changed_ago_s)
    return instance_id


def ours(instance_id: str | None = None) -> dict[str, str]:
    return {TAG_CLUSTER: CLUSTER} | ({TAG_INSTANCE: instance_id} if instance_id else {})


def state_of(ec2, machine_id: str) -> str:
    [reservation] = ec2.describe_instances(InstanceIds=[machine_id])["Reservations"]
    return reservation["Instances"][0]["State"]["Name"]


async def test_lost_machines_orphans_and_policy(settings, sessions, db, make_aws, ec2, ec2_proxy,
                                                run_machine):
    settings = dataclasses.replace(settings, cluster_name=CLUSTER, provider_retries=0)
    providers = Providers.wrapped([make_aws(page_size=5)], settings)

    kept = await add_instance(db, "ready", None)
    kept_machine = run_machine(ours(kept))
    await db.execute("UPDATE instances SET provider_instance_id = $1 WHERE id = $2::uuid", kept_machine, kept)
    lost, also_lost = await add_instance(db, "ready", None), await add_instance(db, "draining", None)
    lost_machine, also_lost_machine = run_machine(ours(lost)), run_machine(ours(also_lost))
    await db.execute("UPDATE instances SET provider_instance_id = $1 WHERE id = $2::uuid", lost_machine, lost)
    await db.execute("UPDATE instances SET provider_instance_id = $1 WHERE id = $2::uuid",
                     also_lost_machine, also_lost)
    ec2.terminate_instances(InstanceIds=[lost_machine, also_lost_machine])  # behind our back
    creating = await add_instance(db, "provisioning", None, changed_ago_s=5)  # create sent, not yet recorded
    creating_machine = run_machine(ours(creating))
    finished = await add_instance(db, "terminated", None)
    orphans = {
        run_machine(ours(finished)): f"its instance {finished} is terminated",
        run_machine(ours(str(uuid.uuid4()))): "which this control plane does not know",
        run_machine(ours()): "it carries our cluster tag but no instance tag",
        run_machine(ours(kept)): f"a second machine for instance {kept}, whose machine is {kept_machine}",
    }
    foreign = run_machine({TAG_CLUSTER: "someone-else", TAG_INSTANCE: kept})
    for _ in range(4):  # more machines of ours being created: the listing spans pages
        run_machine(ours(await add_instance(db, "booting", None)))

    listed_before = ec2_proxy.count(contains="Action=DescribeInstances")
    report = (await reconcile(sessions, providers, settings)).providers["aws"]
    listings = ec2_proxy.count(contains="Action=DescribeInstances") - listed_before

    assert report.error is None and report.listed == 10
    assert listings == math.ceil(10 / 5) + 1, "one call per page, and one describe for the lost machines"
    assert sorted(report.lost) == sorted([uuid.UUID(lost), uuid.UUID(also_lost)])
    row = await db.fetchrow("SELECT status, failure_reason, billed_until FROM instances WHERE id = $1::uuid", lost)
    assert row["status"] == "provider_deleted" and lost_machine in row["failure_reason"]
    assert await db.fetchval("SELECT actor FROM instance_state_history WHERE instance_id = $1::uuid"
                             " ORDER BY id DESC LIMIT 1", lost) == "reconciler"
    assert sorted(report.orphans) == sorted(orphans)
    for machine, why in orphans.items():
        assert why in report.orphans[machine]
    assert report.orphans_terminated == []
    assert foreign not in report.orphans and creating_machine not in report.orphans
    recorded = {r["provider_instance_id"] for r in await db.fetch("SELECT * FROM orphan_machines")}
    assert recorded == set(orphans)
    announced = await db.fetch("SELECT data FROM events WHERE type = 'machine.orphaned'")
    assert len(announced) == 4
    assert all(state_of(ec2, m) == "running" for m in orphans), "policy report terminates nothing"

    await reconcile(sessions, providers, settings)
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'machine.orphaned'") == 4, \
        "an orphan is announced once"

    terminate = dataclasses.replace(settings, orphan_policy="terminate")
    report = (await reconcile(sessions, providers, terminate)).providers["aws"]
    assert sorted(report.orphans_terminated) == sorted(orphans)
    assert all(state_of(ec2, m) in ("shutting-down", "terminated") for m in orphans)
    assert state_of(ec2, kept_machine) == state_of(ec2, creating_machine) == "running"
    assert state_of(ec2, foreign) == "running", "another cluster's machine is never touched"
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'machine.orphan_terminated'") == 4
    assert await db.fetchval("SELECT status FROM instances WHERE id = $1::uuid", kept) == "ready"

    await reconcile(sessions, providers, terminate)
    assert await db.fetchval("SELECT count(*) FROM orphan_machines") == 0, "gone orphans are forgotten"
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'machine.orphan_terminated'") == 4


async def test_stuck_instances_are_reported_once_per_stay_and_retried(settings, sessions, db):
    settings = dataclasses.replace(settings, terminate_timeout_seconds=600)
    stuck = await add_instance(db, "terminating", "m-1", provider="local", changed_ago_s=3600)
    fresh = await add_instance(db, "terminating", "m-2", provider="local", changed_ago_s=60)
    providers = Providers({})

    report = await reconcile(sessions, providers, settings)
    assert report.stuck == [uuid.UUID(stuck)]
    event = await db.fetchrow("SELECT data FROM events WHERE type = 'instance.stuck'")
    assert event is not None and "terminating" in event["data"]
    assert await db.fetchval("SELECT error FROM instance_actions WHERE instance_id = $1::uuid"
                             " AND action_type = 'stuck'", stuck) is not None
    assert await db.fetchval("SELECT next_check_at <= now() FROM instances WHERE id = $1::uuid", stuck)

    assert (await reconcile(sessions, providers, settings)).stuck == [], "reported once per stay"
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'instance.stuck'") == 1
    assert await db.fetchval("SELECT count(*) FROM events WHERE instance_id = $1::uuid", fresh) == 0


async def test_a_provider_that_cannot_be_listed_does_not_stop_the_others(settings, sessions, db, tmp_path,
                                                                         make_aws, ec2_proxy, run_machine):
    settings = dataclasses.replace(settings, cluster_name=CLUSTER, provider_retries=0)
    local = LocalProvider(tmp_path / "local", cluster=CLUSTER)
    providers = Providers.wrapped([make_aws(), local], settings)
    on_aws = await add_instance(db, "ready", None)
    await db.execute("UPDATE instances SET provider_instance_id = $1 WHERE id = $2::uuid",
                     run_machine(ours(on_aws)), on_aws)
    lost_locally = await add_instance(db, "draining", "local-gone", provider="local")
    ec2_proxy.add_rule(contains="Action=DescribeInstances", status=403, body=AUTH_FAILURE,
                       headers={"Content-Type": "text/xml"})

    report = await reconcile(sessions, providers, settings)

    assert report.providers["aws"].error is not None and report.providers["aws"].lost == []
    assert report.providers["local"].lost == [uuid.UUID(lost_locally)]
    assert await db.fetchval("SELECT status FROM instances WHERE id = $1::uuid", on_aws) == "ready"
    assert await db.fetchval("SELECT status FROM instances WHERE id = $1::uuid", lost_locally) == "provider_deleted"


def test_orphan_policy_is_checked():
    with pytest.raises(SettingsError, match="CP_ORPHAN_POLICY"):
        Settings.from_env({"CP_ORPHAN_POLICY": "delete"})
