"""Admin routes for bare-metal hosts (`baremetal` provider): register, list, show, remove.

Thin handlers over `control_plane.hosts`. A host record holds references, never secrets: the
private key stays a file on the control-plane host, named by `private_key_ref`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.exceptions import HTTPException, ValidationException
from litestar.params import FromPath, JSONBody

from control_plane import hosts
from control_plane.api.instances import error_responses
from control_plane.commands.schema import _END, Name

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Start = Annotated[str, msgspec.Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]" + _END,
                                    description="HH:MM, UTC")]
End = Annotated[str, msgspec.Meta(pattern=r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)" + _END,
                                  description="HH:MM, UTC; 24:00 is midnight at the end of the day;"
                                              " before `start`: the window runs past midnight")]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]


class Window(msgspec.Struct, forbid_unknown_fields=True):
    """A weekly window in which the host may be claimed."""

    days: Annotated[list[Day], msgspec.Meta(min_length=1, max_length=7)]
    start: Start
    end: End


class HostBody(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    address: Annotated[str, msgspec.Meta(min_length=1, max_length=255,
                                         pattern=r"^[A-Za-z0-9:][A-Za-z0-9.:-]*" + _END,
                                         description="IP address or DNS name")]
    username: Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                          pattern=r"^[a-z_][a-z0-9_.-]*\$?" + _END)]
    private_key_ref: Annotated[str, msgspec.Meta(
        min_length=2, max_length=1024, pattern=r"^(file:)?/[^\n\r\x00]*" + _END,
        description="Path of the SSH client key on the control-plane host (`/path` or"
                    " `file:/path`); the key itself is never sent or stored")]
    host_key: Annotated[str, msgspec.Meta(min_length=1, max_length=16384,
                                          description="The host's public key, OpenSSH format"
                                                      " (`ssh-keyscan -t ed25519 HOST`)")]
    instance_type: Name
    """What instances ask for, e.g. `a100x8`: the owners' name for this kind of host."""
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 22
    gpus: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=128)]],
                    msgspec.Meta(max_length=64)] = []
    """GPU model names, one per GPU (e.g. 8 x `A100-SXM4-80GB`)."""
    hourly_price: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 0.0
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}" + _END)] = "EUR"
    availability: Annotated[list[Window], msgspec.Meta(max_length=64)] = []
    """When the host may be claimed; empty: always."""
    requires_gpu_check: bool = True
    """Refuse to install the agent unless `nvidia-smi` works on the host."""


class HostOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    address: str
    port: int
    username: str
    private_key_ref: str
    host_key: str
    instance_type: str
    gpus: list[str]
    hourly_price: float
    currency: str
    availability: list[Window]
    requires_gpu_check: bool
    claimed_by: uuid.UUID | None
    """The instance running on the host now."""
    claimed_at: datetime | None
    created_at: datetime
    disabled_at: datetime | None


class HostPage(msgspec.Struct):
    items: list[HostOut]


HostId = FromPath[uuid.UUID]


class HostController(Controller):
    path = "/v1/hosts"
    tags = ["hosts"]

    @post("/", status_code=201, summary="Register a bare-metal host (provider `baremetal`)",
          responses=error_responses(400, 401, 403, 409, 503, e409="A host with this name exists"))
    async def register(self, request: Request, data: JSONBody[HostBody]) -> HostOut:
        fields = msgspec.to_builtins(data)
        try:
            row = await hosts.register_host(request.app.state.runtime.sessions, fields)
        except hosts.InvalidHost as exc:
            raise ValidationException("Validation failed",
                                      extra=[{"key": exc.field, "message": str(exc)}]) from None
        except hosts.HostConflict as exc:
            raise HTTPException(str(exc), status_code=409) from None
        request.app.state.runtime.providers.forget_offers("baremetal")  # its type is offered now
        return _out(row)

    @get("/", summary="List bare-metal hosts, with the instance claiming each",
         responses=error_responses(401))
    async def list(self, request: Request) -> HostPage:
        async with request.app.state.runtime.sessions() as session:
            return HostPage(items=[_out(r) for r in await hosts.list_hosts(session)])

    @get("/{host_id:uuid}", summary="Show a bare-metal host",
         responses=error_responses(401, 404, e404="No such host"))
    async def show(self, request: Request, host_id: HostId) -> HostOut:
        async with request.app.state.runtime.sessions() as session:
            return _out(await hosts.get_host(session, host_id))

    @delete("/{host_id:uuid}", status_code=204, summary="Remove a host that no instance claims",
            responses=error_responses(401, 403, 404, 409, 503, e404="No such host",
                                      e409="An instance runs on the host: terminate it first"))
    async def remove(self, request: Request, host_id: HostId) -> None:
        try:
            await hosts.remove_host(request.app.state.runtime.sessions, host_id)
        except hosts.HostConflict as exc:
            raise HTTPException(str(exc), status_code=409) from None
        request.app.state.runtime.providers.forget_offers("baremetal")


def _out(row: dict[str, Any]) -> HostOut:
    return msgspec.convert({**row, "hourly_price": float(row["hourly_price"])}, HostOut,
                           from_attributes=False, strict=False)
