"""On-prem hosts that joined by themselves (install script + join token).

The control plane does not create, start or delete these machines: the owner installed the
agent, which registered the host (`control_plane/registration.py`) and talks to the control
plane outbound only. So this adapter has nothing to call. "Terminate" releases the host
without wiping it; the lifecycle first asks the agent to stop its engine (`owns_machines` is
False). Whether the host is alive is known from its heartbeats, not from a provider API.
"""

from __future__ import annotations

from adapters.base import InvalidSpec, Machine, MachineSpec, Offer, ProviderAdapter, Volume

NAME = "onprem"


class OnPremHosts(ProviderAdapter):
    name = NAME
    owns_machines = False

    async def list_offers(self) -> list[Offer]:
        return []  # hosts are not ordered: they join

    async def create(self, spec: MachineSpec) -> Machine:
        raise InvalidSpec("on-prem hosts are not created: they join with a join token"
                          " (control-plane join-token create, then the install script on the host)")

    async def start(self, provider_instance_id: str) -> None:
        return None

    async def describe(self, provider_instance_id: str) -> Machine | None:
        return Machine(provider_instance_id=provider_instance_id, state="running", ip=None,
                       zone=None, tags={})

    async def list_by_tags(self, tags: dict[str, str]) -> list[Machine]:
        return []

    async def terminate(self, provider_instance_id: str) -> None:
        return None

    async def list_volumes(self, provider_instance_id: str) -> list[Volume]:
        return []

    async def delete_volume(self, provider_volume_id: str) -> None:
        return None
