"""The built-in `local` provider: machines that are worker-agent processes on this host."""

from adapters.local.provider import INSTANCE_TYPE, LocalProvider

__all__ = ["INSTANCE_TYPE", "LocalProvider"]
