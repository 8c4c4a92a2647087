"""The bare-metal adapter's own errors, under `adapters.base`'s temporary/permanent roots.

Connection failures and refused logins reuse `ProviderUnavailable` and `AuthError` from
`adapters.base`; these name what only a host reached over SSH can get wrong. Messages never
carry a key or the agent's settings.
"""

from __future__ import annotations

from adapters.base import PermanentProviderError, TemporaryProviderError


class HostKeyChanged(PermanentProviderError):
    """The host presented another SSH host key than the one registered for it."""


class HostMisconfigured(PermanentProviderError):
    """The host's record cannot be used (private key reference or host key invalid)."""


class PreflightFailed(PermanentProviderError):
    """The host does not meet a requirement of the agent; nothing was installed."""


class ChecksumMismatch(PermanentProviderError):
    """The agent artifact on the host is not the release; nothing was run."""


class BootstrapFailed(PermanentProviderError):
    """The agent install on the host failed."""


class UninstallFailed(TemporaryProviderError):
    """The agent could not be removed from the host; the host stays claimed until it is."""
