"""Intruders: every admin route refused to callers without a live key of the right scope, with
nothing changed; agent routes refused to admin keys; and no secret (API key, agent token, the
agent-token secret, join token, database or Redis password) leaking into logs, the event feed,
stored rows, Redis streams or error answers during a real lifecycle on the `local` provider.

The single checks (anonymous calls with random ids, tampered and replayed agent requests,
join-token states, the install script, SSH host keys) live in test_api.py, test_agent_api.py,
test_install_script.py and the bare-metal tests; this file sweeps systematically over the
served OpenAPI document, with ids that exist so that a 404 cannot hide a missing check.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import structlog
from redis.asyncio import Redis

from control_plane.agent_release import current_release
from control_plane.api_keys import create_api_key
from control_plane.feed.events import emit
from control_plane.security import agent_token, digest
from tests.conftest import TABLES, RunningControlPlane, eventually

PUBLIC = {"/healthz", "/readyz", "/v1/agent/manifest", "/v1/agent/artifact/{filename}",
          "/v1/agent/install.sh"}
"""Routes anyone may call: nothing secret behind them (test_api.py checks they answer)."""
AGENT_PREFIX = "/v1/agent/"
METHODS = ("get", "post", "put", "patch", "delete")
ALL_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
RELEASE = current_release()
HEARTBEAT = {"agent_info": {"version": RELEASE.version, "build_date": RELEASE.build_date,
                            "checksum": RELEASE.sha256},
             "engine": {"state": "running", "restarts": 0},
             "metrics": {"gpus": [], "vllm": {"num_requests_running": 0, "num_requests_waiting": 0}}}

BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/instances"): {"provider": "local", "instance_type": "local-gpu", "model": "org/m"},
    ("POST", "/v1/instances/{instance_id}/drain"): {"reason": "intruder"},
    ("POST", "/v1/instances/{instance_id}/agent-commands"): {"kind": "stop", "reason": "intruder"},
    ("POST", "/v1/join-tokens"): {"name": "intruder", "model": "org/m"},
    ("POST", "/v1/hosts"): {"name": "intruder-host", "address": "10.9.9.9", "username": "root",
                            "instance_type": "a100x8"},  # + a real key file and host key
    ("POST", "/v1/pools"): {"name": "intruder-pool", "model": "org/m", "min_size": 0, "max_size": 1,
                            "policy": {"scale_to_zero": True}},
    ("PATCH", "/v1/pools/{name}"): {"max_size": 9},
    ("POST", "/v1/agent/heartbeat"): HEARTBEAT,
    ("POST", "/v1/agent/progress"): {"phase": "model_loaded"},
    ("POST", "/v1/agent/events"): {"kind": "engine_crashed", "message": "intruder"},
    ("POST", "/v1/agent/commands/{command_id}/ack"): {"outcome": "done"},
    ("POST", "/v1/agent/register"): {"hostname": "intruder", "address": "10.9.9.8"},
}
"""Bodies that the route accepts from a caller allowed to call it: a missing check would
show as a change, not hide behind a 400 (the admin control in the sweep checks they do)."""
THROUGH_THE_STREAM = {("POST", "/v1/instances"), ("POST", "/v1/instances/{instance_id}/drain"),
                      ("DELETE", "/v1/instances/{instance_id}")}


def quiet(settings):
    """The test's settings with the periodic jobs (health, autoscaling, reconciliation, volume
    sweep) pushed out of the test's time, so that only requests can change the database."""
    return dataclasses.replace(settings, health_check_seconds=3600.0, autoscale_seconds=3600.0,
                               reconcile_seconds=3600.0, volume_sweep_seconds=3600.0)


# --- 1. every route, every wrong credential ---------------------------------------------------


async def test_every_admin_route_refuses_intruders_and_changes_nothing(settings, db, tmp_path):
    async with RunningControlPlane(quiet(settings)) as cp, cp.client(key=None) as anon:
        spec = (await anon.get("/schema/openapi.json")).json()
        fixtures = await _existing_things(cp, db)
        bodies = {**BODIES, ("POST", "/v1/hosts"): {**BODIES[("POST", "/v1/hosts")],
                                                    **_ssh_keys(tmp_path)}}
        admin_routes, agent_routes = _routes(spec)
        assert len(admin_routes) >= 29 and len(agent_routes) >= 6, (admin_routes, agent_routes)
        assert ("GET", "/v1/events") in admin_routes and ("PATCH", "/v1/pools/{name}") in admin_routes

        # Every id is real: the read-only key reads every one of them.
        async with cp.client(key=fixtures["reader"]) as reader:
            for method, path in admin_routes:
                if method == "GET":
                    status, body = await _call(reader, method, _fill(path, fixtures))
                    assert status == 200, (path, body)

        def send(client: httpx.AsyncClient, method: str, path: str, body: Any = "the route's") -> Any:
            body = bodies.get((method, path)) if body == "the route's" else body
            return _call(client, method, _fill(path, fixtures), body)

        before = await _snapshot(db, cp)
        wrong: list[tuple[str, str, str, int, str]] = []  # (who, method, path, status, body)
        intruders = {"no key": None, "revoked admin key": fixtures["revoked"],
                     "an agent token as API key": fixtures["agent_token"],
                     "a join token as API key": fixtures["join_token"]}
        for who, key in intruders.items():
            async with cp.client(key=key) as client:
                for method, path in admin_routes:
                    status, body = await send(client, method, path)
                    if status != 401:
                        wrong.append((who, method, path, status, body[:200]))
        async with cp.client(key=fixtures["reader"]) as reader:
            for method, path in admin_routes:
                if method != "GET":
                    status, body = await send(reader, method, path)
                    if status != 403:
                        wrong.append(("read-only key", method, path, status, body[:200]))
        # Methods the document does not list: refused without a key; with a read-only key,
        # HEAD and OPTIONS are reads (OPTIONS answers 204 with `Allow`), anything else refused.
        for who, key in (("no key", None), ("read-only key", fixtures["reader"])):
            async with cp.client(key=key) as client:
                for path in sorted({p for _, p in admin_routes}):
                    for method in sorted(ALL_METHODS - {m for m, p in admin_routes if p == path}):
                        status, body = await send(client, method, path, {})
                        reads = key and method in ("HEAD", "OPTIONS")
                        if status not in (range(200, 500) if reads else range(400, 500)):
                            wrong.append((f"{who}, undocumented method", method, path, status, body[:200]))
        for who, key in (("admin key", cp.admin_key), ("read-only key", fixtures["reader"])):
            async with cp.client(key=key) as client:
                for method, path in agent_routes:
                    status, body = await send(client, method, path)
                    if status != 401:
                        wrong.append((who, method, path, status, body[:200]))
        assert wrong == [], "routes not refusing an intruder (who, method, path, status, body)"
        assert await _snapshot(db, cp) == before, "a refused request changed something"

        # The control: with the admin key, the same requests are accepted and each changes the
        # snapshot (those going through the command stream are left out: they would start or
        # stop machines; the stream's length is in the snapshot all the same).
        writes = sorted((r for r in admin_routes if r[0] != "GET" and r not in THROUGH_THE_STREAM),
                        key=lambda r: r[0] == "DELETE")
        async with cp.client() as admin:
            for method, path in writes:
                status, body = await send(admin, method, path)
                assert 200 <= status < 300, (method, path, body)
                after = await _snapshot(db, cp)
                assert after != before, f"{method} {path} by the admin changed nothing visible"
                before = after


async def test_the_document_says_how_each_route_is_protected(control_plane):
    async with control_plane.client(key=None) as anon:
        spec = (await anon.get("/schema/openapi.json")).json()
    admin_routes, agent_routes = _routes(spec)
    wrong = []
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method not in item:
                continue
            security = item[method].get("security", spec["security"])
            if path in PUBLIC:
                expected_ok = security == [{}]
            elif (method.upper(), path) in agent_routes:
                expected_ok = security in ([{"agentSignature": []}], [{"joinToken": []}])
            else:
                expected_ok = security == [{"apiKey": []}]
            if not expected_ok:
                wrong.append((method.upper(), path, security))
    assert wrong == [], "routes whose documented security is not what their guard enforces"


async def test_the_event_feed_refuses_intruders_at_once(settings, db):
    async with RunningControlPlane(quiet(settings)) as cp:
        reader_key = await create_api_key(cp.runtime.sessions, "reader", ["read"])
        revoked = await create_api_key(cp.runtime.sessions, "old", ["admin"])
        await db.execute("UPDATE api_keys SET revoked_at = now() WHERE name = 'old'")
        async with cp.runtime.sessions.begin() as session:
            await emit(session, "instance.progress", {"message": "something to replay"}, None)
        for key in (None, revoked, "cpk_" + "x" * 43):
            async with cp.client(key=key) as client:
                for params, headers in (({}, {}), ({"last_event_id": 0}, {}), ({}, {"Last-Event-ID": "0"})):
                    started = time.monotonic()
                    status, body = await _call(client, "GET", "/v1/events", params=params, headers=headers)
                    assert status == 401, (key, params, headers, body)
                    assert time.monotonic() - started < 3, "refused at once, not after a stream"
                    assert "something to replay" not in body
        async with cp.client(key=reader_key) as reader:  # the control: a read key does get the feed
            assert (await _call(reader, "GET", "/v1/events"))[0] == 200


# --- 2. no secret leaks --------------------------------------------------------------------------


async def test_no_secret_leaks_into_logs_events_rows_or_refusals(settings, db, capfd):
    refusals: list[httpx.Response] = []
    with _production_logging():
        async with RunningControlPlane(settings) as cp:
            in_play, ids = await _run_a_lifecycle_with_intruders(cp, db, refusals)
            machine_logs = list((cp.settings.data_dir / "local-provider" / "machines").glob("*/agent.log"))
        captured = capfd.readouterr()
        stored = await _dump_everything(db, cp.settings)
        agent_logs = "\n".join(p.read_text(errors="replace") for p in machine_logs)
    logs = captured.out + captured.err
    local_id = ids[0]

    # The search is real: we did capture the control plane's logs and the rows.
    assert len(logs) > 1000 and local_id in logs, logs[-2000:]
    assert "Local machine" in logs and "Instance transitioned" in logs, "stdlib and structlog both captured"
    assert all(i in stored["events"] for i in ids), "events of both instances were read"
    assert agent_logs, "the local agent wrote its log"
    assert len(refusals) >= 15 and {r.status_code for r in refusals} <= {400, 401, 403, 409}
    assert len(in_play) >= 9 and all(len(s) >= 16 for s in in_play.values()), in_play.keys()

    places = {"control-plane logs (stdout/stderr)": logs, "local agent.log": agent_logs,
              **{f"table {t}": text for t, text in stored.items()},
              **{f"error answer {r.request.method} {r.request.url.path} -> {r.status_code}":
                 r.text + json.dumps(dict(r.headers)) for r in refusals}}
    leaks = [(secret_name, place) for secret_name, secret in in_play.items()
             for place, text in places.items() if _contains(text, secret)]
    assert leaks == [], f"secrets found (secret, where): {leaks}"


async def _run_a_lifecycle_with_intruders(
        cp, db, refusals: list[httpx.Response]) -> tuple[dict[str, str], list[str]]:
    """A local instance created, ready, sent a heartbeat and terminated; an on-prem host joined;
    around it, requests with wrong keys, tokens and signatures (their answers appended to
    `refusals`). Returns the secrets in play by name, and the two instances' ids."""
    sessions = cp.runtime.sessions
    reader = await create_api_key(sessions, "reader", ["read"])
    revoked = await create_api_key(sessions, "old", ["admin"])
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE name = 'old'")
    secret = cp.runtime.agent_token_secret.decode()

    def refused(response: httpx.Response, *codes: int) -> None:
        assert response.status_code in codes, (response.request.url, response.text)
        refusals.append(response)

    async with cp.client() as admin:
        created = await admin.post("/v1/instances", json={
            "provider": "local", "instance_type": "local-gpu", "model": "org/leak-test",
            "labels": {"test": "intruders"}})
        assert created.status_code == 202, created.text
        instance_id = created.json()["id"]
        spare = (await admin.post("/v1/join-tokens", json={"name": "spare", "model": "org/m"})).json()
        withdrawn = (await admin.post("/v1/join-tokens", json={"name": "withdrawn", "model": "org/m"})).json()
        assert (await admin.delete(f"/v1/join-tokens/{withdrawn['id']}")).status_code == 204
        joining = (await admin.post("/v1/join-tokens", json={"name": "rack-1", "model": "org/m"})).json()

        async def ready() -> bool:
            shown = (await admin.get(f"/v1/instances/{instance_id}")).json()
            assert shown["status"] not in ("startup_failed", "terminated"), shown
            return shown["status"] == "ready"

        await eventually(ready, timeout=40, interval=0.2, message="local instance ready")
        token = agent_token(cp.runtime.agent_token_secret, uuid.UUID(instance_id))
        async with cp.agent_client(instance_id) as agent:
            assert (await agent.post("/v1/agent/heartbeat", json=HEARTBEAT)).status_code == 200
            refused(await agent.post("/v1/agent/heartbeat", json={"agent_info": {"version": 1}}), 400)
        for wrong in ("cpa_" + "0" * 64, cp.admin_key, reader, secret):
            async with cp.agent_client(instance_id, token=wrong) as forger:
                refused(await forger.post("/v1/agent/heartbeat", json=HEARTBEAT), 401)
                refused(await forger.get("/v1/agent/commands"), 401)
        async with cp.agent_client(uuid.uuid4(), token=token) as stranger:
            refused(await stranger.post("/v1/agent/progress", json={"phase": "model_loaded"}), 401)
        for path in ("/v1/agent/heartbeat", "/v1/agent/progress"):
            refused(await admin.post(path, json=HEARTBEAT), 401)

        body = BODIES[("POST", "/v1/instances")]
        for key, codes in ((None, (401,)), (revoked, (401,)), ("cpk_" + uuid.uuid4().hex * 2, (401,)),
                           (token, (401,)), (spare["token"], (401,)), (secret, (401,)), (reader, (403,))):
            async with cp.client(key=key) as intruder:
                refused(await intruder.post("/v1/instances", json=body), *codes)
                refused(await intruder.delete(f"/v1/instances/{instance_id}"), *codes)
                if codes == (401,):
                    refused(await intruder.get(f"/v1/instances/{instance_id}"), *codes)
        async with cp.client(key=None) as host:
            for bad in ("cpj_" + "x" * 43, withdrawn["token"], cp.admin_key, token):
                refused(await host.post("/v1/agent/register", json=BODIES[("POST", "/v1/agent/register")],
                                        headers={"Authorization": f"Bearer {bad}"}), 401)
            joined = await host.post("/v1/agent/register",
                                     json={"hostname": "rack-1-node", "address": "10.0.0.7"},
                                     headers={"Authorization": f"Bearer {joining['token']}"})
            assert joined.status_code == 201, joined.text
            refused(await host.post("/v1/agent/register", json={"hostname": "again"},
                                    headers={"Authorization": f"Bearer {joining['token']}"}), 401)
        onprem_id = joined.json()["instance_id"]
        onprem_token = joined.json()["env"]["WORKER_AGENT_TOKEN"]
        assert onprem_token == agent_token(cp.runtime.agent_token_secret, uuid.UUID(onprem_id))
        async with cp.agent_client(onprem_id, token=onprem_token) as onprem:
            assert (await onprem.post("/v1/agent/heartbeat", json=HEARTBEAT)).status_code == 200

        assert (await admin.delete(f"/v1/instances/{instance_id}")).status_code == 202

        async def terminated() -> bool:
            return (await admin.get(f"/v1/instances/{instance_id}")).json()["status"] == "terminated"

        await eventually(terminated, timeout=30, interval=0.2, message="local instance terminated")

    found = {
        "admin API key": cp.admin_key, "read-only API key": reader, "revoked API key": revoked,
        "local instance's agent token": token, "on-prem instance's agent token": onprem_token,
        "agent token secret": secret, "spare join token": spare["token"],
        "revoked join token": withdrawn["token"], "used join token": joining["token"],
    }
    for name, url in (("Postgres", cp.settings.database_url), ("Redis", cp.settings.redis_url)):
        password = urlsplit(url).password
        if password:
            found[f"{name} password"] = unquote(password)
    return found, [instance_id, onprem_id]


def _contains(text: str, secret: str) -> bool:
    """The secret or its random part (after a `cpk_`/`cpa_`/`cpj_` prefix) appears in `text`."""
    body = re.sub(r"^cp[akj]_", "", secret)
    return secret in text or (len(body) >= 16 and body in text)


async def _dump_everything(db, settings) -> dict[str, str]:
    """Every row of every table, and every entry of our Redis streams, as text."""
    dumped = {}
    for table in TABLES:
        rows = await db.fetch(f"SELECT t::text AS row FROM {table} t")
        dumped[table] = "\n".join(r["row"] for r in rows)
    redis = Redis.from_url(settings.redis_url)
    try:
        for stream in (settings.command_stream, settings.dead_letter_stream, settings.events_stream):
            entries = await redis.xrange(stream)
            dumped[f"redis {stream}"] = "\n".join(repr(e) for e in entries)
    finally:
        await redis.aclose()
    return dumped


@contextlib.contextmanager
def _production_logging() -> Iterator[None]:
    """Logging set up as `control-plane up` does (`control_plane.logs.configure`, redaction
    included) at DEBUG, writing to the captured stderr; the test's own setup restored after."""
    from control_plane.logs import configure

    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    noisy = {name: logging.getLogger(name).level for name in ("uvicorn.access", "apscheduler", "alembic")}
    configure("DEBUG")
    structlog.configure(cache_logger_on_first_use=False)  # no logger kept bound to the capture
    try:
        yield
    finally:
        structlog.configure(**saved_structlog)
        root.handlers[:] = saved_root[0]
        root.setLevel(saved_root[1])
        for name, level in noisy.items():
            logging.getLogger(name).setLevel(level)


# --- helpers -------------------------------------------------------------------------------------


def _routes(spec: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(admin routes, agent routes) as (METHOD, path) from the OpenAPI document: every route
    not in `PUBLIC` is an admin route unless it is under `/v1/agent/` (signed or join token)."""
    admin, agent = [], []
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method not in item or path in PUBLIC:
                continue
            (agent if path.startswith(AGENT_PREFIX) else admin).append((method.upper(), path))
    return admin, agent


def _fill(path: str, things: dict[str, str]) -> str:
    for name in re.findall(r"\{(\w+)\}", path):
        assert name in things, f"path parameter {{{name}}} in {path}: give the test a real one"
        path = path.replace(f"{{{name}}}", things[name])
    return path


async def _call(client: httpx.AsyncClient, method: str, url: str, body: Any = None,
                **kwargs: Any) -> tuple[int, str]:
    """Status and body; a stream (the SSE feed) is answered by its status alone. Bounded: an
    unprotected stream must fail the test, not hang it."""
    async with asyncio.timeout(5):
        async with client.stream(method, url, json=body, **kwargs) as response:
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                return response.status_code, ""
            return response.status_code, (await response.aread()).decode(errors="replace")


def _ssh_keys(directory: Path) -> dict[str, str]:
    """A private key file and a public key line, as a host registration names them."""
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519")
    path = directory / "id_ed25519"
    key.write_private_key(str(path))
    return {"private_key_ref": str(path), "host_key": key.export_public_key().decode().strip()}


async def _existing_things(cp, db) -> dict[str, str]:
    """One real thing of each kind a path names, and keys for the intruders: a ready instance
    (no machine: no worker touches it for an hour) with a pending agent command, a live join
    token, a host, a pool; a read-only and a revoked admin key."""
    instance_id = uuid.uuid4()
    token = agent_token(cp.runtime.agent_token_secret, instance_id)
    await db.execute(
        "INSERT INTO instances (id, provider, instance_type, model, status, agent_token_hash,"
        " last_heartbeat_at, next_check_at) VALUES ($1, 'local', 'local-gpu', 'm', 'ready', $2, now(),"
        " now() + interval '1 hour')", instance_id, digest(token))
    host_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO hosts (id, name, address, username, private_key_ref, host_key, instance_type)"
        " VALUES ($1, 'rack-1', '10.0.0.1', 'root', '/nonexistent/key', 'ssh-ed25519 AAAA', 'a100x8')",
        host_id)
    await db.execute(
        "INSERT INTO pools (id, name, model, min_size, max_size, desired_size, policy)"
        " VALUES ($1, 'chat', 'org/m', 0, 2, 0, '{\"scale_to_zero\": true}')", uuid.uuid4())
    async with cp.client() as admin:
        command = await admin.post(f"/v1/instances/{instance_id}/agent-commands", json={"kind": "drain"})
        assert command.status_code == 202, command.text
        join = await admin.post("/v1/join-tokens", json={"name": "rack-2", "model": "org/m"})
        assert join.status_code == 201, join.text
    reader = await create_api_key(cp.runtime.sessions, "reader", ["read"])
    revoked = await create_api_key(cp.runtime.sessions, "old", ["admin"])
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE name = 'old'")
    return {"instance_id": str(instance_id), "host_id": str(host_id), "name": "chat",
            "token_id": join.json()["id"], "command_id": command.json()["id"],
            "join_token": join.json()["token"], "agent_token": token, "reader": reader, "revoked": revoked}


async def _snapshot(db, cp) -> dict[str, Any]:
    """Row count and checksum of every table, and the length of the command stream (creates,
    drains and terminations go there first)."""
    state: dict[str, Any] = {}
    for table in TABLES:
        row = await db.fetchrow(
            "SELECT count(*) AS n, md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
            f" AS sum FROM {table} t")
        state[table] = (row["n"], row["sum"])
    state["command stream"] = await cp.runtime.redis.xlen(cp.settings.command_stream)
    return state
