"""The first-boot user data of cloud machines: pinned checksums and the agent's settings."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from control_plane.agent_bootstrap import env_file, user_data
from control_plane.agent_release import INSTALL_SCRIPT, current_release
from control_plane.settings import Settings
from tests.support.cloud_boot import agent_env_from_user_data

ENV = {"WORKER_AGENT_TOKEN": "tok-123", "WORKER_AGENT_MODEL": "org/m",
       "WORKER_AGENT_VLLM_ARGS": "--enable-prefix-caching --chat-template 'it'\"s {{ x }}\"'"}


def test_user_data_pins_the_install_script_and_the_agent_release():
    script = user_data(Settings(public_url="https://cp.example.com"), ENV)
    release = current_release()
    assert f"{hashlib.sha256(INSTALL_SCRIPT.read_bytes()).hexdigest()}  /run/cp-install.sh" in script
    assert "sha256sum --check" in script.split("bash /run/cp-install.sh")[0], "checked before it runs"
    assert f"--control-plane https://cp.example.com --sha256 {release.sha256}" in script
    assert agent_env_from_user_data(script) == ENV


def test_the_env_file_reads_back_exactly_in_bash(tmp_path):
    path = tmp_path / "agent.env"
    path.write_text(env_file(ENV))
    out = subprocess.run(["bash", "-c", f"set -a; . {path}; env -0"], capture_output=True,
                         check=True, env={}).stdout.decode()
    values = dict(item.split("=", 1) for item in out.split("\0") if item.startswith("WORKER_AGENT_"))
    assert values == ENV


@pytest.mark.parametrize("key,value", [("WORKER_AGENT_X", "a\nb"), ("PATH", "/tmp"),
                                       ("WORKER_AGENT_Y", "nul\0")])
def test_settings_that_could_break_out_are_refused(key, value):
    with pytest.raises(ValueError, match="refused"):
        env_file({key: value})
