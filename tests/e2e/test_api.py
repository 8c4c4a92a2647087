"""The REST API and SSE feed against a real server on 127.0.0.1: auth, validation, resume."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
from httpx_sse import aconnect_sse

from control_plane.api_keys import create_api_key
from control_plane.feed.events import emit
from tests.conftest import eventually

PUBLIC = {"/healthz", "/readyz", "/v1/agent/manifest", "/v1/agent/artifact/{filename}",
          "/v1/agent/install.sh", "/", "/dashboard/{file}"}


async def test_every_route_but_health_and_schema_requires_a_key(control_plane):
    async with control_plane.client(key=None) as anon:
        spec = (await anon.get("/schema/openapi.json")).json()
        assert (await anon.get("/healthz")).status_code == 200
        assert (await anon.get("/readyz")).json()["checks"] == {"postgres": "ok", "redis": "ok"}
        routes = [(method.upper(), path) for path, item in spec["paths"].items()
                  for method in item if path not in PUBLIC]
        assert len(routes) >= 10
        undocumented = [r for r in routes if "401" not in spec["paths"][r[1]][r[0].lower()]["responses"]]
        assert undocumented == [], "the schema says which routes answer 401"
        for method, path in routes:
            url = path
            for parameter in ("{instance_id}", "{command_id}", "{token_id}", "{host_id}"):
                url = url.replace(parameter, str(uuid.uuid4()))
            for headers in ({}, {"Authorization": "Bearer cpk_not-a-key"},
                            {"Authorization": "Basic dXNlcjpwYXNz"}):
                response = await anon.request(method, url, headers=headers, json={})
                assert response.status_code == 401, (method, path, headers, response.text)
                assert "cpk_not-a-key" not in response.text


async def test_admin_keys_do_not_open_agent_routes(control_plane):
    async with control_plane.client() as admin:
        for path in ("/v1/agent/progress", "/v1/agent/heartbeat", "/v1/agent/events", "/v1/agent/register"):
            response = await admin.post(path, json={"phase": "model_loaded"})
            assert response.status_code == 401


async def test_revoked_and_read_only_keys(control_plane, db):
    sessions = control_plane.runtime.sessions
    reader = await create_api_key(sessions, "dashboard", ["read"])
    revoked = await create_api_key(sessions, "old", ["admin"])
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE name = 'old'")
    body = {"provider": "local", "instance_type": "local-gpu", "model": "org/m"}

    async with control_plane.client(key=reader) as client:
        assert (await client.get("/v1/instances")).status_code == 200
        assert (await client.post("/v1/instances", json=body)).status_code == 403
        assert (await client.delete(f"/v1/instances/{uuid.uuid4()}")).status_code == 403
    async with control_plane.client(key=revoked) as client:
        assert (await client.get("/v1/instances")).status_code == 401
    assert await db.fetchval("SELECT count(*) FROM processed_commands") == 0
    stored = await db.fetch("SELECT key_hash, prefix FROM api_keys")
    assert all(reader not in (r["key_hash"], r["prefix"]) for r in stored)


@pytest.mark.parametrize(("body", "field"), [
    ({"instance_type": "local-gpu", "model": "m"}, "provider"),
    ({"provider": "local", "instance_type": "local-gpu", "model": ""}, "model"),
    ({"provider": "local", "instance_type": "local-gpu", "model": "m", "labels": {"k": 1}}, "labels"),
    ({"provider": "local", "instance_type": "local-gpu", "model": "m", "instance_id": "x"}, "instance_id"),
    ({"provider": "local", "instance_type": "local-gpu", "model": "m", "extra": 1}, "extra"),
    ({"provider": "Local!", "instance_type": "local-gpu", "model": "m"}, "provider"),
    ({"provider": "local", "instance_type": "h100-imaginary", "model": "m"}, "instance_type"),
    ({"provider": "aws", "instance_type": "p5.48xlarge", "model": "m"}, "provider"),
    ({"provider": "local", "instance_type": "local-gpu", "model": "m", "zone": "mars-1"}, "zone"),
])
async def test_bad_create_requests_are_400_with_the_field(control_plane, db, body, field):
    async with control_plane.client() as client:
        response = await client.post("/v1/instances", json=body)
    assert response.status_code == 400, response.text
    extra = response.json()["extra"]
    assert any(field in str(e.get("key", "")) + str(e.get("message", "")) for e in extra), extra
    assert await control_plane.runtime.redis.xlen(control_plane.settings.command_stream) == 0


async def test_malformed_json_and_unknown_ids(control_plane):
    async with control_plane.client() as client:
        response = await client.post("/v1/instances", content=b"{not json",
                                     headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        missing = uuid.uuid4()
        for method, path in [("GET", f"/v1/instances/{missing}"),
                             ("GET", f"/v1/instances/{missing}/history"),
                             ("GET", f"/v1/instances/{missing}/actions"),
                             ("GET", f"/v1/instances/{missing}/volumes"),
                             ("DELETE", f"/v1/instances/{missing}"),
                             ("POST", f"/v1/instances/{missing}/drain")]:
            response = await client.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert str(missing) in response.json()["detail"]
        assert (await client.get("/v1/instances/not-a-uuid")).status_code in (400, 404)
        assert (await client.get("/v1/instances", params={"cursor": "%%%"})).status_code == 400
        assert (await client.get("/v1/instances", params={"limit": 0})).status_code == 400
        assert (await client.get("/v1/instances", params={"status": "bogus"})).status_code == 400


async def test_idempotency_key_gives_one_instance(control_plane, db):
    body = {"provider": "local", "instance_type": "local-gpu", "model": "org/m",
            "idempotency_key": "order-42"}
    async with control_plane.client() as client:
        first = (await client.post("/v1/instances", json=body)).json()
        second = (await client.post("/v1/instances", json=body)).json()
        assert first == second
        await eventually(lambda: _consumed(control_plane, 2), message="both commands consumed")
        assert await db.fetchval("SELECT count(*) FROM instances") == 1
        listed = (await client.get("/v1/instances", params={"label": "none=x"})).json()
        assert listed == {"items": [], "next": None}
        await client.delete(f"/v1/instances/{first['id']}")


async def _consumed(cp, count: int) -> bool:
    return cp.runtime.consumer.processed >= count

async def test_sse_requires_a_key(control_plane):
    async with control_plane.client(key=None) as anon:
        response = await anon.get("/v1/events")
        assert response.status_code == 401


async def test_sse_resume_with_last_event_id_loses_and_repeats_nothing(control_plane):
    cp = control_plane
    instance = uuid.uuid4()
    other = uuid.uuid4()

    async def publish(n: int, start: int) -> None:
        async with cp.runtime.sessions.begin() as session:
            for i in range(start, start + n):
                await emit(session, "instance.progress", {"instance_id": str(instance), "n": i}, instance)
                await emit(session, "instance.progress", {"instance_id": str(other), "n": i}, other)

    seen: list[tuple[int, int]] = []

    async def read(count: int, last_id: str | None) -> str:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        async with cp.client(timeout=httpx.Timeout(10, read=10)) as client:
            async with aconnect_sse(client, "GET", "/v1/events",
                                    params={"instance_id": str(instance), "type": "instance.*"},
                                    headers=headers) as source:
                got = 0
                async for sse in source.aiter_sse():
                    if not sse.data:
                        continue
                    data = json.loads(sse.data)
                    assert data["instance_id"] == str(instance)
                    seen.append((int(sse.id), data["n"]))
                    got += 1
                    if got == count:
                        return sse.id
        raise AssertionError("stream ended early")

    # Live: subscribe, then events are produced.
    reader = asyncio.create_task(read(5, "0"))
    await eventually(lambda: _subscribed(cp), message="subscriber registered")
    await publish(5, 0)
    last = await asyncio.wait_for(reader, 15)
    # Disconnected while 7 more happen; resume gets exactly those, then live ones.
    await publish(7, 5)
    reader = asyncio.create_task(read(10, last))
    await eventually(lambda: _subscribed(cp), message="subscriber registered")
    await publish(3, 12)
    await asyncio.wait_for(reader, 15)

    assert [n for _, n in seen] == list(range(15))
    ids = [i for i, _ in seen]
    assert ids == sorted(set(ids))


async def _subscribed(cp) -> bool:
    return cp.runtime.hub.subscribers >= 2  # the event mirror is always one


async def test_openapi_is_served_without_a_key(control_plane):
    async with control_plane.client(key=None) as anon:
        spec = (await anon.get("/schema/openapi.json")).json()
    assert "/v1/instances" in spec["paths"] and "/v1/events" in spec["paths"]


async def test_an_unreachable_command_stream_is_a_503_not_a_500(control_plane):
    from redis.asyncio import Redis

    from tests.conftest import free_port

    working = control_plane.runtime.redis
    control_plane.runtime.redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0",
                                                 socket_connect_timeout=1)
    try:
        async with control_plane.client() as client:
            response = await client.post("/v1/instances", json={
                "provider": "local", "instance_type": "local-gpu", "model": "org/m"})
            ready = await client.get("/readyz")
    finally:
        await control_plane.runtime.redis.aclose()
        control_plane.runtime.redis = working
    assert response.status_code == 503 and "retry" in response.json()["detail"]
    assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("error")


async def test_idle_sse_connections_get_keep_alive_comments(control_plane):
    async with control_plane.client(timeout=httpx.Timeout(10, read=5)) as client:
        async with client.stream("GET", "/v1/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            comments, first_id = [], None
            async for line in response.aiter_lines():
                if line.startswith("id: ") and first_id is None:
                    first_id = line[4:]
                if line.startswith(":"):
                    comments.append(line)
                if len(comments) == 2:
                    break
    assert comments == [": connected", ": keep-alive"]
    assert first_id is not None and int(first_id) >= 0


async def test_lists_page_with_cursors_without_gaps_or_repeats(control_plane, db):
    ids = [uuid.uuid4() for _ in range(7)]  # terminated: no worker starts machines for them
    for n, instance_id in enumerate(ids):
        await db.execute(
            "INSERT INTO instances (id, provider, instance_type, model, labels, created_at, status)"
            f" VALUES ($1, 'local', 'local-gpu', 'm', $2, now() - interval '{n} minutes', 'terminated')",
            instance_id, json.dumps({"team": "a" if n % 2 else "b"}))
        await db.execute(
            "INSERT INTO instance_state_history (instance_id, to_status, transition, actor)"
            " SELECT $1, 'provisioning', 'create', 'test' FROM generate_series(1, 5)", instance_id)

    async with control_plane.client() as client:
        seen, cursor = [], None
        while True:
            page = (await client.get("/v1/instances", params={"limit": 3, **({"cursor": cursor} if cursor else {})})).json()
            seen += [item["id"] for item in page["items"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert seen == [str(i) for i in ids], "newest first, each once"
        labelled = (await client.get("/v1/instances", params={"label": "team=a"})).json()["items"]
        assert [i["id"] for i in labelled] == [str(ids[n]) for n in (1, 3, 5)]

        history, cursor = [], None
        while True:
            page = (await client.get(f"/v1/instances/{ids[0]}/history",
                                     params={"limit": 2, **({"cursor": cursor} if cursor else {})})).json()
            history += [item["id"] for item in page["items"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert len(history) == 5 and history == sorted(set(history))
