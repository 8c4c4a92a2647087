"""The whole control plane on AWS, against moto's EC2 over HTTP (through a fault proxy).

moto keeps machines as records; `CloudBoot` plays their first boot (the user data's agent),
so instances really reach `ready` with a verified agent. See tests/support/cloud_boot.py.
"""

from __future__ import annotations

import base64
import dataclasses

import pytest

from adapters.base import TAG_CLUSTER, TAG_INSTANCE
from tests.conftest import RunningControlPlane, eventually
from tests.e2e.cloud_helpers import (
    create_then_sigkill,
    failed,
    in_status,
    past_provisioning,
    up_process,
)
from tests.e2e.test_up_command import env_for
from tests.integration.providers.conftest import REGION
from tests.support.cloud_boot import CloudBoot

pytestmark = pytest.mark.usefixtures("aws_env")


def aws_settings(settings, ec2_proxy, ami, **extra):
    return dataclasses.replace(
        settings, aws_region=REGION, aws_image_id=ami, aws_endpoint_url=ec2_proxy.url,
        aws_model_cache_gb=50, local_provider="off", **extra)


def running_with_user_data(ec2, cluster: str):
    """{instance id: user data} of our running machines in moto (what CloudBoot boots). A
    machine's user data never changes: it is asked for once."""
    user_data: dict[str, str] = {}

    def list_running() -> dict[str, str]:
        found = {}
        pages = ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]},
            {"Name": "instance-state-name", "Values": ["running"]}])
        for page in pages:
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    machine = instance["InstanceId"]
                    if machine not in user_data:
                        attribute = ec2.describe_instance_attribute(InstanceId=machine, Attribute="userData")
                        data = attribute.get("UserData", {}).get("Value")
                        user_data[machine] = base64.b64decode(data).decode() if data else ""
                    found[machine] = user_data[machine]
        return found
    return list_running


def machines_of(ec2, instance_id: str, states=("pending", "running", "stopping", "stopped")):
    reservations = ec2.describe_instances(Filters=[
        {"Name": f"tag:{TAG_INSTANCE}", "Values": [instance_id]},
        {"Name": "instance-state-name", "Values": list(states)}])["Reservations"]
    return [i for r in reservations for i in r["Instances"]]


def tagged_volumes(ec2, cluster: str):
    return ec2.describe_volumes(Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}])["Volumes"]


async def test_an_aws_instance_boots_to_ready_and_terminates_leaving_only_its_kept_volume(
        settings, ec2_proxy, ami, ec2, tmp_path):
    settings = aws_settings(settings, ec2_proxy, ami)
    with CloudBoot(running_with_user_data(ec2, settings.cluster_name), tmp_path / "machines") as boot:
        async with RunningControlPlane(settings) as cp, cp.client() as client:
            offers = (await client.post("/v1/instances", json={
                "provider": "aws", "instance_type": "nope.xlarge", "model": "org/m"})).json()
            assert "g5.xlarge" in offers["extra"][0]["message"], "refused, saying what is offered"

            created = await client.post("/v1/instances", json={
                "provider": "aws", "instance_type": "g5.xlarge", "model": "org/m"})
            assert created.status_code == 202, created.text
            instance_id = created.json()["id"]
            ready = await eventually(
                lambda: in_status(client, instance_id, "ready"), timeout=60, message="ready")
            assert ready["agent"]["integrity"] == "verified"
            assert ready["hourly_price"] > 0 and ready["currency"] == "USD"
            [machine] = machines_of(ec2, instance_id)
            assert ready["provider_instance_id"] == machine["InstanceId"] == boot.booted[0]

            volumes = (await client.get(f"/v1/instances/{instance_id}/volumes")).json()["items"]
            assert sorted((v["is_boot"], v["delete_on_terminate"]) for v in volumes) == [
                (False, False), (True, True)], "a boot volume deleted with it, a kept model cache"

            assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202
            done = await eventually(
                lambda: in_status(client, instance_id, "terminated"), timeout=60, message="terminated")
            assert done["progress"] == 100
            volumes = (await client.get(f"/v1/instances/{instance_id}/volumes")).json()["items"]
            assert sorted((v["is_boot"], v["status"]) for v in volumes) == [
                (False, "kept"), (True, "deleted")]
            actions = (await client.get(f"/v1/instances/{instance_id}/actions")).json()["items"]
            assert [a["status"] for a in actions if a["action_type"] == "PROVIDER_DELETE_VOLUME"] == ["succeeded"]

    assert machines_of(ec2, instance_id) == []
    left = tagged_volumes(ec2, settings.cluster_name)
    assert [v["VolumeId"] for v in left] == [
        v["provider_volume_id"] for v in volumes if not v["is_boot"]], "only the kept cache is left"


async def test_sigkill_between_create_sent_and_recorded_yields_one_machine(
        settings, ec2_proxy, ami, ec2, tmp_path):
    """The create reaches EC2 but its answer never comes back: the control plane is killed
    right then. The restarted one must find that machine, not create a second."""
    settings = aws_settings(settings, ec2_proxy, ami, lease_seconds=3.0)
    env = env_for(settings) | {
        "CP_AWS_REGION": REGION, "CP_AWS_IMAGE_ID": ami, "CP_AWS_ENDPOINT_URL": ec2_proxy.url,
        "CP_AWS_MODEL_CACHE_GB": "50", "CP_LOCAL_PROVIDER": "off", "CP_LEASE_SECONDS": "3",
        "CP_ADMIN_API_KEY": settings.admin_api_key, "CP_WORKER_POLL_SECONDS": "0.5",
        "CP_AGENT_TOKEN_SECRET": "test-secret-shared-by-both-runs"}
    held = ec2_proxy.add_rule(contains="Action=RunInstances", forward_then_hang=True, times=1)
    instance_id = await create_then_sigkill(
        env, tmp_path / "first.log", settings.admin_api_key, settings.database_url, held,
        {"provider": "aws", "instance_type": "g5.xlarge", "model": "org/m"},
        lambda i: machines_of(ec2, i))

    async with up_process(env, tmp_path / "second.log", settings.admin_api_key) as client:
        booting = await eventually(lambda: past_provisioning(client, instance_id), timeout=60,
                                   message="create recorded")
        [machine] = machines_of(ec2, instance_id)
        assert booting["provider_instance_id"] == machine["InstanceId"]
        assert ec2_proxy.count("Action=RunInstances") == 1, "the retry found the machine"
        assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202
        await eventually(lambda: in_status(client, instance_id, "terminated"), timeout=60,
                         message="terminated")
    assert machines_of(ec2, instance_id) == []
    kept = tagged_volumes(ec2, settings.cluster_name)
    assert len(kept) == 1 and kept[0]["Size"] == 50 and not kept[0]["Attachments"], \
        "only the persistent model cache is left"


INSUFFICIENT_CAPACITY = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
    "<Code>InsufficientInstanceCapacity</Code><Message>We currently do not have sufficient"
    " g6.xlarge capacity in the Availability Zone you requested.</Message></Error></Errors>"
    "<RequestID>cp-test</RequestID></Response>")


async def test_no_capacity_on_the_first_offer_lands_on_the_second(settings, ec2_proxy, ami, ec2):
    settings = aws_settings(settings, ec2_proxy, ami)
    full = ec2_proxy.add_rule(contains="InstanceType=g6.xlarge", status=500,
                              body=INSUFFICIENT_CAPACITY, headers={"Content-Type": "text/xml"})
    async with RunningControlPlane(settings) as cp, cp.client() as client:
        created = await client.post("/v1/instances", json={"model": "org/m", "offers": [
            {"provider": "aws", "instance_type": "g6.xlarge", "zone": "us-east-1a"},
            {"provider": "aws", "instance_type": "g5.xlarge"}]})
        assert created.status_code == 202, created.text
        instance_id = created.json()["id"]
        booting = await eventually(lambda: past_provisioning(client, instance_id), timeout=60,
                                   message="created on the second offer")
        assert (booting["instance_type"], booting["offer_index"]) == ("g5.xlarge", 1)
        [machine] = machines_of(ec2, instance_id)
        assert machine["InstanceType"] == "g5.xlarge"
        assert full.hits >= 1
        actions = (await client.get(f"/v1/instances/{instance_id}/actions")).json()["items"]
        creates = [(a["metadata"]["instance_type"], a["status"]) for a in actions
                   if a["action_type"] == "PROVIDER_CREATE"]
        assert creates == [("g6.xlarge", "failed"), ("g5.xlarge", "succeeded")]
        [failover] = [a for a in actions if a["action_type"] == "FAILOVER"]
        assert "NoCapacity" in failover["metadata"]["reason"]
        assert "trying aws g5.xlarge" in failover["metadata"]["message"]


async def test_when_every_offer_fails_the_reason_lists_each_attempt(settings, ec2_proxy, ami, ec2):
    settings = aws_settings(settings, ec2_proxy, ami)
    ec2_proxy.add_rule(contains="Action=RunInstances", status=500, body=INSUFFICIENT_CAPACITY,
                       headers={"Content-Type": "text/xml"})
    async with RunningControlPlane(settings) as cp, cp.client() as client:
        created = await client.post("/v1/instances", json={"model": "org/m", "offers": [
            {"provider": "aws", "instance_type": "g6.xlarge"},
            {"provider": "aws", "instance_type": "g5.xlarge"}]})
        instance_id = created.json()["id"]
        ended = await eventually(lambda: in_status(client, instance_id, "terminated"),
                                 timeout=60, message="failed and cleaned up")
        reason = ended["failure_reason"]
        assert reason.startswith("No acceptable offer could be created (2 tried)"), reason
        assert "1) aws g6.xlarge: NoCapacity" in reason and "2) aws g5.xlarge: NoCapacity" in reason
    assert machines_of(ec2, instance_id) == []


async def test_a_provider_failing_every_call_opens_the_breaker_and_the_instance_fails_clearly(
        settings, ec2_proxy, ami, ec2):
    settings = aws_settings(settings, ec2_proxy, ami, provider_retries=0, provider_max_attempts=4,
                            breaker_failure_threshold=2, breaker_reset_seconds=600)
    down = ec2_proxy.add_rule(contains="Action=RunInstances", status=503, body="Service Unavailable")
    async with RunningControlPlane(settings) as cp, cp.client() as client:
        created = await client.post("/v1/instances", json={
            "provider": "aws", "instance_type": "g5.xlarge", "model": "org/m"})
        instance_id = created.json()["id"]
        gave_up = await eventually(lambda: failed(client, instance_id), timeout=90,
                                   message="failed with a reason")
        # (Its clean-up waits for the breaker too: it must first ask EC2 whether a machine exists.)
        assert "CircuitOpen: aws (*) is failing: 2 consecutive failures" in gave_up["failure_reason"]
        assert "gave up after 4 attempts" in gave_up["failure_reason"]
        assert down.hits == 2, "an open breaker sends nothing more to the provider"
        metrics = (await client.get("/metrics")).text
        assert 'cp_provider_breaker_state{provider="aws",zone="*"} 2.0' in metrics
        assert 'cp_provider_calls_total{operation="create",outcome="CircuitOpen",provider="aws"}' in metrics
    assert machines_of(ec2, instance_id) == []


async def _terminated_with_its_machine(client, ec2, instance_id: str) -> list:
    """Once the instance is terminated: the machine the slow create made, and its state."""
    await eventually(lambda: in_status(client, instance_id, "terminated"), timeout=60,
                     message="instance terminated")
    await eventually(lambda: _settled(ec2, instance_id), timeout=30, message="its machine terminated")
    return machines_of(ec2, instance_id, states=EVERY_STATE)


EVERY_STATE = ("pending", "running", "stopping", "stopped", "shutting-down", "terminated")


async def _settled(ec2, instance_id: str) -> bool:
    found = machines_of(ec2, instance_id, states=EVERY_STATE)
    return bool(found) and all(m["State"]["Name"] in ("shutting-down", "terminated") for m in found)


async def test_a_slow_create_keeps_its_lease_and_a_terminate_waits_for_its_machine(
        settings, ec2_proxy, ami, ec2):
    """The create takes longer than a lease: the worker keeps renewing it, so nobody else acts
    on the instance meanwhile; the terminate asked during the create ends the machine."""
    settings = aws_settings(settings, ec2_proxy, ami, lease_seconds=1.5)
    ec2_proxy.add_rule(contains="Action=RunInstances", delay_seconds=5, times=1)
    async with RunningControlPlane(settings) as cp, cp.client() as client:
        instance_id = (await client.post("/v1/instances", json={
            "provider": "aws", "instance_type": "g5.xlarge", "model": "org/m"})).json()["id"]
        await eventually(lambda: _create_started(client, instance_id), message="create in flight")
        assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202
        [machine] = await _terminated_with_its_machine(client, ec2, instance_id)
        row = (await client.get(f"/v1/instances/{instance_id}")).json()
        assert row["provider_instance_id"] == machine["InstanceId"]
        actions = (await client.get(f"/v1/instances/{instance_id}/actions")).json()["items"]
        assert [a["status"] for a in actions if a["action_type"] == "PROVIDER_CREATE"] == ["succeeded"]


async def test_a_terminate_after_a_timed_out_create_waits_for_the_machine_it_may_make(
        settings, ec2_proxy, ami, ec2):
    """The create times out on our side but reaches EC2 later: terminating does not conclude
    "no machine" from one empty lookup while such a create can still land."""
    settings = aws_settings(settings, ec2_proxy, ami, provider_call_timeout_seconds=2.0, provider_retries=0)
    ec2_proxy.add_rule(contains="Action=RunInstances", delay_seconds=4, times=1)
    async with RunningControlPlane(settings) as cp, cp.client() as client:
        instance_id = (await client.post("/v1/instances", json={
            "provider": "aws", "instance_type": "g5.xlarge", "model": "org/m"})).json()["id"]
        await eventually(lambda: _create_started(client, instance_id), message="create in flight")
        assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202
        [machine] = await _terminated_with_its_machine(client, ec2, instance_id)
        row = (await client.get(f"/v1/instances/{instance_id}")).json()
        assert row["provider_instance_id"] == machine["InstanceId"], "the late machine was adopted"


async def _create_started(client, instance_id: str) -> bool:
    answer = await client.get(f"/v1/instances/{instance_id}/actions")
    return answer.status_code == 200 and any(
        a["action_type"] == "PROVIDER_CREATE" for a in answer.json()["items"])
