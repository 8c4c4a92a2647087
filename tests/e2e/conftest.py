"""Fixtures shared with the provider integration tests (moto over HTTP, its fault proxy)."""

from tests.integration.providers.conftest import (  # noqa: F401 - fixtures
    ami,
    aws_env,
    ec2,
    ec2_proxy,
    moto_server,
)
