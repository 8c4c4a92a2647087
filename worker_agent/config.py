"""Agent settings, read once from the environment (prefix ``WORKER_AGENT_``) and passed down.

The adapter that starts the agent injects these variables (cloud-init, SSH, install script).
``load_config`` checks all of them at once and raises ``ConfigError`` listing every problem;
``python -m worker_agent`` turns that into a message on stderr and exit code 2.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ENGINES = ("simulated", "vllm")
SIM_FAILURES = ("kv_cache",)


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

    vllm_args: tuple[str, ...] = ()
    """Extra ``vllm serve`` arguments, shell-split (``WORKER_AGENT_VLLM_ARGS``), e.g. ``-tp 2``."""

    sim_boot_seconds: float = 5.0
    """Total boot time of the simulated engine (``WORKER_AGENT_SIM_BOOT_SECONDS``)."""

    sim_fail: str | None = None
    """``kv_cache``: the simulated engine fails its startup (``WORKER_AGENT_SIM_FAIL``)."""

    heartbeat_seconds: float = 10.0
    """Interval between heartbeats once the engine is ready (``WORKER_AGENT_HEARTBEAT_SECONDS``)."""

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
    sim_fail = reader.choice("SIM_FAIL", ("", *SIM_FAILURES), "") or None
    try:
        vllm_args = tuple(shlex.split(environ.get("WORKER_AGENT_VLLM_ARGS", "")))
    except ValueError as exc:
        problems.append(f"WORKER_AGENT_VLLM_ARGS cannot be parsed: {exc}")
        vllm_args = ()
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
        vllm_args=vllm_args,
        sim_boot_seconds=reader.number("SIM_BOOT_SECONDS", 5.0, minimum=0.0),
        sim_fail=sim_fail,
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

    def port(self, name: str, default: int) -> int:
        value = self._raw(name)
        if not value:
            return default
        if not value.isdigit() or not 1 <= int(value) <= 65535:
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


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)
