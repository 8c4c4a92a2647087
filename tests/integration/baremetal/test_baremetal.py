"""The `baremetal` provider against a real OpenSSH server on 127.0.0.1, and its host inventory
and admin API against real Postgres. No mocks: the SSH host-key check, SFTP, `sha256sum`,
`install.sh` and the worker agent all run for real.

There is no GPU and no systemd here, so the one full install (through the whole control plane)
runs `install.sh --no-systemd --no-gpu` into a temporary prefix: a real venv, pip, and the
agent on its simulated engine. Every other test stops before pip. Waits are bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import sys
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from adapters.baremetal import (
    AgentArtifact,
    BareMetalProvider,
    BootstrapFailed,
    ChecksumMismatch,
    HostKeyChanged,
    PreflightFailed,
)
from adapters.base import TAG_CLUSTER, TAG_INSTANCE, AuthError, MachineSpec, NoCapacity
from control_plane import hosts
from control_plane.agent_release import current_release
from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.providers import Providers
from tests.conftest import RunningControlPlane, eventually, free_port
from tests.e2e.test_install_script import alive, run_script, running_from
from tests.integration.baremetal.sshd import running_sshd, unavailable_reason

SCRIPT = Path(__file__).resolve().parents[3] / "deploy" / "install.sh"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
TYPE = "test-box"
TOKEN = "agent-token-must-never-show-0123456789"

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
async def sessions(settings):
    engine = make_engine(settings.database_url, pool_size=2)
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture
def healthz():
    """A URL whose /healthz answers 200: the control plane as the preflight sees it."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def host_fields(sshd, **overrides: Any) -> dict[str, Any]:
    fields = {"name": f"box-{uuid.uuid4().hex[:6]}", "address": "127.0.0.1", "port": sshd.port,
              "username": sshd.username, "private_key_ref": f"file:{sshd.client_key}",
              "host_key": sshd.host_key, "instance_type": TYPE, "gpus": ["simulated"],
              "hourly_price": 0.5, "currency": "EUR", "availability": [], "requires_gpu_check": False}
    return fields | overrides


def release(tamper: bool = False) -> AgentArtifact:
    r = current_release()
    content = r.artifact
    if tamper:  # one byte changed, the genuine checksum announced
        changed = bytearray(content)
        changed[len(changed) // 2] ^= 0x01
        content = bytes(changed)
    return AgentArtifact(content=content, sha256=r.sha256, filename=r.filename)


def make_provider(sessions, url: str, tmp_path: Path, **options: Any) -> BareMetalProvider:
    options = {"min_free_disk_gb": 0.01, "install_prefix": str(tmp_path / "agent"),
               "staging_dir": str(tmp_path / "staging"), "connect_timeout": 5,
               "extra_install_args": ["--no-systemd", "--no-gpu", "--python", sys.executable]} | options
    tampered = options.pop("tamper", False)
    return BareMetalProvider(hosts.PostgresHostInventory(sessions), lambda: release(tampered), SCRIPT,
                             url, cluster="test", **options)


def machine_spec(instance_id: str | None = None) -> MachineSpec:
    instance_id = instance_id or str(uuid.uuid4())
    return MachineSpec(instance_id=instance_id, instance_type=TYPE, zone=None, model=MODEL,
                       tags={TAG_CLUSTER: "test", TAG_INSTANCE: instance_id},
                       agent_env={"WORKER_AGENT_TOKEN": TOKEN, "WORKER_AGENT_INSTANCE_ID": instance_id,
                                  "WORKER_AGENT_NOTE": "it's \"quoted\" $HOME"})


# --- the whole path, through the control plane -----------------------------------------------

@pytest.mark.timeout(420)  # one full install: venv + pip
async def test_a_host_is_bootstrapped_to_ready_through_the_api_and_released_on_terminate(
        settings, sshd, sessions, tmp_path):
    prefix, staging = tmp_path / "agent", tmp_path / "staging"
    bm = hosts.baremetal_provider(
        sessions, settings, min_free_disk_gb=0.01, install_prefix=str(prefix), staging_dir=str(staging),
        extra_install_args=["--no-systemd", "--python", sys.executable,  # --no-gpu: from the host
                            "--env", "WORKER_AGENT_ENGINE=simulated", "--env", "WORKER_AGENT_SIM_BOOT_SECONDS=1",
                            "--env", f"WORKER_AGENT_PORT={free_port()}",
                            "--env", f"WORKER_AGENT_ENGINE_PORT={free_port()}"])
    base = Providers.from_settings(settings)
    providers = Providers({**{name: base.get(name) for name in base.names}, "baremetal": bm})
    try:
        async with RunningControlPlane(settings, providers) as cp, cp.client() as client:
            registered = await client.post("/v1/hosts", json=host_fields(sshd, name="gpu-box-1"))
            assert registered.status_code == 201, registered.text
            host = registered.json()
            assert host["claimed_by"] is None and host["port"] == sshd.port

            created = await client.post("/v1/instances", json={
                "provider": "baremetal", "instance_type": TYPE, "model": MODEL})
            assert created.status_code == 202, created.text
            instance_id = created.json()["id"]

            async def ready():
                answer = await client.get(f"/v1/instances/{instance_id}")
                if answer.status_code == 404:
                    return None  # the create command is not applied yet
                shown = answer.json()
                if shown["status"] in ("startup_failed", "terminating", "terminated"):
                    raise AssertionError(f"instance failed: {shown.get('failure_reason')}")
                return shown if shown["status"] == "ready" else None

            shown = await with_logs(staging, prefix, eventually(
                ready, timeout=300, interval=0.5, message="baremetal instance ready"))
            assert shown["agent"]["integrity"] == "verified"
            assert shown["ip"] == "127.0.0.1"
            assert shown["provider_instance_id"] == f"host:{host['id']}:{instance_id}"
            claimed = (await client.get(f"/v1/hosts/{host['id']}")).json()
            assert claimed["claimed_by"] == instance_id

            # The settings went to the host, and only there: mode 600 in the prefix, the
            # staged copy deleted once installed, the token in no log.
            env_file = prefix / "agent.env"
            assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
            assert not (staging / instance_id / "agent.env").exists()
            install_log = (staging / instance_id / "install.log").read_text()
            assert "Verified sha256" in install_log
            token = [line for line in env_file.read_text().splitlines()
                     if line.startswith("WORKER_AGENT_TOKEN=")][0].split("=", 1)[1].strip("'")
            assert token not in install_log and token not in (prefix / "agent.log").read_text()
            agent_pid = int((prefix / "agent.pid").read_text())
            assert alive(agent_pid)
            await bm.start(shown["provider_instance_id"])  # started already: nothing happens
            assert int((prefix / "agent.pid").read_text()) == agent_pid
            assert (await bm.describe(shown["provider_instance_id"])).state == "running"

            refused = await client.delete(f"/v1/hosts/{host['id']}")
            assert refused.status_code == 409 and "terminate that instance first" in refused.json()["detail"]

            assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202

            async def terminated():
                return (await client.get(f"/v1/instances/{instance_id}")).json()["status"] == "terminated"

            await with_logs(staging, prefix, eventually(
                terminated, timeout=90, interval=0.5, message="baremetal instance terminated"))
            released = (await client.get(f"/v1/hosts/{host['id']}")).json()
            assert released["claimed_by"] is None and released["claimed_at"] is None
            assert not alive(agent_pid)
            assert running_from(prefix) == []
            assert not (prefix / "venv").exists() and not env_file.exists()
            assert not staging.exists()  # staging files (and any settings) removed
            assert (await client.delete(f"/v1/hosts/{host['id']}")).status_code == 204
    finally:
        await run_script(SCRIPT.read_bytes(), "--uninstall", "--no-systemd", "--prefix", str(prefix))
        for pid in running_from(prefix):  # the fallback: nothing the test started outlives it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- refusals, each before anything ran --------------------------------------------------------

async def test_a_tampered_artifact_is_refused_on_the_host_and_nothing_runs(sshd, sessions, healthz, tmp_path):
    await hosts.register_host(sessions, host_fields(sshd))
    bm = make_provider(sessions, healthz, tmp_path, tamper=True)
    spec = machine_spec()
    machine = await bm.create(spec)
    assert machine.state == "stopped" and machine.ip == "127.0.0.1"
    staged = tmp_path / "staging" / spec.instance_id
    assert stat.S_IMODE((staged / "agent.env").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "staging").stat().st_mode) == 0o700
    assert "WORKER_AGENT_NOTE='it'\\''s \"quoted\" $HOME'" in (staged / "agent.env").read_text()

    with pytest.raises(ChecksumMismatch) as refused:
        await bm.start(machine.provider_instance_id)
    message = str(refused.value)
    assert "agent artifact checksum mismatch" in message and "nothing was run" in message
    tampered = hashlib.sha256(release(tamper=True).content).hexdigest()
    assert f"expected sha256 {current_release().sha256}" in message and tampered in message
    assert sorted(p.name for p in staged.iterdir()) == ["agent.env", "install.sh"]  # wheel deleted
    assert not (tmp_path / "agent").exists()
    assert (await bm.describe(machine.provider_instance_id)).state == "stopped"

    await bm.terminate(machine.provider_instance_id)
    assert not (tmp_path / "staging").exists()
    assert await hosts.PostgresHostInventory(sessions).list_claimed() == []
    assert (await bm.describe(machine.provider_instance_id)).state == "terminated"
    await bm.terminate(machine.provider_instance_id)  # released already: nothing to do


async def test_a_failed_install_is_reported_with_its_log(sshd, sessions, healthz, tmp_path):
    await hosts.register_host(sessions, host_fields(sshd))
    bm = make_provider(sessions, healthz, tmp_path, extra_install_args=[
        "--no-systemd", "--no-gpu", "--python", "/nonexistent/python3"])
    machine = await bm.create(machine_spec())
    await bm.start(machine.provider_instance_id)

    async def failed() -> str | None:
        try:
            state = (await bm.describe(machine.provider_instance_id)).state
        except BootstrapFailed as exc:
            return str(exc)
        assert state == "starting", state
        return None

    message = await eventually(failed, timeout=30, interval=0.2, message="install failure reported")
    assert "agent install on host" in message and "failed (exit status 1)" in message
    assert "Python interpreter '/nonexistent/python3' not found" in message  # the log's last lines
    assert TOKEN not in message
    await bm.terminate(machine.provider_instance_id)
    assert not (tmp_path / "agent").exists() and not (tmp_path / "staging").exists()
    assert await bm.describe(f"host:{uuid.uuid4()}:{uuid.uuid4()}") is None  # no such host


async def test_install_script_refuses_a_local_artifact_that_does_not_match(tmp_path):
    wheel = tmp_path / current_release().filename
    wheel.write_bytes(release(tamper=True).content)
    prefix = tmp_path / "agent"
    common = ["--control-plane", "http://127.0.0.1:9", "--token", "cpj_never_sent", "--no-systemd",
              "--no-gpu", "--prefix", str(prefix), "--python", sys.executable]
    result = await run_script(SCRIPT.read_bytes(), *common, "--artifact", str(wheel),
                              "--sha256", current_release().sha256)
    assert result.returncode != 0
    assert "checksum mismatch" in result.stderr and "nothing was installed" in result.stderr
    assert not prefix.exists()
    missing = await run_script(SCRIPT.read_bytes(), *common, "--artifact", str(wheel))
    assert missing.returncode != 0 and "--artifact needs --sha256" in missing.stderr
    bad = await run_script(SCRIPT.read_bytes(), *common, "--sha256", "abc")
    assert bad.returncode != 0 and "--sha256 must be 64 hexadecimal digits" in bad.stderr
    assert not prefix.exists()


async def test_a_changed_host_key_is_refused_with_both_fingerprints(sshd, sessions, healthz, tmp_path):
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    await hosts.register_host(sessions, host_fields(sshd, host_key=other))
    bm = make_provider(sessions, healthz, tmp_path)
    with pytest.raises(HostKeyChanged) as refused:
        await bm.create(machine_spec())
    message = str(refused.value)
    assert "host key" in message and "changed" in message and "update the host record" in message
    assert asyncssh.import_public_key(other).get_fingerprint() in message
    assert asyncssh.import_public_key(sshd.host_key).get_fingerprint() in message
    assert await hosts.PostgresHostInventory(sessions).list_claimed() == []  # the claim was given back
    assert not (tmp_path / "staging").exists()  # nothing was sent


async def test_a_refused_login_is_an_auth_error(sshd, sessions, healthz, tmp_path):
    stranger = tmp_path / "stranger_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    await hosts.register_host(sessions, host_fields(sshd, private_key_ref=str(stranger)))
    with pytest.raises(AuthError, match="refused SSH login"):
        await make_provider(sessions, healthz, tmp_path).create(machine_spec())


async def test_preflight_failures_say_what_is_missing(sshd, sessions, db, healthz, tmp_path):
    host = await hosts.register_host(sessions, host_fields(sshd, requires_gpu_check=True))
    bm = make_provider(sessions, healthz, tmp_path)
    machine = await bm.create(machine_spec())
    if shutil.which("nvidia-smi") is None:
        with pytest.raises(PreflightFailed, match="nvidia-smi not found on host .*: install the NVIDIA"
                                                  " driver, or register the host with requires_gpu_check false"):
            await bm.start(machine.provider_instance_id)
    await db.execute("UPDATE hosts SET requires_gpu_check = false WHERE id = $1", host["id"])

    with pytest.raises(PreflightFailed, match=r"GB free on the filesystem of .*; the agent and its"
                                              r" model cache need at least 1e\+09 GB"):
        await make_provider(sessions, healthz, tmp_path, min_free_disk_gb=1e9).start(machine.provider_instance_id)

    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PreflightFailed, match=f"cannot reach the control plane at {nobody}/healthz"):
        await make_provider(sessions, nobody, tmp_path).start(machine.provider_instance_id)

    staged = tmp_path / "staging" / machine.provider_instance_id.rsplit(":", 1)[1]
    assert sorted(p.name for p in staged.iterdir()) == ["agent.env"]  # nothing copied, nothing run
    assert not (tmp_path / "agent").exists()
    await bm.terminate(machine.provider_instance_id)


# --- inventory ---------------------------------------------------------------------------------

async def test_claims_are_idempotent_exclusive_and_respect_availability(sshd, sessions, db):
    inventory = hosts.PostgresHostInventory(sessions)
    now = datetime.now(UTC)
    today = hosts.DAYS[now.weekday()]
    tomorrow = hosts.DAYS[(now.weekday() + 1) % 7]
    await hosts.register_host(sessions, host_fields(sshd, name="a-closed", hourly_price=0.1, availability=[
        {"days": [tomorrow], "start": "00:00", "end": "00:01"}]))
    await hosts.register_host(sessions, host_fields(sshd, name="b-cheap", hourly_price=1, availability=[
        {"days": [today], "start": "00:00", "end": "24:00"}]))
    await hosts.register_host(sessions, host_fields(sshd, name="c-dear", hourly_price=2))

    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    claims = await asyncio.gather(inventory.claim(first, TYPE), inventory.claim(second, TYPE))
    assert sorted(c.name for c in claims) == ["b-cheap", "c-dear"]  # never the same host twice
    again = await inventory.claim(first, TYPE)
    assert again.claimed_by == first and again.id == claims[0].id  # idempotent
    with pytest.raises(NoCapacity) as none:
        await inventory.claim(str(uuid.uuid4()), TYPE)
    assert str(none.value) == (f"no free baremetal host of type {TYPE!r} now (3 registered: 2 claimed,"
                               " 0 disabled, 1 outside their availability window)")
    with pytest.raises(NoCapacity, match="no baremetal host of type 'h100x8' is registered"):
        await inventory.claim(str(uuid.uuid4()), "h100x8")

    offers = await make_provider(sessions, "http://127.0.0.1:9", Path("/nonexistent")).list_offers()
    assert [(o.instance_type, o.gpus, o.gpu_model, o.hourly_price) for o in offers] == [(TYPE, 1, "simulated", 0.1)]
    bm = make_provider(sessions, "http://127.0.0.1:9", Path("/nonexistent"))
    assert [m.tags[TAG_INSTANCE] for m in await bm.list_by_tags({TAG_INSTANCE: first})] == [first]
    assert len(await bm.list_by_tags({TAG_CLUSTER: "test"})) == 2

    await inventory.release(first)
    await inventory.release(first)  # twice: nothing to do
    assert {h.claimed_by for h in await inventory.list_claimed()} == {second}
    assert (await db.fetchval("SELECT count(*) FROM hosts WHERE claimed_by IS NULL")) == 2


def test_availability_windows():
    monday_noon = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)  # a Monday
    sunday_late = datetime(2026, 11, 29, 23, 30, tzinfo=UTC)
    assert hosts.in_window([], monday_noon)
    assert hosts.in_window([{"days": ["mon"], "start": "09:00", "end": "17:00"}], monday_noon)
    assert not hosts.in_window([{"days": ["tue"], "start": "09:00", "end": "17:00"}], monday_noon)
    assert not hosts.in_window([{"days": ["mon"], "start": "12:01", "end": "24:00"}], monday_noon)
    overnight = [{"days": ["sun"], "start": "22:00", "end": "06:00"}]  # into Monday morning
    assert hosts.in_window(overnight, sunday_late)
    assert hosts.in_window(overnight, datetime(2026, 11, 30, 5, 59, tzinfo=UTC))
    assert not hosts.in_window(overnight, datetime(2026, 11, 30, 6, 0, tzinfo=UTC))


# --- admin API ---------------------------------------------------------------------------------

async def test_host_api_validates_what_owners_send(control_plane, sshd, tmp_path):
    not_a_key = tmp_path / "not-a-key"
    not_a_key.write_text("SECRET-CONTENT-do-not-echo\n")
    async with control_plane.client() as client:
        async def refused(field: str, **overrides: Any) -> str:
            answer = await client.post("/v1/hosts", json=host_fields(sshd, **overrides))
            assert answer.status_code == 400, answer.text
            assert "SECRET-CONTENT" not in answer.text
            return str(answer.json().get("extra"))

        assert "host_key is not an OpenSSH public key line" in await refused("host_key", host_key="ssh-ed25519 bogus")
        assert f"{tmp_path}/missing does not exist" in await refused("private_key_ref",
                                                                     private_key_ref=f"file:{tmp_path}/missing")
        assert "is not a private key" in await refused("private_key_ref", private_key_ref=str(not_a_key))
        await refused("private_key_ref", private_key_ref="file:relative/key")  # the schema's pattern
        assert "port" in await refused("port", port=0)
        assert "would be empty" in await refused(
            "availability", availability=[{"days": ["mon"], "start": "08:00", "end": "08:00"}])
        await refused("availability", availability=[{"days": ["monday"], "start": "08:00", "end": "09:00"}])
        await refused("availability", availability=[{"days": ["mon"], "start": "8:00", "end": "25:00"}])

        fields = host_fields(sshd, name="api-box", availability=[
            {"days": ["mon", "tue"], "start": "22:00", "end": "06:00"},
            {"days": list(hosts.DAYS), "start": "00:00", "end": "24:00"}])
        created = await client.post("/v1/hosts", json=fields)
        assert created.status_code == 201, created.text
        host = created.json()
        assert host["availability"] == fields["availability"] and host["hourly_price"] == 0.5
        duplicate = await client.post("/v1/hosts", json=fields)
        assert duplicate.status_code == 409 and "registered already" in duplicate.json()["detail"]
        assert [h["name"] for h in (await client.get("/v1/hosts")).json()["items"]] == ["api-box"]

        instance_id = str(uuid.uuid4())
        await hosts.PostgresHostInventory(control_plane.runtime.sessions).claim(instance_id, TYPE)
        assert (await client.get(f"/v1/hosts/{host['id']}")).json()["claimed_by"] == instance_id
        busy = await client.delete(f"/v1/hosts/{host['id']}")
        assert busy.status_code == 409 and instance_id in busy.json()["detail"]
        await hosts.PostgresHostInventory(control_plane.runtime.sessions).release(instance_id)
        assert (await client.delete(f"/v1/hosts/{host['id']}")).status_code == 204
        assert (await client.get(f"/v1/hosts/{host['id']}")).status_code == 404
        assert (await client.delete(f"/v1/hosts/{host['id']}")).status_code == 404

    async with control_plane.client(key=None) as anonymous:
        assert (await anonymous.get("/v1/hosts")).status_code == 401


async def test_hosts_cli_adds_lists_and_removes(control_plane, sshd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_")}
    env |= {"CP_API_URL": control_plane.url, "CP_API_KEY": control_plane.admin_key,
            "CP_DATA_DIR": "/nonexistent", "COLUMNS": "200"}

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "control-plane"), "hosts", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 45)
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await cli("add", "--name", "cli-box", "--address", "127.0.0.1", "--port", str(sshd.port),
                               "--username", sshd.username, "--key", str(sshd.client_key),
                               "--host-key", sshd.host_key, "--instance-type", TYPE, "--gpu", "L4",
                               "--gpu", "L4", "--price", "1.25", "--window", "mon,fri 08:00-18:00")
    assert code == 0, err
    host_id = out.strip().splitlines()[-1]
    code, out, _ = await cli("list", "--json")
    [host] = json.loads(out)["items"]
    assert (host["id"], host["gpus"], host["hourly_price"]) == (host_id, ["L4", "L4"], 1.25)
    assert host["availability"] == [{"days": ["mon", "fri"], "start": "08:00", "end": "18:00"}]
    code, _, err = await cli("add", "--name", "bad", "--address", "127.0.0.1", "--username", "root",
                             "--key", "/nonexistent/key", "--host-key", sshd.host_key, "--instance-type", TYPE)
    assert code == 2 and "private_key_ref: /nonexistent/key does not exist" in err
    code, _, err = await cli("remove", host_id)
    assert code == 0, err
    code, out, _ = await cli("list")
    assert code == 0 and "cli-box" not in out


# --- helpers -----------------------------------------------------------------------------------

async def with_logs(staging: Path, prefix: Path, wait):
    """Await `wait`; on failure, show the install and agent logs (the first places to look)."""
    try:
        return await wait
    except AssertionError as exc:
        parts = [str(exc)]
        for log in [*staging.glob("*/install.log"), *staging.glob("*/uninstall.log"), prefix / "agent.log"]:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else "(none)"
            parts.append(f"--- {log} (last lines) ---\n{tail}")
        raise AssertionError("\n".join(parts)) from None
