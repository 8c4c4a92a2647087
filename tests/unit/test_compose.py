"""`compose.yaml` and `deploy/Dockerfile`, checked without a Docker engine.

What `docker compose up` would trip over is checked statically: files that are not there,
settings that do not exist (a misspelt `CP_*` is silently ignored at run time), a control plane
bound where the port mapping cannot reach it, a start order that lets it run before the
migrations, Redis without its append-only file.
"""

from __future__ import annotations

import glob
import json
import re
import shlex
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.agent_release import INSTALL_SCRIPT, RECORD_FILE
from control_plane.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
SETTINGS = {f.metadata.get("env", f"CP_{f.name.upper()}") for f in fields(Settings)}
CLI_VARIABLES = {"CP_API_URL", "CP_API_KEY"}
"""Read by the CLI, not the server; they may appear in the file's comments."""
VARIABLE = re.compile(r"\b(?:CP|SCW)_[A-Z0-9_]+\b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


def test_build_contexts_dockerfiles_and_referenced_files_exist(services):
    built = [s for s in services.values() if "build" in s]
    assert built, "nothing is built from this repository"
    for name, service in services.items():
        for context, dockerfile in _builds(service):
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for env_file in _as_list(service.get("env_file")):
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            assert (ROOT / path).is_file(), f"{name}: env_file {path} missing"
        for source, _target in _mounts(service):
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} missing"


def test_every_variable_set_is_a_real_setting(services):
    for name, service in services.items():
        unknown = {k for k in _environment(service) if VARIABLE.fullmatch(k)} - SETTINGS
        assert not unknown, f"{name} sets variables no setting reads: {sorted(unknown)}"


def test_commented_examples_name_real_settings_too():
    """The commented provider examples are meant to be uncommented as they are."""
    named = set(VARIABLE.findall(COMPOSE_FILE.read_text()))
    assert not named - SETTINGS - CLI_VARIABLES, sorted(named - SETTINGS - CLI_VARIABLES)
    examples = "\n".join(line for line in COMPOSE_FILE.read_text().splitlines()
                         if line.strip().startswith("#"))
    for provider_variable in ("CP_AWS_REGION", "CP_AWS_IMAGE_ID", "SCW_ACCESS_KEY",
                              "SCW_SECRET_KEY", "SCW_DEFAULT_PROJECT_ID", "CP_SCALEWAY_IMAGE"):
        assert f"# {provider_variable}: " in examples, f"no commented example of {provider_variable}"


def test_redis_keeps_an_append_only_file_on_a_named_volume(compose, services):
    redis = services["redis"]
    command = redis["command"]
    args = shlex.split(command) if isinstance(command, str) else command
    assert "--appendonly" in args and args[args.index("--appendonly") + 1] == "yes", args
    assert _named_volume_at(compose, redis, "/data")
    assert redis.get("healthcheck", {}).get("test")


def test_postgres_keeps_its_data_on_a_named_volume(compose, services):
    postgres = services["postgres"]
    assert _named_volume_at(compose, postgres, _environment(postgres).get(
        "PGDATA", "/var/lib/postgresql/data"))
    assert postgres.get("healthcheck", {}).get("test")


def test_migrations_run_before_the_control_plane(services):
    migrate, cp = services["migrate"], services["control-plane"]
    command = migrate["command"]
    assert (command if isinstance(command, list) else shlex.split(command))[-1] == "migrate"
    assert _builds(migrate) == _builds(cp), "migrate must run the control plane's own image"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert cp["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert cp["depends_on"]["redis"]["condition"] == "service_healthy"
    assert _environment(migrate)["CP_DATABASE_URL"] == _environment(cp)["CP_DATABASE_URL"]


def test_health_checks_exist_where_something_waits_for_them(services):
    for name in ("postgres", "redis", "control-plane"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name, service in services.items():
        for dependency, how in (service.get("depends_on") or {}).items():
            if how.get("condition") == "service_healthy":
                assert services[dependency].get("healthcheck"), f"{name} waits on {dependency}"


def test_the_control_plane_is_reachable_through_the_port_mapping(compose, services):
    cp = services["control-plane"]
    env = _environment(cp)
    host, port = _bind(cp, env)
    assert host == "0.0.0.0", "bound to loopback inside the container, the mapping reaches nothing"
    container_ports = {str(p).rsplit(":", 1)[-1].split("/")[0] for p in cp["ports"]}
    assert str(port) in container_ports, (port, cp["ports"])
    assert f":{port}/readyz" in " ".join(cp["healthcheck"]["test"])
    # Agents of `local` machines run in the container and need a URL that is not 0.0.0.0.
    assert "CP_PUBLIC_URL" in env and "0.0.0.0" not in env["CP_PUBLIC_URL"]
    assert _named_volume_at(compose, cp, env["CP_DATA_DIR"]), "local machines need the data dir kept"
    for secret in ("CP_ADMIN_API_KEY", "CP_AGENT_TOKEN_SECRET"):
        assert env[secret].startswith("${" + secret), f"{secret} comes from the operator"


def test_the_dockerfile_copies_what_exists_and_what_the_server_reads(services):
    for context, dockerfile in {b for s in services.values() for b in _builds(s)}:
        instructions = _instructions(dockerfile)
        copied: list[str] = []
        for keyword, args in instructions:
            if keyword not in ("COPY", "ADD"):
                continue
            parts = json.loads(args) if args.startswith("[") else shlex.split(args)
            if any(p.startswith("--from") for p in parts):
                continue
            sources = [p for p in parts if not p.startswith("--")][:-1]
            for source in sources:
                assert glob.glob(str(context / source)), f"{dockerfile}: COPY source {source} missing"
            copied += sources
        wheel = tomllib.loads((context / "pyproject.toml").read_text())
        packages = wheel["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
        needed = [*packages, "pyproject.toml", "uv.lock", "migrations",
                  str(RECORD_FILE.relative_to(context)), str(INSTALL_SCRIPT.relative_to(context))]
        for path in needed:
            assert any(path == c or path.startswith(c.rstrip("/") + "/") for c in copied), (
                f"{dockerfile} does not copy {path}")


# --- helpers, in call order ---------------------------------------------------------------


def _builds(service: dict[str, Any]) -> set[tuple[Path, Path]]:
    build = service.get("build")
    if build is None:
        return set()
    if isinstance(build, str):
        build = {"context": build}
    context = (ROOT / build.get("context", ".")).resolve()
    return {(context, context / build.get("dockerfile", "Dockerfile"))}


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else value if isinstance(value, list) else [value]


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source", "")), volume["target"]))
        elif ":" in volume:
            source, target = volume.split(":")[:2]
            mounts.append((source, target))
    return mounts


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _named_volume_at(compose: dict[str, Any], service: dict[str, Any], target: str) -> bool:
    named = set(compose.get("volumes") or {})
    return any(source in named and t == target for source, t in _mounts(service))


def _bind(service: dict[str, Any], env: dict[str, str]) -> tuple[str, int]:
    """Address and port `control-plane up` binds: its flags, else CP_HOST/CP_PORT, else defaults."""
    command = service.get("command")
    if command is None:
        [(context, dockerfile)] = _builds(service)
        command = json.loads([a for k, a in _instructions(dockerfile) if k == "CMD"][-1])
    args = shlex.split(command) if isinstance(command, str) else command
    assert "up" in args, f"the control plane's command does not run `up`: {args}"
    flags = dict(zip(args, args[1:], strict=False))
    host = flags.get("--host") or env.get("CP_HOST") or Settings().host
    port = int(flags.get("--port") or env.get("CP_PORT") or Settings().port)
    if "CP_HOST" in env:
        assert env["CP_HOST"] == host, "CP_HOST and the --host flag disagree"
    if "CP_PORT" in env:
        assert int(env["CP_PORT"]) == port, "CP_PORT and the --port flag disagree"
    return host, port


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip()]
