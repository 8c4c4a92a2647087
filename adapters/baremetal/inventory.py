"""What the bare-metal adapter is given: registered hosts, where they live, the agent to install.

The adapter keeps no inventory of its own: the control plane implements `HostInventory` on its
database (`control_plane.hosts`) and hands in `HostRecord`s, which hold references only (a
private key's path, the pinned host key), never a secret. `AgentArtifact` is the release the
adapter copies to a host and verifies there before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class HostRecord:
    """A registered host as the inventory stores it (references only, no secrets)."""

    id: str
    name: str
    address: str
    port: int
    username: str
    private_key_ref: str
    host_key: str
    instance_type: str
    gpus: tuple[str, ...] = ()
    hourly_price: float = 0.0
    currency: str = "EUR"
    requires_gpu_check: bool = True
    claimed_by: str | None = None


@dataclass(frozen=True, slots=True)
class HostType:
    """One kind of registered host, as offered: the cheapest enabled host of that type."""

    instance_type: str
    gpus: int
    gpu_model: str
    hourly_price: float
    currency: str


@dataclass(frozen=True, slots=True)
class AgentArtifact:
    """The agent wheel to install: its bytes, their SHA-256 (hex) and the wheel's file name."""

    content: bytes = field(repr=False)
    sha256: str
    filename: str


class HostInventory(Protocol):
    """Where hosts are registered and claimed (the control plane implements it on Postgres)."""

    async def claim(self, instance_id: str, instance_type: str) -> HostRecord:
        """The host claimed by `instance_id`, else a free enabled host of `instance_type` inside
        one of its availability windows, now claimed by it. Raises `NoCapacity` naming the
        type when there is none."""

    async def get(self, host_id: str) -> HostRecord | None:
        """The host, or None when it is not registered (any more)."""

    async def release(self, instance_id: str) -> None:
        """Free the host claimed by `instance_id`, if any."""

    async def list_types(self) -> list[HostType]:
        """One entry per instance type of the enabled hosts."""

    async def list_claimed(self) -> list[HostRecord]:
        """Every host claimed by an instance."""
