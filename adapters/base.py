"""The one interface every provider adapter implements.

Contract (every adapter, every method):

- **Returns quickly.** No method waits for a machine to reach "running"; the lifecycle
  workers call `describe` again later. "Not done yet" is `NotReadyYet`, never a sleep loop.
- **Idempotent.** `create` looks up a machine tagged with the request's `instance_id` before
  creating one, so a retry after a crash returns the same machine instead of a second one.
  `start` on a started machine, `terminate` on a gone machine and `delete_volume` on a gone
  volume all succeed silently.
- **`describe` returns `None`** when the machine no longer exists at the provider.
- **Typed errors** under `ProviderError`: `TemporaryProviderError` subclasses mean "retry
  later, with backoff"; `PermanentProviderError` subclasses mean "this request cannot succeed
  as asked" (another offer may). Provider SDK exceptions never escape an adapter.
- **Tags.** Every resource created carries `TAG_CLUSTER` and `TAG_INSTANCE`, so that
  reconciliation can find what we own by listing on tags.

Adapters know nothing of `control_plane`: they receive plain values and return plain values.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

TAG_CLUSTER = "cp-cluster"
TAG_INSTANCE = "cp-instance"

MachineState = Literal["pending", "stopped", "starting", "running", "stopping", "terminated"]


class ProviderError(Exception):
    """The provider could not do what was asked."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class TemporaryProviderError(ProviderError):
    """The provider failed in a way that a later retry may fix."""


class ProviderUnavailable(TemporaryProviderError):
    """The provider API could not be reached or answered with a server error."""


class RateLimited(TemporaryProviderError):
    """The provider API rate-limited the request."""

    def __init__(self, message: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReadyYet(TemporaryProviderError):
    """The resource is in a transient state; ask again later."""


class CircuitOpen(TemporaryProviderError):
    """Calls to this provider and zone are suspended after repeated failures."""


class PermanentProviderError(ProviderError):
    """The request cannot succeed as asked; retrying it unchanged is pointless."""


class NoCapacity(PermanentProviderError):
    """The provider has no capacity for this instance type in this zone."""


class QuotaExceeded(PermanentProviderError):
    """The account's quota does not allow this request."""


class AuthError(PermanentProviderError):
    """The provider rejected our credentials."""


class InvalidSpec(PermanentProviderError):
    """The provider rejected the request as invalid."""


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """What the control plane asks a provider to create."""

    instance_id: str
    instance_type: str
    zone: str | None
    model: str
    tags: dict[str, str]
    agent_env: dict[str, str] = field(default_factory=dict)
    """Configuration injected into the node agent's environment at boot (contains secrets:
    never log it)."""
    user_data: str | None = None
    """A shell script (cloud-init user data) that installs, verifies and starts the agent with
    `agent_env` on first boot. Cloud adapters pass it as is; it contains the agent's token."""


@dataclass(frozen=True, slots=True)
class Machine:
    """A machine as the provider describes it."""

    provider_instance_id: str
    state: MachineState
    ip: str | None
    zone: str | None
    tags: dict[str, str]


@dataclass(frozen=True, slots=True)
class Volume:
    """A volume attached to (or left over from) one of our machines."""

    provider_volume_id: str
    volume_type: str
    size_gb: int
    is_boot: bool
    delete_on_terminate: bool
    attached_to: str | None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Offer:
    """An instance type a provider can run, with its price."""

    provider: str
    zone: str | None
    instance_type: str
    gpus: int
    gpu_model: str
    hourly_price: float
    currency: str


class ProviderAdapter(abc.ABC):
    """One provider behind the common contract (see the module docstring)."""

    name: str
    owns_machines: bool = True
    """False when machines belong to someone else (on-prem hosts): terminating then stops the
    agent through its command stream and releases the machine instead of deleting it."""

    @abc.abstractmethod
    async def list_offers(self) -> list[Offer]:
        """Instance types this provider offers, with hourly prices."""

    @abc.abstractmethod
    async def create(self, spec: MachineSpec) -> Machine:
        """Create the machine, or return the one already tagged with `spec.instance_id`."""

    @abc.abstractmethod
    async def start(self, provider_instance_id: str) -> None:
        """Start the machine (its agent starts with it). Succeeds if already started."""

    @abc.abstractmethod
    async def describe(self, provider_instance_id: str) -> Machine | None:
        """The machine's current state, or `None` when it no longer exists."""

    async def describe_many(self, provider_instance_ids: list[str]) -> dict[str, Machine | None]:
        """`describe` of each id (adapters that can ask about many at once override this)."""
        return {pid: await self.describe(pid) for pid in provider_instance_ids}

    @abc.abstractmethod
    async def list_by_tags(self, tags: dict[str, str]) -> list[Machine]:
        """Every live machine carrying all of `tags`."""

    @abc.abstractmethod
    async def terminate(self, provider_instance_id: str) -> None:
        """Stop and destroy the machine. Volumes are left to `delete_volume`.

        Succeeds silently when the machine is already gone."""

    @abc.abstractmethod
    async def list_volumes(self, provider_instance_id: str) -> list[Volume]:
        """Every volume attached to the machine (boot volume included)."""

    @abc.abstractmethod
    async def delete_volume(self, provider_volume_id: str) -> None:
        """Delete a detached volume. Succeeds silently when it is already gone;
        raises `NotReadyYet` while it is still attached."""

    async def list_tagged_volumes(self, tags: dict[str, str]) -> list[Volume]:
        """Every volume carrying all of `tags`, attached or not (for the volume sweep).

        Adapters whose volumes cannot outlive their machine keep this default."""
        return []

    def zone_of(self, provider_id: str) -> str | None:
        """The zone a machine or volume id belongs to, when the id says (circuit breakers are
        per provider and zone)."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and connections."""
