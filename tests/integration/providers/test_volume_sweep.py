"""The volume sweep against moto: what it reports, what it deletes, what it leaves alone."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from adapters.base import TAG_CLUSTER, TAG_INSTANCE
from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.loops.volume_sweep import sweep_volumes
from control_plane.providers import Providers
from tests.integration.providers.conftest import CLUSTER, REGION


def tags(instance_id: str) -> list[dict]:
    return [{"ResourceType": "volume", "Tags": [{"Key": TAG_CLUSTER, "Value": CLUSTER},
                                                 {"Key": TAG_INSTANCE, "Value": instance_id}]}]


@pytest.fixture
async def sessions(settings, db):
    engine = make_engine(settings.database_url)
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.mark.parametrize("delete", [False, True])
async def test_sweep_reports_orphans_deletes_detached_ones_and_spares_live_and_kept_volumes(
        settings, sessions, db, aws, ec2, ami, delete):
    settings = dataclasses.replace(settings, cluster_name=CLUSTER, volume_sweep_delete=delete)
    providers = Providers.wrapped([aws], settings)
    live, gone, kept_owner = (str(uuid.uuid4()) for _ in range(3))
    await db.execute("INSERT INTO instances (id, provider, instance_type, model, status)"
                     " VALUES ($1::uuid, 'aws', 'g5.xlarge', 'm', 'ready'),"
                     " ($2::uuid, 'aws', 'g5.xlarge', 'm', 'terminated')", live, kept_owner)

    def volume(instance_id: str) -> str:
        return ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=10,
                                 TagSpecifications=tags(instance_id))["VolumeId"]

    of_live, orphan, kept = volume(live), volume(gone), volume(kept_owner)
    await db.execute("INSERT INTO instance_volumes (instance_id, provider_volume_id, volume_type,"
                     " size_gb, is_boot, delete_on_terminate, status)"
                     " VALUES ($1::uuid, $2, 'gp3', 10, false, false, 'kept')", kept_owner, kept)
    # A machine of ours (by its tags) that we do not run: its boot volume is attached.
    stray = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, TagSpecifications=tags(gone))
    stray_id = stray["Instances"][0]["InstanceId"]
    [attached] = [v["VolumeId"] for v in ec2.describe_volumes(Filters=[
        {"Name": "attachment.instance-id", "Values": [stray_id]}])["Volumes"]]
    untagged = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=10)["VolumeId"]

    reported: set[str] = set()
    found = await sweep_volumes(sessions, providers, settings, reported)
    assert sorted((o.provider_volume_id, o.reason) for o in found) == sorted([
        (orphan, "detached, and its instance is gone or unknown"),
        (attached, "attached to a machine we do not run")])
    events = await db.fetch("SELECT data FROM events WHERE type = 'volume.orphaned'")
    assert len(events) == 2
    swept = await db.fetchval("SELECT count(*) FROM events WHERE type = 'volume.swept'")
    left = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    assert {of_live, kept, attached, untagged} <= left, "live, kept, attached and foreign volumes stay"
    assert (orphan in left) is not delete and swept == int(delete)

    await sweep_volumes(sessions, providers, settings, reported)
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'volume.orphaned'") == 2, \
        "an orphan is reported once"
