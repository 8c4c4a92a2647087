"""What the agent runs as its engine: one ``vllm serve`` argument list for every engine.

``engine_launch`` puts ``vllm_serve_args`` behind an executable prefix: ``vllm``, the
simulated vLLM (``python -m worker_agent.simulated_vllm``), or ``docker run ... IMAGE``. The
simulated engine takes the same arguments as vLLM; what only a simulation has (boot time,
failure modes) travels in its environment (``engine_env``). Pure: nothing here runs anything.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from worker_agent.config import AgentConfig
from worker_agent.integrity import PACKAGE_ROOT

CONTAINER_PORT = 8000
CONTAINER_HF_CACHE = "/root/.cache/huggingface"


@dataclass(frozen=True)
class EngineLaunch:
    """What to run for one engine, and how to stop it when it is not a plain process."""

    command: list[str]
    env: dict[str, str]
    stop_command: list[str] | None = None
    """Run to stop the engine instead of SIGTERM (``docker stop``); ``None``: SIGTERM."""
    kill_command: list[str] | None = None
    """Run after SIGKILL of our process group when the engine lives elsewhere (a container)."""


def engine_launch(
    config: AgentConfig,
    environ: Mapping[str, str],
    *,
    stop_grace: float,
    container_name: str | None = None,
) -> EngineLaunch:
    """The engine for ``config``: command, environment, and for docker the stop commands.

    ``stop_grace`` is how long a stop may take before the engine is killed (``docker stop
    -t``). ``container_name`` defaults to a new unique name per call.

    The docker runtime is checked here only as command lines: this machine has no docker and
    no GPU, so ``--gpus all`` (needs the NVIDIA container toolkit), the image's behaviour, and
    ``docker stop`` actually stopping the container are untested. A SIGKILLed agent leaves its
    container running (the parent-death signal reaches the docker CLI, not the container).
    """
    env = engine_env(environ, config)
    serve = vllm_serve_args(config)
    if config.runtime == "docker":
        name = container_name or _container_name(config.instance_id)
        grace = str(max(1, round(stop_grace)))
        return EngineLaunch(
            docker_run_command(config, environ, name),
            env,
            stop_command=["docker", "stop", "-t", grace, name],
            kill_command=["docker", "kill", name],
        )
    if config.engine == "vllm":
        return EngineLaunch(["vllm", *serve], env)
    return EngineLaunch([sys.executable, "-m", "worker_agent.simulated_vllm", *serve], env)


def vllm_serve_args(
    config: AgentConfig,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    download_dir: str | None = None,
) -> list[str]:
    """``serve MODEL --host H --port P ...``: the arguments of every engine, real or simulated.

    Options at their vLLM default (tensor parallel size 1, no revision, ...) are left out;
    ``config.vllm_args`` come last. ``download_dir`` overrides ``config.download_dir`` (the
    path inside a container).
    """
    args = [
        "serve", config.model, "--host", host, "--port", str(port or config.engine_port),
        "--served-model-name", config.served_model_name,
    ]  # fmt: skip
    if config.model_revision:
        args += ["--revision", config.model_revision]
    if config.tensor_parallel_size != 1:
        args += ["--tensor-parallel-size", str(config.tensor_parallel_size)]
    if config.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", f"{config.gpu_memory_utilization:g}"]
    if config.max_model_len is not None:
        args += ["--max-model-len", str(config.max_model_len)]
    if download_dir or config.download_dir:
        args += ["--download-dir", download_dir or config.download_dir]
    args += ["--shutdown-timeout", str(config.shutdown_timeout_seconds)]
    return [*args, *config.vllm_args]


def docker_run_command(config: AgentConfig, environ: Mapping[str, str], name: str) -> list[str]:
    """``docker run`` of ``config.docker_image`` serving on 127.0.0.1:``engine_port``.

    The weights directory (``download_dir``, else the host's Hugging Face cache) is mounted
    at the container's Hugging Face cache; vLLM inside gets the same ``serve`` arguments with
    host 0.0.0.0, port 8000 and that in-container path, so the files on the host are laid out
    as with the process runtime. ``--entrypoint vllm`` because the image's own entrypoint
    changed across versions (``python3 -m vllm.entrypoints.openai.api_server``, later
    ``vllm serve``). ``HF_TOKEN`` is passed by name only: its value never enters a command line.
    """
    cache = config.download_dir or environ.get("HF_HOME") or _home_cache(environ)
    command = [
        "docker", "run", "--rm", "--name", name, "--gpus", "all", "--ipc=host",
        "-p", f"127.0.0.1:{config.engine_port}:{CONTAINER_PORT}",
        "-v", f"{cache}:{CONTAINER_HF_CACHE}",
    ]  # fmt: skip
    if "HF_TOKEN" in environ:
        command += ["-e", "HF_TOKEN"]
    serve = vllm_serve_args(
        config,
        host="0.0.0.0",
        port=CONTAINER_PORT,
        download_dir=CONTAINER_HF_CACHE if config.download_dir else None,
    )
    return [*command, "--entrypoint", "vllm", config.docker_image, *serve]


def engine_env(environ: Mapping[str, str], config: AgentConfig) -> dict[str, str]:
    """The engine's environment: the agent's, minus every ``WORKER_AGENT_*`` (the token).

    Unbuffered output so phases arrive as they happen. For the simulated engine, the agent's
    own package is made importable wherever the agent was started from, and the simulation
    knobs (``SIMULATED_VLLM_*``) come from the ``WORKER_AGENT_SIM_*`` settings.
    """
    env = {k: v for k, v in environ.items() if not k.startswith("WORKER_AGENT_")}
    env["PYTHONUNBUFFERED"] = "1"
    if config.engine == "simulated":
        paths = [str(PACKAGE_ROOT.parent), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env["SIMULATED_VLLM_BOOT_SECONDS"] = f"{config.sim_boot_seconds:g}"
        env["SIMULATED_VLLM_FAIL"] = config.sim_fail or ""
        env["SIMULATED_VLLM_FAIL_AFTER_SECONDS"] = f"{config.sim_fail_after_seconds:g}"
    return env


def _container_name(instance_id: str) -> str:
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", instance_id)[:40]
    return f"worker-agent-{safe}-{secrets.token_hex(4)}"


def _home_cache(environ: Mapping[str, str]) -> str:
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".cache", "huggingface")
