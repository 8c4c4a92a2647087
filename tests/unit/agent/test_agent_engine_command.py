"""How the agent starts its engine: command lines and the engine's environment."""

import sys

from worker_agent.config import load_config
from worker_agent.engine import engine_command, engine_env
from worker_agent.integrity import PACKAGE_ROOT

BASE = {
    "WORKER_AGENT_CONTROL_PLANE_URL": "http://cp",
    "WORKER_AGENT_TOKEN": "secret",
    "WORKER_AGENT_INSTANCE_ID": "i-1",
    "WORKER_AGENT_MODEL": "meta-llama/Llama-3.2-1B-Instruct",
}


def test_vllm_command() -> None:
    config = load_config(
        BASE
        | {
            "WORKER_AGENT_ENGINE": "vllm",
            "WORKER_AGENT_ENGINE_PORT": "8123",
            "WORKER_AGENT_SERVED_MODEL_NAME": "llama",
            "WORKER_AGENT_VLLM_ARGS": "--tensor-parallel-size 2 --enforce-eager",
        }
    )

    assert engine_command(config) == [
        "vllm", "serve", "meta-llama/Llama-3.2-1B-Instruct", "--host", "127.0.0.1",
        "--port", "8123", "--served-model-name", "llama", "--tensor-parallel-size", "2",
        "--enforce-eager",
    ]  # fmt: skip


def test_simulated_command() -> None:
    config = load_config(
        BASE | {"WORKER_AGENT_SIM_BOOT_SECONDS": "1.5", "WORKER_AGENT_SIM_FAIL": "kv_cache"}
    )

    assert engine_command(config) == [
        sys.executable, "-m", "worker_agent.simulated_vllm", "--model",
        "meta-llama/Llama-3.2-1B-Instruct", "--host", "127.0.0.1", "--port", "8001",
        "--boot-seconds", "1.5", "--served-model-name", "meta-llama/Llama-3.2-1B-Instruct",
        "--fail", "kv_cache",
    ]  # fmt: skip


def test_engine_env_drops_agent_settings_and_token() -> None:
    environ = BASE | {"PATH": "/usr/bin", "HF_HOME": "/data/hf", "PYTHONPATH": "/x"}

    env = engine_env(environ, simulated=False)

    assert not any(key.startswith("WORKER_AGENT_") for key in env)
    assert "secret" not in env.values()
    assert env["PATH"] == "/usr/bin" and env["HF_HOME"] == "/data/hf"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"] == "/x"
    assert engine_env(environ, simulated=True)["PYTHONPATH"] == f"{PACKAGE_ROOT.parent}:/x"
