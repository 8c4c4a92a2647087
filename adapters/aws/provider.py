"""`AwsProvider`: the adapter contract on EC2, and `client_token`, its idempotency key.

Every call goes through `_run` (a worker thread, SDK exceptions mapped by `_errors`); answers
are turned into `Machine`/`Volume` by `_resources` and this module's `_to_volumes`. Guarantees
and the differences between real EC2 and moto are described on the package, `adapters.aws`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
from botocore import xform_name
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from adapters.aws._errors import _code, _map_error
from adapters.aws._resources import (
    _has_tags,
    _live_attachments,
    _tag_filters,
    _tags_of,
    _to_machine,
)
from adapters.aws.catalog import CATALOG
from adapters.base import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    InvalidSpec,
    Machine,
    MachineSpec,
    NotReadyYet,
    Offer,
    ProviderAdapter,
    ProviderUnavailable,
    Volume,
)

# The package's name, as before the split into modules: log configuration keeps applying.
logger = logging.getLogger("adapters.aws")

NAME = "aws"
CACHE_DEVICE = "/dev/sdf"
LIVE_STATES = ["pending", "running", "stopping", "stopped"]
"""States in which an instance can still serve us (a create lookup returns it)."""

# MaxResults bounds per operation (EC2 rejects pages outside them).
_PAGE_LIMITS = {"DescribeInstances": 1000, "DescribeVolumes": 500,
                "DescribeInstanceTypeOfferings": 1000}
_FILTER_VALUES = 200  # ids per filter value list, under EC2's limit

_T = TypeVar("_T")


class AwsProvider(ProviderAdapter):
    """GPU machines as EC2 instances (see the `adapters.aws` package docstring)."""

    name = NAME

    def __init__(
        self,
        *,
        region: str,
        image_id: str,
        cluster: str,
        endpoint_url: str | None = None,
        subnet_id: str | None = None,
        security_group_ids: Sequence[str] = (),
        key_name: str | None = None,
        boot_volume_gb: int = 200,
        model_cache_gb: int = 0,
        prices: dict[str, float] | None = None,
        page_size: int = 1000,
        call_timeout: float = 20.0,
        threads: int = 32,
    ) -> None:
        unknown = set(prices or {}) - set(CATALOG)
        if unknown:
            raise ValueError(f"prices for instance types outside the GPU catalog: {sorted(unknown)}")
        self._region = region
        self._image_id = image_id
        self._cluster = cluster
        self._subnet_id = subnet_id
        self._security_group_ids = list(security_group_ids)
        self._key_name = key_name
        self._boot_volume_gb = boot_volume_gb
        self._model_cache_gb = model_cache_gb
        self._prices = {t: g.usd_per_hour for t, g in CATALOG.items()} | (prices or {})
        self._page_size = page_size
        self._root_device: str | None = None  # of `image_id`, read once
        config = Config(
            retries={"mode": "standard", "max_attempts": 3},  # 3 retries after the first try
            connect_timeout=call_timeout,
            read_timeout=call_timeout,
            max_pool_connections=threads,
        )
        # Threads of our own: botocore sleeps its retry backoffs in them, and asyncio's default
        # pool (cores + 4 threads) would queue every other call of the process behind those.
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="aws")
        # A session of our own: boto3's default session is shared (and not thread-safe);
        # credentials come from the usual chain (environment, profile, instance role).
        self._client = boto3.session.Session().client(
            "ec2", region_name=region, endpoint_url=endpoint_url, config=config
        )

    async def list_offers(self) -> list[Offer]:
        """One offer per (catalog type, availability zone) that EC2 offers in the region."""
        offerings = await self._paginate(
            "DescribeInstanceTypeOfferings", "InstanceTypeOfferings",
            LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": list(CATALOG)}],
        )
        offers = {
            (o["InstanceType"], o["Location"])
            for o in offerings
            if o.get("InstanceType") in CATALOG
        }
        return [
            Offer(provider=NAME, zone=zone, instance_type=itype, gpus=CATALOG[itype].gpus,
                  gpu_model=CATALOG[itype].gpu_model, hourly_price=self._prices[itype],
                  currency="USD")
            for itype, zone in sorted(offers)
        ]

    async def create(self, spec: MachineSpec) -> Machine:
        """The live instance already made for `spec.instance_id`, else a new one (running)."""
        tags = self._tags(spec)
        token = client_token(spec.instance_id)
        existing = await self._find_existing(spec.instance_id, token)
        if existing is not None:
            return existing
        params = await self._run_params(spec, tags, token)
        reply = await self._call("RunInstances", **params)
        instance = reply["Instances"][0]
        logger.info("AWS instance %s launched for instance %s (%s in %s)",
                    instance["InstanceId"], spec.instance_id, spec.instance_type,
                    instance.get("Placement", {}).get("AvailabilityZone"))
        return _to_machine(instance, fallback_tags=tags)

    async def start(self, provider_instance_id: str) -> None:
        """StartInstances when stopped; nothing when pending or running. `NotReadyYet` while
        stopping (or not yet visible); `InvalidSpec` once it is terminated or terminating."""
        instance = await self._describe_raw(provider_instance_id)
        if instance is None:
            # Right after RunInstances EC2 may not know the id yet (eventual consistency).
            raise NotReadyYet(f"AWS instance {provider_instance_id} is not visible (yet)")
        state = instance["State"]["Name"]
        if state in ("pending", "running"):
            return
        if state in ("shutting-down", "terminated"):
            raise InvalidSpec(f"AWS instance {provider_instance_id} is {state}; it cannot start")
        if state == "stopping":
            raise NotReadyYet(f"AWS instance {provider_instance_id} is still stopping")
        await self._call("StartInstances", InstanceIds=[provider_instance_id])
        logger.info("AWS instance %s started", provider_instance_id)

    async def describe(self, provider_instance_id: str) -> Machine | None:
        instance = await self._describe_raw(provider_instance_id)
        return None if instance is None else _to_machine(instance)

    async def describe_many(self, provider_instance_ids: list[str]) -> dict[str, Machine | None]:
        """One call per 200 ids: the `instance-id` filter leaves unknown ids out, where
        `InstanceIds` would fail the whole call."""
        found: dict[str, Machine] = {}
        for start in range(0, len(provider_instance_ids), _FILTER_VALUES):
            ids = provider_instance_ids[start:start + _FILTER_VALUES]
            for i in await self._describe_instances(Filters=[{"Name": "instance-id", "Values": ids}]):
                found[i["InstanceId"]] = _to_machine(i)
        return {pid: found.get(pid) for pid in provider_instance_ids}

    async def list_by_tags(self, tags: dict[str, str]) -> list[Machine]:
        """Every instance not yet terminated carrying all of `tags` (one call per page)."""
        instances = await self._describe_instances(
            Filters=[*_tag_filters(tags),
                     {"Name": "instance-state-name", "Values": [*LIVE_STATES, "shutting-down"]}]
        )
        return [_to_machine(i) for i in instances if _has_tags(i, tags)]

    async def terminate(self, provider_instance_id: str) -> None:
        reply = await self._call("TerminateInstances", InstanceIds=[provider_instance_id],
                                 missing="InvalidInstanceID.NotFound")
        if reply:
            logger.info("AWS instance %s terminating", provider_instance_id)

    async def list_volumes(self, provider_instance_id: str) -> list[Volume]:
        volumes = await self._paginate(
            "DescribeVolumes", "Volumes",
            Filters=[{"Name": "attachment.instance-id", "Values": [provider_instance_id]}],
        )
        return await self._to_volumes(volumes, provider_instance_id)

    async def list_tagged_volumes(self, tags: dict[str, str]) -> list[Volume]:
        volumes = await self._paginate("DescribeVolumes", "Volumes", Filters=_tag_filters(tags))
        return await self._to_volumes([v for v in volumes if _has_tags(v, tags)], None)

    async def delete_volume(self, provider_volume_id: str) -> None:
        """DeleteVolume; gone already is success, attached (`VolumeInUse`) is `NotReadyYet`."""
        reply = await self._call("DeleteVolume", VolumeId=provider_volume_id,
                                 missing="InvalidVolume.NotFound")
        if reply:
            logger.info("AWS volume %s deleted", provider_volume_id)

    async def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # Helpers, in call order.

    def _tags(self, spec: MachineSpec) -> dict[str, str]:
        tags = dict(spec.tags)
        for key, expected in ((TAG_INSTANCE, spec.instance_id), (TAG_CLUSTER, self._cluster)):
            if tags.setdefault(key, expected) != expected:
                raise InvalidSpec(f"tag {key}={tags[key]!r} contradicts {expected!r}")
        tags.setdefault("Name", f"cp-{spec.instance_id}")
        return tags

    async def _find_existing(self, instance_id: str, token: str) -> Machine | None:
        """Our live instance for `instance_id`: by tags first, then by client token (which
        also finds one whose tags were removed)."""
        live = {"Name": "instance-state-name", "Values": LIVE_STATES}
        wanted = {TAG_INSTANCE: instance_id, TAG_CLUSTER: self._cluster}
        found = [i for i in await self._describe_instances(Filters=[*_tag_filters(wanted), live])
                 if _has_tags(i, wanted)]
        if not found:
            try:
                found = [i for i in await self._describe_instances(
                    Filters=[{"Name": "client-token", "Values": [token]}, live])
                    if i.get("ClientToken") == token]
            except ProviderUnavailable as exc:
                # Safe to go on: RunInstances with the same token is EC2's own guard. (moto
                # lacks this filter and answers 500: this keeps it usable.)
                logger.warning("AWS client-token lookup failed for instance %s: %s",
                               instance_id, exc)
        if not found:
            return None
        found.sort(key=lambda i: (str(i.get("LaunchTime") or ""), i["InstanceId"]))
        if len(found) > 1:
            logger.warning("AWS has %d live instances for instance %s; using %s", len(found),
                           instance_id, found[0]["InstanceId"])
        return _to_machine(found[0])

    async def _run_params(self, spec: MachineSpec, tags: dict[str, str],
                          token: str) -> dict[str, Any]:
        tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
        # Explicit DeleteOnTermination on every mapping: the AMI's defaults must not decide
        # whether a volume (and its cost) outlives the machine.
        mappings: list[dict[str, Any]] = [{
            "DeviceName": await self._root_device_name(),
            "Ebs": {"VolumeSize": self._boot_volume_gb, "VolumeType": "gp3",
                    "DeleteOnTermination": True},
        }]
        if self._model_cache_gb > 0:
            mappings.append({
                "DeviceName": CACHE_DEVICE,
                "Ebs": {"VolumeSize": self._model_cache_gb, "VolumeType": "gp3",
                        "DeleteOnTermination": False},  # the model cache survives the machine
            })
        params: dict[str, Any] = {
            "ClientToken": token,
            "MinCount": 1,
            "MaxCount": 1,
            "ImageId": self._image_id,
            "InstanceType": spec.instance_type,
            "BlockDeviceMappings": mappings,
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tag_list},
                                  {"ResourceType": "volume", "Tags": tag_list}],
        }
        if spec.user_data:
            params["UserData"] = spec.user_data  # botocore base64-encodes it
        if spec.zone:
            params["Placement"] = {"AvailabilityZone": spec.zone}
        if self._subnet_id:
            params["SubnetId"] = self._subnet_id
        if self._security_group_ids:
            params["SecurityGroupIds"] = self._security_group_ids
        if self._key_name:
            params["KeyName"] = self._key_name
        return params

    async def _root_device_name(self) -> str:
        if self._root_device is None:
            reply = await self._call("DescribeImages", ImageIds=[self._image_id])
            images = reply.get("Images") or []
            if not images or not images[0].get("RootDeviceName"):
                raise InvalidSpec(f"AWS image {self._image_id} not found in {self._region}")
            self._root_device = images[0]["RootDeviceName"]
        return self._root_device

    async def _describe_raw(self, instance_id: str) -> dict[str, Any] | None:
        reply = await self._call("DescribeInstances", InstanceIds=[instance_id],
                                 missing="InvalidInstanceID.NotFound")
        instances = [i for r in reply.get("Reservations", []) for i in r.get("Instances", [])]
        return instances[0] if instances else None

    async def _describe_instances(self, **params: Any) -> list[dict[str, Any]]:
        reservations = await self._paginate("DescribeInstances", "Reservations", **params)
        return [i for r in reservations for i in r.get("Instances", [])]

    async def _to_volumes(self, raw: list[dict[str, Any]],
                          instance_id: str | None) -> list[Volume]:
        """Volumes with their boot flag and `DeleteOnTermination` taken from their instances'
        block-device mappings (moto leaves the flag out of volume attachments)."""
        attached = sorted({a["InstanceId"] for v in raw for a in _live_attachments(v)})
        mappings: dict[str, tuple[str | None, dict[str, bool]]] = {}
        for start in range(0, len(attached), _FILTER_VALUES):
            ids = attached[start:start + _FILTER_VALUES]
            for i in await self._describe_instances(
                    Filters=[{"Name": "instance-id", "Values": ids}]):
                mappings[i["InstanceId"]] = (i.get("RootDeviceName"), {
                    m["Ebs"]["VolumeId"]: bool(m["Ebs"].get("DeleteOnTermination"))
                    for m in i.get("BlockDeviceMappings", []) if "Ebs" in m})
        volumes = []
        for v in raw:
            attachment = next((a for a in _live_attachments(v)
                               if instance_id in (None, a["InstanceId"])), None)
            owner = attachment["InstanceId"] if attachment else None
            root, flags = mappings.get(owner or "", (None, {}))
            volumes.append(Volume(
                provider_volume_id=v["VolumeId"],
                volume_type=v.get("VolumeType", ""),
                size_gb=int(v.get("Size", 0)),
                is_boot=attachment is not None and attachment.get("Device") == root,
                delete_on_terminate=flags.get(
                    v["VolumeId"], bool(attachment and attachment.get("DeleteOnTermination"))),
                attached_to=owner,
                tags=_tags_of(v),
            ))
        volumes.sort(key=lambda vol: (not vol.is_boot, vol.provider_volume_id))
        return volumes

    async def _paginate(self, operation: str, key: str, **params: Any) -> list[Any]:
        """All items under `key` of every page, in one worker thread; calls grow with pages."""
        size = max(5, min(self._page_size, _PAGE_LIMITS[operation]))
        paginator = self._client.get_paginator(xform_name(operation))

        def fetch() -> list[Any]:
            items: list[Any] = []
            for page in paginator.paginate(**params, PaginationConfig={"PageSize": size}):
                items.extend(page.get(key, []))
            return items

        return await self._run(operation, fetch)

    async def _call(self, operation: str, *, missing: str | None = None,
                    **params: Any) -> dict[str, Any]:
        """One API call; `{}` when AWS answers with the error code `missing` (already gone)."""
        method = getattr(self._client, xform_name(operation))
        try:
            return await self._run(operation, lambda: method(**params), missing=missing)
        except _Missing:
            return {}

    async def _run(self, operation: str, fn: Callable[[], _T], *,
                   missing: str | None = None) -> _T:
        call = functools.partial(contextvars.copy_context().run, fn)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, call)
        except ClientError as exc:
            if missing is not None and _code(exc) == missing:
                raise _Missing from None
            raise _map_error(operation, exc) from None
        except (BotoCoreError, ResponseParserError) as exc:
            # `from None`: SDK exceptions may carry request parameters (user data).
            raise _map_error(operation, exc) from None


class _Missing(Exception):
    """AWS said the resource does not exist (internal signal of `_run`)."""


def client_token(instance_id: str) -> str:
    """RunInstances' idempotency token for an instance id: deterministic, 35 ASCII chars."""
    return "cp-" + hashlib.sha256(instance_id.encode()).hexdigest()[:32]
