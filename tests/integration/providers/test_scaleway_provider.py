"""The Scaleway adapter through the real `scaleway` SDK, over HTTP, against the stand-in.

The stand-in (`tests/standins/scaleway_api.py`) keeps state and answers with Scaleway's
recorded shapes; its module docstring lists where it is simpler than Scaleway. State changes
(poweron, terminate) complete after a few reads of the server, so the tests poll with a bound
(`eventually`) and never sleep. Faults (429, 500, outage, out of stock, quotas, slow answers)
are set on the stand-in at run time. Setup the adapter does not do itself (a persistent Block
volume, a server deleted behind its back) goes through the plain SDK, as a user would.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from scaleway import Client
from scaleway.block.v1 import BlockV1API, CreateVolumeRequestFromEmpty
from scaleway.block.v1alpha1 import BlockV1Alpha1API
from scaleway.instance.v1.custom_api import InstanceUtilsV1API

from adapters.base import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    AuthError,
    InvalidSpec,
    Machine,
    MachineSpec,
    NoCapacity,
    NotReadyYet,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
)
from adapters.scaleway import TAG_SERVER, TAG_VOLUME_ROLE, ScalewayProvider
from tests.conftest import eventually
from tests.standins.scaleway_api import ScalewayStandIn

SECRET_KEY = "5f0c2d9e-7b1a-4c3e-9d8f-2a6b4c8e0f13"
ACCESS_KEY = "SCWTESTACCESSKEY0001"
PROJECT = "11111111-1111-1111-1111-111111111111"
CLUSTER = "scw-test-cluster"
ZONES = ["fr-par-1", "fr-par-2"]
AGENT_TOKEN = "agent-token-7c1e9b2f44d0a8"
USER_DATA = f"#!/bin/sh\nexport WORKER_AGENT_TOKEN={AGENT_TOKEN}\nexec /opt/agent/start\n"
SERVERS = "/instance/v1/zones/{zone}/servers"
SERVER = "/instance/v1/zones/{zone}/servers/{server_id}"
ACTION = "/instance/v1/zones/{zone}/servers/{server_id}/action"
USER_DATA_KEY_PATH = "/instance/v1/zones/{zone}/servers/{server_id}/user_data/{key}"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def standin() -> Iterator[ScalewayStandIn]:
    """A fresh stand-in; transitions complete by reads only (its clock is set far away)."""
    with ScalewayStandIn(SECRET_KEY, project_id=PROJECT, transition_reads=2,
                         transition_seconds=600.0) as server:
        yield server


@pytest.fixture
async def make_scw(standin: ScalewayStandIn) -> AsyncIterator[Callable[..., ScalewayProvider]]:
    made: list[ScalewayProvider] = []

    def make(**overrides: Any) -> ScalewayProvider:
        options: dict[str, Any] = {
            "access_key": ACCESS_KEY, "secret_key": SECRET_KEY, "project_id": PROJECT,
            "zones": ZONES, "image": "ubuntu_noble", "cluster": CLUSTER,
            "api_url": standin.url, "call_timeout": 5.0,
        }
        provider = ScalewayProvider(**(options | overrides))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()


@pytest.fixture
def scw(make_scw: Callable[..., ScalewayProvider]) -> ScalewayProvider:
    return make_scw()


class Sdk:
    """The plain SDK against the stand-in: what an operator (or a crash) does by hand."""

    def __init__(self, url: str) -> None:
        client = Client(access_key=ACCESS_KEY, secret_key=SECRET_KEY, api_url=url,
                        default_project_id=PROJECT, default_zone=ZONES[0])
        self.instance = InstanceUtilsV1API(client, bypass_validation=True)
        self.block = BlockV1API(client, bypass_validation=True)
        self.block_alpha = BlockV1Alpha1API(client, bypass_validation=True)

    def persistent_volume(self, zone: str, server_id: str, tags: list[str]) -> str:
        volume = self.block.create_volume(zone=zone, name="model-cache", tags=tags,
                                          from_empty=CreateVolumeRequestFromEmpty(size=50 * 10**9))
        self.instance.attach_server_volume(server_id=server_id, volume_id=volume.id, zone=zone,
                                           volume_type="sbs_volume")
        return volume.id


@pytest.fixture
def sdk(standin: ScalewayStandIn) -> Sdk:
    return Sdk(standin.url)


def make_spec(instance_id: str | None = None, **overrides: Any) -> MachineSpec:
    instance_id = instance_id or str(uuid.uuid4())
    fields: dict[str, Any] = {
        "instance_id": instance_id, "instance_type": "L4-1-24G", "zone": None,
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "tags": {TAG_CLUSTER: CLUSTER, TAG_INSTANCE: instance_id, "cp-model": "llama-8b"},
        "agent_env": {"WORKER_AGENT_TOKEN": AGENT_TOKEN}, "user_data": USER_DATA,
    }
    return MachineSpec(**(fields | overrides))


def split(provider_id: str) -> tuple[str, str]:
    zone, _, rid = provider_id.partition("/")
    return zone, rid


def assert_clean(exc: BaseException) -> None:
    """No secret in the message, nor anywhere in the exception chain."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        assert SECRET_KEY not in text and AGENT_TOKEN not in text, text
        seen = seen.__cause__ or seen.__context__


def tags_of(items: list[str]) -> dict[str, str]:
    return dict(t.partition("=")[::2] for t in items)


async def running(scw: ScalewayProvider, machine: Machine) -> Machine:
    await scw.start(machine.provider_instance_id)

    async def check() -> Machine | None:
        m = await scw.describe(machine.provider_instance_id)
        return m if m is not None and m.state == "running" else None

    return await eventually(check, timeout=10, message="server running")


async def gone(scw: ScalewayProvider, machine: Machine) -> None:
    async def check() -> bool:
        return await scw.describe(machine.provider_instance_id) is None

    await eventually(check, timeout=10, message="server gone")


# --- create -----------------------------------------------------------------------------------


async def test_create_twice_and_through_a_new_adapter_gives_one_tagged_server(
        scw: ScalewayProvider, make_scw: Callable[..., ScalewayProvider],
        standin: ScalewayStandIn) -> None:
    spec = make_spec()
    first = await scw.create(spec)
    again = await scw.create(spec)
    other = await make_scw().create(spec)  # a restarted control plane: no memory of the first

    assert first == again == other
    assert standin.count("POST", SERVERS) == 1
    zone, sid = split(first.provider_instance_id)
    assert zone == "fr-par-1" and scw.zone_of(first.provider_instance_id) == "fr-par-1"
    assert first.state == "stopped"  # Scaleway creates servers stopped
    assert first.ip and first.tags[TAG_INSTANCE] == spec.instance_id

    [server] = standin.servers()
    ours = {TAG_CLUSTER: CLUSTER, TAG_INSTANCE: spec.instance_id}
    assert tags_of(server["tags"]) == ours | {"cp-model": "llama-8b"}
    [boot] = standin.block_volumes()
    assert tags_of(boot["tags"]).items() >= (ours | {TAG_VOLUME_ROLE: "boot"}).items()
    assert boot["size"] == 100 * 10**9 and boot["references"][0]["product_resource_id"] == sid
    [ip] = standin.ips()
    assert ip["server"]["id"] == sid and ip["address"] == first.ip
    assert tags_of(ip["tags"]).items() >= (ours | {TAG_SERVER: sid}).items()
    assert standin.user_data(zone, sid) == {"cloud-init": USER_DATA.encode()}
    assert standin.count("PATCH", USER_DATA_KEY_PATH) == 1  # the retries found it set


async def test_a_retry_after_a_crash_finishes_user_data_and_tags(
        scw: ScalewayProvider, sdk: Sdk, standin: ScalewayStandIn) -> None:
    """The server exists (tagged, as created by a control plane that died right after), but
    without user data and with untagged boot volume and IP: `create` completes it."""
    spec = make_spec()
    created = sdk.instance.create_server(
        zone="fr-par-1", commercial_type="L4-1-24G", image="ubuntu_noble",
        tags=[f"{TAG_CLUSTER}={CLUSTER}", f"{TAG_INSTANCE}={spec.instance_id}"],
        dynamic_ip_required=True, routed_ip_enabled=True).server

    machine = await scw.create(spec)

    assert machine.provider_instance_id == f"fr-par-1/{created.id}"
    assert standin.count("POST", SERVERS) == 1  # the SDK's, none from the adapter
    assert standin.user_data("fr-par-1", created.id) == {"cloud-init": USER_DATA.encode()}
    [boot] = standin.block_volumes()
    assert tags_of(boot["tags"])[TAG_INSTANCE] == spec.instance_id
    [ip] = standin.ips()
    assert tags_of(ip["tags"])[TAG_SERVER] == created.id


async def test_create_in_another_configured_zone(scw: ScalewayProvider,
                                                 standin: ScalewayStandIn) -> None:
    machine = await scw.create(make_spec(zone="fr-par-2"))
    assert machine.zone == "fr-par-2" and scw.zone_of(machine.provider_instance_id) == "fr-par-2"
    assert [s["zone"] for s in standin.servers()] == ["fr-par-2"]
    with pytest.raises(InvalidSpec, match="nl-ams-1"):
        await scw.create(make_spec(zone="nl-ams-1"))


# --- start, describe --------------------------------------------------------------------------


async def test_start_then_describe_until_running(scw: ScalewayProvider,
                                                 standin: ScalewayStandIn) -> None:
    machine = await scw.create(make_spec())
    await scw.start(machine.provider_instance_id)

    described = await scw.describe(machine.provider_instance_id)
    assert described is not None and described.state == "starting"  # callers must poll
    await scw.start(machine.provider_instance_id)  # starting: nothing more to do
    up = await running(scw, machine)
    await scw.start(machine.provider_instance_id)  # running: nothing more to do

    assert standin.count("POST", ACTION) == 1
    assert up.ip == machine.ip and up.tags == machine.tags


async def test_describe_and_start_of_missing_and_locked_servers(
        scw: ScalewayProvider, standin: ScalewayStandIn) -> None:
    missing = f"fr-par-1/{uuid.uuid4()}"
    assert await scw.describe(missing) is None
    with pytest.raises(InvalidSpec, match="does not exist"):
        await scw.start(missing)

    machine = await scw.create(make_spec())
    standin.lock(*split(machine.provider_instance_id))
    described = await scw.describe(machine.provider_instance_id)
    assert described is not None and described.state == "pending"
    with pytest.raises(NotReadyYet):
        await scw.start(machine.provider_instance_id)
    with pytest.raises(NotReadyYet):
        await scw.terminate(machine.provider_instance_id)


async def test_start_during_a_transient_state_is_not_ready_yet(
        scw: ScalewayProvider, standin: ScalewayStandIn) -> None:
    machine = await scw.create(make_spec())
    zone, sid = split(machine.provider_instance_id)
    standin.fail_next(409, {"current_state": "stopped", "message": "resource is in a transient state",
                            "resource": "instance_server", "resource_id": sid,
                            "type": "transient_state"}, method="POST", pattern=ACTION)
    with pytest.raises(NotReadyYet, match="transient_state"):
        await scw.start(machine.provider_instance_id)
    await running(scw, machine)  # the retry goes through


async def test_stopped_in_place_counts_as_stopped_and_is_deleted_on_terminate(
        scw: ScalewayProvider, sdk: Sdk, standin: ScalewayStandIn) -> None:
    machine = await running(scw, await scw.create(make_spec()))
    zone, sid = split(machine.provider_instance_id)
    sdk.instance.server_action(server_id=sid, zone=zone, action="stop_in_place")

    async def stopped() -> bool:
        m = await scw.describe(machine.provider_instance_id)
        return m is not None and m.state == "stopped"

    await eventually(stopped, timeout=10, message="server stopped in place")
    assert standin.servers()[0]["state"] == "stopped in place"
    await scw.terminate(machine.provider_instance_id)
    assert await scw.describe(machine.provider_instance_id) is None and standin.ips() == []


# --- terminate and volumes --------------------------------------------------------------------


async def test_terminate_running_server_leaves_only_detached_block_volumes(
        scw: ScalewayProvider, sdk: Sdk, standin: ScalewayStandIn) -> None:
    spec = make_spec()
    machine = await scw.create(spec)
    zone, sid = split(machine.provider_instance_id)
    cache_id = sdk.persistent_volume(zone, sid, [f"{TAG_CLUSTER}={CLUSTER}", "cp-role=cache"])
    await running(scw, machine)

    volumes = {v.provider_volume_id: v for v in await scw.list_volumes(machine.provider_instance_id)}
    [boot] = [v for v in volumes.values() if v.is_boot]
    cache = volumes[f"{zone}/{cache_id}"]
    assert boot.delete_on_terminate and boot.attached_to == machine.provider_instance_id
    assert boot.size_gb == 100 and boot.tags[TAG_INSTANCE] == spec.instance_id
    assert not cache.delete_on_terminate and not cache.is_boot and cache.size_gb == 50
    with pytest.raises(NotReadyYet):
        await scw.delete_volume(cache.provider_volume_id)  # attached

    await scw.terminate(machine.provider_instance_id)
    assert standin.ips(zone) == []
    with pytest.raises(NotReadyYet, match="in_use"):
        await scw.delete_volume(boot.provider_volume_id)  # still detaching
    await gone(scw, machine)
    await scw.terminate(machine.provider_instance_id)  # gone: nothing to do

    detached = {v.provider_volume_id: v for v in await scw.list_tagged_volumes({TAG_CLUSTER: CLUSTER})}
    assert detached.keys() == {boot.provider_volume_id, cache.provider_volume_id}
    assert detached[boot.provider_volume_id].attached_to is None
    assert detached[boot.provider_volume_id].is_boot  # known by its tag once the server is gone
    await scw.delete_volume(boot.provider_volume_id)
    await scw.delete_volume(boot.provider_volume_id)  # gone: nothing to do

    [left] = standin.block_volumes(zone)
    assert left["id"] == cache_id and left["status"] == "available" and left["references"] == []
    assert tags_of(left["tags"]) == {TAG_CLUSTER: CLUSTER, "cp-role": "cache"}  # untouched
    assert sdk.block_alpha.get_volume(volume_id=cache_id, zone=zone).status == "available"
    assert await scw.list_volumes(machine.provider_instance_id) == []
    assert standin.servers() == [] and standin.local_volumes() == []


async def test_terminate_running_server_deletes_its_scratch_volume(
        scw: ScalewayProvider, standin: ScalewayStandIn) -> None:
    machine = await scw.create(make_spec(instance_type="H100-1-80G"))
    [scratch] = [v for v in await scw.list_volumes(machine.provider_instance_id)
                 if v.volume_type == "scratch"]
    assert scratch.delete_on_terminate and not scratch.is_boot
    assert scratch.tags[TAG_CLUSTER] == CLUSTER
    await running(scw, machine)

    await scw.terminate(machine.provider_instance_id)
    await gone(scw, machine)

    assert standin.local_volumes() == []
    await scw.delete_volume(scratch.provider_volume_id)  # already gone with the server


async def test_terminate_stopped_server_with_local_boot_volume(
        make_scw: Callable[..., ScalewayProvider], standin: ScalewayStandIn) -> None:
    scw = make_scw(boot_volume_type="l_ssd", boot_volume_gb=20)
    machine = await scw.create(make_spec(instance_type="DEV1-S"))
    [boot] = await scw.list_volumes(machine.provider_instance_id)
    assert boot.volume_type == "l_ssd" and boot.is_boot and boot.delete_on_terminate
    assert boot.size_gb == 20 and boot.tags[TAG_VOLUME_ROLE] == "boot"
    assert await scw.list_tagged_volumes({TAG_INSTANCE: machine.tags[TAG_INSTANCE]}) == [boot]

    await scw.terminate(machine.provider_instance_id)  # stopped: DELETE, then its volumes

    assert await scw.describe(machine.provider_instance_id) is None
    assert standin.local_volumes() == [] and standin.ips() == [] and standin.block_volumes() == []
    await scw.terminate(machine.provider_instance_id)
    await scw.delete_volume(boot.provider_volume_id)


async def test_terminate_after_a_crash_finds_the_left_over_ip_by_tag(
        scw: ScalewayProvider, sdk: Sdk, standin: ScalewayStandIn) -> None:
    """The server is gone (deleted by hand, or by a terminate that crashed halfway) but an IP
    made for it is left: terminating again finds it by its `cp-scw-server` tag."""
    machine = await scw.create(make_spec())
    zone, sid = split(machine.provider_instance_id)
    left = sdk.instance.create_ip(zone=zone, type_="routed_ipv4",
                                  tags=[f"{TAG_CLUSTER}={CLUSTER}", f"{TAG_SERVER}={sid}"]).ip
    unrelated = sdk.instance.create_ip(zone=zone, type_="routed_ipv4",
                                       tags=[f"{TAG_CLUSTER}={CLUSTER}"]).ip
    sdk.instance.delete_server(server_id=sid, zone=zone)
    assert left.id in {ip["id"] for ip in standin.ips()}

    await scw.terminate(machine.provider_instance_id)

    assert [ip["id"] for ip in standin.ips()] == [unrelated.id]


async def test_delete_volume_of_unknown_ids(scw: ScalewayProvider) -> None:
    await scw.delete_volume(f"fr-par-1/{uuid.uuid4()}")
    with pytest.raises(InvalidSpec, match="not a Scaleway id"):
        await scw.delete_volume("vol-123")


# --- listing ----------------------------------------------------------------------------------


async def test_list_by_tags_reads_every_page_of_every_zone(
        scw: ScalewayProvider, sdk: Sdk, standin: ScalewayStandIn) -> None:
    standin.max_page_size = 2  # the server caps pages below the adapter's 100
    ours = [f"{TAG_CLUSTER}={CLUSTER}"]
    for n in range(5):
        sdk.instance.create_server(zone="fr-par-1", commercial_type="DEV1-S", image="ubuntu",
                                   tags=[*ours, f"{TAG_INSTANCE}=i{n}"])
    sdk.instance.create_server(zone="fr-par-2", commercial_type="DEV1-S", image="ubuntu", tags=ours)
    sdk.instance.create_server(zone="fr-par-1", commercial_type="DEV1-S", image="ubuntu",
                               tags=[f"{TAG_CLUSTER}=someone-else"])

    before = standin.count("GET", SERVERS)
    found = await scw.list_by_tags({TAG_CLUSTER: CLUSTER})
    calls = standin.count("GET", SERVERS) - before

    assert len(found) == 6 and {m.zone for m in found} == {"fr-par-1", "fr-par-2"}
    assert all(m.tags[TAG_CLUSTER] == CLUSTER for m in found)
    assert calls == math.ceil(5 / 2) + math.ceil(1 / 2)

    for n in range(4):
        sdk.instance.create_server(zone="fr-par-1", commercial_type="DEV1-S", image="ubuntu",
                                   tags=[*ours, f"{TAG_INSTANCE}=j{n}"])
    before = standin.count("GET", SERVERS)
    assert len(await scw.list_by_tags({TAG_CLUSTER: CLUSTER})) == 10
    assert standin.count("GET", SERVERS) - before == math.ceil(9 / 2) + 1  # grows with pages
    assert [m.tags[TAG_INSTANCE] for m in await scw.list_by_tags({TAG_INSTANCE: "i3"})] == ["i3"]


async def test_offers_are_gpu_types_in_eur_without_shortages(
        scw: ScalewayProvider, standin: ScalewayStandIn) -> None:
    standin.set_availability("fr-par-2", "L4-2-24G", "shortage")
    standin.set_availability("fr-par-2", "H100-1-80G", "scarce")

    offers = await scw.list_offers()

    by_key = {(o.zone, o.instance_type): o for o in offers}
    assert {o.currency for o in offers} == {"EUR"} and {o.provider for o in offers} == {"scaleway"}
    assert all(o.gpus > 0 and o.hourly_price > 0 for o in offers)
    assert ("fr-par-1", "DEV1-S") not in by_key and ("fr-par-1", "POP2-2C-8G") not in by_key
    assert ("fr-par-2", "L4-2-24G") not in by_key and ("fr-par-1", "L4-2-24G") in by_key
    assert ("fr-par-2", "H100-1-80G") in by_key  # scarce is still offered
    l4 = by_key[("fr-par-1", "L4-1-24G")]
    assert (l4.gpus, l4.gpu_model, l4.hourly_price) == (1, "L4", 0.7875)  # as recorded


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [409, 503])
async def test_out_of_stock_is_no_capacity_whatever_the_status(
        scw: ScalewayProvider, standin: ScalewayStandIn, status: int) -> None:
    standin.out_of_stock("fr-par-1", "L4-1-24G", status=status)
    with pytest.raises(NoCapacity, match="out_of_stock") as caught:
        await scw.create(make_spec())
    assert_clean(caught.value)
    assert standin.servers() == []
    await scw.create(make_spec(zone="fr-par-2"))  # another zone has stock


async def test_quotas_exceeded_is_quota_not_auth(scw: ScalewayProvider,
                                                  standin: ScalewayStandIn) -> None:
    standin.quota_exceeded("fr-par-1", status=403)
    with pytest.raises(QuotaExceeded, match="quota") as caught:
        await scw.create(make_spec())
    assert_clean(caught.value)


async def test_rate_limited_without_retry_after(scw: ScalewayProvider,
                                                standin: ScalewayStandIn) -> None:
    machine = await scw.create(make_spec())
    standin.rate_limit_next(1)
    with pytest.raises(RateLimited) as caught:
        await scw.describe(machine.provider_instance_id)
    assert caught.value.retry_after is None
    assert_clean(caught.value)
    assert await scw.describe(machine.provider_instance_id) is not None  # one 429, then fine


async def test_server_errors_and_outage_are_provider_unavailable(
        scw: ScalewayProvider, standin: ScalewayStandIn) -> None:
    standin.server_error_next(1)
    with pytest.raises(ProviderUnavailable, match="HTTP 500") as caught:
        await scw.list_by_tags({TAG_CLUSTER: CLUSTER})
    assert_clean(caught.value)

    standin.outage()
    some_id = f"fr-par-1/{uuid.uuid4()}"
    calls = (scw.list_offers, lambda: scw.create(make_spec()), lambda: scw.describe(some_id),
             lambda: scw.terminate(some_id), lambda: scw.delete_volume(some_id))
    for call in calls:
        with pytest.raises(ProviderUnavailable, match="HTTP 503") as caught:
            await call()
        assert_clean(caught.value)
    standin.outage(False)
    assert await scw.list_by_tags({TAG_CLUSTER: CLUSTER}) == []


async def test_unreachable_api_is_provider_unavailable(
        make_scw: Callable[..., ScalewayProvider]) -> None:
    from tests.conftest import free_port

    scw = make_scw(api_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ProviderUnavailable, match="unreachable") as caught:
        await scw.describe(f"fr-par-1/{uuid.uuid4()}")
    assert_clean(caught.value)


async def test_wrong_secret_key_is_auth_error(make_scw: Callable[..., ScalewayProvider],
                                              standin: ScalewayStandIn) -> None:
    wrong = "00000000-dead-beef-0000-000000000000"
    scw = make_scw(secret_key=wrong)
    with pytest.raises(AuthError, match="denied_authentication") as caught:
        await scw.create(make_spec())
    assert wrong not in str(caught.value)
    assert_clean(caught.value)
    assert standin.servers() == []


async def test_block_only_type_with_local_boot_volume_is_invalid(
        make_scw: Callable[..., ScalewayProvider], standin: ScalewayStandIn) -> None:
    scw = make_scw(boot_volume_type="l_ssd", boot_volume_gb=20)
    for instance_type in ("L4-1-24G", "H100-1-80G", "L40S-1-48G"):
        with pytest.raises(InvalidSpec, match=f"{instance_type} boots on Block storage only.*sbs_volume"):
            await scw.create(make_spec(instance_type=instance_type))
    with pytest.raises(InvalidSpec, match="at most 20 GB"):
        await make_scw(boot_volume_type="l_ssd", boot_volume_gb=100).create(
            make_spec(instance_type="DEV1-S"))
    assert standin.count("POST", SERVERS) == 0


async def test_unknown_instance_type_is_invalid(scw: ScalewayProvider,
                                                standin: ScalewayStandIn) -> None:
    with pytest.raises(InvalidSpec, match="GPU-9000"):
        await scw.create(make_spec(instance_type="GPU-9000"))
    assert standin.count("POST", SERVERS) == 0


async def test_a_slow_answer_fails_within_the_call_timeout(
        make_scw: Callable[..., ScalewayProvider], standin: ScalewayStandIn) -> None:
    scw = make_scw(call_timeout=1.0)
    machine = await scw.create(make_spec())
    standin.slow(30.0, calls=1)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="timed out") as caught:
        await scw.describe(machine.provider_instance_id)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0, elapsed
    assert_clean(caught.value)
    assert await scw.describe(machine.provider_instance_id) is not None  # next call is fine


async def test_no_message_or_log_carries_the_secret_key_or_user_data(
        scw: ScalewayProvider, standin: ScalewayStandIn, caplog: pytest.LogCaptureFixture) -> None:
    """Even when Scaleway's error quotes what it was sent (here: the user data)."""
    caplog.set_level(logging.DEBUG)
    standin.fail_next(400, {"type": "invalid_arguments", "message": "invalid argument(s)",
                            "details": [{"argument_name": "user_data", "reason": "constraint",
                                         "help_message": f"cannot parse {USER_DATA!r}"}]},
                      method="PATCH", pattern=USER_DATA_KEY_PATH)
    errors: list[ProviderError] = []
    try:
        await scw.create(make_spec())
    except InvalidSpec as exc:
        errors.append(exc)
    standin.rate_limit_next(1)
    standin.server_error_next(1)
    for _ in range(2):
        try:
            await scw.list_offers()
        except ProviderError as exc:
            errors.append(exc)
    assert [type(e) for e in errors] == [InvalidSpec, RateLimited, ProviderUnavailable]
    assert "user_data" in str(errors[0]) and "[redacted]" in str(errors[0])
    for exc in errors:
        assert_clean(exc)
    assert SECRET_KEY not in caplog.text and AGENT_TOKEN not in caplog.text
    machine = await scw.create(make_spec())  # a new instance, created cleanly after the errors
    assert machine.state == "stopped"
