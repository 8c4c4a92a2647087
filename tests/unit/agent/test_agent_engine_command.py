"""How the agent starts its engine: one ``vllm serve`` argument list, three prefixes, and the
engine's environment. Docker is not installed here: its command lines are checked exactly."""

import sys

from worker_agent.config import load_config
from worker_agent.engine_command import engine_env, engine_launch, vllm_serve_args
from worker_agent.integrity import PACKAGE_ROOT

BASE = {
    "WORKER_AGENT_CONTROL_PLANE_URL": "http://cp",
    "WORKER_AGENT_TOKEN": "secret",
    "WORKER_AGENT_INSTANCE_ID": "i-1",
    "WORKER_AGENT_MODEL": "meta-llama/Llama-3.2-1B-Instruct",
}
EVERY_OPTION = {
    "WORKER_AGENT_ENGINE": "vllm",
    "WORKER_AGENT_ENGINE_PORT": "8123",
    "WORKER_AGENT_SERVED_MODEL_NAME": "llama",
    "WORKER_AGENT_MODEL_REVISION": "0cb88a4f",
    "WORKER_AGENT_TENSOR_PARALLEL_SIZE": "2",
    "WORKER_AGENT_GPU_MEMORY_UTILIZATION": "0.85",
    "WORKER_AGENT_MAX_MODEL_LEN": "8192",
    "WORKER_AGENT_DOWNLOAD_DIR": "/data/models",
    "WORKER_AGENT_SHUTDOWN_TIMEOUT_SECONDS": "45",
    "WORKER_AGENT_VLLM_ARGS": "--enforce-eager --kv-cache-dtype fp8",
}
HOST = {"PATH": "/usr/bin", "HOME": "/root"}


def launch(settings: dict[str, str], environ: dict[str, str] = HOST, **kwargs):
    return engine_launch(load_config(BASE | settings), environ, stop_grace=60.0, **kwargs)


def test_vllm_process_with_every_option() -> None:
    assert launch(EVERY_OPTION).command == [
        "vllm", "serve", "meta-llama/Llama-3.2-1B-Instruct", "--host", "127.0.0.1",
        "--port", "8123", "--served-model-name", "llama", "--revision", "0cb88a4f",
        "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.85",
        "--max-model-len", "8192", "--download-dir", "/data/models",
        "--shutdown-timeout", "45", "--enforce-eager", "--kv-cache-dtype", "fp8",
    ]  # fmt: skip


def test_vllm_process_defaults_leave_vllm_defaults_alone() -> None:
    engine = launch({"WORKER_AGENT_ENGINE": "vllm"})

    assert engine.command == [
        "vllm", "serve", "meta-llama/Llama-3.2-1B-Instruct", "--host", "127.0.0.1",
        "--port", "8001", "--served-model-name", "meta-llama/Llama-3.2-1B-Instruct",
        "--shutdown-timeout", "30",
    ]  # fmt: skip
    assert (engine.stop_command, engine.kill_command) == (None, None)


def test_simulated_engine_gets_the_same_arguments_and_its_knobs_by_environment() -> None:
    settings = EVERY_OPTION | {
        "WORKER_AGENT_ENGINE": "simulated",
        "WORKER_AGENT_SIM_BOOT_SECONDS": "1.5",
        "WORKER_AGENT_SIM_FAIL": "crash",
        "WORKER_AGENT_SIM_FAIL_AFTER_SECONDS": "2",
    }
    simulated = launch(settings)
    real = launch(settings | {"WORKER_AGENT_ENGINE": "vllm"})

    assert simulated.command[:3] == [sys.executable, "-m", "worker_agent.simulated_vllm"]
    assert simulated.command[3:] == real.command[1:]
    assert simulated.command[3:] == vllm_serve_args(load_config(BASE | settings))
    assert simulated.env["SIMULATED_VLLM_BOOT_SECONDS"] == "1.5"
    assert simulated.env["SIMULATED_VLLM_FAIL"] == "crash"
    assert simulated.env["SIMULATED_VLLM_FAIL_AFTER_SECONDS"] == "2"
    assert not any(key.startswith("SIMULATED_VLLM_") for key in real.env)


def test_docker_runtime_with_every_option() -> None:
    engine = launch(
        EVERY_OPTION | {"WORKER_AGENT_RUNTIME": "docker"},
        HOST | {"HF_TOKEN": "hf_secret"},
        container_name="worker-agent-i-1-abcd",
    )

    assert engine.command == [
        "docker", "run", "--rm", "--name", "worker-agent-i-1-abcd", "--gpus", "all",
        "--ipc=host", "-p", "127.0.0.1:8123:8000",
        "-v", "/data/models:/root/.cache/huggingface", "-e", "HF_TOKEN",
        "--entrypoint", "vllm", "vllm/vllm-openai:v0.19.1",
        "serve", "meta-llama/Llama-3.2-1B-Instruct", "--host", "0.0.0.0", "--port", "8000",
        "--served-model-name", "llama", "--revision", "0cb88a4f",
        "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.85",
        "--max-model-len", "8192", "--download-dir", "/root/.cache/huggingface",
        "--shutdown-timeout", "45", "--enforce-eager", "--kv-cache-dtype", "fp8",
    ]  # fmt: skip
    assert "hf_secret" not in engine.command  # by name only: docker reads it from its env
    assert engine.env["HF_TOKEN"] == "hf_secret"
    assert engine.stop_command == ["docker", "stop", "-t", "60", "worker-agent-i-1-abcd"]
    assert engine.kill_command == ["docker", "kill", "worker-agent-i-1-abcd"]


def test_docker_runtime_defaults_mount_the_hugging_face_cache() -> None:
    settings = {
        "WORKER_AGENT_ENGINE": "vllm",
        "WORKER_AGENT_RUNTIME": "docker",
        "WORKER_AGENT_DOCKER_IMAGE": "vllm/vllm-openai:v0.20.0",
    }

    home = launch(settings, container_name="c").command
    hf_home = launch(settings, HOST | {"HF_HOME": "/srv/hf"}, container_name="c").command

    assert home == [
        "docker", "run", "--rm", "--name", "c", "--gpus", "all", "--ipc=host",
        "-p", "127.0.0.1:8001:8000", "-v", "/root/.cache/huggingface:/root/.cache/huggingface",
        "--entrypoint", "vllm", "vllm/vllm-openai:v0.20.0",
        "serve", "meta-llama/Llama-3.2-1B-Instruct", "--host", "0.0.0.0", "--port", "8000",
        "--served-model-name", "meta-llama/Llama-3.2-1B-Instruct", "--shutdown-timeout", "30",
    ]  # fmt: skip
    assert "/srv/hf:/root/.cache/huggingface" in hf_home


def test_docker_container_names_are_unique_and_valid() -> None:
    settings = {"WORKER_AGENT_ENGINE": "vllm", "WORKER_AGENT_RUNTIME": "docker"}
    odd_id = {"WORKER_AGENT_INSTANCE_ID": "inst/42 x"}

    names = {launch(settings | odd_id).stop_command[-1] for _ in range(5)}

    assert len(names) == 5
    assert all(name.startswith("worker-agent-inst-42-x-") for name in names)


def test_engine_env_drops_agent_settings_and_token() -> None:
    environ = BASE | {"PATH": "/usr/bin", "HF_HOME": "/data/hf", "PYTHONPATH": "/x"}
    config = load_config(BASE)

    env = engine_env(environ, load_config(BASE | {"WORKER_AGENT_ENGINE": "vllm"}))

    assert not any(key.startswith("WORKER_AGENT_") for key in env)
    assert "secret" not in env.values()
    assert env["PATH"] == "/usr/bin" and env["HF_HOME"] == "/data/hf"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"] == "/x"
    assert engine_env(environ, config)["PYTHONPATH"] == f"{PACKAGE_ROOT.parent}:/x"
