"""``config.load_config`` and the exit code 2 of ``python -m worker_agent`` on bad settings."""

import pytest

from worker_agent.__main__ import main
from worker_agent.config import AgentConfig, ConfigError, load_config

REQUIRED = {
    "WORKER_AGENT_CONTROL_PLANE_URL": "https://cp.example.com/",
    "WORKER_AGENT_TOKEN": "s3cret-token",
    "WORKER_AGENT_INSTANCE_ID": "inst-42",
    "WORKER_AGENT_MODEL": "Qwen/Qwen2.5-0.5B-Instruct",
}


def test_defaults() -> None:
    config = load_config(REQUIRED)

    assert config == AgentConfig(
        control_plane_url="https://cp.example.com",
        token="s3cret-token",
        instance_id="inst-42",
        model="Qwen/Qwen2.5-0.5B-Instruct",
        served_model_name="Qwen/Qwen2.5-0.5B-Instruct",
        engine="simulated",
        engine_port=8001,
        host="127.0.0.1",
        port=8002,
        model_revision=None,
        tensor_parallel_size=1,
        gpu_memory_utilization=None,
        max_model_len=None,
        download_dir=None,
        vllm_args=(),
        runtime="process",
        docker_image="vllm/vllm-openai:v0.19.1",
        shutdown_timeout_seconds=30,
        drain_timeout_seconds=300.0,
        stall_seconds=60.0,
        probe_interval_seconds=30.0,
        probe_timeout_seconds=30.0,
        sim_boot_seconds=5.0,
        sim_fail=None,
        sim_fail_after_seconds=5.0,
        heartbeat_seconds=10.0,
        boot_timeout_seconds=1800.0,
    )


def test_every_setting_is_read() -> None:
    config = load_config(
        REQUIRED
        | {
            "WORKER_AGENT_ENGINE": "vllm",
            "WORKER_AGENT_ENGINE_PORT": "9001",
            "WORKER_AGENT_HOST": "0.0.0.0",
            "WORKER_AGENT_PORT": "9002",
            "WORKER_AGENT_SERVED_MODEL_NAME": "qwen",
            "WORKER_AGENT_MODEL_REVISION": "v2.1",
            "WORKER_AGENT_TENSOR_PARALLEL_SIZE": "2",
            "WORKER_AGENT_GPU_MEMORY_UTILIZATION": "0.85",
            "WORKER_AGENT_MAX_MODEL_LEN": "8192",
            "WORKER_AGENT_DOWNLOAD_DIR": "/data/models",
            "WORKER_AGENT_VLLM_ARGS": "--enforce-eager --kv-cache-dtype 'fp8'",
            "WORKER_AGENT_RUNTIME": "docker",
            "WORKER_AGENT_DOCKER_IMAGE": "registry.example.com/vllm-openai:v0.20.0",
            "WORKER_AGENT_SHUTDOWN_TIMEOUT_SECONDS": "45",
            "WORKER_AGENT_DRAIN_TIMEOUT_SECONDS": "120",
            "WORKER_AGENT_STALL_SECONDS": "90",
            "WORKER_AGENT_PROBE_INTERVAL_SECONDS": "15",
            "WORKER_AGENT_PROBE_TIMEOUT_SECONDS": "20",
            "WORKER_AGENT_SIM_BOOT_SECONDS": "1.5",
            "WORKER_AGENT_SIM_FAIL": "hang",
            "WORKER_AGENT_SIM_FAIL_AFTER_SECONDS": "3",
            "WORKER_AGENT_HEARTBEAT_SECONDS": "2",
            "WORKER_AGENT_BOOT_TIMEOUT_SECONDS": "60",
        }
    )

    assert (config.engine, config.engine_port, config.host, config.port) == (
        "vllm",
        9001,
        "0.0.0.0",
        9002,
    )
    assert config.served_model_name == "qwen"
    assert (config.model_revision, config.tensor_parallel_size) == ("v2.1", 2)
    assert (config.gpu_memory_utilization, config.max_model_len) == (0.85, 8192)
    assert config.download_dir == "/data/models"
    assert config.vllm_args == ("--enforce-eager", "--kv-cache-dtype", "fp8")
    assert (config.runtime, config.docker_image) == (
        "docker",
        "registry.example.com/vllm-openai:v0.20.0",
    )
    assert (config.shutdown_timeout_seconds, config.drain_timeout_seconds) == (45, 120.0)
    assert (config.stall_seconds, config.probe_interval_seconds) == (90.0, 15.0)
    assert config.probe_timeout_seconds == 20.0
    assert (config.sim_boot_seconds, config.sim_fail, config.sim_fail_after_seconds) == (
        1.5,
        "hang",
        3.0,
    )
    assert (config.heartbeat_seconds, config.boot_timeout_seconds) == (2.0, 60.0)


def test_token_is_not_in_repr() -> None:
    config = load_config(REQUIRED)

    assert "s3cret-token" not in repr(config)
    assert "s3cret-token" not in str(config)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            {
                "WORKER_AGENT_CONTROL_PLANE_URL": "ftp://cp",
                "WORKER_AGENT_TOKEN": "  ",
                "WORKER_AGENT_ENGINE": "tgi",
                "WORKER_AGENT_ENGINE_PORT": "70000",
                "WORKER_AGENT_PORT": "http",
                "WORKER_AGENT_SIM_FAIL": "oom",
                "WORKER_AGENT_HEARTBEAT_SECONDS": "0",
                "WORKER_AGENT_BOOT_TIMEOUT_SECONDS": "nan",
                "WORKER_AGENT_SIM_BOOT_SECONDS": "-1",
                "WORKER_AGENT_VLLM_ARGS": "--unclosed 'quote",
            }
        )

    text = "\n".join(caught.value.problems)
    for name in (
        "CONTROL_PLANE_URL must be an http(s) URL",
        "TOKEN is required",
        "INSTANCE_ID is required",
        "MODEL is required",
        "ENGINE must be one of simulated, vllm, got 'tgi'",
        "ENGINE_PORT must be a port",
        "WORKER_AGENT_PORT must be a port",
        "SIM_FAIL must be one of kv_cache, crash, hang, got 'oom'",
        "HEARTBEAT_SECONDS must be a number",
        "BOOT_TIMEOUT_SECONDS must be a number",
        "SIM_BOOT_SECONDS must be a number",
        "VLLM_ARGS cannot be parsed",
    ):
        assert name in text
    assert len(caught.value.problems) == 12


def test_engine_options_are_validated_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            REQUIRED
            | {
                "WORKER_AGENT_TENSOR_PARALLEL_SIZE": "0",
                "WORKER_AGENT_GPU_MEMORY_UTILIZATION": "1.5",
                "WORKER_AGENT_MAX_MODEL_LEN": "4k",
                "WORKER_AGENT_RUNTIME": "podman",
                "WORKER_AGENT_SHUTDOWN_TIMEOUT_SECONDS": "2.5",
                "WORKER_AGENT_DRAIN_TIMEOUT_SECONDS": "-1",
                "WORKER_AGENT_STALL_SECONDS": "0",
                "WORKER_AGENT_PROBE_INTERVAL_SECONDS": "never",
                "WORKER_AGENT_PROBE_TIMEOUT_SECONDS": "inf",
                "WORKER_AGENT_SIM_FAIL_AFTER_SECONDS": "soon",
            }
        )

    assert caught.value.problems == [
        "WORKER_AGENT_RUNTIME must be one of process, docker, got 'podman'",
        "WORKER_AGENT_TENSOR_PARALLEL_SIZE must be a whole number >= 1, got '0'",
        "WORKER_AGENT_GPU_MEMORY_UTILIZATION must be a number in (0, 1], got '1.5'",
        "WORKER_AGENT_MAX_MODEL_LEN must be a whole number >= 1, got '4k'",
        "WORKER_AGENT_SHUTDOWN_TIMEOUT_SECONDS must be a whole number >= 0, got '2.5'",
        "WORKER_AGENT_DRAIN_TIMEOUT_SECONDS must be a number >= 0.0, got '-1'",
        "WORKER_AGENT_STALL_SECONDS must be a number >= 0.05, got '0'",
        "WORKER_AGENT_PROBE_INTERVAL_SECONDS must be a number >= 0.05, got 'never'",
        "WORKER_AGENT_PROBE_TIMEOUT_SECONDS must be a number >= 0.05, got 'inf'",
        "WORKER_AGENT_SIM_FAIL_AFTER_SECONDS must be a number >= 0.0, got 'soon'",
    ]


@pytest.mark.parametrize("value", ["0", "-0.5", "nan", "x"])
def test_gpu_memory_utilization_must_be_a_share(value: str) -> None:
    with pytest.raises(ConfigError, match="GPU_MEMORY_UTILIZATION must be a number in"):
        load_config(REQUIRED | {"WORKER_AGENT_GPU_MEMORY_UTILIZATION": value})

    assert (
        load_config(REQUIRED | {"WORKER_AGENT_GPU_MEMORY_UTILIZATION": "1"}).gpu_memory_utilization
        == 1.0
    )


def test_docker_runtime_needs_the_real_engine_and_an_absolute_download_dir() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            REQUIRED | {"WORKER_AGENT_RUNTIME": "docker", "WORKER_AGENT_DOWNLOAD_DIR": "models"}
        )

    assert caught.value.problems == [
        "WORKER_AGENT_RUNTIME=docker needs WORKER_AGENT_ENGINE=vllm",
        "WORKER_AGENT_DOWNLOAD_DIR must be an absolute path with the docker runtime, got 'models'",
    ]
    process = load_config(REQUIRED | {"WORKER_AGENT_DOWNLOAD_DIR": "models"})
    assert process.download_dir == "models"  # vLLM resolves it against the agent's directory


def test_vllm_args_must_not_set_what_the_agent_sets() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            REQUIRED
            | {"WORKER_AGENT_VLLM_ARGS": "--enforce-eager --port 9000 -tp 2 --max-model-len=4096"}
        )

    assert caught.value.problems == [
        "WORKER_AGENT_VLLM_ARGS must not set --port: use WORKER_AGENT_ENGINE_PORT",
        "WORKER_AGENT_VLLM_ARGS must not set -tp: use WORKER_AGENT_TENSOR_PARALLEL_SIZE",
        "WORKER_AGENT_VLLM_ARGS must not set --max-model-len: use WORKER_AGENT_MAX_MODEL_LEN",
    ]


def test_main_exits_2_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([], environ={"WORKER_AGENT_TOKEN": "s3cret-token"})

    err = capsys.readouterr().err
    assert code == 2
    assert "invalid configuration" in err
    assert "WORKER_AGENT_CONTROL_PLANE_URL is required" in err
    assert "s3cret-token" not in err


def test_main_prints_version_and_checksum(capsys: pytest.CaptureFixture[str]) -> None:
    from worker_agent import AGENT_BUILD_DATE, AGENT_VERSION
    from worker_agent.integrity import code_checksum

    assert main(["--version"], environ={}) == 0
    assert capsys.readouterr().out == f"{AGENT_VERSION} {AGENT_BUILD_DATE}\n"
    assert main(["--checksum"], environ={}) == 0
    assert capsys.readouterr().out == code_checksum() + "\n"
