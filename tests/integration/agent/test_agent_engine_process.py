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


ENGINE_IGNORING_SIGTERM = (
    "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0)); "
    "open(sys.argv[1], 'w').write(str(os.getpid())); print('up', flush=True); time.sleep(60)"
)
STOPPER = (  # stands in for `docker stop`: records its arguments, asks the engine to exit
    "import os, signal, sys; open(sys.argv[2], 'w').write(' '.join(sys.argv[1:])); "
    "os.kill(int(open(sys.argv[1]).read()), signal.SIGUSR1)"
)


async def test_a_stop_command_is_used_instead_of_sigterm(tmp_path: Path) -> None:
    pid_file, record = tmp_path / "pid", tmp_path / "stop-args"
    engine = EngineProcess(
        [sys.executable, "-c", ENGINE_IGNORING_SIGTERM, str(pid_file)],
        os.environ,
        stop_command=[sys.executable, "-c", STOPPER, str(pid_file), str(record)],
    )
    await engine.start()
    await wait_until(lambda: "up" in engine.tail, "the engine to be up")

    assert await engine.stop(grace=30) == 0  # exited on its own: not killed

    assert record.read_text() == f"{pid_file} {record}"
    assert engine.stop_requested


async def test_a_failing_stop_command_falls_back_to_sigterm_then_kill(tmp_path: Path) -> None:
    pid_file, killed = tmp_path / "pid", tmp_path / "killed"
    ignore_all = ENGINE_IGNORING_SIGTERM.replace("lambda *_: sys.exit(0)", "signal.SIG_IGN")
    engine = EngineProcess(
        [sys.executable, "-c", ignore_all, str(pid_file)],
        os.environ,
        stop_command=[sys.executable, "-c", "raise SystemExit(1)"],
        kill_command=[sys.executable, "-c", f"open({str(killed)!r}, 'w').write('yes')"],
    )
    await engine.start()
    await wait_until(lambda: "up" in engine.tail, "the engine to be up")

    assert await engine.stop(grace=0.5) == -9

    assert killed.read_text() == "yes"  # e.g. `docker kill`: the container is not our child
    assert not pid_alive(engine.pid)
