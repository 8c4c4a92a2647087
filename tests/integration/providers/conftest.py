"""Fixtures for provider adapters against real HTTP stand-ins (moto for EC2).

One moto server per session, emptied before each test. Each test gets its own fault proxy in
front of it (`ec2_proxy`): adapters talk to moto through it, so tests can count requests and
inject EC2 errors. AWS credentials are dummies, set in the environment for the test only.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import boto3
import pytest

from adapters.aws import AwsProvider
from tests.support.fault_proxy import FaultProxy, Seen
from tests.support.moto_server import MotoServer

REGION = "us-east-1"
CLUSTER = "test-cluster"
DUMMY_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}

EMPTY_DESCRIBE_INSTANCES = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
    "<requestId>cp-test-client-token</requestId><reservationSet/></DescribeInstancesResponse>"
)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="session")
def ami(moto_server: MotoServer) -> str:
    """An EBS-backed image from moto's built-in catalogue (the same after every reset)."""
    client = boto3.client("ec2", region_name=REGION, endpoint_url=moto_server.url,
                          **DUMMY_CREDENTIALS)
    images = client.describe_images(
        Owners=["amazon"], Filters=[{"Name": "root-device-type", "Values": ["ebs"]}])["Images"]
    client.close()
    return sorted(i["ImageId"] for i in images if i.get("RootDeviceName"))[0]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials in the environment, and nothing from this machine's AWS config."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def ec2_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of a freshly emptied moto.

    It stands in for what moto lacks of RunInstances' `ClientToken`: moto launches a second
    instance for a token it has seen, EC2 answers with the first launch (so a retry by
    botocore, after its read timeout, launches nothing more); the proxy does as EC2 does.
    And it stands in for the one DescribeInstances filter moto lacks (`client-token`: moto answers
    HTTP 500 once the region holds an instance) by answering "no instance". That is what EC2 would say here: every instance
    these tests launch carries its `cp-instance` tag, so the tag lookup, made first, has
    already found it.
    """
    moto_server.reset()
    with FaultProxy(moto_server.url, idempotency_key=run_instances_client_token) as proxy:
        proxy.add_rule(contains="Name=client-token", status=200, body=EMPTY_DESCRIBE_INSTANCES,
                       headers={"Content-Type": "text/xml"})
        yield proxy


@pytest.fixture(scope="session")
def ec2(moto_server: MotoServer) -> Iterator[Any]:
    """A plain boto3 client straight to moto: the provider's own view, for assertions."""
    client = boto3.client("ec2", region_name=REGION, endpoint_url=moto_server.url,
                          **DUMMY_CREDENTIALS)
    yield client
    client.close()


@pytest.fixture
async def make_aws(aws_env: None, ec2_proxy: FaultProxy,
                   ami: str) -> AsyncIterator[Callable[..., AwsProvider]]:
    """Build `AwsProvider`s talking to moto through the proxy (closed after the test)."""
    made: list[AwsProvider] = []

    def make(**overrides: Any) -> AwsProvider:
        options: dict[str, Any] = {
            "region": REGION, "image_id": ami, "cluster": CLUSTER,
            "endpoint_url": ec2_proxy.url, "model_cache_gb": 50, "call_timeout": 5.0,
        }
        provider = AwsProvider(**(options | overrides))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()


@pytest.fixture
def aws(make_aws: Callable[..., AwsProvider]) -> AwsProvider:
    return make_aws()


def run_instances_client_token(seen: Seen) -> str | None:
    """RunInstances' idempotency token, when `seen` is a RunInstances request."""
    if "Action=RunInstances" not in seen.body:
        return None
    found = re.search(r"(?:^|&)ClientToken=([^&]+)", seen.body)
    return found.group(1) if found else None
