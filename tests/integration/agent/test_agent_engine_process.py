"""``EngineProcess`` with real child processes: log parsing through the pipe, stop, cleanup."""

import asyncio
import os
import re
import sys
from pathlib import Path

from agent_harness import pid_alive, wait_until

from worker_agent.engine import EngineProcess
from worker_agent.engine_log import Phase

FIXTURES = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "vllm"
SPAWN_WORKER = (
    "import subprocess, sys; "
    "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print('worker', w.pid, flush=True)"
)


async def test_phases_and_failures_are_read_from_the_engine_output() -> None:
    log = FIXTURES / "startup-v0.25-fail-kv-cache-memory.log"
    engine = EngineProcess(["tail", "-n", "+2", str(log)], os.environ)  # minus "# source:"
    await engine.start()

    assert await asyncio.wait_for(engine.wait(), 10) == 0
    await engine.wait_closed(5)

    assert list(engine.phases) == [Phase.ENGINE_STARTED, Phase.MODEL_LOADED]
    assert engine.phases[Phase.MODEL_LOADED].startswith("Model loading took 95.46 GiB")
    assert len(engine.failures) == 4
    assert engine.last_line.endswith("Failed core proc(s): {}")
    assert len(engine.tail) == 200  # the log has more lines: only the last ones are kept
    assert await engine.stop() == 0


async def test_workers_left_behind_by_an_exited_engine_are_killed() -> None:
    engine = EngineProcess([sys.executable, "-c", SPAWN_WORKER], os.environ)
    await engine.start()

    await asyncio.wait_for(engine.wait(), 10)
    await engine.wait_closed(5)
    worker = int(re.search(r"worker (\d+)", "\n".join(engine.tail)).group(1))

    await wait_until(lambda: not pid_alive(worker), "the worker to be killed", seconds=5)
    await engine.stop()


async def test_stop_escalates_to_sigkill_for_the_whole_group() -> None:
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        + SPAWN_WORKER
        + "; time.sleep(60)"
    )
    engine = EngineProcess([sys.executable, "-c", script], os.environ)
    await engine.start()
    await wait_until(lambda: any(line.startswith("worker") for line in engine.tail), "worker")
    worker = int(engine.tail[-1].split()[1])

    assert await engine.stop(grace=0.5) == -9

    assert not pid_alive(engine.pid)
    await wait_until(lambda: not pid_alive(worker), "the worker to be killed", seconds=5)
