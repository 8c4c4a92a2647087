"""The AWS adapter against moto over HTTP, with a fault proxy in between.

moto's semantics are EC2's where it matters here (tags, block-device mappings, volumes that
outlive their instance, pagination of DescribeInstances), except where the adapter's module
docstring says otherwise; errors EC2 would send are injected by the proxy as EC2's own XML.
No test sleeps: state changes are waited for with a bound (`eventually`).
"""

from __future__ import annotations

import base64
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import boto3
import pytest

from adapters.aws import CATALOG, AwsProvider, client_token
from adapters.base import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    AuthError,
    InvalidSpec,
    MachineSpec,
    NoCapacity,
    NotReadyYet,
    PermanentProviderError,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
)
from tests.conftest import eventually, free_port
from tests.integration.providers.conftest import CLUSTER, REGION
from tests.support.fault_proxy import FaultProxy
from tests.support.moto_server import MotoServer

SECRET = "agent-token-s3cr3t-7f9a2c"
USER_DATA = f"#!/bin/sh\nexport WORKER_AGENT_TOKEN={SECRET}\nexec /opt/agent/start\n"
DESCRIBE_INSTANCES = "Action=DescribeInstances&"
RUN_INSTANCES = "Action=RunInstances&"


def make_spec(instance_id: str | None = None, **overrides: Any) -> MachineSpec:
    fields: dict[str, Any] = {
        "instance_id": instance_id or str(uuid.uuid4()),
        "instance_type": "g5.xlarge",
        "zone": None,
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "tags": {"cp-model": "qwen"},
        "user_data": USER_DATA,
    }
    return MachineSpec(**(fields | overrides))


def ec2_error(code: str, message: str = "injected by the fault proxy") -> str:
    """An error body exactly as EC2 sends it."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}'
            f"</Code><Message>{message}</Message></Error></Errors>"
            f"<RequestID>{uuid.uuid4()}</RequestID></Response>")


def live_instances(ec2: Any, instance_id: str) -> list[dict[str, Any]]:
    reply = ec2.describe_instances(Filters=[
        {"Name": f"tag:{TAG_INSTANCE}", "Values": [instance_id]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
    ])
    return [i for r in reply["Reservations"] for i in r["Instances"]]


def sent(proxy: FaultProxy, contains: str) -> list[dict[str, list[str]]]:
    """The form parameters of every request the proxy received containing `contains`."""
    return [parse_qs(s.body) for s in proxy.requests if contains in s.body]


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


# Creation: idempotent, tagged, explicit about which volumes outlive the machine.


async def test_create_is_idempotent_within_and_across_adapter_objects(
    aws: AwsProvider, make_aws: Callable[..., AwsProvider], ec2: Any, ec2_proxy: FaultProxy
) -> None:
    spec = make_spec()
    first = await aws.create(spec)
    again = await aws.create(spec)
    after_restart = await make_aws().create(spec)  # a new process, same request

    assert first.provider_instance_id == again.provider_instance_id
    assert after_restart.provider_instance_id == first.provider_instance_id
    assert [i["InstanceId"] for i in live_instances(ec2, spec.instance_id)] == [
        first.provider_instance_id]
    runs = sent(ec2_proxy, RUN_INSTANCES)
    assert len(runs) == 1
    token = client_token(spec.instance_id)
    assert runs[0]["ClientToken"] == [token] and len(token) <= 64 and token.isascii()
    assert client_token(spec.instance_id) == token  # deterministic: a retry sends the same


async def test_create_looks_up_by_tag_then_by_client_token_before_launching(
    aws: AwsProvider, ec2_proxy: FaultProxy
) -> None:
    spec = make_spec()
    await aws.create(spec)

    lookups = sent(ec2_proxy, DESCRIBE_INSTANCES)
    assert len(lookups) == 2
    by_tag, by_token = lookups
    assert by_tag["Filter.1.Name"] == [f"tag:{TAG_INSTANCE}"]
    assert by_tag["Filter.1.Value.1"] == [spec.instance_id]
    assert by_tag["Filter.2.Name"] == [f"tag:{TAG_CLUSTER}"]
    assert by_token["Filter.1.Name"] == ["client-token"]
    assert by_token["Filter.1.Value.1"] == [client_token(spec.instance_id)]
    order = [s.body.split("&", 1)[0] for s in ec2_proxy.requests]
    assert order.index("Action=RunInstances") > order.index("Action=DescribeInstances")


async def test_create_against_plain_moto_survives_the_missing_client_token_filter(
    aws: AwsProvider, ec2: Any, ec2_proxy: FaultProxy, caplog: pytest.LogCaptureFixture, ami: str
) -> None:
    """Without the proxy's stand-in, moto answers the client-token lookup with a 500 (as soon
    as the region has any instance to filter)."""
    ec2_proxy.clear()
    ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="t3.micro")
    spec = make_spec()

    first = await aws.create(spec)
    again = await aws.create(spec)

    assert again.provider_instance_id == first.provider_instance_id
    assert len(live_instances(ec2, spec.instance_id)) == 1
    assert "client-token lookup failed" in caplog.text


async def test_create_tags_the_instance_and_its_volumes_and_passes_user_data(
    aws: AwsProvider, ec2: Any
) -> None:
    spec = make_spec(zone="us-east-1c")
    machine = await aws.create(spec)

    expected = {"cp-model": "qwen", TAG_INSTANCE: spec.instance_id, TAG_CLUSTER: CLUSTER,
                "Name": f"cp-{spec.instance_id}"}
    assert machine.tags == expected
    assert machine.zone == "us-east-1c"
    assert machine.ip  # public or private
    (instance,) = live_instances(ec2, spec.instance_id)
    assert tags_of(instance) == expected
    assert instance["InstanceType"] == "g5.xlarge"
    volumes = ec2.describe_volumes(Filters=[
        {"Name": "attachment.instance-id", "Values": [machine.provider_instance_id]}])["Volumes"]
    assert len(volumes) == 2
    assert all(tags_of(v) == expected for v in volumes)
    user_data = ec2.describe_instance_attribute(
        InstanceId=machine.provider_instance_id, Attribute="userData")["UserData"]["Value"]
    assert base64.b64decode(user_data).decode() == USER_DATA


async def test_every_block_device_mapping_says_whether_it_outlives_the_machine(
    aws: AwsProvider, ec2: Any, ec2_proxy: FaultProxy, ami: str
) -> None:
    machine = await aws.create(make_spec())

    (run,) = sent(ec2_proxy, RUN_INSTANCES)
    root = ec2.describe_images(ImageIds=[ami])["Images"][0]["RootDeviceName"]
    assert run["BlockDeviceMapping.1.DeviceName"] == [root]
    assert run["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == ["true"]
    assert run["BlockDeviceMapping.1.Ebs.VolumeSize"] == ["200"]
    assert run["BlockDeviceMapping.2.DeviceName"] == ["/dev/sdf"]
    assert run["BlockDeviceMapping.2.Ebs.DeleteOnTermination"] == ["false"]
    assert run["BlockDeviceMapping.2.Ebs.VolumeSize"] == ["50"]
    assert sorted(v[0] for k, v in run.items() if k.endswith(".ResourceType")) == [
        "instance", "volume"]

    boot, cache = await aws.list_volumes(machine.provider_instance_id)
    assert (boot.is_boot, boot.delete_on_terminate, boot.size_gb, boot.volume_type) == (
        True, True, 200, "gp3")
    assert (cache.is_boot, cache.delete_on_terminate, cache.size_gb) == (False, False, 50)
    assert {boot.attached_to, cache.attached_to} == {machine.provider_instance_id}
    assert boot.tags[TAG_INSTANCE] == cache.tags[TAG_INSTANCE] == machine.tags[TAG_INSTANCE]


async def test_without_a_model_cache_only_the_boot_volume_is_mapped(
    make_aws: Callable[..., AwsProvider], ec2_proxy: FaultProxy
) -> None:
    aws = make_aws(model_cache_gb=0, boot_volume_gb=80)
    machine = await aws.create(make_spec())

    (run,) = sent(ec2_proxy, RUN_INSTANCES)
    assert "BlockDeviceMapping.2.DeviceName" not in run
    (boot,) = await aws.list_volumes(machine.provider_instance_id)
    assert (boot.is_boot, boot.delete_on_terminate, boot.size_gb) == (True, True, 80)


async def test_create_rejects_tags_that_contradict_the_request(aws: AwsProvider) -> None:
    with pytest.raises(InvalidSpec, match=TAG_CLUSTER):
        await aws.create(make_spec(tags={TAG_CLUSTER: "someone-else"}))


async def test_an_unknown_image_is_an_invalid_spec(
    make_aws: Callable[..., AwsProvider]
) -> None:
    with pytest.raises(InvalidSpec, match="InvalidAMIID.NotFound"):
        await make_aws(image_id="ami-00000000deadbeef0").create(make_spec())


# Life after creation: describe, start, terminate, volumes.


async def test_terminate_deletes_the_boot_volume_and_keeps_the_model_cache(
    aws: AwsProvider, ec2: Any
) -> None:
    machine = await aws.create(make_spec())
    boot, cache = await aws.list_volumes(machine.provider_instance_id)

    await aws.terminate(machine.provider_instance_id)
    await aws.terminate(machine.provider_instance_id)  # again: nothing to do

    async def gone() -> bool:
        described = await aws.describe(machine.provider_instance_id)
        return described is None or described.state == "terminated"

    await eventually(gone, timeout=10, message="instance terminated")
    left = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    assert boot.provider_volume_id not in left
    assert await aws.list_volumes(machine.provider_instance_id) == []

    (kept,) = await aws.list_tagged_volumes({TAG_CLUSTER: CLUSTER})
    assert kept.provider_volume_id == cache.provider_volume_id
    assert (kept.attached_to, kept.is_boot, kept.delete_on_terminate) == (None, False, False)
    assert kept.tags[TAG_INSTANCE] == machine.tags[TAG_INSTANCE]
    assert await aws.list_tagged_volumes({TAG_CLUSTER: "another-cluster"}) == []

    await aws.delete_volume(kept.provider_volume_id)
    await aws.delete_volume(kept.provider_volume_id)  # already gone: success
    assert await aws.list_tagged_volumes({TAG_CLUSTER: CLUSTER}) == []


async def test_list_tagged_volumes_reports_attached_volumes_with_their_owner(
    aws: AwsProvider
) -> None:
    machine = await aws.create(make_spec())

    volumes = await aws.list_tagged_volumes({TAG_INSTANCE: machine.tags[TAG_INSTANCE]})

    assert [(v.is_boot, v.delete_on_terminate, v.attached_to) for v in volumes] == [
        (True, True, machine.provider_instance_id), (False, False, machine.provider_instance_id)]


async def test_an_attached_volume_is_not_ready_to_delete(aws: AwsProvider) -> None:
    machine = await aws.create(make_spec())
    _, cache = await aws.list_volumes(machine.provider_instance_id)

    with pytest.raises(NotReadyYet, match="VolumeInUse"):
        await aws.delete_volume(cache.provider_volume_id)


async def test_unknown_ids_are_gone(aws: AwsProvider) -> None:
    assert await aws.describe("i-0123456789abcdef0") is None
    await aws.terminate("i-0123456789abcdef0")
    await aws.delete_volume("vol-0123456789abcdef0")
    assert await aws.list_volumes("i-0123456789abcdef0") == []
    with pytest.raises(NotReadyYet):  # EC2 may not know a fresh id yet
        await aws.start("i-0123456789abcdef0")


async def test_start(aws: AwsProvider, ec2: Any, ec2_proxy: FaultProxy) -> None:
    machine = await aws.create(make_spec())
    iid = machine.provider_instance_id

    await aws.start(iid)  # RunInstances already started it
    assert ec2_proxy.count("Action=StartInstances&") == 0

    ec2.stop_instances(InstanceIds=[iid])
    await eventually(lambda: _state_is(aws, iid, "stopped"), timeout=10, message="stopped")
    refused = ec2_proxy.add_rule(contains="Action=StartInstances&", status=400,
                                 body=ec2_error("IncorrectInstanceState"), times=1)
    with pytest.raises(NotReadyYet, match="IncorrectInstanceState"):
        await aws.start(iid)
    assert refused.hits == 1
    await aws.start(iid)
    await eventually(lambda: _state_is(aws, iid, "running"), timeout=10, message="running")

    await aws.terminate(iid)
    await eventually(lambda: _state_is(aws, iid, "terminated"), timeout=10, message="terminated")
    with pytest.raises(InvalidSpec, match="terminated"):  # moto would revive it
        await aws.start(iid)


async def _state_is(aws: AwsProvider, iid: str, state: str) -> bool:
    machine = await aws.describe(iid)
    return machine is not None and machine.state == state


async def test_list_by_tags_pages_through_everything_in_few_calls(
    make_aws: Callable[..., AwsProvider], ec2_proxy: FaultProxy
) -> None:
    aws = make_aws(page_size=5)
    machines = [await aws.create(make_spec()) for _ in range(13)]
    await aws.terminate(machines[-1].provider_instance_id)
    await make_aws(cluster="another-cluster").create(make_spec())

    before = ec2_proxy.count(DESCRIBE_INSTANCES)
    listed = await aws.list_by_tags({TAG_CLUSTER: CLUSTER})
    calls = ec2_proxy.count(DESCRIBE_INSTANCES) - before

    assert sorted(m.provider_instance_id for m in listed) == sorted(
        m.provider_instance_id for m in machines[:-1])
    assert calls == math.ceil(12 / 5)
    one_page = make_aws(page_size=1000)
    before = ec2_proxy.count(DESCRIBE_INSTANCES)
    assert len(await one_page.list_by_tags({TAG_CLUSTER: CLUSTER})) == 12
    assert ec2_proxy.count(DESCRIBE_INSTANCES) - before == 1
    (one,) = await aws.list_by_tags({TAG_INSTANCE: machines[0].tags[TAG_INSTANCE]})
    assert one.provider_instance_id == machines[0].provider_instance_id


# Offers.


@pytest.mark.parametrize("region", [REGION, "us-west-1"])
async def test_offers_are_the_catalog_types_offered_in_each_zone(
    make_aws: Callable[..., AwsProvider], moto_server: MotoServer, region: str
) -> None:
    aws = make_aws(region=region, prices={"g5.xlarge": 0.5})
    offers = await aws.list_offers()

    raw = boto3.client("ec2", region_name=region, endpoint_url=moto_server.url,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    offered = raw.describe_instance_type_offerings(LocationType="availability-zone")
    raw.close()
    expected = {(o["InstanceType"], o["Location"]) for o in offered["InstanceTypeOfferings"]
                if o["InstanceType"] in CATALOG}
    assert {(o.instance_type, o.zone) for o in offers} == expected
    assert len(offers) == len(expected)
    assert expected < {(t, z) for t in CATALOG for z in {z for _, z in expected}}  # filtered
    for offer in offers:
        entry = CATALOG[offer.instance_type]
        assert (offer.provider, offer.currency, offer.gpus, offer.gpu_model) == (
            "aws", "USD", entry.gpus, entry.gpu_model)
        assert offer.hourly_price == (0.5 if offer.instance_type == "g5.xlarge"
                                      else entry.usd_per_hour)
    if region == REGION:
        assert {o.gpu_model for o in offers} == {"A10G", "L4", "L40S", "A100", "H100"}


def test_prices_for_types_outside_the_catalog_are_refused() -> None:
    with pytest.raises(ValueError, match="m5.large"):
        AwsProvider(region=REGION, image_id="ami-1", cluster=CLUSTER, prices={"m5.large": 0.1})


# Errors: EC2's own answers, injected by the proxy, mapped to the contract's types.


ERROR_CASES = [
    # code, HTTP status (as EC2 sends it), expected type, attempts (botocore retries 5xx
    # 3 times: `max_attempts` counts retries, not attempts)
    ("InsufficientInstanceCapacity", 500, NoCapacity, 4),
    ("InsufficientHostCapacity", 500, NoCapacity, 4),
    ("VcpuLimitExceeded", 400, QuotaExceeded, 1),
    ("InstanceLimitExceeded", 400, QuotaExceeded, 1),
    ("AuthFailure", 401, AuthError, 1),
    ("UnauthorizedOperation", 403, AuthError, 1),
    ("RequestLimitExceeded", 503, RateLimited, 4),
    ("InvalidParameterValue", 400, InvalidSpec, 1),
    ("IdempotentParameterMismatch", 400, InvalidSpec, 1),
    ("InternalError", 500, ProviderUnavailable, 4),
    ("SomethingNewInEc2", 400, PermanentProviderError, 1),
]


@pytest.mark.parametrize(("code", "status", "expected", "attempts"), ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
async def test_ec2_errors_map_to_typed_errors(
    aws: AwsProvider, ec2: Any, ec2_proxy: FaultProxy, caplog: pytest.LogCaptureFixture,
    code: str, status: int, expected: type[ProviderError], attempts: int,
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters")
    rule = ec2_proxy.add_rule(contains=RUN_INSTANCES, status=status,
                              body=ec2_error(code, "details from EC2"))
    spec = make_spec()

    with pytest.raises(expected) as raised:
        await aws.create(spec)

    assert type(raised.value) is expected
    assert rule.hits == attempts
    message = str(raised.value)
    assert "RunInstances" in message and code in message and "details from EC2" in message
    _assert_no_secret(message, caplog.text)
    assert live_instances(ec2, spec.instance_id) == []


@pytest.mark.parametrize(("body", "attempts"), [
    ("", 4),  # botocore reads it as error "503" and retries it
    ("<html><body>503 Service Unavailable</body></html>", 4),  # the same
    ("Service Unavailable", 1),  # unparseable (ResponseParserError): botocore does not retry
], ids=["empty", "html", "text"])
async def test_a_503_without_an_ec2_error_is_unavailable(
    aws: AwsProvider, ec2_proxy: FaultProxy, body: str, attempts: int
) -> None:
    rule = ec2_proxy.add_rule(contains=DESCRIBE_INSTANCES, status=503, body=body,
                              headers={"Content-Type": "text/html"})
    with pytest.raises(ProviderUnavailable, match="DescribeInstances"):
        await aws.describe("i-0123456789abcdef0")
    assert rule.hits == attempts


async def test_a_dropped_connection_is_unavailable(
    aws: AwsProvider, ec2: Any, ec2_proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters")
    rule = ec2_proxy.add_rule(contains=RUN_INSTANCES, drop=True)
    spec = make_spec()

    with pytest.raises(ProviderUnavailable, match="RunInstances") as raised:
        await aws.create(spec)

    assert rule.hits == 4  # botocore retried the connection error 3 times
    _assert_no_secret(str(raised.value), caplog.text)
    assert live_instances(ec2, spec.instance_id) == []


async def test_an_unanswered_call_times_out_as_unavailable(
    make_aws: Callable[..., AwsProvider], ec2_proxy: FaultProxy
) -> None:
    aws = make_aws(call_timeout=0.5)
    rule = ec2_proxy.add_rule(contains=DESCRIBE_INSTANCES, hang=True)

    with pytest.raises(ProviderUnavailable, match="ReadTimeoutError"):
        await aws.list_by_tags({TAG_CLUSTER: CLUSTER})
    assert rule.hits == 4


async def test_an_unreachable_endpoint_is_unavailable(
    make_aws: Callable[..., AwsProvider]
) -> None:
    aws = make_aws(endpoint_url=f"http://127.0.0.1:{free_port()}", call_timeout=1.0)
    with pytest.raises(ProviderUnavailable, match="EndpointConnectionError"):
        await aws.list_offers()


async def test_a_flaky_api_still_yields_one_instance_per_request(
    aws: AwsProvider, ec2: Any, ec2_proxy: FaultProxy
) -> None:
    """A fifth of all calls fail with 503; callers retry on `TemporaryProviderError` only."""
    flaky = ec2_proxy.add_rule(status=503, body=ec2_error("Unavailable"), fraction=0.2, seed=7)
    specs = [make_spec() for _ in range(3)]

    for spec in specs:
        for _ in range(2):  # the caller asks twice, as after a crash
            for _attempt in range(10):
                try:
                    await aws.create(spec)
                    break
                except ProviderUnavailable:
                    continue
            else:
                raise AssertionError("create never succeeded")

    assert flaky.hits > 0
    for spec in specs:
        assert len(live_instances(ec2, spec.instance_id)) == 1


def _assert_no_secret(*texts: str) -> None:
    encoded = base64.b64encode(USER_DATA.encode()).decode()
    for text in texts:
        assert SECRET not in text and encoded not in text
