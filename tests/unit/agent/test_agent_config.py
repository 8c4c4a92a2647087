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
        vllm_args=(),
        sim_boot_seconds=5.0,
        sim_fail=None,
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
            "WORKER_AGENT_VLLM_ARGS": "-tp 2 --max-model-len '8192'",
            "WORKER_AGENT_SIM_BOOT_SECONDS": "1.5",
            "WORKER_AGENT_SIM_FAIL": "kv_cache",
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
    assert config.vllm_args == ("-tp", "2", "--max-model-len", "8192")
    assert (config.sim_boot_seconds, config.sim_fail) == (1.5, "kv_cache")
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
        "SIM_FAIL must be one of kv_cache, got 'oom'",
        "HEARTBEAT_SECONDS must be a number",
        "BOOT_TIMEOUT_SECONDS must be a number",
        "SIM_BOOT_SECONDS must be a number",
        "VLLM_ARGS cannot be parsed",
    ):
        assert name in text
    assert len(caught.value.problems) == 12


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
