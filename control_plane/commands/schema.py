"""Version 1 of the command stream's schema: what producers in any language may send.

An entry of the stream `cp:commands` has one field, `command`, holding a JSON object:

    {"version": 1, "id": "<producer-chosen unique id>", "type": "instance.create",
     "payload": {...}}

`id` is the dedupe key: a command id is applied at most once, however often it is delivered.
The JSON Schema in `command.schema.json` is generated from these types (a test keeps it so).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from worker_agent.config import RESERVED_VLLM_ARGS

SCHEMA_FILE = Path(__file__).with_name("command.schema.json")
NAMESPACE = uuid.UUID("9b0f6f2e-6c1a-4a53-9a53-2f1d1b0c8e11")
# End of input in both Python and JavaScript regexes (`$` also matches before a final "\n").
_END = r"(?![\s\S])"

CommandId = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+" + _END,
                                        description="Producer-chosen unique id (printable ASCII)")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*" + _END)]
Provider = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}" + _END, description="Provider name, e.g. local, aws, scaleway")]
Model = Annotated[str, msgspec.Meta(min_length=1, max_length=512, pattern=r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._:/@-]*" + _END,
                                    description="Model id as vLLM takes it, e.g. meta-llama/Llama-3.2-1B-Instruct")]
LabelKey = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*" + _END)]
LabelValue = Annotated[str, msgspec.Meta(max_length=256, pattern=r"^[^\x00]*" + _END)]
Labels = Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=64)]
Reason = Annotated[str, msgspec.Meta(max_length=1000, pattern=r"^[^\x00]*" + _END)]


EngineArg = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]*" + _END)]


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How vLLM serves the model (each field maps to one `vllm serve` flag)."""

    revision: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*" + _END,
                                          description="Branch, tag or commit (--revision)")] | None = None
    tensor_parallel_size: Annotated[int, msgspec.Meta(ge=1, le=64, description="GPUs per replica (-tp)")] = 1
    gpu_memory_utilization: Annotated[float, msgspec.Meta(gt=0, le=1, description="--gpu-memory-utilization")] | None = None
    max_model_len: Annotated[int, msgspec.Meta(ge=1, le=10_000_000, description="--max-model-len")] | None = None
    served_model_name: Name | None = None
    """Name clients use (--served-model-name); default: the model id."""
    extra_args: Annotated[list[EngineArg], msgspec.Meta(max_length=64, description="Further `vllm serve` arguments, one per item")] = []

    def __post_init__(self) -> None:
        for arg in self.extra_args:
            option = arg.split("=", 1)[0]
            if option in RESERVED_VLLM_ARGS:  # the agent would refuse to start
                raise ValueError(f"extra_args must not set {option}: the agent sets it"
                                 " (use the model_spec field for it)")


class OfferChoice(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One acceptable place for an instance: a provider's instance type, in a zone or any."""

    provider: Provider
    instance_type: Name
    zone: Name | None = None


class CreatePayload(msgspec.Struct, forbid_unknown_fields=True):
    """Where the instance may run, in one of three ways: `provider` + `instance_type` (+
    `zone`); `offers`, tried in order when one has no capacity; or neither, and the cheapest
    offer of any provider with `gpu_model` (if given) and at least `tensor_parallel_size` GPUs
    wins, the others following by price."""

    model: Model
    provider: Provider | None = None
    instance_type: Name | None = None
    zone: Name | None = None
    offers: Annotated[list[OfferChoice], msgspec.Meta(max_length=20)] = []
    gpu_model: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*" + _END,
                                           description="e.g. L4, A100, H100 (case-insensitive)")] | None = None
    model_spec: ModelSpec = msgspec.field(default_factory=ModelSpec)
    labels: Labels = {}
    instance_id: uuid.UUID | None = None
    """Chosen by the producer, or derived from the command id (so redelivery is harmless)."""

    def __post_init__(self) -> None:
        single = self.provider is not None or self.instance_type is not None or self.zone is not None
        if single and (self.provider is None or self.instance_type is None):
            raise ValueError("provider and instance_type go together")
        if single and (self.offers or self.gpu_model):
            raise ValueError("give provider + instance_type, or offers, or neither (cheapest offer);"
                             " not several")
        if self.offers and self.gpu_model:
            raise ValueError("gpu_model only applies when no offer is named")

    @property
    def choices(self) -> list[OfferChoice]:
        """The offers named by the request (empty: any offer may do)."""
        if self.provider is not None and self.instance_type is not None:
            return [OfferChoice(self.provider, self.instance_type, self.zone)]
        return list(self.offers)


class TerminatePayload(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: uuid.UUID
    reason: Reason | None = None


class DrainPayload(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: uuid.UUID
    reason: Reason | None = None


class _Envelope(msgspec.Struct, forbid_unknown_fields=True, tag_field="type"):
    version: Literal[1]
    id: CommandId


class CreateInstance(_Envelope, tag="instance.create"):
    payload: CreatePayload

    @property
    def instance_id(self) -> uuid.UUID:
        return self.payload.instance_id or uuid.uuid5(NAMESPACE, self.id)


class TerminateInstance(_Envelope, tag="instance.terminate"):
    payload: TerminatePayload


class DrainInstance(_Envelope, tag="instance.drain"):
    payload: DrainPayload


Command = CreateInstance | TerminateInstance | DrainInstance

_decoder = msgspec.json.Decoder(Command)


class InvalidCommand(ValueError):
    """The entry is not a valid version-1 command."""


def decode(raw: bytes | str) -> Command:
    """Parse and validate one command; raises `InvalidCommand` saying what is wrong."""
    try:
        return _decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidCommand(str(exc)) from None
    except UnicodeError as exc:
        raise InvalidCommand(f"command is not valid UTF-8 ({exc.reason} at {exc.start})") from None
    except RecursionError:
        raise InvalidCommand("command is nested too deeply") from None


def encode(command: Command) -> bytes:
    return msgspec.json.encode(command)


def json_schema() -> dict:
    """JSON Schema (2020-12) of a command, for producers in other languages."""
    schema = msgspec.json.schema(Command)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Control-plane command, version 1",
        "description": "The JSON in the `command` field of an entry of the `cp:commands` Redis stream.",
        **schema,
    }
