"""The faulty provider: a fleet of AWS instances created and terminated while EC2 misbehaves.

moto's EC2 sits behind the fault proxy. A seeded 30 % of the calls the lifecycle makes fail,
spread over what EC2 answers when it is unwell: server errors (500, 503), throttling
(`RequestLimitExceeded`, as 429 and as 503), capacity errors (`InsufficientInstanceCapacity`)
and answers slower than our call timeout. One instance type is sold out, so half the fleet
fails over to its second offer. Then, while the fleet waits for agents that never come, EC2
has an outage: it hangs (every answer too slow), still hangs when the breaker tries again, then
answers; the breaker must open, refuse calls, reopen on a failed trial and close once EC2
answers. Last, the whole fleet is terminated under the scattered faults.

What must hold whatever the faults did:

- every instance ends `terminated` within a bound; one that could not start says why, naming
  the provider's error, and tried every offer it had before giving up;
- moto holds no machine of ours that still runs, and never two machines for one instance
  (as EC2 would count them: see `provider_side`);
- RunInstances requests per instance stay within what the retry settings allow;
- `cp_provider_breaker_state` is seen OPEN during the outage, a trial call that fails opens it
  again, and every breaker is CLOSED at the end.

Invariants broken from the outage on are collected and reported together (one broken breaker
breaks termination too), each with what was seen. moto machines run no agent: instances stay
`booting` until they are terminated.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.aws import client_token
from adapters.base import TAG_CLUSTER, TAG_INSTANCE, CircuitOpen, ProviderError
from adapters.resilience import CLOSED, HALF_OPEN, OPEN
from tests.conftest import RunningControlPlane, eventually
from tests.e2e.test_aws_lifecycle import (
    EVERY_STATE,
    INSUFFICIENT_CAPACITY,
    aws_settings,
    machines_of,
)

pytestmark = pytest.mark.usefixtures("aws_env")

SEED = 7
FLEET = 20
SOLD_OUT = {"provider": "aws", "instance_type": "g6.xlarge", "zone": "us-east-1a"}
AVAILABLE = {"provider": "aws", "instance_type": "g5.xlarge"}
ANY_ZONE = "*"
"""The breaker of calls about existing machines and of creates without a zone (AwsProvider has
no `zone_of`): the one the termination traffic goes through."""

# Settings, each chosen to keep the test short while every mechanism still acts:
CALL_TIMEOUT = 2.0
"""`provider_call_timeout_seconds`: bounds each call and its in-call retries. Small, so a slow
answer costs 2 s, yet well above what moto needs (10-100 ms) on this loaded 2-core machine.
It is also botocore's connect and read timeout."""
SLOW = CALL_TIMEOUT + 0.25
"""How long a slow answer is held before the request is forwarded: just beyond the timeout
(botocore gives up reading it and retries; the late request still reaches moto)."""
RETRIES = 1
"""`provider_retries`: one in-call retry; botocore below already retries 3 times."""
MAX_ATTEMPTS = 3
"""`provider_max_attempts`: scattered faults rarely fail a start, and a start that keeps
failing gives up within seconds (the worker backs off 1-2 s, then 2-4 s)."""
THRESHOLD = 5
"""`breaker_failure_threshold`: botocore absorbs most scattered faults and other calls'
successes interleave, so 5 consecutive failures are rare outside the outage, which trips it
within one round of calls."""
RESET = 1.0
"""`breaker_reset_seconds`: an open breaker holds calls back briefly, then lets a trial through."""
POLL = 0.2
"""`worker_poll_seconds`: workers take up instances whose backoff ran out within 0.2 s."""
CONCURRENCY = 20
"""`worker_concurrency`: the whole fleet at once (the adapter gets as many threads, plus 8)."""
BOTOCORE_ATTEMPTS = 4
"""HTTP requests per SDK call: botocore `standard` mode, 3 retries (adapters/aws)."""

FAULT_SHARE = 0.30
ACTIONS = ("RunInstances", "DescribeInstances", "DescribeVolumes", "DescribeImages",
           "TerminateInstances", "DeleteVolume")
"""What the lifecycle calls. DescribeInstanceTypeOfferings is left alone: the API lists offers
once, for the first request (then cached), and a fault there only refuses that POST."""


def ec2_error(code: str, message: str) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
            f"<Code>{code}</Code><Message>{message}</Message></Error></Errors>"
            "<RequestID>cp-test-faulty</RequestID></Response>")


XML = {"Content-Type": "text/xml"}
SERVER_ERROR = {"status": 500, "body": ec2_error("InternalError", "An internal error has occurred"),
                "headers": XML}
UNAVAILABLE = {"status": 503, "body": ec2_error("Unavailable", "The service is unavailable"),
               "headers": XML}
THROTTLED_429 = {"status": 429, "body": ec2_error("RequestLimitExceeded", "Request limit exceeded."),
                 "headers": XML}
THROTTLED_503 = {"status": 503, "body": ec2_error("RequestLimitExceeded", "Request limit exceeded."),
                 "headers": XML}
NO_CAPACITY = {"status": 500, "body": INSUFFICIENT_CAPACITY, "headers": XML}
TOO_SLOW = {"delay_seconds": SLOW}

ERROR_NAMES = ("ProviderUnavailable", "RateLimited", "NoCapacity", "CircuitOpen", "timed out")


def fault_mix(action: str) -> list[tuple[str, dict, float]]:
    """(kind, rule arguments, share of the action's requests), the shares summing to 30 %.

    Slow answers are the fewest (2.5 %): each fails a whole call, where botocore absorbs most
    server errors and throttling by retrying them, and failures in a row back an instance off
    exponentially (1-2 s, 2-4 s, 4-8 s...), which 20 instances cannot afford often in a test of
    40 s. Capacity errors come mostly from the sold-out offer."""
    unit = FAULT_SHARE / 12
    if action == "RunInstances":
        mix = [("5xx", SERVER_ERROR, 3), ("5xx", UNAVAILABLE, 2), ("throttled", THROTTLED_429, 2),
               ("throttled", THROTTLED_503, 2), ("capacity", NO_CAPACITY, 2), ("timeout", TOO_SLOW, 1)]
    else:
        mix = [("5xx", SERVER_ERROR, 3), ("5xx", UNAVAILABLE, 3), ("throttled", THROTTLED_429, 2),
               ("throttled", THROTTLED_503, 3), ("timeout", TOO_SLOW, 1)]
    return [(kind, args, units * unit) for kind, args, units in mix]


def add_faults(proxy, seed: int) -> list[tuple[str, object]]:
    """The seeded fault rules, in order; each acts on its share of what earlier rules let pass."""
    rules = []
    for a, action in enumerate(ACTIONS):
        passed = 1.0
        for k, (kind, args, share) in enumerate(fault_mix(action)):
            rule = proxy.add_rule(contains=f"Action={action}&", fraction=share / passed,
                                  seed=seed * 1000 + a * 10 + k, **args)
            passed -= share
            rules.append((kind, rule))
    return rules


async def test_a_fleet_survives_a_faulty_provider(settings, ec2_proxy, ami, ec2):
    settings = aws_settings(
        settings, ec2_proxy, ami, provider_call_timeout_seconds=CALL_TIMEOUT,
        provider_retries=RETRIES, provider_max_attempts=MAX_ATTEMPTS,
        breaker_failure_threshold=THRESHOLD, breaker_reset_seconds=RESET,
        worker_poll_seconds=POLL, worker_concurrency=CONCURRENCY)
    sold_out = ec2_proxy.add_rule(contains="InstanceType=g6.xlarge", **NO_CAPACITY)
    faults = add_faults(ec2_proxy, SEED)
    problems: list[str] = []
    async with RunningControlPlane(settings) as cp, cp.client() as client:
        offers_of: dict[str, list[dict]] = {}
        for n in range(FLEET):
            offers = [SOLD_OUT, AVAILABLE] if n % 2 else [AVAILABLE]
            created = await client.post("/v1/instances", json={"model": "org/m", "offers": offers})
            assert created.status_code == 202, created.text
            offers_of[created.json()["id"]] = offers

        # 1. Creation under scattered faults, until each instance boots or has failed.
        started = await eventually(lambda: settled(client, offers_of), timeout=40, interval=0.2,
                                   message="every instance booting or failed")
        booted = {i["id"] for i in started if i["status"] == "booting"}
        assert booted, "scattered faults still let instances start"
        assert any(i["offer_index"] == 1 for i in started if i["id"] in booted), \
            "an instance failed over from the sold-out offer"
        assert sold_out.hits > 0, "capacity errors (the scattered ones on RunInstances are few)"
        for kind in ("5xx", "throttled", "timeout"):
            assert sum(r.hits for k, r in faults if k == kind) > 0, f"no {kind} fault was injected"
        share = sum(r.hits for _, r in faults) / faultable(ec2_proxy)
        assert 0.2 < share < 0.4, f"{share:.0%} of the calls failed, not about 30 %"
        problems += untried_offers(started, offers_of)

        # 2. An outage while the fleet waits for its agents: EC2 hangs (every answer too slow).
        # Calls made as a lifecycle step makes them must open the breaker: timeouts count.
        # (The outage is driven by such calls rather than by the fleet's termination: every
        # refused step raises an instance's backoff, 2^attempts s, so a fleet terminated through
        # an outage takes minutes to finish.) Only slow answers meanwhile: a scattered 5xx would
        # open it as well, hiding whether timeouts count.
        aws = cp.runtime.providers.get("aws")
        machine = next(i["provider_instance_id"] for i in started if i["id"] in booted)
        for _, rule in faults:
            ec2_proxy.remove_rule(rule)
        hanging = ec2_proxy.add_rule(**TOO_SLOW)
        refused_before = await calls_refused(client)
        if not await reached(lambda: opened_by_calls(aws, machine, client),
                             timeout=2 * CALL_TIMEOUT + 1, interval=0):
            problems.append(
                "a hanging EC2 never opened the breaker: every call timed out, but lifecycle"
                " steps bound each call with asyncio.wait_for(provider_call_timeout_seconds)"
                " around ResilientProvider, whose budget is the same value and starts later, so"
                " the call is cancelled before its own deadline and Breaker.failed() never runs"
                f" (breaker {await breaker_state(client)}, call outcomes {await outcomes(client)})")
            ec2_proxy.remove_rule(hanging)  # an outage of errors opens it, to test the rest
            down = ec2_proxy.add_rule(**UNAVAILABLE)
            await eventually(lambda: opened_by_calls(aws, machine, client), timeout=30,
                             interval=0, message="cp_provider_breaker_state OPEN in a 503 outage")
            ec2_proxy.remove_rule(down)
            hanging = ec2_proxy.add_rule(**TOO_SLOW)
        # (Within a reset period; had it passed, the probe was the trial, and the next refused.)
        assert await reached(lambda: refused(aws, machine), timeout=RESET + CALL_TIMEOUT + 2,
                             interval=0.05), "an open breaker refuses calls at once"
        assert await calls_refused(client) > refused_before, "refusals in cp_provider_calls_total"

        # 3. After breaker_reset_seconds one trial call goes through; EC2 still hangs, so the
        # trial times out and the breaker must open again, not stay half-open.
        await reached(lambda: trial_ran(aws, machine), timeout=2 * (RESET + CALL_TIMEOUT) + 2,
                      interval=0.05)
        after_trial = (await breaker_state(client)).get(ANY_ZONE)
        wedged = after_trial == HALF_OPEN
        if wedged:
            problems.append(
                "the breaker stays HALF_OPEN for good after its trial call timed out: the trial"
                " is cancelled (by the caller's wait_for, as every lifecycle step does) inside"
                " ResilientProvider._call; CancelledError is caught neither as a failure nor as"
                " a success, so Breaker._trial stays True and every later call is refused with"
                " CircuitOpen ('suspended for 0 s more') until the process restarts")
        elif after_trial != OPEN:
            problems.append(f"the breaker is {after_trial} after a trial call that timed out, not OPEN")

        # 4. EC2 answers again (with the scattered faults): the next trial closes the breaker.
        ec2_proxy.remove_rule(hanging)
        add_faults(ec2_proxy, SEED + 1)
        if not wedged and not await reached(lambda: closed_by_calls(aws, machine, client),
                                            timeout=RESET + 10, interval=0.1):
            problems.append(f"the breaker did not close once EC2 answered: {await breaker_state(client)}")

        # 5. Terminate the fleet under scattered faults. A wedged breaker refuses every call:
        # termination cannot finish, so there is no point waiting for it.
        for instance_id in offers_of:
            assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202
        ended = await reached(lambda: all_terminated(client, offers_of),
                              timeout=3 if wedged else 30, interval=0.2)
        if not ended:
            stuck = [f"{i['id']} ({i['status']})" for i in await instances(client, offers_of)
                     if i["status"] != "terminated"]
            problems.append(f"{len(stuck)} instances not terminated within the bound: {stuck}")
        elif not await reached(lambda: breakers_closed(client), timeout=10, interval=0.1):
            problems.append(f"breakers not CLOSED at the end: {await breaker_state(client)}")

        ended = ended or await instances(client, offers_of)
        for instance in ended:
            reason = instance["failure_reason"]
            if instance["id"] not in booted and not any(n in (reason or "") for n in ERROR_NAMES):
                problems.append(f"{instance['id']} failed without naming the provider's error:"
                                f" {reason!r}")

    problems += provider_side(ec2, settings.cluster_name, ec2_proxy, offers_of,
                              {i["id"]: i for i in ended}, booted)
    assert not problems, "\n- ".join(["the faulty provider broke invariants:", *problems])


def provider_side(ec2, cluster: str, proxy, offers_of: dict[str, list[dict]],
                  by_id: dict[str, dict], booted: set[str]) -> list[str]:
    """What moto and the proxy saw: machines left running, doubles, RunInstances per instance.

    Read with EC2's `ClientToken` in mind, which moto ignores. A create we stopped waiting for
    (timed out) may still be retried by botocore in its worker thread and land after our next
    create found nothing and launched a machine: moto then holds two, where EC2 returns the
    first machine for the second request (same token, same parameters). So machines of one
    instance with the same type and zone count as one, terminated if either was; that every
    RunInstances carries the instance's token is checked instead."""
    problems, running = [], []
    requests = list(proxy.requests)
    ours = {tag["Value"] for r in ec2.describe_instances(Filters=[
        {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}])["Reservations"]
        for m in r["Instances"] for tag in m.get("Tags", []) if tag["Key"] == TAG_INSTANCE}
    if ours - set(offers_of):
        problems.append(f"machines of unknown instances: {sorted(ours - set(offers_of))}")
    for instance_id, offers in offers_of.items():
        runs = [seen.body for seen in requests
                if "Action=RunInstances&" in seen.body and instance_id in seen.body]
        if any(token_of(body) != client_token(instance_id) for body in runs):
            problems.append(f"instance {instance_id}: a RunInstances without its ClientToken")
        allowed = len(offers) * MAX_ATTEMPTS * (RETRIES + 1) * BOTOCORE_ATTEMPTS
        if len(runs) > allowed:
            problems.append(f"instance {instance_id}: {len(runs)} RunInstances requests, at most"
                            f" {allowed} allowed ({len(offers)} offers x {MAX_ATTEMPTS} attempts x"
                            f" {RETRIES + 1} calls x {BOTOCORE_ATTEMPTS} botocore attempts)")
        machines = machines_of(ec2, instance_id, states=EVERY_STATE)
        same: dict[tuple[str, str], list[dict]] = {}
        for m in machines:
            same.setdefault((m["InstanceType"], m["Placement"]["AvailabilityZone"]), []).append(m)
        seen_as = [(m["InstanceId"], m["InstanceType"], m["State"]["Name"]) for m in machines]
        if len(same) > 1:
            problems.append(f"instance {instance_id} has machines of different types or zones: {seen_as}")
        if any(not {m["State"]["Name"] for m in group} & {"shutting-down", "terminated"}
               for group in same.values()):
            running.append(f"{instance_id}: {[m['InstanceId'] for m in machines]}")
        recorded = by_id.get(instance_id, {}).get("provider_instance_id")
        if instance_id in booted and recorded not in [m["InstanceId"] for m in machines]:
            problems.append(f"instance {instance_id} records {recorded}, moto has {seen_as}")
    if running:
        problems.append(f"{len(running)} instances left a machine running at the provider: {running}")
    return problems


def token_of(body: str) -> str | None:
    found = re.search(r"(?:^|&)ClientToken=([^&]*)", body)
    return found[1] if found else None


def untried_offers(items: list[dict], offers_of: dict[str, list[dict]]) -> list[str]:
    """Instances that gave up on a capacity error with an offer left untried.

    Seen when an earlier create on the first offer failed "unsure" (timed out or a 5xx): the
    failover then first lists machines by tag (`_nothing_created`); if that listing fails too,
    `switch` is False but the capacity error is permanent, so `give_up` fails the instance at
    once, where a retry of the check later would have let it try the next offer."""
    return [f"instance {i['id']} failed with {len(offers_of[i['id']])} offers after trying only"
            f" the first: {i['failure_reason']!r}" for i in items
            if len(offers_of[i["id"]]) > 1 and (i["failure_reason"] or "").startswith(
                "No acceptable offer could be created (1 tried)")]


def faultable(proxy) -> int:
    """Requests the fault rules could act on (the client-token lookup is the fixture's, the
    sold-out type's RunInstances the sold-out rule's)."""
    return sum(1 for seen in list(proxy.requests) if "Name=client-token" not in seen.body
               and "InstanceType=g6.xlarge" not in seen.body
               and any(f"Action={action}&" in seen.body for action in ACTIONS))


async def probe(aws, machine: str) -> str:
    """One provider call made as a lifecycle step makes it (`Steps._call`): `describe` through
    the control plane's own adapter stack, bounded by the call timeout. Returns the outcome."""
    try:
        await asyncio.wait_for(aws.describe(machine), CALL_TIMEOUT)
        return "ok"
    except TimeoutError:
        return "timed out"
    except CircuitOpen:
        return "refused"
    except ProviderError as exc:
        return type(exc).__name__


async def opened_by_calls(aws, machine: str, client) -> bool:
    """A round of `THRESHOLD` calls at once, then whether the breaker is open."""
    await asyncio.gather(*(probe(aws, machine) for _ in range(THRESHOLD)))
    return await breaker_is(client, OPEN)


async def refused(aws, machine: str) -> bool:
    return await probe(aws, machine) == "refused"


async def trial_ran(aws, machine: str) -> bool:
    """Whether a call went through rather than being refused (the half-open trial)."""
    return await probe(aws, machine) != "refused"


async def closed_by_calls(aws, machine: str, client) -> bool:
    await probe(aws, machine)
    return await breaker_is(client, CLOSED)


async def reached(check, timeout: float, interval: float = 0.1):
    """`eventually`, answering None instead of failing: for invariants reported together."""
    try:
        return await eventually(check, timeout=timeout, interval=interval)
    except AssertionError:
        return None


async def settled(client, offers_of: dict[str, list[dict]]) -> list[dict] | None:
    """The instances once each is booting on its machine or has failed (with a reason)."""
    items = await instances(client, offers_of)
    done = all(i["failure_reason"] or i["status"] == "booting" and i["provider_instance_id"]
               for i in items)
    return items if done and len(items) == len(offers_of) else None


async def all_terminated(client, offers_of: dict[str, list[dict]]) -> list[dict] | None:
    items = await instances(client, offers_of)
    return items if len(items) == len(offers_of) and all(
        i["status"] == "terminated" for i in items) else None


async def instances(client, offers_of: dict[str, list[dict]]) -> list[dict]:
    answer = await client.get("/v1/instances", params={"limit": 100})
    assert answer.status_code == 200, answer.text
    return [i for i in answer.json()["items"] if i["id"] in offers_of]


async def metric_samples(client, name: str) -> list:
    """Samples of `name` for the aws provider, scraped from the control plane's /metrics."""
    answer = await client.get("/metrics")
    assert answer.status_code == 200, answer.text
    return [s for family in text_string_to_metric_families(answer.text) for s in family.samples
            if s.name == name and s.labels.get("provider") == "aws"]


async def breaker_state(client) -> dict[str, float]:
    """{zone: 0 closed, 1 half-open, 2 open} of the aws breakers."""
    return {s.labels["zone"]: s.value for s in await metric_samples(client, "cp_provider_breaker_state")}


async def breaker_is(client, state: int) -> bool:
    return (await breaker_state(client)).get(ANY_ZONE) == state


async def breakers_closed(client) -> bool:
    states = await breaker_state(client)
    return bool(states) and all(v == CLOSED for v in states.values())


async def calls_refused(client) -> float:
    return sum(s.value for s in await metric_samples(client, "cp_provider_calls_total")
               if s.labels.get("outcome") == "CircuitOpen")


async def outcomes(client) -> dict[str, float]:
    totals: dict[str, float] = {}
    for s in await metric_samples(client, "cp_provider_calls_total"):
        totals[s.labels["outcome"]] = totals.get(s.labels["outcome"], 0) + s.value
    return totals
