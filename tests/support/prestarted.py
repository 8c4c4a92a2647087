"""`control-plane ...` as a real process that starts in a fraction of a second.

Importing the control plane costs about 3 s of CPU here, and the crash tests start it dozens
of times. So a fork server (multiprocessing's `forkserver`) imports it once, and each start
forks a fresh process from it that runs the command line as `control-plane` would: its own
pid, event loop, connections and port, its environment replaced by the one given, its stderr
appended to a log, and SIGKILL ends it like any process. What differs from exec'ing the
`control-plane` script: the interpreter and the imports are inherited instead of redone.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from pathlib import Path

PRELOAD = ["control_plane.cli", "control_plane.api.app", "control_plane.runtime", "uvicorn",
           "adapters.aws", "adapters.scaleway", "adapters.baremetal", "adapters.local",
           # imported on the way up (migrations, schema, scheduler):
           "alembic.command", "alembic.autogenerate", "sqlalchemy.dialects.postgresql.asyncpg",
           "pydantic", "litestar.plugins.pydantic", "apscheduler.schedulers.asyncio"]

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def _main(argv: list[str], env: dict[str, str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(fd, 2)
    os.environ.clear()
    os.environ.update(env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # as a freshly exec'd process has them
    from control_plane.cli import app

    app(args=argv, prog_name="control-plane")


class Prestarted:
    """One forked `control-plane` process; answers like `asyncio.subprocess.Process` for what
    the tests use: `pid`, `returncode` (negative signal number when killed), `send_signal`,
    `kill` and `wait()`."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self._process = _context.Process(target=_main, args=(argv, env, str(log)), daemon=True)
        self._process.start()
        self.pid: int = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Its exit code, once it exited (its sentinel becomes readable then)."""
        if self.returncode is None:
            loop = asyncio.get_running_loop()
            ended = loop.create_future()
            loop.add_reader(self._process.sentinel, lambda: ended.done() or ended.set_result(None))
            try:
                await ended
            finally:
                loop.remove_reader(self._process.sentinel)
        self._process.join()
        return self._process.exitcode
