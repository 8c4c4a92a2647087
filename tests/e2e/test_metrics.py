"""`GET /metrics` against a real server: counters moved by a lifecycle on the `local` provider,
fleet gauges computed from Postgres (and left out, not stale, without it), rejected heartbeats
by reason, transitions counted only once committed, and the monitoring files in `deploy/monitoring/` reading only series that exist.

The registry is process-wide and other tests move it too: counters are compared as deltas
between two scrapes of the same test."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from httpx_sse import aconnect_sse
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from control_plane import metrics
from control_plane.agent_release import current_release
from control_plane.api_keys import create_api_key
from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.lifecycle.states import Status
from control_plane.lifecycle.transitions import transition
from control_plane.security import agent_token, digest
from tests.conftest import RunningControlPlane, eventually, free_port
from worker_agent import signing

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RELEASE = current_release()
HEARTBEAT = {"agent_info": {"version": RELEASE.version, "build_date": RELEASE.build_date,
                            "checksum": RELEASE.sha256}, "engine": {"state": "running"}, "metrics": {}}
PROMETHEUS_OWN = {"up"}
"""Series Prometheus makes itself about a scrape, not read from /metrics."""


class Scrape:
    """One parsed exposition: samples by name and labels, and the metric families."""

    def __init__(self, exposition: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(exposition)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]

    def matching(self, name: str, matchers: list[tuple[str, str, str]]) -> list:
        return [s for s in self.samples if s.name == name and all(
            _matches(s.labels.get(label, ""), op, value) for label, op, value in matchers)]

    def names(self) -> set[str]:
        """Every name an expression may use: samples', and those of families without samples
        yet (a counter's `_total`, a histogram's `_bucket`, `_count`, `_sum`)."""
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                    "gauge": ("",)}
        known = {s.name for s in self.samples}
        for name, family in self.families.items():
            known |= {name + suffix for suffix in suffixes.get(family.type, ("",))}
        return known


async def scrape(cp, key: str | None = "admin") -> Scrape:
    async with cp.client(key) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


async def insert_instance(db, cp, status: str, *, provider: str = "local", price: float | None = None,
                          currency: str | None = None, machine: bool = True, in_status: str = "0 seconds",
                          heartbeat_age: str | None = None) -> uuid.UUID:
    """An instance row as the lifecycle would leave it; no worker looks at it for an hour."""
    instance_id = uuid.uuid4()
    token = agent_token(cp.runtime.agent_token_secret, instance_id)
    await db.execute(
        "INSERT INTO instances (id, provider, instance_type, model, status, agent_token_hash,"
        " hourly_price, currency, provider_instance_id, status_changed_at, last_heartbeat_at,"
        " next_check_at) VALUES ($1, $2, 'local-gpu', 'm', $3, $4, $5, $6, $7,"
        " now() - $8::text::interval, now() - $9::text::interval, now() + interval '1 hour')",
        instance_id, provider, status, digest(token), price, currency,
        f"m-{instance_id.hex[:12]}" if machine else None, in_status, heartbeat_age)
    return instance_id


# --- the monitoring files read only series that exist (first: before anything happened) --------


SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "by", "without", "rate", "increase",
                "histogram_quantile", "and", "or", "unless", "on", "ignoring", "bool", "le"}


async def test_every_alert_reads_series_that_exist_before_anything_happened(control_plane):
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"][0]["rules"]
    fresh = await scrape(control_plane)
    alerts = {r["alert"] for r in rules}
    assert {"InstanceStuckProvisioning", "InstanceStuckBooting", "AgentHeartbeatsStale",
            "ProviderCircuitBreakerOpen", "CommandsDeadLettered", "OrphanedVolumesFound",
            "TerminationStuck", "OrphanMachinesFound", "ReconciliationFailing", "NoLeader"} <= alerts
    for rule in rules:
        assert rule["for"] and rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert len(rule["annotations"]["summary"]) > 10 and len(rule["annotations"]["description"]) > 80
        selectors = _selectors(rule["expr"])
        assert selectors, rule["alert"]
        for name, matchers in selectors:
            if name in PROMETHEUS_OWN:
                continue
            assert fresh.matching(name, matchers), f"{rule['alert']}: no series {name}{matchers}"


async def test_every_dashboard_query_reads_metrics_that_exist(control_plane):
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    known = (await scrape(control_plane)).names()
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["title"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = {name for name, _ in _selectors(target["expr"])}
            assert names, (panel["title"], target["expr"])
            missing = names - known
            assert not missing, f"{panel['title']}: {missing} not in /metrics"
            used |= names
    for wanted in ("cp_instances", "cp_cost_rate_per_hour", "cp_provider_calls_total",
                   "cp_provider_call_seconds_bucket", "cp_provider_breaker_state",
                   "cp_heartbeats_total", "cp_commands_total", "cp_lifecycle_step_seconds_bucket"):
        assert wanted in used, wanted


def test_prometheus_config_scrapes_with_a_key_file_and_loads_the_rules():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["credentials_file"]
    assert "credentials" not in job["authorization"], "the key stays out of the config"


# --- a lifecycle --------------------------------------------------------------------------------


async def test_a_lifecycle_moves_the_counters_and_the_fleet_gauges(control_plane):
    cp = control_plane
    before = await scrape(cp)
    async with cp.client() as client:
        created = await client.post("/v1/instances", json={
            "provider": "local", "instance_type": "local-gpu", "model": "meta-llama/Llama-3.2-1B-Instruct"})
        assert created.status_code == 202, created.text
        instance_id = created.json()["id"]

        async def status_is(wanted: str):
            return (await client.get(f"/v1/instances/{instance_id}")).json().get("status") == wanted

        await eventually(lambda: status_is("ready"), timeout=60, message="ready")

        async def heartbeat_counted():
            now = await scrape(cp)
            accepted = {"outcome": "accepted", "reason": ""}
            counted = now.value("cp_heartbeats_total", **accepted) > before.value("cp_heartbeats_total", **accepted)
            return now if counted else None

        ready = await eventually(heartbeat_counted, timeout=20, message="a heartbeat counted")
        assert ready.value("cp_instances", status="ready", provider="local", pool="") == 1
        assert ready.value("cp_instances", status="booting", provider="local", pool="") == 0
        assert ready.value("cp_cost_rate_per_hour", currency="EUR") == 0  # `local` is free

        assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202
        await eventually(lambda: status_is("terminated"), timeout=60, message="terminated")
    after = await scrape(cp)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("cp_commands_total", outcome="accepted") == 2  # create, terminate
    for outcome in ("rejected", "duplicate", "dead_lettered"):
        assert delta("cp_commands_total", outcome=outcome) == 0
    for source, target in (("provisioning", "booting"), ("booting", "ready"),
                           ("ready", "terminating"), ("terminating", "terminated")):
        assert delta("cp_transitions_total", from_status=source, to_status=target) == 1, (source, target)
    assert delta("cp_transitions_total", from_status="booting", to_status="startup_failed") == 0
    for step in ("PROVIDER_CREATE", "PROVIDER_START", "IP_ASSIGNED", "AGENT_INSTALLED", "ENGINE_STARTED",
                 "MODEL_LOADED", "WARMUP_DONE", "HEALTH_CHECK_PASSED", "READY"):
        assert delta("cp_lifecycle_step_seconds_count", step=step) == 1, step
    assert after.value("cp_lifecycle_step_seconds_count", step="PROVIDER_TERMINATE") >= 1
    # The simulated engine takes `local_boot_seconds` (1 s) to load its model.
    assert delta("cp_lifecycle_step_seconds_sum", step="MODEL_LOADED") > 0.5
    assert after.value("cp_instances", status="terminated", provider="local", pool="") == 1
    assert after.value("cp_instances", status="ready", provider="local", pool="") == 0
    assert after.value("cp_instances_stale_heartbeat") == 0


# --- fleet gauges ---------------------------------------------------------------------------------


@pytest.fixture
async def slow_heartbeats(settings):
    """A control plane whose agents beat every 30 s: stale means older than 90 s."""
    async with RunningControlPlane(dataclasses.replace(settings, agent_heartbeat_seconds=30)) as cp:
        yield cp


async def test_fleet_gauges_count_by_status_provider_and_cost_from_postgres(slow_heartbeats, db):
    cp = slow_heartbeats
    await insert_instance(db, cp, "ready", price=1.5, currency="EUR", heartbeat_age="10 seconds")
    await insert_instance(db, cp, "ready", price=2.0, currency="EUR", heartbeat_age="2 minutes")
    await insert_instance(db, cp, "ready", provider="gone", in_status="1 hour")  # never beat
    await insert_instance(db, cp, "booting", price=0.5, currency="USD", in_status="10 minutes")
    await insert_instance(db, cp, "provisioning", price=3.0, currency="EUR", machine=False,
                          in_status="2 minutes")
    await insert_instance(db, cp, "terminated", price=9.0, currency="EUR")
    await insert_instance(db, cp, "archived", price=9.0, currency="EUR")

    now = await scrape(cp)
    counts = {(s.labels["status"], s.labels["provider"]): s.value
              for s in now.samples if s.name == "cp_instances"}
    assert {k: v for k, v in counts.items() if v} == {
        ("ready", "local"): 2, ("ready", "gone"): 1, ("booting", "local"): 1,
        ("provisioning", "local"): 1, ("terminated", "local"): 1}
    assert counts[("draining", "local")] == 0, "every configured provider and status is a series"
    assert "archived" not in {status for status, _ in counts}
    assert all(s.labels["pool"] == "" for s in now.samples if s.name == "cp_instances")
    # Billed: machines that exist (a provider id) in an active status.
    assert now.value("cp_cost_rate_per_hour", currency="EUR") == pytest.approx(3.5)
    assert now.value("cp_cost_rate_per_hour", currency="USD") == pytest.approx(0.5)
    # Stale: older than 3 x 30 s, or no heartbeat since it became ready an hour ago.
    assert now.value("cp_instances_stale_heartbeat") == 2
    assert 600 <= now.value("cp_oldest_instance_in_status_seconds", status="booting") < 700
    assert 120 <= now.value("cp_oldest_instance_in_status_seconds", status="provisioning") < 200
    assert now.value("cp_oldest_instance_in_status_seconds", status="terminating") == 0
    assert now.value("cp_oldest_instance_in_status_seconds", status="draining") == 0

    await db.execute("UPDATE instances SET status = 'archived' WHERE status = 'ready'")
    later = await scrape(cp)
    assert later.value("cp_instances", status="ready", provider="local", pool="") == 0
    assert not later.matching("cp_instances", [("provider", "=", "gone")]), "gone series dropped"
    assert later.value("cp_instances_stale_heartbeat") == 0


async def test_feed_subscribers_follow_open_streams(control_plane):
    cp = control_plane

    async def subscribers() -> float:
        return (await scrape(cp)).value("cp_feed_subscribers")

    base = await subscribers()
    async with cp.client(timeout=httpx.Timeout(10, read=30)) as client:
        async with aconnect_sse(client, "GET", "/v1/events") as source:
            assert source.response.status_code == 200
            await eventually(lambda: _equals(subscribers(), base + 1), timeout=10,
                             message="subscriber counted")
    await eventually(lambda: _equals(subscribers(), base), timeout=10, message="subscriber gone")


# --- heartbeats -----------------------------------------------------------------------------------


async def test_heartbeats_are_counted_accepted_or_rejected_with_the_reason(control_plane, db):
    cp = control_plane
    instance_id = await insert_instance(db, cp, "booting")
    revoked_id = await insert_instance(db, cp, "ready")
    await db.execute("UPDATE instances SET credential_revoked_at = now() WHERE id = $1", revoked_id)
    token = agent_token(cp.runtime.agent_token_secret, instance_id)
    path = "/v1/agent/heartbeat"
    body = json.dumps(HEARTBEAT).encode()
    signed = signing.sign(token, str(instance_id), "POST", path, body)
    bad = json.dumps({"agent_info": {"version": "1"}}).encode()
    cases = [  # (reason, headers, body)
        ("bad_signature", signing.sign("cpa_" + "0" * 64, str(instance_id), "POST", path, body), body),
        ("stale", signing.sign(token, str(instance_id), "POST", path, body, now=time.time() - 3600), body),
        ("unknown", signing.sign(token, str(uuid.uuid4()), "POST", path, body), body),
        ("revoked", signing.sign(agent_token(cp.runtime.agent_token_secret, revoked_id), str(revoked_id),
                                 "POST", path, body), body),
        ("invalid", {}, body),
        ("invalid", signing.sign(token, str(instance_id), "POST", path, bad), bad),
        (None, signed, body),
        ("replay", signed, body),
    ]
    before = await scrape(cp)
    async with httpx.AsyncClient(base_url=cp.url, timeout=10) as client:
        for reason, headers, content in cases:
            response = await client.post(path, content=content,
                                         headers={**headers, "Content-Type": "application/json"})
            expected = 200 if reason is None else 400 if content is bad else 401
            assert response.status_code == expected, (reason, response.text)
            assert response.json().get("detail") or reason is None
    after = await scrape(cp)

    def delta(outcome: str, reason: str) -> float:
        labels = {"outcome": outcome, "reason": reason}
        return after.value("cp_heartbeats_total", **labels) - before.value("cp_heartbeats_total", **labels)

    assert delta("accepted", "") == 1
    assert {r: delta("rejected", r) for r in ("bad_signature", "stale", "unknown", "revoked", "invalid",
                                              "replay")} == {
        "bad_signature": 1, "stale": 1, "unknown": 1, "revoked": 1, "invalid": 2, "replay": 1}


async def test_other_agent_routes_do_not_count_as_heartbeats(control_plane, db):
    cp = control_plane
    instance_id = await insert_instance(db, cp, "booting")
    before = await scrape(cp)
    async with httpx.AsyncClient(base_url=cp.url, timeout=10) as client:
        refused = await client.post("/v1/agent/progress", json={"phase": "engine_started"})
        assert refused.status_code == 401
    async with cp.agent_client(instance_id) as agent:
        assert (await agent.post("/v1/agent/progress", json={"phase": "engine_started"})).status_code == 200
    after = await scrape(cp)
    heartbeats = [s for s in before.samples if s.name == "cp_heartbeats_total"]
    assert [after.value(s.name, **s.labels) for s in heartbeats] == [s.value for s in heartbeats]


# --- transitions count once committed --------------------------------------------------------------


async def test_a_rolled_back_transition_is_not_counted(control_plane, db):
    cp = control_plane
    instance_id = await insert_instance(db, cp, "booting")
    labels = {"from_status": "booting", "to_status": "ready"}
    before = (await scrape(cp)).value("cp_transitions_total", **labels)

    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with cp.runtime.sessions.begin() as session:
            assert await transition(session, instance_id, Status.BOOTING, Status.READY,
                                    reason="test", actor="test")
            raise Abort
    assert (await scrape(cp)).value("cp_transitions_total", **labels) == before
    assert await db.fetchval("SELECT status FROM instances WHERE id = $1", instance_id) == "booting"

    async with cp.runtime.sessions.begin() as session:
        assert await transition(session, instance_id, Status.BOOTING, Status.READY,
                                reason="test", actor="test")
        assert (await scrape(cp)).value("cp_transitions_total", **labels) == before, "not before commit"
    assert (await scrape(cp)).value("cp_transitions_total", **labels) == before + 1


async def test_without_postgres_the_fleet_gauges_are_left_out_not_stale():
    engine = make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    metrics.INSTANCES.labels("ready", "local", "").set(3)
    errors = REGISTRY.get_sample_value("cp_fleet_refresh_errors_total")
    try:
        await metrics.refresh_fleet(make_sessionmaker(engine), ["local"], 10.0)
    finally:
        await engine.dispose()
    assert REGISTRY.get_sample_value("cp_fleet_refresh_errors_total") == errors + 1
    exposition = Scrape(generate_latest().decode())
    assert not exposition.matching("cp_instances", [])
    assert not exposition.matching("cp_oldest_instance_in_status_seconds", [])


# --- access ---------------------------------------------------------------------------------------


async def test_metrics_need_a_key_and_a_read_key_is_enough(control_plane):
    cp = control_plane
    for key in (None, "cpk_not_a_key"):
        async with cp.client(key) as client:
            response = await client.get("/metrics")
        assert response.status_code == 401, key
        assert "cp_" not in response.text
    read_key = await create_api_key(cp.runtime.sessions, "prometheus", ["read"])
    assert (await scrape(cp, read_key)).value("cp_feed_subscribers") >= 0
    async with cp.client() as client:
        documented = (await client.get("/schema/openapi.json")).json()["paths"]["/metrics"]["get"]
    assert "401" in documented["responses"]


def _selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Metric names in a PromQL expression, with their label matchers (enough for ours: no
    strings outside matchers, durations in brackets)."""
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations, e.g. [5m], [$__rate_interval]
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    found = []
    for match in SELECTOR.finditer(expr):
        name, braces = match.group(1), match.group(2)
        if name in PROMQL_WORDS or re.fullmatch(r"[0-9.e]+", name) or expr[match.end():].lstrip().startswith("("):
            continue
        found.append((name, MATCHER.findall(braces or "")))
    return found


def _matches(actual: str, op: str, value: str) -> bool:
    if op == "=":
        return actual == value
    if op == "!=":
        return actual != value
    hit = re.fullmatch(value, actual) is not None
    return hit if op == "=~" else not hit


async def _equals(value, expected) -> bool:
    return await value == expected
