"""The configured provider adapters, and request validation against their offers."""

from __future__ import annotations

import time

from adapters.base import Offer, ProviderAdapter, ProviderError
from control_plane.settings import Settings


class UnknownOffer(ValueError):
    """The provider, instance type or zone is not offered."""

    def __init__(self, message: str, field: str = "instance_type") -> None:
        super().__init__(message)
        self.field = field


class Providers:
    """Adapters by name, with their offers cached for validation."""

    def __init__(self, adapters: dict[str, ProviderAdapter], *, offers_ttl: float = 300.0) -> None:
        self._adapters = adapters
        self._offers: dict[str, tuple[float, list[Offer]]] = {}
        self._ttl = offers_ttl

    @classmethod
    def from_settings(cls, settings: Settings) -> Providers:
        from adapters.local import LocalProvider
        from adapters.onprem import OnPremHosts

        local = LocalProvider(
            settings.data_dir / "local-provider",
            cluster=settings.cluster_name,
            boot_seconds=settings.local_boot_seconds,
            model_cache=settings.local_model_cache,
        )
        return cls({"local": local, "onprem": OnPremHosts()})

    def get(self, name: str) -> ProviderAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise UnknownOffer(
                f"unknown provider {name!r}; configured: {', '.join(sorted(self._adapters))}",
                "provider",
            ) from None

    @property
    def names(self) -> list[str]:
        return sorted(self._adapters)

    async def offers(self, name: str) -> list[Offer]:
        cached = self._offers.get(name)
        if cached and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        offers = await self.get(name).list_offers()
        self._offers[name] = (time.monotonic(), offers)
        return offers

    async def validate(self, provider: str, instance_type: str, zone: str | None) -> None:
        """Raise `UnknownOffer` unless `provider` offers `instance_type` (in `zone`)."""
        try:
            offers = await self.offers(provider)
        except ProviderError as exc:
            raise UnknownOffer(f"could not list offers of {provider!r}: {exc}", "provider") from exc
        if not self.get(provider).owns_machines:
            raise UnknownOffer(f"{provider!r} machines are not created but join by themselves:"
                               " create a join token and run the install script on the host",
                               "provider")
        types = sorted({o.instance_type for o in offers})
        matching = [o for o in offers if o.instance_type == instance_type]
        if not matching:
            raise UnknownOffer(
                f"provider {provider!r} does not offer instance type {instance_type!r};"
                f" offered: {', '.join(types)}"
            )
        if zone is not None and not any(o.zone in (None, zone) for o in matching):
            zones = sorted({o.zone for o in matching if o.zone})
            raise UnknownOffer(
                f"{instance_type!r} is not offered in zone {zone!r}; zones: {', '.join(zones)}",
                "zone",
            )

    async def close(self) -> None:
        for adapter in self._adapters.values():
            await adapter.close()
