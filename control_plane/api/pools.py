"""Admin routes for pools: create, list, show, change, delete (`control_plane/pools.py`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.exceptions import HTTPException, ValidationException
from litestar.params import FromPath, JSONBody

from control_plane import pools
from control_plane.api.instances import error_responses
from control_plane.commands.apply import resolve_offers
from control_plane.commands.schema import _END, CreatePayload, Labels, Model, ModelSpec, OfferChoice
from control_plane.feed.events import emit

Size = Annotated[int, msgspec.Meta(ge=0, le=1000)]
PoolName = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?" + _END,
                                       description="Lower-case letters, digits and dashes")]
GpuModel = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*" + _END)]


class PoolBody(msgspec.Struct, forbid_unknown_fields=True):
    name: PoolName
    model: Model
    min_size: Size
    max_size: Size
    desired_size: Size | None = None
    """Where the pool starts (default: `min_size`)."""
    model_spec: ModelSpec = msgspec.field(default_factory=ModelSpec)
    offers: Annotated[list[OfferChoice], msgspec.Meta(max_length=20)] = []
    """Acceptable offers in preference order; empty: the cheapest with `gpu_model`."""
    gpu_model: GpuModel | None = None
    labels: Labels = {}
    policy: pools.PoolPolicy = msgspec.field(default_factory=pools.PoolPolicy)


class PoolPatch(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Only the fields given change; `policy` fields are merged into the pool's policy.
    `offers` and `gpu_model` are replaced together. The model cannot change: make a new pool."""

    min_size: Size | None = None
    max_size: Size | None = None
    desired_size: Size | None = None
    offers: Annotated[list[OfferChoice], msgspec.Meta(max_length=20)] | None = None
    gpu_model: GpuModel | None = None
    labels: Labels | None = None
    policy: dict[str, Any] | None = None


class PoolOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    model: str
    model_spec: dict[str, Any]
    offers: list[dict[str, Any]]
    gpu_model: str | None
    labels: dict[str, str]
    min_size: int
    max_size: int
    desired_size: int
    policy: pools.PoolPolicy
    members: dict[str, int]
    """Its instances by status (terminated ones left out)."""
    unhealthy: int
    pressure_since: datetime | None
    """Since when the queue has been over the scale-up threshold."""
    idle_since: datetime | None
    """Since when the pool has been idle (scale-down window)."""
    last_scaled_at: datetime | None
    deleting_at: datetime | None
    created_at: datetime
    updated_at: datetime


class PoolPage(msgspec.Struct):
    items: list[PoolOut]


NameParam = FromPath[str]


class PoolController(Controller):
    path = "/v1/pools"
    tags = ["pools"]

    @post("/", status_code=201, summary="Create a pool: a model kept served by min..max instances",
          responses=error_responses(400, 401, 403, 409, 503, e409="A pool with this name exists"))
    async def create(self, request: Request, data: JSONBody[PoolBody]) -> PoolOut:
        runtime = request.app.state.runtime
        fields = msgspec.to_builtins(data)
        await _check_placement(runtime, data.model, fields)
        async with runtime.sessions.begin() as session:
            with _refusals():
                row = await pools.create_pool(session, fields)
            await emit(session, "pool.created", {"pool": data.name, "message": (
                f"Pool {data.name} created: {data.model}, {row['min_size']}..{row['max_size']}"
                f" instances, starting with {row['desired_size']}")}, None)
        return _out(row)

    @get("/", summary="List pools with their instances by status", responses=error_responses(401))
    async def list(self, request: Request) -> PoolPage:
        async with request.app.state.runtime.sessions() as session:
            return PoolPage(items=[_out(r) for r in await pools.list_pools(session)])

    @get("/{name:str}", summary="Show a pool", responses=error_responses(401, 404, e404="No such pool"))
    async def show(self, request: Request, name: NameParam) -> PoolOut:
        async with request.app.state.runtime.sessions() as session:
            return _out(await pools.get_pool(session, name))

    @patch("/{name:str}", summary="Change a pool's bounds, size, policy, offers or labels",
           responses=error_responses(400, 401, 403, 404, 409, 503, e404="No such pool",
                                     e409="The pool is being deleted"))
    async def change(self, request: Request, name: NameParam, data: JSONBody[PoolPatch]) -> PoolOut:
        runtime = request.app.state.runtime
        changes = msgspec.to_builtins(data)
        async with runtime.sessions.begin() as session:
            current = await pools.get_pool(session, name)
        if "offers" in changes or "gpu_model" in changes:
            await _check_placement(runtime, current["model"], changes)
        async with runtime.sessions.begin() as session:
            with _refusals():
                row = await pools.update_pool(session, name, changes)
            await emit(session, "pool.updated", {"pool": name, "changes": changes, "message": (
                f"Pool {name} changed: {', '.join(sorted(changes))}")}, None)
        return _out(row)

    @delete("/{name:str}", status_code=202, summary="Delete a pool: its instances drain, then it goes",
            responses=error_responses(401, 403, 404, 503, e404="No such pool"))
    async def remove(self, request: Request, name: NameParam) -> PoolOut:
        async with request.app.state.runtime.sessions.begin() as session:
            row = await pools.delete_pool(session, name)
            await emit(session, "pool.deleting", {"pool": name, "message": (
                f"Pool {name} deleted: its instances drain, then it goes")}, None)
        return _out(row)


async def _check_placement(runtime: Any, model: str, fields: dict[str, Any]) -> None:
    """Refuse offers no provider has now (a pool must be able to start instances)."""
    try:
        payload = msgspec.convert({"model": model, "offers": fields.get("offers") or [],
                                   "gpu_model": fields.get("gpu_model"),
                                   "model_spec": fields.get("model_spec") or {}}, CreatePayload)
    except msgspec.ValidationError as exc:
        raise ValidationException("Validation failed", extra=[{"key": "offers", "message": str(exc)}]) from None
    await resolve_offers(runtime.providers, payload)  # UnknownOffer: 400 with its field


@contextmanager
def _refusals() -> Iterator[None]:
    """Map the pool module's refusals to API errors."""
    try:
        yield
    except pools.InvalidPool as exc:
        raise ValidationException("Validation failed", extra=[{"key": exc.field, "message": str(exc)}]) from None
    except pools.PoolConflict as exc:
        raise HTTPException(str(exc), status_code=409) from None
    except msgspec.ValidationError as exc:  # a merged policy field out of range
        raise ValidationException("Validation failed", extra=[{"key": "policy", "message": str(exc)}]) from None


def _out(row: dict[str, Any]) -> PoolOut:
    return msgspec.convert(row, PoolOut, from_attributes=False, strict=False)

