"""Agent settings, read once from the environment (prefix ``WORKER_AGENT_``) and passed down.

The adapter that starts the agent injects these variables (cloud-init, SSH, install script).
``load_config`` checks all of them at once and raises ``ConfigError`` listing every problem;
``python -m worker_agent`` turns that into a message on stderr and exit code 2.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ENGINES = ("simulated", "vllm")
RUNTIMES = ("process", "docker")
SIM_FAILURES = ("kv_cache", "crash", "hang")
DEFAULT_DOCKER_IMAGE = "vllm/vllm-openai:v0.19.1"
"""An official vLLM image recent enough for ``--shutdown-timeout`` (added in v0.18.0)."""

RESERVED_VLLM_ARGS = {
    "--model": "use WORKER_AGENT_MODEL",
    "--host": "the agent keeps the engine on 127.0.0.1",
    "--port": "use WORKER_AGENT_ENGINE_PORT",
    "--served-model-name": "use WORKER_AGENT_SERVED_MODEL_NAME",
    "--revision": "use WORKER_AGENT_MODEL_REVISION",
    "--tensor-parallel-size": "use WORKER_AGENT_TENSOR_PARALLEL_SIZE",
    "-tp": "use WORKER_AGENT_TENSOR_PARALLEL_SIZE",
    "--gpu-memory-utilization": "use WORKER_AGENT_GPU_MEMORY_UTILIZATION",
    "--max-model-len": "use WORKER_AGENT_MAX_MODEL_LEN",
    "--download-dir": "use WORKER_AGENT_DOWNLOAD_DIR",
    "--shutdown-timeout": "use WORKER_AGENT_SHUTDOWN_TIMEOUT_SECONDS",
}
"""``vllm serve`` options the agent sets itself: a second value in ``VLLM_ARGS`` would win
silently (argparse keeps the last one) and break the agent's probes or settings."""


class ConfigError(Exception):
    """The agent's environment is missing or has invalid settings."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs, validated. ``token`` is kept out of ``repr``."""

    control_plane_url: str
    """Base URL of the control plane (``WORKER_AGENT_CONTROL_PLANE_URL``), no trailing slash."""

    token: str = field(repr=False)
    """Bearer token for the control plane (``WORKER_AGENT_TOKEN``). Secret: never logged."""

    instance_id: str
    """Id of this instance in the control plane (``WORKER_AGENT_INSTANCE_ID``)."""

    model: str
    """Model vLLM loads (``WORKER_AGENT_MODEL``), e.g. ``Qwen/Qwen2.5-0.5B-Instruct``."""

    served_model_name: str
    """Name the model is served under (``WORKER_AGENT_SERVED_MODEL_NAME``, default: model)."""

    engine: str = "simulated"
    """``simulated`` (``worker_agent.simulated_vllm``) or ``vllm`` (``WORKER_AGENT_ENGINE``)."""

    engine_port: int = 8001
    """Port the engine listens on, on 127.0.0.1 (``WORKER_AGENT_ENGINE_PORT``)."""

    host: str = "127.0.0.1"
    """Address of the agent's own ``/info`` server (``WORKER_AGENT_HOST``)."""

    port: int = 8002
    """Port of the agent's own ``/info`` server (``WORKER_AGENT_PORT``)."""

    info_server: bool = True
    """Serve ``/info`` (``WORKER_AGENT_INFO_SERVER=off``: no listening socket at all; the
    same facts travel in every heartbeat)."""

    model_revision: str | None = None
    """Branch, tag or commit of the model (``WORKER_AGENT_MODEL_REVISION``, vLLM ``--revision``)."""

    tensor_parallel_size: int = 1
    """GPUs the model is split across (``WORKER_AGENT_TENSOR_PARALLEL_SIZE``), >= 1."""

    gpu_memory_utilization: float | None = None
    """Share of GPU memory vLLM may use, 0 < x <= 1 (``WORKER_AGENT_GPU_MEMORY_UTILIZATION``);
    ``None`` leaves vLLM's default (0.9)."""

    max_model_len: int | None = None
    """Context length (``WORKER_AGENT_MAX_MODEL_LEN``); ``None``: the model's own."""

    download_dir: str | None = None
    """Directory for model weights (``WORKER_AGENT_DOWNLOAD_DIR``; absolute with docker, else
    relative to the agent's working directory); ``None``: the Hugging Face cache (``HF_HOME``
    or ``~/.cache/huggingface``)."""

    vllm_args: tuple[str, ...] = ()
    """Extra ``vllm serve`` arguments, shell-split (``WORKER_AGENT_VLLM_ARGS``), e.g.
    ``--enforce-eager``; options in ``RESERVED_VLLM_ARGS`` are refused."""

    runtime: str = "process"
    """``process`` (``vllm`` on this host) or ``docker`` (``WORKER_AGENT_RUNTIME``)."""

    docker_image: str = DEFAULT_DOCKER_IMAGE
    """Image of the ``docker`` runtime (``WORKER_AGENT_DOCKER_IMAGE``)."""

    shutdown_timeout_seconds: int = 30
    """vLLM's ``--shutdown-timeout``: after SIGTERM, in-flight requests get this long to finish
    (``WORKER_AGENT_SHUTDOWN_TIMEOUT_SECONDS``, whole seconds, >= 0)."""

    drain_timeout_seconds: float = 300.0
    """How long a drain waits for the engine to go idle before stopping it anyway
    (``WORKER_AGENT_DRAIN_TIMEOUT_SECONDS``)."""

    stall_seconds: float = 60.0
    """Waiting requests with a flat ``generation_tokens_total`` for this long mean the engine
    hung (``WORKER_AGENT_STALL_SECONDS``)."""

    probe_interval_seconds: float = 30.0
    """Interval between one-token probe completions (``WORKER_AGENT_PROBE_INTERVAL_SECONDS``)."""

    probe_timeout_seconds: float = 30.0
    """A probe unanswered for this long means the engine hung
    (``WORKER_AGENT_PROBE_TIMEOUT_SECONDS``)."""

    sim_boot_seconds: float = 5.0
    """Total boot time of the simulated engine (``WORKER_AGENT_SIM_BOOT_SECONDS``)."""

    sim_fail: str | None = None
    """How the simulated engine fails (``WORKER_AGENT_SIM_FAIL``): ``kv_cache`` (its startup),
    ``crash`` (exits) or ``hang`` (stops answering) ``sim_fail_after_seconds`` after ready."""

    sim_fail_after_seconds: float = 5.0
    """Delay after ready before ``crash`` or ``hang`` (``WORKER_AGENT_SIM_FAIL_AFTER_SECONDS``)."""

    heartbeat_seconds: float = 10.0
    """Interval between heartbeats, from the agent's start (``WORKER_AGENT_HEARTBEAT_SECONDS``)."""

    boot_timeout_seconds: float = 1800.0
    """Boot longer than this is a failure (``WORKER_AGENT_BOOT_TIMEOUT_SECONDS``)."""


def load_config(environ: Mapping[str, str]) -> AgentConfig:
    """Build the settings from ``environ``; raise ``ConfigError`` naming every bad variable."""
    problems: list[str] = []
    reader = _Reader(environ, problems)
    url = reader.required("CONTROL_PLANE_URL").rstrip("/")
    if url and not _is_http_url(url):
        problems.append(f"WORKER_AGENT_CONTROL_PLANE_URL must be an http(s) URL, got {url!r}")
    token = reader.required("TOKEN")
    instance_id = reader.required("INSTANCE_ID")
    model = reader.required("MODEL")
    engine = reader.choice("ENGINE", ENGINES, "simulated")
    runtime = reader.choice("RUNTIME", RUNTIMES, "process")
    if runtime == "docker" and engine != "vllm":
        problems.append("WORKER_AGENT_RUNTIME=docker needs WORKER_AGENT_ENGINE=vllm")
    sim_fail = reader.choice("SIM_FAIL", ("", *SIM_FAILURES), "") or None
    download_dir = reader.optional("DOWNLOAD_DIR")
    if runtime == "docker" and download_dir is not None and not posixpath.isabs(download_dir):
        # docker -v would take a relative path for a named volume
        problems.append(
            f"WORKER_AGENT_DOWNLOAD_DIR must be an absolute path with the docker runtime, "
            f"got {download_dir!r}"
        )
    vllm_args = _vllm_args(environ.get("WORKER_AGENT_VLLM_ARGS", ""), problems)
    config = AgentConfig(
        control_plane_url=url,
        token=token,
        instance_id=instance_id,
        model=model,
        served_model_name=environ.get("WORKER_AGENT_SERVED_MODEL_NAME", "").strip() or model,
        engine=engine,
        engine_port=reader.port("ENGINE_PORT", 8001),
        host=environ.get("WORKER_AGENT_HOST", "").strip() or "127.0.0.1",
        port=reader.port("PORT", 8002),
        info_server=reader.choice("INFO_SERVER", ("on", "off"), "on") == "on",
        model_revision=reader.optional("MODEL_REVISION"),
        tensor_parallel_size=reader.integer("TENSOR_PARALLEL_SIZE", 1, minimum=1),
        gpu_memory_utilization=reader.fraction("GPU_MEMORY_UTILIZATION"),
        max_model_len=reader.integer("MAX_MODEL_LEN", None, minimum=1),
        download_dir=download_dir,
        vllm_args=vllm_args,
        runtime=runtime,
        docker_image=reader.optional("DOCKER_IMAGE") or DEFAULT_DOCKER_IMAGE,
        shutdown_timeout_seconds=reader.integer("SHUTDOWN_TIMEOUT_SECONDS", 30, minimum=0),
        drain_timeout_seconds=reader.number("DRAIN_TIMEOUT_SECONDS", 300.0, minimum=0.0),
        stall_seconds=reader.number("STALL_SECONDS", 60.0, minimum=0.05),
        probe_interval_seconds=reader.number("PROBE_INTERVAL_SECONDS", 30.0, minimum=0.05),
        probe_timeout_seconds=reader.number("PROBE_TIMEOUT_SECONDS", 30.0, minimum=0.05),
        sim_boot_seconds=reader.number("SIM_BOOT_SECONDS", 5.0, minimum=0.0),
        sim_fail=sim_fail,
        sim_fail_after_seconds=reader.number("SIM_FAIL_AFTER_SECONDS", 5.0, minimum=0.0),
        heartbeat_seconds=reader.number("HEARTBEAT_SECONDS", 10.0, minimum=0.05),
        boot_timeout_seconds=reader.number("BOOT_TIMEOUT_SECONDS", 1800.0, minimum=1.0),
    )
    if problems:
        raise ConfigError(problems)
    return config


@dataclass
class _Reader:
    environ: Mapping[str, str]
    problems: list[str]

    def _raw(self, name: str) -> str:
        return self.environ.get(f"WORKER_AGENT_{name}", "").strip()

    def required(self, name: str) -> str:
        value = self._raw(name)
        if not value:
            self.problems.append(f"WORKER_AGENT_{name} is required")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self._raw(name) or default
        if value not in allowed:
            shown = ", ".join(a for a in allowed if a)
            self.problems.append(f"WORKER_AGENT_{name} must be one of {shown}, got {value!r}")
        return value

    def optional(self, name: str) -> str | None:
        return self._raw(name) or None

    def integer(self, name: str, default: int | None, *, minimum: int) -> int | None:
        value = self._raw(name)
        if not value:
            return default
        if not _DIGITS.fullmatch(value) or int(value) < minimum:
            self.problems.append(
                f"WORKER_AGENT_{name} must be a whole number >= {minimum}, got {value!r}"
            )
            return default
        return int(value)

    def fraction(self, name: str) -> float | None:
        """A number in (0, 1], or ``None`` when unset."""
        value = self._raw(name)
        if not value:
            return None
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not 0.0 < number <= 1.0:
            self.problems.append(f"WORKER_AGENT_{name} must be a number in (0, 1], got {value!r}")
            return None
        return number

    def port(self, name: str, default: int) -> int:
        value = self._raw(name)
        if not value:
            return default
        if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= 65535:
            self.problems.append(f"WORKER_AGENT_{name} must be a port 1-65535, got {value!r}")
            return default
        return int(value)

    def number(self, name: str, default: float, *, minimum: float) -> float:
        value = self._raw(name)
        if not value:
            return default
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not number >= minimum or number == float("inf"):
            self.problems.append(
                f"WORKER_AGENT_{name} must be a number >= {minimum}, got {value!r}"
            )
            return default
        return number


_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() accepts "²", which int() refuses


def _vllm_args(raw: str, problems: list[str]) -> tuple[str, ...]:
    try:
        args = tuple(shlex.split(raw))
    except ValueError as exc:
        problems.append(f"WORKER_AGENT_VLLM_ARGS cannot be parsed: {exc}")
        return ()
    for arg in args:
        option = arg.split("=", 1)[0]
        if option in RESERVED_VLLM_ARGS:
            problems.append(
                f"WORKER_AGENT_VLLM_ARGS must not set {option}: {RESERVED_VLLM_ARGS[option]}"
            )
    return args


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)
