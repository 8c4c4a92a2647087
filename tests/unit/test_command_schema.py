"""Version 1 of the command stream's schema (`control_plane/commands/schema.py`)."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import msgspec
import pytest

from control_plane.commands.schema import (
    SCHEMA_FILE,
    CreateInstance,
    DrainInstance,
    InvalidCommand,
    TerminateInstance,
    decode,
    encode,
    json_schema,
)

REGENERATE = (
    "uv run python -c 'import json; from control_plane.commands.schema import json_schema, "
    "SCHEMA_FILE; SCHEMA_FILE.write_text(json.dumps(json_schema(), indent=2) + \"\\n\")'"
)
IID = "3f2a8c1e-5b7d-4e9f-8a6b-1c2d3e4f5a6b"


def create(**payload: Any) -> dict[str, Any]:
    body = {"provider": "local", "instance_type": "gpu-1x", "model": "Qwen/Qwen2.5-0.5B-Instruct"}
    body.update(payload)
    return {"version": 1, "id": "cmd-1", "type": "instance.create", "payload": body}


def terminate(**payload: Any) -> dict[str, Any]:
    return {"version": 1, "id": "cmd-2", "type": "instance.terminate",
            "payload": {"instance_id": IID, **payload}}


def drain(**payload: Any) -> dict[str, Any]:
    return {"version": 1, "id": "cmd-3", "type": "instance.drain",
            "payload": {"instance_id": IID, **payload}}


def without(doc: dict[str, Any], *path: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc


def with_(doc: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**copy.deepcopy(doc), **top}


# ---------------------------------------------------------------------------------------------
# The committed JSON Schema


def test_committed_schema_file_is_up_to_date() -> None:
    assert SCHEMA_FILE.exists(), f"{SCHEMA_FILE} is missing; generate it with:\n{REGENERATE}"
    committed = json.loads(SCHEMA_FILE.read_text())
    current = json.loads(json.dumps(json_schema()))
    assert committed == current, (
        f"{SCHEMA_FILE.name} no longer matches the command types; regenerate it with:\n"
        f"{REGENERATE}\n(and bump the version if the change is not backwards compatible)")


def test_schema_file_is_formatted_as_generated() -> None:
    assert SCHEMA_FILE.read_text() == json.dumps(json_schema(), indent=2) + "\n", REGENERATE


def test_schema_describes_every_command_type() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["discriminator"]["mapping"]) == {
        "instance.create", "instance.terminate", "instance.drain"}
    for name in ("CreateInstance", "TerminateInstance", "DrainInstance"):
        definition = schema["$defs"][name]
        assert definition["additionalProperties"] is False
        assert set(definition["required"]) == {"type", "version", "id", "payload"}
        assert definition["properties"]["version"] == {"enum": [1]}


# ---------------------------------------------------------------------------------------------
# Valid commands


def test_minimal_create() -> None:
    cmd = decode(json.dumps(create()))
    assert isinstance(cmd, CreateInstance)
    assert (cmd.version, cmd.id) == (1, "cmd-1")
    p = cmd.payload
    assert (p.provider, p.instance_type, p.model) == ("local", "gpu-1x", "Qwen/Qwen2.5-0.5B-Instruct")
    assert (p.zone, p.labels, p.instance_id) == (None, {}, None)


def test_full_create() -> None:
    labels = {f"k{i}": "v" * 256 for i in range(64)} | {"team/app.name_x-1": ""}
    labels.pop("k0")
    raw = json.dumps(create(zone="fr-par-2", labels=labels, instance_id=IID,
                            model="meta-llama/Llama-3.2-1B-Instruct@main:v1"))
    cmd = decode(raw.encode())  # bytes too
    assert isinstance(cmd, CreateInstance)
    assert cmd.payload.zone == "fr-par-2"
    assert cmd.payload.labels == labels
    assert cmd.payload.instance_id == uuid.UUID(IID)
    assert cmd.payload.model == "meta-llama/Llama-3.2-1B-Instruct@main:v1"


@pytest.mark.parametrize(
    ("doc", "cls"),
    [
        (terminate(), TerminateInstance),
        (terminate(reason="Cost cutting: weekend"), TerminateInstance),
        (terminate(reason=None), TerminateInstance),
        (terminate(reason="é" * 1000), TerminateInstance),
        (drain(), DrainInstance),
        (drain(reason="maintenance"), DrainInstance),
    ],
)
def test_terminate_and_drain(doc: dict[str, Any], cls: type) -> None:
    cmd = decode(json.dumps(doc))
    assert type(cmd) is cls
    assert cmd.payload.instance_id == uuid.UUID(IID)
    assert cmd.payload.reason == doc["payload"].get("reason")


@pytest.mark.parametrize(
    "command_id",
    ["a", "x" * 200, "order-42:retry/1", "!~", "550e8400-e29b-41d4-a716-446655440000",
     "a\"b'c;d"],
)
def test_valid_command_ids(command_id: str) -> None:
    assert decode(json.dumps(with_(create(), id=command_id))).id == command_id


def test_field_order_does_not_matter() -> None:
    doc = create()
    reordered = {"payload": doc["payload"], "type": doc["type"], "id": doc["id"], "version": 1}
    assert decode(json.dumps(reordered)) == decode(json.dumps(doc))


@pytest.mark.parametrize("doc", [create(zone="z", labels={"a": "b"}, instance_id=IID), create(),
                                 terminate(reason="r"), drain()])
def test_encode_decode_round_trip(doc: dict[str, Any]) -> None:
    cmd = decode(json.dumps(doc))
    assert decode(encode(cmd)) == cmd


# ---------------------------------------------------------------------------------------------
# Invalid commands: each is refused with a message (ideally saying where).

HUGE = "a" * 1_000_000
INJECTIONS = [
    "x'; DROP TABLE instances; --",
    "m' OR '1'='1",
    "Robert'); DROP TABLE students;--",
    "model; SELECT pg_sleep(10)",
    "model\"; DELETE FROM api_keys; --",
    "model/**/UNION/**/SELECT",
    "model$(rm -rf /)",
    "model`id`",
    "--trust-remote-code",   # would be an option on vLLM's command line
    "../../etc/passwd",
    " model",
    "model name",
]

INVALID: list[tuple[str, bytes | str, str]] = [
    # (case, raw entry, fragment the message must contain)
    ("not json", "not json", ""),
    ("empty", "", ""),
    ("truncated", json.dumps(create())[:-3], ""),
    ("bad utf-8", b"\xff\xfe{}", ""),
    ("bad utf-8 inside a string", json.dumps(create()).encode().replace(b"cmd-1", b"cmd-\xff"), ""),
    ("lone surrogate escaped", json.dumps(terminate(reason="a\ud800b")).encode(), ""),
    ("lone surrogate in a label", json.dumps(create(labels={"k": "\udfff"})).encode(), ""),
    ("trailing garbage", json.dumps(create()) + " x", ""),
    ("two objects", json.dumps(create()) * 2, ""),
    ("array", "[]", "object"),
    ("list of command", json.dumps([create()]), "object"),
    ("number", "1", "object"),
    ("null", "null", "object"),
    ("string", json.dumps(json.dumps(create())), "object"),
    ("empty object", "{}", "type"),
    ("missing type", json.dumps(without(create(), "type")), "type"),
    ("missing version", json.dumps(without(create(), "version")), "version"),
    ("missing id", json.dumps(without(create(), "id")), "id"),
    ("missing payload", json.dumps(without(create(), "payload")), "payload"),
    ("missing provider", json.dumps(without(create(), "payload", "provider")), "provider"),
    ("missing model", json.dumps(without(create(), "payload", "model")), "model"),
    ("missing instance_type", json.dumps(without(create(), "payload", "instance_type")),
     "instance_type"),
    ("terminate without instance", json.dumps(without(terminate(), "payload", "instance_id")),
     "instance_id"),
    ("drain without instance", json.dumps(without(drain(), "payload", "instance_id")),
     "instance_id"),
    ("unknown type", json.dumps(with_(create(), type="instance.reboot")), "$.type"),
    ("type in capitals", json.dumps(with_(create(), type="INSTANCE.CREATE")), "$.type"),
    ("type empty", json.dumps(with_(create(), type="")), "$.type"),
    ("type not a string", json.dumps(with_(create(), type=1)), "$.type"),
    ("type null", json.dumps(with_(create(), type=None)), "$.type"),
    ("create payload under terminate", json.dumps(with_(create(), type="instance.terminate")),
     "$.payload"),
    ("version 2", json.dumps(with_(create(), version=2)), "$.version"),
    ("version 0", json.dumps(with_(create(), version=0)), "$.version"),
    ("version -1", json.dumps(with_(create(), version=-1)), "$.version"),
    ("version as string", json.dumps(with_(create(), version="1")), "$.version"),
    ("version as float", json.dumps(with_(create(), version=1.5)), "$.version"),
    ("version true", json.dumps(with_(create(), version=True)), "$.version"),
    ("version null", json.dumps(with_(create(), version=None)), "$.version"),
    ("version huge", json.dumps(create()).replace('"version": 1', '"version": 1' + "0" * 400),
     "version"),
    ("unknown top-level field", json.dumps(with_(create(), extra=1)), "extra"),
    ("unknown payload field", json.dumps(create(gpu_count=8)), "gpu_count"),
    ("unknown terminate field", json.dumps(terminate(force=True)), "force"),
    ("id empty", json.dumps(with_(create(), id="")), "$.id"),
    ("id too long", json.dumps(with_(create(), id="x" * 201)), "$.id"),
    ("id huge", json.dumps(with_(create(), id=HUGE)), "$.id"),
    ("id with space", json.dumps(with_(create(), id="my command")), "$.id"),
    ("id with tab", json.dumps(with_(create(), id="a\tb")), "$.id"),
    ("id non-ascii", json.dumps(with_(create(), id="commandé")), "$.id"),
    ("id with NUL", json.dumps(with_(create(), id="a\x00b")), "$.id"),
    ("id with DEL", json.dumps(with_(create(), id="a\x7fb")), "$.id"),
    ("id a number", json.dumps(with_(create(), id=42)), "$.id"),
    ("id null", json.dumps(with_(create(), id=None)), "$.id"),
    ("bad uuid", json.dumps(terminate(instance_id="not-a-uuid")), "instance_id"),
    ("uuid too short", json.dumps(terminate(instance_id=IID[:-1])), "instance_id"),
    ("uuid with braces", json.dumps(terminate(instance_id="{" + IID + "}")), "instance_id"),
    ("uuid a number", json.dumps(terminate(instance_id=12345)), "instance_id"),
    ("uuid empty", json.dumps(terminate(instance_id="")), "instance_id"),
    ("uuid null", json.dumps(terminate(instance_id=None)), "instance_id"),
    ("create uuid bad", json.dumps(create(instance_id="zzzzzzzz-5b7d-4e9f-8a6b-1c2d3e4f5a6b")),
     "instance_id"),
    ("provider uppercase", json.dumps(create(provider="AWS")), "provider"),
    ("provider mixed case", json.dumps(create(provider="Scaleway")), "provider"),
    ("provider empty", json.dumps(create(provider="")), "provider"),
    ("provider starts with digit", json.dumps(create(provider="1aws")), "provider"),
    ("provider too long", json.dumps(create(provider="a" * 33)), "provider"),
    ("provider with space", json.dumps(create(provider="aws east")), "provider"),
    ("provider with dot", json.dumps(create(provider="aws.east")), "provider"),
    ("provider with NUL", json.dumps(create(provider="aws\x00")), "provider"),
    ("provider not a string", json.dumps(create(provider=["aws"])), "provider"),
    ("instance_type empty", json.dumps(create(instance_type="")), "instance_type"),
    ("instance_type too long", json.dumps(create(instance_type="g" * 129)), "instance_type"),
    ("instance_type with space", json.dumps(create(instance_type="GPU 3")), "instance_type"),
    ("instance_type with NUL", json.dumps(create(instance_type="t\x00")), "instance_type"),
    ("zone too long", json.dumps(create(zone="z" * 129)), "zone"),
    ("zone empty", json.dumps(create(zone="")), "zone"),
    ("zone a number", json.dumps(create(zone=2)), "zone"),
    ("model empty", json.dumps(create(model="")), "model"),
    ("model too long", json.dumps(create(model="m" * 513)), "model"),
    ("model huge", json.dumps(create(model=HUGE)), "model"),
    ("model with NUL", json.dumps(create(model="a\x00b")), "model"),
    ("model a number", json.dumps(create(model=7)), "model"),
    ("model an object", json.dumps(create(model={"name": "m"})), "model"),
    ("model a list", json.dumps(create(model=["m"])), "model"),
    ("labels too many", json.dumps(create(labels={f"k{i}": "v" for i in range(65)})), "labels"),
    ("labels a list", json.dumps(create(labels=["a", "b"])), "labels"),
    ("labels a string", json.dumps(create(labels="a=b")), "labels"),
    ("label key empty", json.dumps(create(labels={"": "v"})), "labels"),
    ("label key too long", json.dumps(create(labels={"k" * 64: "v"})), "labels"),
    ("label key with space", json.dumps(create(labels={"my key": "v"})), "labels"),
    ("label key leading dash", json.dumps(create(labels={"-k": "v"})), "labels"),
    ("label key with NUL", json.dumps(create(labels={"k\x00": "v"})), "labels"),
    ("label value too long", json.dumps(create(labels={"k": "v" * 257})), "labels"),
    ("label value huge", json.dumps(create(labels={"k": HUGE})), "labels"),
    ("label value a number", json.dumps(create(labels={"k": 1})), "labels"),
    ("label value null", json.dumps(create(labels={"k": None})), "labels"),
    ("label value nested", json.dumps(create(labels={"k": {"deep": {"er": [1, 2]}}})), "labels"),
    ("reason too long", json.dumps(terminate(reason="r" * 1001)), "reason"),
    ("reason huge", json.dumps(drain(reason=HUGE)), "reason"),
    ("reason an object", json.dumps(drain(reason={"why": "x"})), "reason"),
    ("payload a list", json.dumps(with_(create(), payload=[create()["payload"]])), "payload"),
    ("payload a string", json.dumps(with_(create(), payload="provider=local")), "payload"),
    ("payload null", json.dumps(with_(create(), payload=None)), "payload"),
    ("payload empty", json.dumps(with_(create(), payload={})), "payload"),
    ("deeply nested junk", '{"version": 1, "id": "x", "type": "instance.create", "payload": '
     + "[" * 5000 + "]" * 5000 + "}", "payload"),
    ("nested command as payload", json.dumps(with_(create(), payload=create())), "payload"),
] + [(f"sql/shell injection in model: {s!r}", json.dumps(create(model=s)), "model")
     for s in INJECTIONS]


@pytest.mark.parametrize(("raw", "fragment"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_command(raw: bytes | str, fragment: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        decode(raw)
    message = str(info.value)
    assert message.strip(), "InvalidCommand must say what is wrong"
    assert fragment in message, message
    assert len(message) < 2000, "the message must not echo huge input back"


def test_invalid_command_is_a_value_error() -> None:
    assert issubclass(InvalidCommand, ValueError)


# Python's `$` also matches before a final "\n" (msgspec checks patterns with `re.search`),
# so the patterns end with a lookahead both Python and JSON Schema regexes read as "end".
# Postgres cannot store NUL characters in text or jsonb: refused at the edge, not on apply.
EDGE_CASES = [
    ("id with trailing newline", json.dumps(with_(create(), id="cmd-1\n"))),
    ("model with trailing newline", json.dumps(create(model="org/model\n"))),
    ("provider with trailing newline", json.dumps(create(provider="local\n"))),
    ("instance_type with trailing newline", json.dumps(create(instance_type="gpu-1x\n"))),
    ("label key with trailing newline", json.dumps(create(labels={"k\n": "v"}))),
    ("label value with NUL", json.dumps(create(labels={"k": "a\x00b"}))),
    ("reason with NUL", json.dumps(terminate(reason="a\x00b"))),
    # decode() takes str too, but a str holding a lone surrogate raises UnicodeEncodeError
    # (only UnicodeDecodeError is turned into InvalidCommand).
    ("str with a lone surrogate", json.dumps(terminate(reason="\ud800"), ensure_ascii=False)),
]


@pytest.mark.parametrize("raw", [c[1] for c in EDGE_CASES], ids=[c[0] for c in EDGE_CASES])
def test_invalid_command_edge_cases(raw: str) -> None:
    with pytest.raises(InvalidCommand):
        decode(raw)


# ---------------------------------------------------------------------------------------------
# instance_id of a create command


def test_instance_id_derived_from_command_id() -> None:
    first = decode(json.dumps(with_(create(), id="order-42")))
    again = decode(json.dumps(with_(create(model="other/model"), id="order-42")))
    other = decode(json.dumps(with_(create(), id="order-43")))
    assert isinstance(first.instance_id, uuid.UUID)
    assert first.instance_id == again.instance_id  # a redelivery maps to the same instance
    assert first.instance_id != other.instance_id
    assert first.payload.instance_id is None
    # Pinned: the derivation must never change, or a command redelivered across an upgrade
    # would create a second instance.
    assert first.instance_id == uuid.UUID("5850afc8-fb22-56e4-aff9-16ac90b8340d")


def test_instance_id_given_is_kept() -> None:
    for command_id in ("order-42", "order-43"):
        cmd = decode(json.dumps(with_(create(instance_id=IID), id=command_id)))
        assert cmd.instance_id == uuid.UUID(IID)
    assert decode(json.dumps(create(instance_id=IID.upper()))).instance_id == uuid.UUID(IID)


# ---------------------------------------------------------------------------------------------
# The same samples against the JSON Schema file, when `jsonschema` is installed.

SCHEMA_VALID = [create(), create(zone="z", labels={"a": "b"}, instance_id=IID), terminate(),
                drain(reason="r")]
SCHEMA_INVALID = [with_(create(), version=2), with_(create(), version="1"),
                  with_(create(), extra=1), create(provider="AWS"), with_(create(), id="a b"),
                  create(labels={f"k{i}": "v" for i in range(65)}), create(model="x'; DROP --"),
                  with_(create(), type="instance.reboot"), without(create(), "payload")]


def test_samples_against_json_schema_file() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    for doc in SCHEMA_VALID:
        decode(json.dumps(doc))
        validator.validate(doc)
    for doc in SCHEMA_INVALID:
        with pytest.raises(InvalidCommand):
            decode(json.dumps(doc))
        assert not validator.is_valid(doc), doc


# ---------------------------------------------------------------------------------------------
# Model spec: how vLLM serves the model


def test_model_spec_defaults_and_full_form() -> None:
    assert decode(json.dumps(create())).payload.model_spec.tensor_parallel_size == 1
    spec = {"revision": "v1.2", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.85,
            "max_model_len": 8192, "served_model_name": "qwen", "extra_args": ["--enforce-eager", "--seed=1"]}
    decoded = decode(json.dumps(create(model_spec=spec))).payload.model_spec
    assert msgspec.to_builtins(decoded) == spec


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"extra_args": ["--max-model-len=4096"]}, "must not set --max-model-len"),
    ({"extra_args": ["-tp", "2"]}, "must not set -tp"),
    ({"extra_args": ["--port", "1"]}, "must not set --port"),
    ({"extra_args": ["--x\n--port=1"]}, "extra_args"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"revision": "../main"}, "revision"),
    ({"unknown": 1}, "unknown"),
])
def test_model_spec_refuses_what_the_agent_could_not_run(spec: dict, fragment: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        decode(json.dumps(create(model_spec=spec)))
    assert fragment in str(info.value)
