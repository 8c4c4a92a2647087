"""The `control-plane` command: run the service (`up`) and talk to it (`status`, `instances ...`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from control_plane.cli._api import ADMIN_KEY_FILE
from control_plane.cli.client import instances_app, join_tokens_app
from control_plane.cli.costs import costs
from control_plane.cli.hosts import hosts_app
from control_plane.cli.pools import pools_app
from control_plane.cli.status import status
from control_plane.settings import Settings, SettingsError

SHUTDOWN_GRACE_SECONDS = 10
"""Longest wait for in-flight HTTP requests when stopping `up`."""

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Control plane for GPU inference fleets running vLLM.")
apikey_app = typer.Typer(no_args_is_help=True, help="Manage admin API keys.")
app.add_typer(apikey_app, name="apikey")
app.add_typer(instances_app, name="instances")
app.add_typer(join_tokens_app, name="join-token")
app.add_typer(hosts_app, name="hosts")
app.add_typer(pools_app, name="pools")
agent_app = typer.Typer(no_args_is_help=True, help="Agent release: checksum, build, version discipline.")
app.add_typer(agent_app, name="agent")


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1, CP_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (default 8000, CP_PORT)")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log JSON lines")] = False,
) -> None:
    """Run the API, command consumer, lifecycle workers and scheduler in one process."""
    from control_plane.logs import configure

    configure(log_level.upper(), json=json_logs)
    settings = _settings(host=host, port=port)
    asyncio.run(_up(settings))


@app.command()
def migrate() -> None:
    """Apply database migrations and exit (`up` also does this on start)."""

    async def nothing(_sessions) -> None:
        return None

    _with_database(nothing)
    typer.echo("Database is at the latest migration.")


app.command("status")(status)
app.command("costs")(costs)


@apikey_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for")],
    read_only: Annotated[bool, typer.Option("--read-only", help="May only read")] = False,
) -> None:
    """Create an API key; it is printed once, on the last line, and stored only hashed."""
    from control_plane.api_keys import create_api_key

    scopes = ["read"] if read_only else ["admin"]
    key = _with_database(lambda sessions: create_api_key(sessions, name, scopes))
    typer.echo(f"Created {'read-only' if read_only else 'admin'} API key {name!r}. It is shown only once:",
               err=True)
    typer.echo(key)


@apikey_app.command("list")
def apikey_list(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout, nothing else")] = False,
) -> None:
    """List API keys (name, first characters, scopes, state); keys themselves are not stored."""
    from control_plane.api_keys import list_api_keys

    keys = _with_database(list_api_keys)
    if json_out:
        typer.echo(json.dumps({"items": [
            {"name": k.name, "prefix": k.prefix, "scopes": list(k.scopes),
             "created_at": k.created_at.isoformat(),
             "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None} for k in keys]},
            indent=2))
        return
    for key in keys:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "live"
        typer.echo(f"{key.name}\t{key.prefix}…\t{','.join(key.scopes)}\t"
                   f"created {key.created_at:%Y-%m-%d %H:%M}\t{state}")


@apikey_app.command("revoke")
def apikey_revoke(name: Annotated[str, typer.Option(help="Name of the key(s) to revoke")]) -> None:
    """Revoke every live key with this name (running servers stop accepting it within
    CP_API_KEY_CACHE_SECONDS)."""
    from control_plane.api_keys import revoke_api_keys

    count = _with_database(lambda sessions: revoke_api_keys(sessions, name))
    if not count:
        typer.echo(f"No live API key named {name!r}.", err=True)
        raise typer.Exit(1)
    typer.echo(f"Revoked {count} API key(s) named {name!r}.")


@agent_app.command("checksum")
def agent_checksum() -> None:
    """Print the SHA-256 of the agent artifact built from this code (what agents report)."""
    from control_plane.agent_release import build_release

    typer.echo(build_release().sha256)


@agent_app.command("build")
def agent_build(output: Annotated[Path, typer.Option(help="Directory to write the wheel to")] = Path(".")) -> None:
    """Write the agent wheel (byte-for-byte reproducible) and print its path and SHA-256."""
    from control_plane.agent_release import build_release

    release = build_release()
    output.mkdir(parents=True, exist_ok=True)
    (output / release.filename).write_bytes(release.artifact)
    typer.echo(f"{output / release.filename}  sha256 {release.sha256}")


@agent_app.command("version-check")
def agent_version_check() -> None:
    """Fail when the agent's code changed but AGENT_VERSION did not (CI runs this)."""
    from control_plane.agent_release import VersionError, check_version

    try:
        release = check_version()
    except VersionError as exc:
        typer.echo(f"agent version check failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"agent {release.version} ({release.build_date}) matches its release record: {release.sha256}")


@agent_app.command("version-bump")
def agent_version_bump(
    part: Annotated[str, typer.Option(help="major, minor or patch")] = "patch",
) -> None:
    """Raise AGENT_VERSION, set AGENT_BUILD_DATE to today and record the new checksum."""
    from control_plane.agent_release import bump_version

    try:
        release = bump_version(part)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"agent {release.version} ({release.build_date}) recorded: {release.sha256}")


def _with_database(action):
    """Run `action(sessions)` against the control plane's database (migrated first). Logs
    go to stderr, warnings and worse only: stdout is the command's output (`--json`)."""
    from control_plane.logs import configure

    configure("WARNING")
    settings = _settings()

    async def run():
        from control_plane.db.engine import make_engine, make_sessionmaker, upgrade

        services, bootstrap = await _services(settings)
        engine = make_engine(services.database_url, pool_size=1)
        try:
            await asyncio.to_thread(upgrade, services.database_url)
            return await action(make_sessionmaker(engine))
        finally:
            await engine.dispose()
            await bootstrap.stop()

    return asyncio.run(run())


def _settings(**overrides) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except SettingsError as exc:
        raise typer.BadParameter(str(exc)) from None


async def _services(settings: Settings):
    from control_plane.backing import ServicesBootstrap

    bootstrap = ServicesBootstrap(Path(settings.data_dir), database_url=settings.database_url,
                                  redis_url=settings.redis_url)
    return await bootstrap.start(), bootstrap


async def _up(settings: Settings) -> None:
    import structlog
    import uvicorn

    from control_plane.api.app import create_app
    from control_plane.runtime import Runtime

    log = structlog.get_logger("control_plane")
    services, bootstrap = await _services(settings)
    runtime = Runtime(settings, services.database_url, services.redis_url)
    try:
        await runtime.start()
        new_key = await runtime.seed_admin_key()
        server = uvicorn.Server(uvicorn.Config(
            create_app(runtime), host=settings.host, port=settings.port, log_config=None,
            access_log=False, lifespan="off", timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS))

        def shut_down() -> None:
            runtime.hub.close_streams()  # open SSE responses would hold the server forever
            server.should_exit = True

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, shut_down)
        serving = asyncio.create_task(server._serve())  # serve() minus its signal capture
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if serving.done():
            await serving  # raises the bind error
            return
        _announce(settings, services.embedded, new_key)
        log.info("Control plane started", url=f"http://{settings.host}:{settings.port}")
        await serving
    finally:
        await runtime.stop()
        await bootstrap.stop()


def _announce(settings: Settings, embedded: list[str], new_key: str | None) -> None:
    url = f"http://{settings.host}:{settings.port}"
    key_file = Path(settings.data_dir) / ADMIN_KEY_FILE
    lines = [f"Control plane listening on {url}  (OpenAPI: {url}/schema/openapi.json)"]
    lines += [f"Using {note}" for note in embedded]
    if new_key:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            key_file.unlink()
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_key + "\n")
        lines += ["First start: an admin API key was created and saved (mode 600) to",
                  f"  {key_file.resolve()}",
                  "Authenticate with:  Authorization: Bearer $(cat " + str(key_file) + ")",
                  "The CLI on this machine reads that file when CP_API_KEY is not set."]
    elif settings.admin_api_key:
        lines.append("Authenticate with:  Authorization: Bearer $CP_ADMIN_API_KEY")
    elif key_file.exists():
        lines.append(f"Authenticate with the key in {key_file} (or create one: control-plane apikey create --name NAME)")
    else:
        lines.append("Authenticate with an API key (create one: control-plane apikey create --name NAME)")
    typer.echo("\n".join(lines), err=True)
