"""The agent's side of the API against a real server: signed requests (bad signatures, replays,
other instances' tokens, revoked credentials), heartbeat integrity verdicts and metrics, the
outbound command stream, join-token registration, and the release the control plane serves.

Fake agents here are plain HTTP clients at our own interface, signing with the agent's own
code (`worker_agent.reporting.RequestSigner`)."""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import httpx
import pytest
from httpx_sse import aconnect_sse

from control_plane.agent_release import current_release
from control_plane.agents import AgentIdentity
from control_plane.loops.scheduler import delete_old_rows
from control_plane.security import agent_token, digest
from tests.conftest import eventually
from worker_agent import signing

RELEASE = current_release()
GENUINE = {"version": RELEASE.version, "build_date": RELEASE.build_date, "checksum": RELEASE.sha256}
METRICS = {"gpus": [{"index": 0, "utilization_percent": 87, "memory_used_bytes": 1, "memory_total_bytes": 2}],
           "vllm": {"num_requests_running": 3, "num_requests_waiting": 1}}


async def booting_instance(db, control_plane, status: str = "booting") -> uuid.UUID:
    """An instance row as a provider create would leave it (no machine: a fake agent talks)."""
    instance_id = uuid.uuid4()
    token = agent_token(control_plane.runtime.agent_token_secret, instance_id)
    await db.execute(
        "INSERT INTO instances (id, provider, instance_type, model, status, agent_token_hash,"
        " boot_deadline_at, next_check_at) VALUES ($1, 'local', 'local-gpu', 'm', $2, $3,"
        " now() + interval '1 hour', now() + interval '1 hour')", instance_id, status, digest(token))
    return instance_id


def heartbeat(agent_info: dict = GENUINE, metrics: dict = METRICS) -> dict:
    return {"agent_info": agent_info, "engine": {"state": "running", "restarts": 0}, "metrics": metrics}


async def snapshot(db, instance_id) -> tuple:
    row = await db.fetchrow("SELECT status, last_heartbeat_at, agent_checksum, agent_integrity FROM instances"
                            " WHERE id = $1", instance_id)
    metrics = await db.fetchval("SELECT count(*) FROM instance_metrics WHERE instance_id = $1", instance_id)
    return tuple(row) + (metrics,)


# --- signed requests ---------------------------------------------------------------------------


async def test_signed_heartbeat_is_stored_with_its_metrics_series(control_plane, db):
    instance_id = await booting_instance(db, control_plane)
    async with control_plane.agent_client(instance_id) as agent:
        for _ in range(3):
            answer = await agent.post("/v1/agent/heartbeat", json=heartbeat())
            assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": True, "status": "booting", "integrity": "verified"}
    rows = await db.fetch("SELECT gpus, vllm, engine FROM instance_metrics WHERE instance_id = $1", instance_id)
    assert len(rows) == 3
    assert json.loads(rows[0]["gpus"])[0]["utilization_percent"] == 87
    assert json.loads(rows[0]["vllm"]) == {"num_requests_running": 3, "num_requests_waiting": 1}
    async with control_plane.client() as admin:
        shown = (await admin.get(f"/v1/instances/{instance_id}")).json()
        series = (await admin.get(f"/v1/instances/{instance_id}/metrics", params={"limit": 2})).json()
    assert shown["agent"]["integrity"] == "verified" and shown["metrics"]["vllm"]["num_requests_waiting"] == 1
    assert len(series["items"]) == 2 and series["items"][0]["engine"]["state"] == "running"


async def test_tampered_replayed_stale_and_foreign_requests_are_refused(control_plane, db):
    instance_id = await booting_instance(db, control_plane)
    other_id = await booting_instance(db, control_plane)
    token = agent_token(control_plane.runtime.agent_token_secret, instance_id)
    body = json.dumps(heartbeat()).encode()
    path = "/v1/agent/heartbeat"
    before = await snapshot(db, instance_id)

    async def post(headers: dict, content: bytes = body) -> httpx.Response:
        async with httpx.AsyncClient(base_url=control_plane.url, timeout=10) as client:
            return await client.post(path, content=content,
                                     headers={**headers, "Content-Type": "application/json"})

    signed = signing.sign(token, str(instance_id), "POST", path, body)
    cases = {
        "no signature": ({}, body, "unsigned agent request"),
        "bearer token instead of a signature": ({"Authorization": f"Bearer {token}"}, body, "unsigned"),
        "body changed after signing": (signed, body.replace(b"87", b"88"), "bad agent request signature"),
        "signature for another path": (signing.sign(token, str(instance_id), "POST", "/v1/agent/events", body),
                                       body, "bad agent request signature"),
        "another instance's token": (signing.sign(agent_token(control_plane.runtime.agent_token_secret, other_id),
                                                  str(instance_id), "POST", path, body), body, "bad agent request signature"),
        "a guessed token": (signing.sign("cpa_" + "0" * 64, str(instance_id), "POST", path, body), body,
                            "bad agent request signature"),
        "stale timestamp": (signing.sign(token, str(instance_id), "POST", path, body, now=time.time() - 3600),
                            body, "away from the control plane's clock"),
        "unknown instance": (signing.sign(token, str(uuid.uuid4()), "POST", path, body), body,
                             "unknown instance or revoked"),
        "short nonce": (signing.sign(token, str(instance_id), "POST", path, body, nonce="abc"), body, "X-Agent-Nonce"),
    }
    for name, (headers, content, message) in cases.items():
        response = await post(headers, content)
        assert response.status_code == 401, name
        assert message in response.json()["detail"], (name, response.text)
        assert token not in response.text
    assert await snapshot(db, instance_id) == before, "a refused request changed nothing"

    first = await post(signed)
    assert first.status_code == 200
    replay = await post(signed)
    assert replay.status_code == 401 and "replayed" in replay.json()["detail"]
    assert await db.fetchval("SELECT count(*) FROM instance_metrics WHERE instance_id = $1", instance_id) == 1


async def test_revoking_a_credential_stops_its_heartbeats_at_once(control_plane, db):
    instance_id = await booting_instance(db, control_plane, status="ready")
    async with control_plane.agent_client(instance_id) as agent, control_plane.client() as admin:
        assert (await agent.post("/v1/agent/heartbeat", json=heartbeat())).status_code == 200  # cached now
        revoked = await admin.post(f"/v1/instances/{instance_id}/revoke-credential")
        assert revoked.status_code == 200
        beat = await agent.post("/v1/agent/heartbeat", json=heartbeat())
        assert beat.status_code == 401 and "revoked" in beat.json()["detail"]
        # Another replica's cache still trusts the token: the statement itself refuses.
        token = agent_token(control_plane.runtime.agent_token_secret, instance_id)
        control_plane.runtime.agent_token_cache[instance_id] = (time.monotonic(), AgentIdentity(instance_id, token))
        cached = await agent.post("/v1/agent/heartbeat", json=heartbeat())
        assert cached.status_code == 409 and "revoked" in cached.json()["detail"]
    assert await db.fetchval("SELECT count(*) FROM instance_metrics WHERE instance_id = $1", instance_id) == 1
    events = await db.fetch("SELECT type FROM events WHERE instance_id = $1", instance_id)
    assert "instance.credential_revoked" in [e["type"] for e in events]


# --- integrity ---------------------------------------------------------------------------------


async def test_a_mismatching_agent_is_flagged_once_and_not_routable(control_plane, db):
    instance_id = await booting_instance(db, control_plane, status="ready")
    tampered = {**GENUINE, "checksum": hashlib.sha256(b"tampered").hexdigest()}
    async with control_plane.agent_client(instance_id) as agent, control_plane.client() as admin:
        assert (await agent.post("/v1/agent/heartbeat", json=heartbeat())).json()["integrity"] == "verified"
        assert (await admin.get(f"/v1/instances/{instance_id}")).json()["routable"] is True
        for _ in range(3):
            answer = await agent.post("/v1/agent/heartbeat", json=heartbeat(tampered))
            assert answer.json()["integrity"] == "mismatch"
        shown = (await admin.get(f"/v1/instances/{instance_id}")).json()
        assert shown["routable"] is False and shown["agent"]["integrity"] == "mismatch"
        assert tampered["checksum"][:12] in shown["agent"]["integrity_detail"]
        assert (await agent.post("/v1/agent/heartbeat", json=heartbeat())).json()["integrity"] == "verified"
        assert (await admin.get(f"/v1/instances/{instance_id}")).json()["routable"] is True
    actions = await db.fetch("SELECT action_type, status FROM instance_actions WHERE instance_id = $1 ORDER BY id",
                             instance_id)
    assert [tuple(a) for a in actions] == [
        ("AGENT_INTEGRITY_VERIFIED", "succeeded"), ("AGENT_INTEGRITY_MISMATCH", "failed"),
        ("AGENT_INTEGRITY_VERIFIED", "succeeded")]
    events = [json.loads(r["data"])["integrity"] for r in await db.fetch(
        "SELECT data FROM events WHERE instance_id = $1 AND type = 'instance.agent_integrity' ORDER BY id", instance_id)]
    assert events == ["verified", "mismatch", "verified"]


async def test_a_booting_instance_with_a_mismatching_agent_never_becomes_ready(control_plane, db):
    instance_id = await booting_instance(db, control_plane)
    await db.execute("UPDATE instances SET provider_instance_id = 'gone', next_check_at = now() WHERE id = $1",
                     instance_id)
    await db.execute(
        "INSERT INTO instance_actions (instance_id, action_type, status, finished_at) SELECT $1, s, 'succeeded', now()"
        " FROM unnest(ARRAY['PROVIDER_START', 'IP_ASSIGNED', 'HEALTH_CHECK_PASSED']) AS s", instance_id)
    async with control_plane.agent_client(instance_id) as agent:
        wrong = {**GENUINE, "version": "0.0.1"}
        assert (await agent.post("/v1/agent/heartbeat", json=heartbeat(wrong))).status_code == 200

    async def failed() -> bool:
        return await db.fetchval("SELECT count(*) FROM instance_state_history WHERE instance_id = $1"
                                 " AND transition = 'booting_to_startup_failed'", instance_id) == 1

    await eventually(failed, timeout=20, message="startup failed")
    reason = await db.fetchval("SELECT failure_reason FROM instances WHERE id = $1", instance_id)
    assert reason.startswith("Agent integrity check failed") and "0.0.1" in reason
    assert await db.fetchval("SELECT count(*) FROM instance_state_history WHERE instance_id = $1"
                             " AND to_status = 'ready'", instance_id) == 0


# --- outbound command stream -----------------------------------------------------------------


async def commands(source):
    async for event in source.aiter_sse():
        if event.event == "command":
            yield json.loads(event.data)



async def test_commands_reach_the_agent_over_its_own_stream_and_acks_are_idempotent(control_plane, db):
    instance_id = await booting_instance(db, control_plane, status="ready")
    async with control_plane.client() as admin, control_plane.agent_client(instance_id, timeout=30) as agent:
        early = (await admin.post(f"/v1/instances/{instance_id}/agent-commands",
                                  json={"kind": "restart_engine", "reason": "test"})).json()["id"]
        received = []
        async with aconnect_sse(agent, "GET", "/v1/agent/commands") as source:
            events = commands(source)
            received.append(await anext(events))  # queued before we connected
            later = (await admin.post(f"/v1/instances/{instance_id}/agent-commands",
                                      json={"kind": "upgrade"})).json()["id"]
            received.append(await anext(events))  # live
        assert [(c["id"], c["kind"]) for c in received] == [(early, "restart_engine"), (later, "upgrade")]

        ack = await agent.post(f"/v1/agent/commands/{early}/ack", json={"outcome": "done", "detail": "restarted"})
        assert ack.json() == {"recorded": True}
        again = await agent.post(f"/v1/agent/commands/{early}/ack", json={"outcome": "failed"})
        assert again.json() == {"recorded": False}
        async with aconnect_sse(agent, "GET", "/v1/agent/commands") as source:
            redelivered = await anext(commands(source))
        assert redelivered["id"] == later, "unacknowledged commands come again, acknowledged ones not"
        listed = (await admin.get(f"/v1/instances/{instance_id}/agent-commands")).json()["items"]
    assert {(c["kind"], c["outcome"], c["detail"]) for c in listed} == {
        ("restart_engine", "done", "restarted"), ("upgrade", None, None)}

    other_id = await booting_instance(db, control_plane, status="ready")
    async with control_plane.agent_client(other_id) as intruder:
        stolen = await intruder.post(f"/v1/agent/commands/{later}/ack", json={"outcome": "done"})
        assert stolen.status_code == 404
    assert await db.fetchval("SELECT acked_at FROM agent_commands WHERE id = $1", uuid.UUID(later)) is None


async def test_commands_are_refused_for_instances_that_cannot_take_them(control_plane, db):
    instance_id = await booting_instance(db, control_plane, status="terminated")
    async with control_plane.client() as admin:
        refused = await admin.post(f"/v1/instances/{instance_id}/agent-commands", json={"kind": "drain"})
        assert refused.status_code == 409 and "terminated" in refused.json()["detail"]
        bad = await admin.post(f"/v1/instances/{instance_id}/agent-commands", json={"kind": "rm -rf"})
        assert bad.status_code == 400
        missing = await admin.post(f"/v1/instances/{uuid.uuid4()}/agent-commands", json={"kind": "drain"})
        assert missing.status_code == 404
    assert await db.fetchval("SELECT count(*) FROM agent_commands") == 0


# --- registration --------------------------------------------------------------------------------


async def test_a_join_token_registers_one_host_once(control_plane, db):
    async with control_plane.client() as admin:
        created = (await admin.post("/v1/join-tokens", json={
            "name": "rack-7", "model": "Qwen/Qwen2.5-0.5B-Instruct", "instance_type": "4xL40S",
            "model_spec": {"tensor_parallel_size": 4, "max_model_len": 8192, "extra_args": ["--enforce-eager"]},
            "labels": {"site": "lyon"}})).json()
    token = created["token"]
    assert token.startswith("cpj_") and token in created["install_command"]
    assert await db.fetchval("SELECT count(*) FROM join_tokens WHERE token_hash = $1", digest(token)) == 1
    assert await db.fetchval("SELECT count(*) FROM join_tokens WHERE token_hash = $1", token) == 0

    body = {"hostname": "gpu-node-1", "address": "10.0.0.7", "gpus": ["NVIDIA L40S"] * 4}
    async with httpx.AsyncClient(base_url=control_plane.url, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}) as host:
        registered = await host.post("/v1/agent/register", json=body)
        assert registered.status_code == 201, registered.text
        again = await host.post("/v1/agent/register", json=body)
        assert again.status_code == 401 and "already used" in again.json()["detail"]
    answer = registered.json()
    env = answer["env"]
    instance_id = uuid.UUID(answer["instance_id"])
    assert env["WORKER_AGENT_INSTANCE_ID"] == str(instance_id)
    assert env["WORKER_AGENT_TENSOR_PARALLEL_SIZE"] == "4" and env["WORKER_AGENT_MAX_MODEL_LEN"] == "8192"
    assert env["WORKER_AGENT_VLLM_ARGS"] == "--enforce-eager"
    row = await db.fetchrow("SELECT * FROM instances WHERE id = $1", instance_id)
    assert (row["provider"], row["status"], row["instance_type"], row["ip"], row["progress"]) == (
        "onprem", "booting", "4xL40S", "10.0.0.7", 50)
    assert json.loads(row["labels"]) == {"site": "lyon"}
    assert row["billed_from"] is not None, "its hours count from the join (no price: the owner's machine)"
    async with control_plane.agent_client(instance_id, token=env["WORKER_AGENT_TOKEN"]) as agent:
        assert (await agent.post("/v1/agent/heartbeat", json=heartbeat())).status_code == 200
    async with control_plane.client() as admin:
        listed = (await admin.get("/v1/join-tokens")).json()["items"]
        assert [(t["name"], t["instance_id"]) for t in listed] == [("rack-7", str(instance_id))]
        refused = await admin.post("/v1/instances", json={"provider": "onprem", "instance_type": "4xL40S", "model": "m"})
        assert refused.status_code == 400 and "join token" in refused.text


@pytest.mark.parametrize("state", ["expired", "revoked", "unknown"])
async def test_expired_revoked_or_unknown_join_tokens_are_refused(control_plane, db, state):
    async with control_plane.client() as admin:
        created = (await admin.post("/v1/join-tokens", json={"name": "n", "model": "m"})).json()
        if state == "revoked":
            assert (await admin.delete(f"/v1/join-tokens/{created['id']}")).status_code == 204
    if state == "expired":
        await db.execute("UPDATE join_tokens SET expires_at = now() - interval '1 second'")
    token = created["token"] if state != "unknown" else "cpj_" + "x" * 43
    async with httpx.AsyncClient(base_url=control_plane.url, timeout=10) as host:
        refused = await host.post("/v1/agent/register", json={"hostname": "h"},
                                  headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401 and "join token unknown, already used, expired or revoked" in refused.text
    assert await db.fetchval("SELECT count(*) FROM instances") == 0


# --- the release served ------------------------------------------------------------------------


async def test_manifest_and_artifact_agree(control_plane):
    async with control_plane.client(key=None) as anonymous:
        manifest = (await anonymous.get("/v1/agent/manifest")).json()
        artifact = await anonymous.get(manifest["url"].removeprefix(control_plane.url))
        unknown = await anonymous.get("/v1/agent/artifact/worker_agent-0.0.0-py3-none-any.whl")
        script = await anonymous.get("/v1/agent/install.sh")
    assert artifact.status_code == 200 and hashlib.sha256(artifact.content).hexdigest() == manifest["sha256"]
    assert (manifest["version"], manifest["size"]) == (RELEASE.version, len(artifact.content))
    assert manifest["url"].startswith(control_plane.settings.agent_url)
    assert unknown.status_code == 404
    assert script.status_code == 200 and script.content.startswith(b"#!")


async def test_metrics_older_than_the_retention_are_pruned(control_plane, db):
    instance_id = await booting_instance(db, control_plane)
    await db.execute("INSERT INTO instance_metrics (instance_id, at, gpus, vllm, engine) SELECT $1,"
                     " now() - make_interval(hours => h), '[]', '{}', '{}' FROM generate_series(0, 9) AS h",
                     instance_id)
    deleted = await delete_old_rows(control_plane.runtime.sessions, "instance_metrics", 4.5 * 3600)
    assert deleted == 5
    assert await db.fetchval("SELECT count(*) FROM instance_metrics") == 5
