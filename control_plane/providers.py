"""The configured provider adapters, and request validation against their offers."""

from __future__ import annotations

import dataclasses
import time

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.base import Offer, ProviderAdapter, ProviderError
from adapters.resilience import ResiliencePolicy, ResilientProvider
from control_plane.commands.schema import OfferChoice
from control_plane.settings import Settings, SettingsError

log = structlog.get_logger(__name__)


class UnknownOffer(ValueError):
    """The provider, instance type or zone is not offered."""

    def __init__(self, message: str, field: str = "instance_type") -> None:
        super().__init__(message)
        self.field = field


class Providers:
    """Adapters by name, with their offers cached for validation."""

    def __init__(self, adapters: dict[str, ProviderAdapter], *, offers_ttl: float = 300.0,
                 eur_per_usd: float = 0.92, max_offers: int = 5) -> None:
        self._adapters = adapters
        self._offers: dict[str, tuple[float, list[Offer]]] = {}
        self._ttl = offers_ttl
        self._eur_per_usd = eur_per_usd
        self._max_offers = max_offers

    @classmethod
    def from_settings(cls, settings: Settings, sessions: async_sessionmaker[AsyncSession] | None = None,
                      ) -> Providers:
        """Every provider the environment configures, each behind retries and a breaker."""
        from adapters.local import LocalProvider
        from adapters.onprem import OnPremHosts

        adapters: list[ProviderAdapter] = [OnPremHosts()]
        if settings.aws_region and settings.aws_image_id:
            from adapters.aws import AwsProvider
            adapters.append(AwsProvider(
                region=settings.aws_region, image_id=settings.aws_image_id,
                cluster=settings.cluster_name, endpoint_url=settings.aws_endpoint_url,
                subnet_id=settings.aws_subnet_id, key_name=settings.aws_key_name,
                security_group_ids=[g.strip() for g in settings.aws_security_group_ids.split(",") if g.strip()],
                boot_volume_gb=settings.aws_boot_volume_gb, model_cache_gb=settings.aws_model_cache_gb,
                call_timeout=settings.provider_call_timeout_seconds, threads=_sdk_threads(settings)))
        scw = (settings.scaleway_access_key, settings.scaleway_secret_key,
               settings.scaleway_project_id, settings.scaleway_image)
        if all(scw):
            from adapters.scaleway import ScalewayProvider
            zones = [z.strip() for z in settings.scaleway_zones.split(",") if z.strip()]
            adapters.append(ScalewayProvider(
                access_key=settings.scaleway_access_key, secret_key=settings.scaleway_secret_key,
                project_id=settings.scaleway_project_id, zones=zones or [settings.scaleway_zone],
                image=settings.scaleway_image, cluster=settings.cluster_name,
                api_url=settings.scaleway_api_url, boot_volume_gb=settings.scaleway_boot_volume_gb,
                call_timeout=settings.provider_call_timeout_seconds, threads=_sdk_threads(settings)))
        elif any(scw):
            raise SettingsError("Scaleway needs SCW_ACCESS_KEY, SCW_SECRET_KEY,"
                                " SCW_DEFAULT_PROJECT_ID and CP_SCALEWAY_IMAGE together")
        if sessions is not None:  # hosts live in Postgres
            from control_plane.hosts import baremetal_provider
            adapters.append(baremetal_provider(sessions, settings))
        if settings.local_provider not in ("auto", "on", "off"):
            raise SettingsError(f"CP_LOCAL_PROVIDER={settings.local_provider!r}: use auto, on or off")
        clouds = any(a.name in ("aws", "scaleway") for a in adapters)
        if settings.local_provider == "on" or (settings.local_provider == "auto" and not clouds):
            adapters.append(LocalProvider(
                settings.data_dir / "local-provider", cluster=settings.cluster_name,
                boot_seconds=settings.local_boot_seconds, model_cache=settings.local_model_cache))
        return cls.wrapped(adapters, settings)

    @classmethod
    def wrapped(cls, adapters: list[ProviderAdapter], settings: Settings) -> Providers:
        policy = ResiliencePolicy(
            retries=settings.provider_retries, budget_seconds=settings.provider_call_timeout_seconds,
            listing_budget_seconds=settings.provider_listing_timeout_seconds,
            failure_threshold=settings.breaker_failure_threshold,
            reset_seconds=settings.breaker_reset_seconds)
        return cls({a.name: ResilientProvider(a, policy) for a in adapters},
                   eur_per_usd=settings.eur_per_usd, max_offers=settings.max_offers)

    def get_or_none(self, name: str) -> ProviderAdapter | None:
        return self._adapters.get(name)

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

    def forget_offers(self, name: str) -> None:
        """Drop the cached offers of `name` (e.g. after a bare-metal host was registered)."""
        self._offers.pop(name, None)

    async def offers(self, name: str) -> list[Offer]:
        cached = self._offers.get(name)
        if cached and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        offers = await self.get(name).list_offers()
        self._offers[name] = (time.monotonic(), offers)
        return offers

    async def resolve(self, choices: list[OfferChoice], *, gpu_model: str | None = None,
                      min_gpus: int = 1) -> list[Offer]:
        """The offers to try, in order, for a create request; raises `UnknownOffer`.

        Named choices are checked against each provider's offers (a choice without a zone keeps
        zone None: the provider's default). No choice: every offer of the providers that create
        machines, with `gpu_model` and at least `min_gpus` GPUs, cheapest first."""
        if choices:
            return [await self._check(c, f"offers[{n}]." if len(choices) > 1 else "")
                    for n, c in enumerate(choices)]
        found: list[Offer] = []
        for name in self.names:
            if not self.get(name).owns_machines:
                continue
            try:
                found += await self.offers(name)
            except ProviderError as exc:  # one provider down must not block the others
                log.warning("Offers unavailable", provider=name, error=str(exc))
        wanted = (gpu_model or "").lower()
        matching = [o for o in found if o.gpus >= min_gpus and wanted in o.gpu_model.lower()]
        if not matching:
            what = f"{gpu_model} " if gpu_model else ""
            raise UnknownOffer(f"no provider offers {min_gpus}+ {what}GPUs", "gpu_model")
        matching.sort(key=lambda o: (self._in_eur(o), o.provider, o.zone or "", o.instance_type))
        return matching[: self._max_offers]

    async def _check(self, choice: OfferChoice, prefix: str) -> Offer:
        provider, instance_type, zone = choice.provider, choice.instance_type, choice.zone
        if not self.get_or_none(provider):
            raise UnknownOffer(f"unknown provider {provider!r}; configured: {', '.join(self.names)}",
                               f"{prefix}provider")
        if not self.get(provider).owns_machines:
            raise UnknownOffer(f"{provider!r} machines are not created but join by themselves:"
                               " create a join token and run the install script on the host",
                               f"{prefix}provider")
        try:
            offers = await self.offers(provider)
        except ProviderError as exc:
            raise UnknownOffer(f"could not list offers of {provider!r}: {exc}", f"{prefix}provider") from exc
        types = sorted({o.instance_type for o in offers})
        matching = [o for o in offers if o.instance_type == instance_type]
        if not matching:
            raise UnknownOffer(
                f"provider {provider!r} does not offer instance type {instance_type!r};"
                f" offered: {', '.join(types)}", f"{prefix}instance_type")
        in_zone = [o for o in matching if zone is None or o.zone in (None, zone)]
        if not in_zone:
            zones = sorted({o.zone for o in matching if o.zone})
            raise UnknownOffer(f"{instance_type!r} is not offered in zone {zone!r}; zones: {', '.join(zones)}",
                               f"{prefix}zone")
        cheapest = min(in_zone, key=self._in_eur)
        return dataclasses.replace(cheapest, zone=zone)

    def _in_eur(self, offer: Offer) -> float:
        return offer.hourly_price * (self._eur_per_usd if offer.currency == "USD" else 1.0)

    async def close(self) -> None:
        for adapter in self._adapters.values():
            await adapter.close()


def _sdk_threads(settings: Settings) -> int:
    """Threads for a blocking SDK: one per lifecycle worker, plus a few for the health,
    reconciliation and offer calls that run beside them."""
    return settings.worker_concurrency + 8
