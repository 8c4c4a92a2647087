"""One reconciliation pass over N AWS instances, against the bare paginated listing alone.

moto's EC2 server (`tests/support/moto_server.py`) holds N + orphans machines tagged with our
cluster, behind the counting fault proxy (`tests/support/fault_proxy.py`, with the
`client-token` rule the provider tests use); Postgres (a scratch database, migrated) holds N
`ready` instances owning them. A few percent of the machines are terminated behind our back
(lost) and a few percent have no instance row (orphans), so the pass does real work; the
report must name exactly those, or the benchmark fails.

value = wall seconds of one `reconcile(...)` pass (listing, describes of the missing, lost
instances marked, orphans found and recorded, stuck check). Baseline = wall seconds of the
adapter's bare `list_by_tags` with the same page size through the same proxy, in the same run;
ratio = value / baseline (what comparing with Postgres costs on top of listing); the listing
is timed once before the pass and once after, and the baseline is their mean. Also reported:
the provider calls the pass made (listing pages vs describes), and where its time went (per
phase, with the DB statements, transactions and pool checkouts of each). `--profile` runs the
pass under cProfile (its value is then inflated) and prints the top functions to stderr.

Setup, made for speed; none of it changes what the pass or the baseline sees on the wire:
- Machines are launched with RunInstances in batches (MinCount=MaxCount), carrying the
  cluster tag; each gets its `cp-instance` tag straight in moto's tag store (this process
  runs moto, in a thread), as one CreateTags call per machine would (~10-20 ms each here).
- Each batch's reservation is split into one reservation per instance, as the control plane
  launches them (one RunInstances per machine). moto pages DescribeInstances by reservations:
  unsplit, 10,000 instances would fit in one page.
- moto without its ~1,300 built-in AMIs and without default root volumes: both cost moto
  per-instance scans at launch (quadratic for volumes).
- moto's per-resource tag lookup (`TaggedEC2Resource.get_tags`) is replaced, in this process
  only, by a dict lookup giving the same answer: moto scans every tag of the region per
  instance, twice per instance listed, which makes a 10,000-instance listing quadratic
  (minutes of moto time that would swamp both the pass and the baseline).
- moto's objects live in this process: they are frozen out of the garbage collector's reach
  (`gc.freeze`) before measuring, so that collections triggered by parsing listings do not
  rescan them (the control plane does not hold them in production).

Where moto stays slower than EC2: it serializes a few hundred instances per second (both sides
of the ratio pay that), and it scans every reservation on each DescribeInstances by id, ~0.2 s
a call at 10,000 instances, one at a time (its server shares this process's GIL): the pass
pays that once per lost machine, the baseline never (see `phases.mark_lost`).

    python -m benchmarks.reconcile [--quick] [--count N] [--page-size P] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import logging
import math
import os
import pstats
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event, text

from adapters.base import TAG_CLUSTER, TAG_INSTANCE
from control_plane.db.engine import asyncpg_dsn, make_engine, make_sessionmaker, upgrade
from control_plane.logs import configure as configure_logs
from control_plane.loops import reconcile as reconcile_module
from control_plane.providers import Providers
from control_plane.settings import Settings

ADMIN_DSN = os.environ.get("CP_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
REGION = "us-east-1"
CLUSTER = "bench-cluster"
IMAGE_ID = "ami-0b0be0c0ffee0b0b0"  # any id: moto accepts unknown AMIs, and listing never reads it
INSTANCE_TYPE = "g5.xlarge"
LAUNCH_BATCH = 1000
LOST_SHARE = 0.03
ORPHAN_SHARE = 0.02
EMPTY_DESCRIBE_INSTANCES = (  # as tests/integration/providers/conftest.py
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
    "<requestId>cp-bench-client-token</requestId><reservationSet/></DescribeInstancesResponse>"
)


class Mismatch(Exception):
    """The pass did not find exactly the lost machines and orphans the setup made."""


async def main(count: int, page_size: int, profile: bool) -> dict:
    _aws_env()
    from tests.support.fault_proxy import FaultProxy  # after _aws_env: they import moto/boto3
    from tests.support.moto_server import MotoServer

    name = f"cp_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    try:
        await asyncio.to_thread(upgrade, url)
        with (_fast_moto_tags(), MotoServer() as moto, FaultProxy(moto.url) as proxy,
              tempfile.TemporaryDirectory() as tmp):
            proxy.add_rule(contains="Name=client-token", status=200, body=EMPTY_DESCRIBE_INSTANCES,
                           headers={"Content-Type": "text/xml"})
            world = await _setup(moto.url, url, count)
            settings = Settings(database_url=url, redis_url=REDIS_URL, data_dir=Path(tmp),
                                cluster_name=CLUSTER,
                                # moto needs far longer than EC2 to list 10,000 instances.
                                provider_listing_timeout_seconds=600.0)
            result = await _measure(proxy, settings, world, page_size, profile)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return result


# --- setup ---------------------------------------------------------------------------------


@dataclass
class World:
    count: int
    instances: dict[str, uuid.UUID]
    """provider_instance_id -> instance id, for every instance row."""
    lost: dict[str, uuid.UUID]
    orphans: set[str]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def listed(self) -> int:
        return self.count - len(self.lost) + len(self.orphans)


async def _setup(moto_url: str, url: str, count: int) -> World:
    import boto3
    from botocore.config import Config

    started = time.perf_counter()
    lost_n = max(1, round(count * LOST_SHARE))
    orphan_n = max(1, round(count * ORPHAN_SHARE))
    client = boto3.session.Session().client(
        "ec2", region_name=REGION, endpoint_url=moto_url,
        config=Config(read_timeout=600, retries={"mode": "standard", "max_attempts": 1}))
    try:
        machines, reservations = await asyncio.to_thread(_launch, client, count + orphan_n)
        launched = time.perf_counter()
        store = _moto_store()
        _one_reservation_per_instance(store, reservations)
        owners = [uuid.uuid4() for _ in range(count + orphan_n)]  # the orphans' owners are unknown
        for machine, owner in zip(machines, owners, strict=True):
            store.create_tags([machine], {TAG_INSTANCE: str(owner)})
        instances = dict(zip(machines[:count], owners[:count], strict=True))
        orphans = set(machines[count:])
        pick = random.Random(7)
        lost = {m: instances[m] for m in pick.sample(machines[:count], lost_n)}
        for start in range(0, lost_n, 500):
            await asyncio.to_thread(client.terminate_instances,
                                    InstanceIds=list(lost)[start:start + 500])
        tagged = time.perf_counter()
    finally:
        client.close()
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        changed = datetime.now(UTC) - timedelta(hours=1)
        await conn.copy_records_to_table(
            "instances",
            columns=["id", "provider", "instance_type", "model", "status", "provider_instance_id",
                     "status_changed_at", "ready_at"],
            records=[(owner, "aws", INSTANCE_TYPE, "org/model", "ready", machine, changed, changed)
                     for machine, owner in instances.items()])
        await conn.execute("ANALYZE instances")
    finally:
        await conn.close()
    done = time.perf_counter()
    return World(count=count, instances=instances, lost=lost, orphans=orphans, seconds={
        "launch": launched - started, "tag_and_terminate": tagged - launched,
        "db_rows": done - tagged, "total": done - started})


def _launch(client: Any, total: int) -> tuple[list[str], list[str]]:
    """`total` running machines carrying the cluster tag, in RunInstances batches."""
    machines: list[str] = []
    reservations: list[str] = []
    while len(machines) < total:
        n = min(LAUNCH_BATCH, total - len(machines))
        reply = client.run_instances(
            ImageId=IMAGE_ID, InstanceType=INSTANCE_TYPE, MinCount=n, MaxCount=n,
            BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "NoDevice": ""}],
            TagSpecifications=[{"ResourceType": "instance",
                                "Tags": [{"Key": TAG_CLUSTER, "Value": CLUSTER}]}])
        machines += [i["InstanceId"] for i in reply["Instances"]]
        reservations.append(reply["ReservationId"])
    return machines, reservations


def _aws_env() -> None:
    """Dummy credentials, nothing from this machine's AWS config, moto without built-in AMIs."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2"):
        os.environ.pop(name, None)
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true", "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
    })


def _moto_store() -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    return ec2_backends[DEFAULT_ACCOUNT_ID][REGION]


def _one_reservation_per_instance(store: Any, reservation_ids: list[str]) -> None:
    from moto.ec2.models.instances import Reservation
    from moto.ec2.utils import random_reservation_id

    for reservation_id in reservation_ids:
        batch = store.reservations.pop(reservation_id)
        for instance in batch.instances:
            single = Reservation(random_reservation_id(), batch.owner_id)
            single.groups = list(batch.groups)
            single.instances = [instance]
            store.reservations[single.id] = single


@contextmanager
def _fast_moto_tags():
    """moto's `get_tags` as a dict lookup (same answer; see the module docstring)."""
    from moto.ec2.models.core import TaggedEC2Resource
    from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

    def get_tags(self: Any) -> list[dict[str, str]]:
        tags = self.ec2_backend.tags.get(self.id) if self.id else None
        if not tags:
            return []
        kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
        return [{"resource_id": self.id, "key": k, "value": v, "resource_type": kind}
                for k, v in tags.items()]

    original = TaggedEC2Resource.get_tags
    TaggedEC2Resource.get_tags = get_tags  # type: ignore[method-assign]
    try:
        yield
    finally:
        TaggedEC2Resource.get_tags = original  # type: ignore[method-assign]


# --- measurement ---------------------------------------------------------------------------


class _GcClock:
    """Seconds spent in the garbage collector, and full collections, while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.full += info["generation"] == 2

    @contextmanager
    def installed(self):
        gc.callbacks.append(self)
        try:
            yield
        finally:
            gc.callbacks.remove(self)


_GC = _GcClock()


class _Phases:
    """Wall time, DB statements, transactions, pool checkouts and GC time per phase of the pass."""

    def __init__(self) -> None:
        self.current = "idle"
        self.seconds: Counter[str] = Counter()
        self.gc_seconds: Counter[str] = Counter()
        self.statements: Counter[str] = Counter()
        self.statement_seconds: Counter[str] = Counter()
        self.transactions: Counter[str] = Counter()
        self.checkouts: Counter[str] = Counter()
        self.kinds: Counter[tuple[str, str]] = Counter()
        self.describes = 0
        self.describe_span: list[float] = []

    @contextmanager
    def phase(self, name: str):
        previous, self.current = self.current, name
        started, gc_started = time.perf_counter(), _GC.seconds
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started
            self.gc_seconds[name] += _GC.seconds - gc_started
            self.current = previous

    def listen(self, engine: Any) -> None:
        sync = engine.sync_engine

        @event.listens_for(sync, "before_cursor_execute")
        def before(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
            conn.info.setdefault("bench_started", []).append(time.perf_counter())

        @event.listens_for(sync, "after_cursor_execute")
        def after(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
            self.statements[self.current] += 1
            self.statement_seconds[self.current] += time.perf_counter() - conn.info["bench_started"].pop()
            self.kinds[(self.current, " ".join(statement.split())[:60])] += 1

        @event.listens_for(sync, "begin")
        def begin(conn):  # noqa: ANN001
            self.transactions[self.current] += 1

        @event.listens_for(sync.pool, "checkout")
        def checkout(dbapi_conn, record, proxy):  # noqa: ANN001
            self.checkouts[self.current] += 1

    def report(self, total: float) -> dict[str, Any]:
        names = ["read_believed", "listing", "mark_lost", "find_orphans", "record_orphans", "stuck"]
        out: dict[str, Any] = {}
        for name in names:
            out[name] = {"s": round(self.seconds[name], 3), "db_statements": self.statements[name],
                         "db_transactions": self.transactions[name],
                         "pool_checkouts": self.checkouts[name],
                         "db_statement_s": round(self.statement_seconds[name], 3),
                         "gc_s": round(self.gc_seconds[name], 3)}
        out["mark_lost"]["describe_calls"] = self.describes
        if self.describe_span:
            out["mark_lost"]["describes_wall_s"] = round(self.describe_span[1] - self.describe_span[0], 3)
        out["other_s"] = round(total - sum(self.seconds[n] for n in names), 3)
        return out


class _Timed:
    """The adapter reconcile gets, reporting phase changes (forwards everything else)."""

    def __init__(self, inner: Any, phases: _Phases) -> None:
        self._inner = inner
        self._phases = phases

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def list_by_tags(self, tags: dict[str, str]) -> Any:
        self._phases.seconds["read_believed"] += time.perf_counter() - self._pass_started
        with self._phases.phase("listing"):
            return await self._inner.list_by_tags(tags)

    async def describe_many(self, provider_instance_ids: list[str]) -> Any:
        started = time.perf_counter()
        try:
            return await self._inner.describe_many(provider_instance_ids)
        finally:
            span = self._phases.describe_span
            self._phases.describes += 1
            span[:] = [min(span[0], started) if span else started, time.perf_counter()]


@contextmanager
def _phased(phases: _Phases):
    """Name the phases of `reconcile` by wrapping its module functions (restored after)."""
    wrapped = {"_mark_lost": "mark_lost", "_find_orphans": "find_orphans",
               "_record_orphans": "record_orphans", "_stuck": "stuck"}
    originals = {attr: getattr(reconcile_module, attr) for attr in wrapped}

    def wrap(attr: str, phase: str) -> Any:
        original = originals[attr]

        async def timed(*args: Any, **kwargs: Any) -> Any:
            with phases.phase(phase):
                return await original(*args, **kwargs)
        return timed

    for attr, phase in wrapped.items():
        setattr(reconcile_module, attr, wrap(attr, phase))
    try:
        yield
    finally:
        for attr, original in originals.items():
            setattr(reconcile_module, attr, original)


def _calls(proxy: Any, since: int) -> dict[str, int]:
    """Requests the proxy saw after the first `since`: listing pages, describes, the rest."""
    seen = proxy.requests[since:]
    instances = [r.query + "&" + r.body for r in seen if "Action=DescribeInstances" in r.query + r.body]
    describes = sum(1 for r in instances if "InstanceId.1=" in r or "Name=instance-id" in r)
    pages = sum(1 for r in instances if "MaxResults=" in r and "Name=instance-id" not in r)
    return {"total": len(seen), "pages": pages, "describes": describes,
            "other": len(seen) - pages - describes}


async def _measure(proxy: Any, settings: Settings, world: World, page_size: int,
                   profile: bool) -> dict:
    from adapters.aws import AwsProvider

    aws = AwsProvider(region=REGION, image_id=IMAGE_ID, cluster=CLUSTER, endpoint_url=proxy.url,
                      page_size=page_size, call_timeout=300.0)
    providers = Providers.wrapped([aws], settings)
    adapter = providers.get("aws")
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    phases = _Phases()
    phases.listen(engine)
    timed = _Timed(adapter, phases)
    with _GC.installed():
        try:
            # Warm both paths (boto3's models and connection, the pool) outside the measurements.
            await adapter.describe(next(iter(world.instances)))
            async with sessions() as session:
                await session.connection()

            # moto's machines live in this process: out of the collector's way, as they would be
            # in production (parsing a listing triggers full collections that would rescan them).
            gc.collect()
            gc.freeze()
            baselines = [await _bare_listing(proxy, adapter, world)]

            profiler = cProfile.Profile() if profile else None
            before = proxy.total
            with _phased(phases):
                phases.current = "read_believed"
                timed._pass_started = started = time.perf_counter()
                gc_started = _GC.seconds
                if profiler:
                    profiler.enable()
                report = await reconcile_module.reconcile(sessions, Providers({"aws": timed}), settings)
                value = time.perf_counter() - started
                pass_gc = _GC.seconds - gc_started
                if profiler:
                    profiler.disable()
                phases.current = "idle"
            calls = _calls(proxy, before)
            await _check(report, world, engine)
            # Again after the pass (same machines listed): the order of the two measurements
            # must not favour either.
            baselines.append(await _bare_listing(proxy, adapter, world))
        finally:
            await engine.dispose()
            await aws.close()
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        print(out.getvalue(), file=sys.stderr)
    _print_statement_kinds(phases)

    aws_report = report.providers["aws"]
    baseline = sum(seconds for seconds, _ in baselines) / len(baselines)
    return {
        "name": "reconcile", "value": round(value, 3), "unit": "s per pass",
        "baseline": round(baseline, 3),
        "baseline_unit": "s for the bare paginated list_by_tags (same page size, same proxy;"
                         " mean of one listing before and one after the pass)",
        "baseline_runs": [round(seconds, 3) for seconds, _ in baselines],
        "baseline_runs_gc_s": [calls["gc_s"] for _, calls in baselines],
        "ratio": round(value / baseline, 3),
        "count": world.count, "instances_per_s": round(world.count / value, 1),
        "page_size": page_size, "listed": aws_report.listed, "lost": len(aws_report.lost),
        "orphans": len(aws_report.orphans),
        "provider_calls": calls["total"], "provider_calls_listing": calls["pages"],
        "provider_calls_describe": calls["describes"],
        "provider_calls_other": calls["other"],
        "expected_listing_pages": math.ceil(world.listed / page_size),
        "baseline_provider_calls": baselines[0][1]["total"],
        "gc_s": round(pass_gc, 3),
        "phases": phases.report(value),
        "setup_s": {k: round(v, 2) for k, v in world.seconds.items()},
        "profiled": profile,
    }


async def _bare_listing(proxy: Any, adapter: Any, world: World) -> tuple[float, dict[str, Any]]:
    before, gc_before = proxy.total, _GC.seconds
    started = time.perf_counter()
    listed = await adapter.list_by_tags({TAG_CLUSTER: CLUSTER})
    elapsed = time.perf_counter() - started
    if len(listed) != world.listed:
        raise Mismatch(f"the bare listing returned {len(listed)} machines, expected {world.listed}")
    return elapsed, _calls(proxy, before) | {"gc_s": round(_GC.seconds - gc_before, 3)}


async def _check(report: Any, world: World, engine: Any) -> None:
    aws = report.providers.get("aws")
    problems = []
    if aws is None or aws.error is not None:
        raise Mismatch(f"the provider was not reconciled: {aws and aws.error}")
    if aws.listed != world.listed:
        problems.append(f"listed {aws.listed}, expected {world.listed}")
    if sorted(aws.lost) != sorted(world.lost.values()):
        problems.append(f"lost {len(aws.lost)} instances, expected exactly the {len(world.lost)} terminated")
    if set(aws.orphans) != world.orphans:
        problems.append(f"found {len(aws.orphans)} orphans, expected exactly the {len(world.orphans)} made")
    elif not all("does not know" in why for why in aws.orphans.values()):
        problems.append("orphans found for an unexpected reason")
    if report.stuck:
        problems.append(f"{len(report.stuck)} stuck instances, expected none")
    async with engine.connect() as conn:
        deleted = (await conn.execute(text(
            "SELECT count(*) FROM instances WHERE status = 'provider_deleted'"))).scalar_one()
        recorded = (await conn.execute(text("SELECT count(*) FROM orphan_machines"))).scalar_one()
    if deleted != len(world.lost) or recorded != len(world.orphans):
        problems.append(f"{deleted} instances provider_deleted and {recorded} orphans recorded,"
                        f" expected {len(world.lost)} and {len(world.orphans)}")
    if problems:
        raise Mismatch("; ".join(problems))


def _print_statement_kinds(phases: _Phases) -> None:
    """The DB statements of the pass by phase and kind (stderr), the most repeated first."""
    print("DB statements during the pass (phase, count, statement):", file=sys.stderr)
    for (phase, kind), n in sorted(phases.kinds.items(), key=lambda kv: -kv[1]):
        if phase == "idle":
            continue
        print(f"  {phase:<15} {n:>6}  {kind}", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 instances (well under 60 s)")
    parser.add_argument("--count", type=int, help="instances (default 10,000; 1,000 with --quick)")
    parser.add_argument("--page-size", type=int, default=1000,
                        help="DescribeInstances page size (default 1000, EC2's maximum)")
    parser.add_argument("--profile", action="store_true",
                        help="run the pass under cProfile (top functions on stderr; value inflated)")
    args = parser.parse_args()
    configure_logs("ERROR")  # the pass logs every orphan; keep the output to the result
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    try:
        result = asyncio.run(main(args.count or (1000 if args.quick else 10_000), args.page_size,
                                  args.profile))
    except Mismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))
