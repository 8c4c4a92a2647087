"""The shell the bare-metal adapter runs on hosts, and the agent's settings file: pure text.

Why it is separate: these strings are the adapter's protocol with a host's staging directory
(`agent.env`, `install.sh`, the wheel, `bootstrap.sh`, then `bootstrap.pid`, `install.log` and
`status` written on the host), and building them needs no connection, so they read and test as
plain functions. Every value put into a command is shell-quoted here, or (staging paths,
instance ids) restricted by the provider to characters that need no quoting.
"""

from __future__ import annotations

import re
import shlex

from adapters.baremetal.inventory import AgentArtifact
from adapters.base import InvalidSpec

LOG_TAIL_LINES = 20

PROBE = """cd {staging} 2>/dev/null || {{ echo absent; exit 0; }}
if [ -f status ]; then echo "done $(cat status)"; exit 0; fi
if [ ! -f bootstrap.pid ]; then if [ -f agent.env ]; then echo staged; else echo absent; fi; exit 0; fi
if kill -0 "$(cat bootstrap.pid)" 2>/dev/null; then echo running; exit 0; fi
if [ -f status ]; then echo "done $(cat status)"; else echo lost; fi"""
"""Prints the install's state in `{staging}`: `absent`, `staged`, `running`, `lost` or
`done <exit status>`."""

_ENV_KEY = re.compile(r"[A-Z_][A-Z0-9_]*\Z")


def bootstrap(sudo: str, prefix: str, url: str, artifact: AgentArtifact,
              extra: list[str]) -> str:
    """The script run detached on the host, in the staging directory: settings into the
    prefix, then install.sh with the verified local wheel; log and exit status to files."""
    q = shlex.quote
    args = " ".join(q(a) for a in ["--sha256", artifact.sha256, "--prefix", prefix, *extra])
    return f"""#!/bin/sh
# Written by the control plane (adapters/baremetal/): installs the worker agent from this
# directory. Output: install.log; exit status: status.
cd "$(dirname "$0")" || exit 1
dir=$(pwd)
echo $$ >bootstrap.pid
{{
	{sudo}install -d -m 700 {q(prefix)} &&
		{sudo}install -m 600 agent.env {q(prefix + "/agent.env")} &&
		{sudo}bash "$dir/install.sh" --control-plane {q(url)} --artifact "$dir"/{q(artifact.filename)} {args}
}} >install.log 2>&1 </dev/null
code=$?
if [ "$code" -eq 0 ]; then rm -f agent.env; fi
echo "$code" >status.tmp && mv -f status.tmp status
"""


def launch(staging: str) -> str:
    """The command starting `bootstrap.sh` detached, recording its pid."""
    # Its own session: the install outlives this SSH connection; its pid tells it runs. A
    # simple command in the background, so that $! is the script's pid (setsid execs it).
    return (f"cd {staging} && rm -f status status.tmp || exit 1;"
            " setsid sh ./bootstrap.sh </dev/null >/dev/null 2>&1 & echo $! >bootstrap.pid")


def uninstall(staging: str, sudo: str, prefix: str, extra: list[str]) -> str:
    """Stop a bootstrap still running (its whole process group), then `install.sh --uninstall`."""
    args = " ".join(shlex.quote(a) for a in ["--uninstall", "--prefix", prefix, *extra])
    return (f"cd {staging} || exit 1; if [ -f bootstrap.pid ] && [ ! -f status ]; then"
            f' {sudo}kill -TERM -- "-$(cat bootstrap.pid)" 2>/dev/null; fi;'
            f" {sudo}bash ./install.sh {args} </dev/null >uninstall.log 2>&1; code=$?;"
            f' [ "$code" -eq 0 ] || tail -n {LOG_TAIL_LINES} uninstall.log; exit "$code"')


def env_file(env: dict[str, str]) -> bytes:
    """agent.env as bash (`. file`) and systemd (`EnvironmentFile=`) both read it."""
    lines = ["# Worker agent settings, written by the control plane. Secret: holds the agent's token."]
    for key, value in env.items():
        if not _ENV_KEY.match(key) or "\n" in value or "\0" in value:
            raise InvalidSpec(f"agent_env has an invalid variable {key!r}")  # never the value
        lines.append("{}='{}'".format(key, value.replace("'", "'\\''")))
    return ("\n".join(lines) + "\n").encode()
