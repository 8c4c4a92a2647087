"""The whole control plane on Scaleway, through the real SDK against the stand-in
(tests/standins/scaleway_api.py), behind a fault proxy; and failover from Scaleway to AWS."""

from __future__ import annotations

import dataclasses

import pytest

from adapters.base import TAG_CLUSTER, TAG_INSTANCE
from tests.conftest import RunningControlPlane, eventually
from tests.e2e.cloud_helpers import create_then_sigkill, in_status, past_provisioning, up_process
from tests.e2e.test_aws_lifecycle import aws_settings, machines_of
from tests.e2e.test_up_command import env_for
from tests.standins.scaleway_api import ScalewayStandIn
from tests.support.cloud_boot import CloudBoot
from tests.support.fault_proxy import FaultProxy

SECRET_KEY = "7d2c0e4a-1b3f-4c5d-8e9f-0a1b2c3d4e5f"
PROJECT = "22222222-2222-2222-2222-222222222222"
ZONE = "fr-par-2"


@pytest.fixture
def scaleway():
    with ScalewayStandIn(SECRET_KEY, project_id=PROJECT, transition_reads=2,
                         transition_seconds=1.0) as standin, FaultProxy(standin.url) as proxy:
        yield standin, proxy


def scw_settings(settings, proxy: FaultProxy, **extra):
    return dataclasses.replace(
        settings, scaleway_access_key="SCWE2EACCESSKEY00001", scaleway_secret_key=SECRET_KEY,
        scaleway_project_id=PROJECT, scaleway_zone=ZONE, scaleway_api_url=proxy.url,
        scaleway_image="ubuntu_noble", local_provider="off", **extra)


def scw_env(settings) -> dict[str, str]:
    return env_for(settings) | {
        "SCW_ACCESS_KEY": settings.scaleway_access_key, "SCW_SECRET_KEY": SECRET_KEY,
        "SCW_DEFAULT_PROJECT_ID": PROJECT, "SCW_DEFAULT_ZONE": ZONE,
        "SCW_API_URL": settings.scaleway_api_url, "CP_SCALEWAY_IMAGE": "ubuntu_noble",
        "CP_LOCAL_PROVIDER": "off", "CP_LEASE_SECONDS": "3", "CP_WORKER_POLL_SECONDS": "0.5",
        "CP_ADMIN_API_KEY": settings.admin_api_key,
        "CP_AGENT_TOKEN_SECRET": "test-secret-shared-by-both-runs"}


def ours(standin: ScalewayStandIn, instance_id: str | None = None) -> list[dict]:
    want = f"{TAG_INSTANCE}={instance_id}" if instance_id else None
    return [s for s in standin.servers() if want is None or want in s["tags"]]


def running_with_user_data(standin: ScalewayStandIn):
    def list_running() -> dict[str, str]:
        return {f"{s['zone']}/{s['id']}": standin.user_data(s["zone"], s["id"]).get(
                    "cloud-init", b"").decode()
                for s in standin.servers() if s["state"] == "running"}
    return list_running


async def test_a_scaleway_instance_boots_to_ready_and_terminate_leaves_no_volume_or_ip(
        settings, scaleway, tmp_path):
    standin, proxy = scaleway
    settings = scw_settings(settings, proxy)
    with CloudBoot(running_with_user_data(standin), tmp_path / "machines"):
        async with RunningControlPlane(settings) as cp, cp.client() as client:
            created = await client.post("/v1/instances", json={
                "provider": "scaleway", "instance_type": "L4-1-24G", "zone": ZONE, "model": "org/m"})
            assert created.status_code == 202, created.text
            instance_id = created.json()["id"]
            ready = await eventually(lambda: in_status(client, instance_id, "ready"), timeout=60,
                                     message="ready")
            assert ready["agent"]["integrity"] == "verified"
            assert ready["hourly_price"] > 0 and ready["currency"] == "EUR"
            [server] = ours(standin, instance_id)
            assert ready["provider_instance_id"] == f"{ZONE}/{server['id']}"
            assert f"{TAG_CLUSTER}={settings.cluster_name}" in server["tags"]
            assert ready["ip"] and [ip["address"] for ip in standin.ips()] == [ready["ip"]]
            volumes = (await client.get(f"/v1/instances/{instance_id}/volumes")).json()["items"]
            assert [(v["is_boot"], v["volume_type"][:4], v["delete_on_terminate"]) for v in volumes] == [
                (True, "sbs_", True)], "one Block boot volume, deleted with the machine"

            assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202
            await eventually(lambda: in_status(client, instance_id, "terminated"), timeout=60,
                             message="terminated")
            volumes = (await client.get(f"/v1/instances/{instance_id}/volumes")).json()["items"]
            assert [v["status"] for v in volumes] == ["deleted"]
    assert ours(standin) == [] and standin.ips() == []
    assert standin.block_volumes() == [] and standin.local_volumes() == [], "nothing left behind"


async def test_sigkill_between_create_sent_and_recorded_yields_one_server(
        settings, scaleway, tmp_path):
    standin, proxy = scaleway
    settings = scw_settings(settings, proxy)
    env = scw_env(settings)
    held = proxy.add_rule(method="POST", path=r"/servers$", forward_then_hang=True, times=1)
    instance_id = await create_then_sigkill(
        env, tmp_path / "first.log", settings.admin_api_key, settings.database_url, held,
        {"provider": "scaleway", "instance_type": "L4-1-24G", "model": "org/m"},
        lambda i: ours(standin, i))
    assert standin.user_data(ZONE, ours(standin, instance_id)[0]["id"]) == {}, "killed before user data"

    async with up_process(env, tmp_path / "second.log", settings.admin_api_key) as client:
        booting = await eventually(lambda: past_provisioning(client, instance_id), timeout=60,
                                   message="create recorded")
        [server] = ours(standin, instance_id)
        assert booting["provider_instance_id"] == f"{ZONE}/{server['id']}"
        assert proxy.count(method="POST", path=r"/servers$") == 1, "the retry found the server"
        assert "cloud-init" in standin.user_data(ZONE, server["id"]), "and finished its set-up"
        assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202
        await eventually(lambda: in_status(client, instance_id, "terminated"), timeout=60,
                         message="terminated")
    assert ours(standin) == [] and standin.ips() == [] and standin.block_volumes() == []


async def test_out_of_stock_on_scaleway_fails_over_to_aws(
        settings, scaleway, ec2_proxy, ami, ec2, aws_env):
    standin, proxy = scaleway
    settings = scw_settings(aws_settings(settings, ec2_proxy, ami), proxy)
    standin.out_of_stock(ZONE, "L4-1-24G")
    async with RunningControlPlane(settings) as cp, cp.client() as client:
        created = await client.post("/v1/instances", json={"model": "org/m", "offers": [
            {"provider": "scaleway", "instance_type": "L4-1-24G", "zone": ZONE},
            {"provider": "aws", "instance_type": "g6.xlarge"}]})
        assert created.status_code == 202, created.text
        instance_id = created.json()["id"]
        moved = await eventually(lambda: past_provisioning(client, instance_id), timeout=60,
                                 message="created on AWS")
        assert (moved["provider"], moved["instance_type"], moved["currency"]) == ("aws", "g6.xlarge", "USD")
        [machine] = machines_of(ec2, instance_id)
        assert moved["provider_instance_id"] == machine["InstanceId"]
        assert ours(standin) == []
        events = (await client.get("/v1/instances/" + instance_id + "/actions")).json()["items"]
        [failover] = [a for a in events if a["action_type"] == "FAILOVER"]
        assert failover["metadata"]["message"].startswith(
            f"scaleway L4-1-24G in {ZONE} failed (NoCapacity:")
        assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202
        await eventually(lambda: in_status(client, instance_id, "terminated"), timeout=60,
                         message="terminated")
    assert machines_of(ec2, instance_id) == []


async def test_cheapest_matching_offer_wins_when_none_is_named(settings, scaleway, ec2_proxy, ami,
                                                               aws_env):
    standin, proxy = scaleway
    settings = scw_settings(aws_settings(settings, ec2_proxy, ami), proxy)
    async with RunningControlPlane(settings) as cp, cp.client() as client:
        created = await client.post("/v1/instances", json={"model": "org/m", "gpu_model": "L4"})
        assert created.status_code == 202, created.text
        chosen = await eventually(lambda: past_provisioning(client, created.json()["id"]),
                                  timeout=60, message="created")
        offers = chosen["offers"]
        assert all("L4" in o["instance_type"] or o["provider"] == "aws" for o in offers)
        in_eur = [o["hourly_price"] * (0.92 if o["currency"] == "USD" else 1) for o in offers]
        assert in_eur == sorted(in_eur) and len(offers) > 1, offers
        assert (chosen["provider"], chosen["instance_type"]) == (offers[0]["provider"], offers[0]["instance_type"])
        refused = await client.post("/v1/instances", json={"model": "org/m", "gpu_model": "TPU"})
        assert refused.status_code == 400 and "no provider offers 1+ TPU GPUs" in refused.text
