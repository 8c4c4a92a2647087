"""Commit-to-receipt delay (p99) of the admin SSE feed with 1,000 concurrent subscribers, against
the same delay with one subscriber in the same run. Prints one JSON object on its last line.

A whole control plane (runtime + HTTP API, uvicorn on the default asyncio loop, as
`control-plane up` runs it) serves from this process. The subscribers live in ANOTHER process
(this module with `--client`, started by the benchmark): N raw HTTP/1.1 connections on
`asyncio.Protocol`s with a minimal chunked/SSE parser and no HTTP library, so the client side
costs little; both processes still share the machine's cores, which the output says. The
client reports once every subscriber got its `: connected` comment; the benchmark then checks
the `cp_feed_subscribers` gauge at `/metrics` and commits events at a steady pace through
`control_plane.feed.events.emit`, a fresh session per event (own engine, on a thread of this
process with its own loop: see `_Publisher`), recording `time.time()` right after COMMIT
returns, by event id. Each subscriber records
`time.time()` when the bytes carrying an event arrive, by event id (same host, same clock).
Delay = receipt - commit. Every subscriber must receive every event, in id order: a lost
(skipped), duplicated or reordered event, or one still not received 30 s after the last commit
(`undelivered_at_timeout`: the server fell that far behind), fails the run (exit 1, after the
JSON line). The aim (issue): p99 < 250 ms.

    python -m benchmarks.feed [--quick] [--subscribers N] [--rate R] [--seconds S] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Only the standard library at module level: the subscriber process (`--client`) imports this
# module too and must stay lean; the control plane's imports are inside the server functions.

ROOT = Path(__file__).resolve().parents[1]
AIM_P99_MS = 250.0
EVENT_TYPE = "bench.feed"
KEY_ENV = "CP_BENCH_FEED_KEY"
CONNECT_TIMEOUT_SECONDS = 60.0
DRAIN_TIMEOUT_SECONDS = 30.0
CONNECT_CONCURRENCY = 100
"""Handshakes in flight at once while subscribers connect (a gentle ramp, not a storm)."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# The benchmark (server) process
# --------------------------------------------------------------------------------------------

async def main(subscribers: int, rate: float, seconds: float, baseline_seconds: float,
               profile: bool) -> dict:
    from benchmarks.support import control_plane_settings, scratch_database, scratch_redis

    load_before = os.getloadavg()[0]
    async with scratch_database() as url, scratch_redis() as (_redis, prefix):
        with tempfile.TemporaryDirectory() as tmp:
            settings = control_plane_settings(url, prefix, Path(tmp))
            baseline, measured = await _measure(settings, subscribers, rate, seconds,
                                                baseline_seconds, profile)
    p99, base = measured["p99_ms"], baseline["p99_ms"]
    return {
        "name": "feed", "value": p99, "unit": "ms p99 commit-to-receipt delay",
        "baseline": base, "baseline_unit": "ms p99 commit-to-receipt delay, 1 subscriber",
        "ratio": round(p99 / base, 3) if base else None,
        "aim_p99_ms": AIM_P99_MS, "aim_met": p99 < AIM_P99_MS,
        "subscribers": subscribers, **{k: v for k, v in measured.items() if k != "p99_ms"},
        "baseline_run": baseline,
        "client": "separate process, raw asyncio.Protocol HTTP/1.1 + minimal chunked/SSE parser",
        "cores": os.cpu_count(), "cores_shared": "server, subscriber process and Postgres share"
        f" the same {os.cpu_count()} cores (other load on the host: loadavg before the run"
        f" {load_before:.2f}, after {os.getloadavg()[0]:.2f})",
        "profiled": profile, "python": sys.version.split()[0],
    }


async def _measure(settings, subscribers: int, rate: float, seconds: float,
                   baseline_seconds: float, profile: bool) -> tuple[dict, dict]:
    import httpx

    from benchmarks.support import serve
    from control_plane.runtime import Runtime

    runtime = Runtime(settings, settings.database_url, settings.redis_url)
    publisher = _Publisher(settings.database_url)
    server = serving = None
    try:
        await publisher.start()
        server, serving = await serve(runtime, settings)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}", timeout=30,
                                     headers={"Authorization": f"Bearer {settings.admin_api_key}"}) as http:
            await publisher.run(0, 3, 10.0)  # warm the publisher's pool, the hub and the mirror
            await asyncio.sleep(0.5)
            idle = await _gauge(http)  # the runtime's own subscriptions (the event mirror)
            phase = dict(settings=settings, publisher=publisher, http=http, idle_gauge=idle, rate=rate)
            baseline = await _phase(subscribers=1, count=max(2, round(rate * baseline_seconds)),
                                    profile=False, **phase)
            measured = await _phase(subscribers=subscribers, count=max(2, round(rate * seconds)),
                                    profile=profile, **phase)
    finally:
        if server is not None:
            runtime.hub.close_streams()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, 15)
        await runtime.stop()
        await publisher.stop()
    return baseline, measured


class _Publisher:
    """Commits the events from a thread of this process with its own event loop and engine.

    Why a thread: taken on the server's loop, "right after COMMIT returns" would be when that
    loop next gets to the publisher's coroutine, i.e. after the very fan-out being measured
    (which the same NOTIFY woke): the delays came out tens of ms too small, even negative. The
    thread's loop is idle, so it resumes as soon as it holds the GIL (the server's thread
    yields it every `sys.getswitchinterval()`, 5 ms) and the machine gives it a core: a
    negative `min_ms` bounds what is left of that bias; `commit_p99_ms` is what COMMIT took."""

    def __init__(self, url: str) -> None:
        import threading

        self._url = url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="feed-publisher",
                                        daemon=True)
        self._engine = self._sessions = None

    async def start(self) -> None:
        self._thread.start()

        async def make() -> None:
            from control_plane.db.engine import make_engine, make_sessionmaker
            self._engine = make_engine(self._url, pool_size=2)
            self._sessions = make_sessionmaker(self._engine)
        await self._call(make())

    async def run(self, tag: int, count: int, rate: float) -> dict:
        return await self._call(self._series(tag, count, rate))

    async def stop(self) -> None:
        if self._thread.is_alive():
            if self._engine is not None:
                with contextlib.suppress(Exception):
                    await self._call(self._engine.dispose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 10)
        if not self._loop.is_running():
            self._loop.close()

    async def _call(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _series(self, tag: int, count: int, rate: float) -> dict:
        """`count` events at `rate`/s, each committed in a fresh session: ids in commit order,
        wall time right after each COMMIT, lateness against the schedule, COMMIT durations."""
        from control_plane.feed.events import emit

        order, commits, lateness, commit_ms = [], {}, [], []
        started = time.time()
        for i in range(count):
            due = started + i / rate
            if (wait := due - time.time()) > 0:
                await asyncio.sleep(wait)
            began = time.time()
            async with self._sessions() as session:
                async with session.begin():
                    event_id = await emit(session, EVENT_TYPE, {"seq": i, "phase": tag})
                    before_commit = time.time()
                committed = time.time()
            lateness.append((began - due) * 1000)
            commit_ms.append((committed - before_commit) * 1000)
            commits[event_id] = committed
            order.append(event_id)
        return {"order": order, "commits": commits, "lateness": lateness, "commit_ms": commit_ms,
                "started": started, "published": time.time()}


async def _phase(*, settings, publisher, http, idle_gauge: float, rate: float, subscribers: int,
                 count: int, profile: bool) -> dict:
    from benchmarks.support import until

    out = Path(settings.data_dir) / f"receipts-{subscribers}.json"
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.feed", "--client", "--port", str(settings.port),
        "--subscribers", str(subscribers), "--out", str(out), cwd=ROOT,
        env={**os.environ, KEY_ENV: settings.admin_api_key},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        line = await _line(client, CONNECT_TIMEOUT_SECONDS + 15, "subscribers connected")
        if not line.startswith("ready "):
            raise RuntimeError(f"subscriber process: {line}")
        connect_seconds = float(line.split()[2])
        # Every subscription is open in the hub (the gauge counts the mirror's too).
        await until(lambda: _gauge_is(http, idle_gauge + subscribers), 10,
                     f"cp_feed_subscribers = {idle_gauge + subscribers:g}")
        await asyncio.sleep(0.5)  # let the connect burst settle

        profiler = None
        if profile:
            import cProfile
            profiler = cProfile.Profile()
        cpu_before = (_cpu_seconds(os.getpid()), _cpu_seconds(client.pid))
        host_before = _host()
        if profiler:
            profiler.enable()  # this (the server's) thread only, not the publisher's
        series = await publisher.run(subscribers, count, rate)
        order, commits = series["order"], series["commits"]
        started, published = series["started"], series["published"]
        client.stdin.write(f"last {order[-1]}\n".encode())
        await client.stdin.drain()
        line = await _line(client, DRAIN_TIMEOUT_SECONDS + 30, "receipts written")
        if profiler:
            profiler.disable()
        drained = time.time()
        cpu_after = (_cpu_seconds(os.getpid()), _cpu_seconds(client.pid))
        host_after = _host()
        if not line.startswith("done"):
            raise RuntimeError(f"subscriber process: {line}")
        receipts = json.loads(out.read_text())
        client.stdin.close()  # the subscriber process exits
        await asyncio.wait_for(client.wait(), 15)
    finally:
        if client.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                client.kill()
            await client.wait()
    if profiler:
        _print_profile(profiler)
    window = drained - started
    stats = _stats(order, commits, receipts, subscribers)
    stats.update({
        "events": count, "rate_per_s": rate,
        "published_per_s": round(count / (published - started), 1),
        "publish_late_p99_ms": _round(_pct(sorted(series["lateness"]), 0.99)),
        "commit_p50_ms": _round(_pct(sorted(series["commit_ms"]), 0.5)),
        "commit_p99_ms": _round(_pct(sorted(series["commit_ms"]), 0.99)),
        # Messages written to subscribers per second, first commit to last receipt (under
        # overload that runs past the publishing time; offered = rate x subscribers).
        "pushed_per_s": round(stats["delivered"] / (stats.pop("last_receipt") - started), 1)
        if stats["delivered"] else 0.0,
        "offered_per_s": round(rate * subscribers, 1),
        "connect_seconds": connect_seconds,
        "server_cpu_percent": _percent(cpu_after[0] - cpu_before[0], window),
        "server_cpu_us_per_message": round(1e6 * (cpu_after[0] - cpu_before[0]) / stats["delivered"], 1)
        if stats["delivered"] >= 1000 else None,  # else the runtime's idle loops dominate
        "client_cpu_percent": _percent(cpu_after[1] - cpu_before[1], window),
        **_host_delta(host_before, host_after, window),
        "window_seconds": round(window, 1),
    })
    return stats


def _stats(order: list[int], commits: dict[int, float], receipts: dict, subscribers: int) -> dict:
    """Delays over every (subscriber, event) pair, and every loss, duplicate and reordering."""
    expected = set(order)
    delays: list[float] = []
    per_event: dict[int, list[float]] = {i: [] for i in order}
    lost = undelivered = duplicated = reordered = other = 0
    dropped = receipts["closed_early"]
    for ids, times in zip(receipts["ids"], receipts["times"], strict=True):
        seen: set[int] = set()
        previous = 0
        for event_id, at in zip(ids, times, strict=True):
            if event_id in seen:
                duplicated += 1
                continue
            seen.add(event_id)
            if event_id < previous:
                reordered += 1
            previous = max(previous, event_id)
            if event_id not in expected:
                other += 1
                continue
            delay = (at - commits[event_id]) * 1000
            delays.append(delay)
            per_event[event_id].append(delay)
        missing = expected - seen
        if missing:
            newest = max((i for i in seen if i in expected), default=0)
            skipped = sum(i < newest for i in missing)
            lost += skipped
            undelivered += len(missing) - skipped
    undelivered += (subscribers - len(receipts["ids"])) * len(order)
    delays.sort()
    firsts = sorted(min(v) for v in per_event.values() if v)
    lasts = sorted(max(v) for v in per_event.values() if v)
    tenth = max(1, len(order) // 10)
    head = sorted(d for i in order[:tenth] for d in per_event[i])
    tail = sorted(d for i in order[-tenth:] for d in per_event[i])
    return {
        "p50_ms": _round(_pct(delays, 0.5)), "p99_ms": _round(_pct(delays, 0.99)),
        "percentiles_are_lower_bounds": undelivered > 0,  # over what arrived before the timeout
        "max_ms": _round(delays[-1] if delays else None),
        "min_ms": _round(delays[0] if delays else None),
        "mean_ms": _round(statistics.fmean(delays) if delays else None),
        "first_subscriber_p50_ms": _round(_pct(firsts, 0.5)),
        "last_subscriber_p50_ms": _round(_pct(lasts, 0.5)),
        "last_subscriber_max_ms": _round(lasts[-1] if lasts else None),
        "first_tenth_p50_ms": _round(_pct(head, 0.5)), "last_tenth_p50_ms": _round(_pct(tail, 0.5)),
        "delivered": len(delays), "expected": len(order) * subscribers,
        "lost": lost, "undelivered_at_timeout": undelivered, "drain_timed_out": receipts["timed_out"],
        "duplicated": duplicated, "out_of_order": reordered, "other_events": other,
        "closed_early": dropped,
        "last_receipt": max((t[-1] for t in receipts["times"] if t), default=0.0),
    }


def _print_profile(profiler) -> None:
    import io
    import pstats

    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(30)
        print(f"--- server profile by {key} (main phase, whole event loop thread) ---",
              file=sys.stderr)
        print(buf.getvalue(), file=sys.stderr)


async def _line(proc, timeout: float, what: str) -> str:
    try:
        raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
    except TimeoutError:
        raise RuntimeError(f"{what}: no answer from the subscriber process in {timeout:g} s") from None
    if not raw:
        raise RuntimeError(f"{what}: the subscriber process exited ({await proc.wait()})")
    return raw.decode().strip()


async def _gauge(http) -> float:
    response = await http.get("/metrics")
    response.raise_for_status()
    for line in response.text.splitlines():
        if line.startswith("cp_feed_subscribers "):
            return float(line.split()[1])
    raise RuntimeError("cp_feed_subscribers missing from /metrics")


async def _gauge_is(http, value: float) -> bool:
    return await _gauge(http) == value


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _host() -> dict:
    """Counters that tell a busy server from a starved one: the server's loop thread's CPU
    and run-queue wait (schedstat, ns), the machine's busy and stolen CPU ticks, and the
    cumulative CPU pressure stall (µs)."""
    pid = os.getpid()
    counters = {}
    with contextlib.suppress(OSError, ValueError):
        run, wait = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[:2]
        counters["loop_run"], counters["loop_wait"] = int(run), int(wait)
    with contextlib.suppress(OSError, ValueError):
        ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        counters["total"] = sum(ticks[:8])
        counters["idle"] = ticks[3] + ticks[4]
        counters["steal"] = ticks[7]
    with contextlib.suppress(OSError, ValueError, IndexError):
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        counters["pressure"] = int(some.rpartition("total=")[2])
    return counters


def _host_delta(before: dict, after: dict, wall: float) -> dict:
    delta = {k: after[k] - before[k] for k in before if k in after}
    out = {}
    if "loop_run" in delta:
        out["server_loop_thread_cpu_percent"] = round(100 * delta["loop_run"] / 1e9 / wall, 1)
        out["server_loop_thread_runqueue_wait_percent"] = round(100 * delta["loop_wait"] / 1e9 / wall, 1)
    if delta.get("total"):
        cores = os.cpu_count() or 1
        out["host_cpu_busy_percent"] = round(100 * cores * (1 - delta["idle"] / delta["total"]), 1)
        out["host_cpu_steal_percent"] = round(100 * cores * delta["steal"] / delta["total"], 1)
        out["host_cpu_percent_unit"] = f"% of one core (the host has {cores})"
    if "pressure" in delta:
        out["host_cpu_pressure_some_percent"] = round(100 * delta["pressure"] / 1e6 / wall, 1)
    return out


def _percent(cpu: float, wall: float) -> float:
    return round(100 * cpu / wall, 1)


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)








# --------------------------------------------------------------------------------------------
# The subscriber process (`--client`): standard library only
# --------------------------------------------------------------------------------------------

class _Subscriber(asyncio.Protocol):
    """One `GET /v1/events` connection: de-chunks the body, splits SSE messages, and records
    (event id, time.time() when the bytes arrived) for every message that carries an event."""

    def __init__(self, request: bytes, connected: asyncio.Future, closed: asyncio.Future) -> None:
        self.request = request
        self.connected = connected
        self.closed = closed
        self.raw = bytearray()
        self.body = bytearray()
        self.head = True
        self.chunked = False
        self.chunk_left = 0  # data bytes left in the current chunk
        self.crlf_left = 0  # bytes of the CRLF after the current chunk still to skip
        self.ids: list[int] = []
        self.times: list[float] = []
        self.last = 0
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        raw = self.raw
        raw += data
        if self.head:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(raw[:end]).decode("latin-1")
            del raw[:end + 4]
            status = head.split(" ", 2)[1]
            if status != "200":
                self._fail(f"HTTP {status}: {head.splitlines()[0]}")
                return
            self.chunked = "transfer-encoding: chunked" in head.lower()
            self.head = False
        body = self.body
        if self.chunked:
            while raw:
                if self.crlf_left:
                    take = min(self.crlf_left, len(raw))
                    del raw[:take]
                    self.crlf_left -= take
                    continue
                if self.chunk_left == 0:
                    end = raw.find(b"\r\n")
                    if end < 0:
                        break
                    size = int(bytes(raw[:end]).split(b";")[0], 16)
                    del raw[:end + 2]
                    if size == 0:  # the server ended the stream
                        self.transport.close()
                        break
                    self.chunk_left = size
                take = min(self.chunk_left, len(raw))
                body += raw[:take]
                del raw[:take]
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.crlf_left = 2
        else:
            body += raw
            raw.clear()
        while (end := body.find(b"\r\n\r\n")) >= 0:
            message = bytes(body[:end])
            del body[:end + 4]
            if b"\nevent: " in message or message.startswith(b"event: "):
                event_id = 0
                for line in message.split(b"\r\n"):
                    if line.startswith(b"id: "):
                        event_id = int(line[4:])
                        break
                self.ids.append(event_id)
                self.times.append(now)
                if event_id > self.last:
                    self.last = event_id
            elif message.startswith(b": connected") and not self.connected.done():
                self.connected.set_result(None)

    def _fail(self, why: str) -> None:
        if not self.connected.done():
            self.connected.set_exception(RuntimeError(why))
        self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self.connected.done():
            self.connected.set_exception(RuntimeError(f"connection lost before connected: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(exc)


async def client(port: int, subscribers: int, out: Path) -> None:
    loop = asyncio.get_running_loop()
    key = os.environ[KEY_ENV]
    request = (f"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
               "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n").encode()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    subs: list[_Subscriber] = []

    async def connect() -> None:
        async with gate:
            connected, closed = loop.create_future(), loop.create_future()
            _, sub = await loop.create_connection(lambda: _Subscriber(request, connected, closed),
                                                  "127.0.0.1", port)
            subs.append(sub)
            await connected

    began = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(connect() for _ in range(subscribers))),
                               CONNECT_TIMEOUT_SECONDS)
    except Exception as exc:  # noqa: BLE001 - reported to the benchmark, which fails
        _say(f"error connecting subscribers: {exc!r}")
        return
    _say(f"ready {len(subs)} {time.monotonic() - began:.2f}")

    line = (await stdin.readline()).decode().split()
    if len(line) != 2 or line[0] != "last":
        _say(f"error: unexpected instruction {line!r}")
        return
    last = int(line[1])
    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    while time.monotonic() < deadline and any(s.last < last and not s.closed.done() for s in subs):
        await asyncio.sleep(0.02)
    timed_out = any(s.last < last and not s.closed.done() for s in subs)
    closed_early = sum(s.closed.done() for s in subs)
    for s in subs:
        s.transport.close()
    out.write_text(json.dumps({"ids": [s.ids for s in subs], "times": [s.times for s in subs],
                               "closed_early": closed_early, "timed_out": timed_out}))
    _say("done")
    await stdin.readline()  # stay until the benchmark has read our CPU time (it closes stdin)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s): 200 subscribers, 5 s")
    parser.add_argument("--subscribers", type=int, help="concurrent SSE subscribers (default 1000, 200 with --quick)")
    parser.add_argument("--rate", type=float, help="events committed per second (default 20, 10 with --quick)")
    parser.add_argument("--seconds", type=float, help="publishing time per phase (default 10, 5 with --quick)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the server's event loop during the N-subscriber phase (to stderr;"
                             " inflates the delays)")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _raise_fd_limit()
    if args.client:
        asyncio.run(client(args.port, args.subscribers, args.out))
        sys.exit(0)

    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    subscribers = args.subscribers or (200 if args.quick else 1000)
    rate = args.rate or (10.0 if args.quick else 20.0)
    seconds = args.seconds or (5.0 if args.quick else 10.0)
    if subscribers < 1 or rate <= 0 or seconds <= 0:
        parser.error("--subscribers, --rate and --seconds must be positive")
    result = asyncio.run(main(subscribers, rate, seconds, baseline_seconds=seconds, profile=args.profile))
    print(json.dumps(result))
    checks = ("lost", "undelivered_at_timeout", "duplicated", "out_of_order")
    bad = any(run[c] for run in (result, result["baseline_run"]) for c in checks)
    sys.exit(1 if bad else 0)
