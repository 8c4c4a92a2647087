"""Appends commands to the command stream (the REST API and the CLI use it; so can anyone)."""

from __future__ import annotations

from redis.asyncio import Redis

from control_plane.commands.schema import Command, encode


async def publish(redis: Redis, stream: str, command: Command) -> str:
    """Append `command`; returns the stream entry id. The consumer applies it asynchronously."""
    entry_id = await redis.xadd(stream, {"command": encode(command)})
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id
