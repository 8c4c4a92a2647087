"""The one place where AWS SDK exceptions become typed `ProviderError`s.

`_map_error` decides by AWS error code first (`_ERRORS`, `_ERROR_PREFIXES`), then by HTTP
status (429 → `RateLimited`, 5xx → `ProviderUnavailable`, other → `PermanentProviderError`);
botocore's own exceptions (missing credentials, rejected parameters, connection and parser
failures) are mapped by type. Messages never carry parameter values: they may be user data or
secrets. Internal to `adapters.aws`.
"""

from __future__ import annotations

import re

from botocore.exceptions import (
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    TokenRetrievalError,
)
from botocore.parsers import ResponseParserError

from adapters.base import (
    AuthError,
    InvalidSpec,
    NoCapacity,
    NotReadyYet,
    PermanentProviderError,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
)

_ERRORS: dict[str, type[ProviderError]] = {
    **dict.fromkeys(["InsufficientInstanceCapacity", "InsufficientCapacity",
                     "InsufficientHostCapacity", "Unsupported"], NoCapacity),
    **dict.fromkeys(["InstanceLimitExceeded", "VcpuLimitExceeded",
                     "MaxSpotInstanceCountExceeded", "VolumeLimitExceeded"], QuotaExceeded),
    **dict.fromkeys(["AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId",
                     "SignatureDoesNotMatch", "OptInRequired"], AuthError),
    **dict.fromkeys(["RequestLimitExceeded", "Throttling"], RateLimited),
    # IdempotentParameterMismatch: our ClientToken (derived from the instance id) was used
    # before with other parameters (another type or zone for the same instance id, maybe a
    # machine terminated less than a day ago). Retrying the same request cannot succeed.
    **dict.fromkeys(["InvalidParameterValue", "InvalidParameterCombination",
                     "IdempotentParameterMismatch", "MissingParameter"], InvalidSpec),
    **dict.fromkeys(["IncorrectInstanceState", "IncorrectState", "VolumeInUse"], NotReadyYet),
}
_ERROR_PREFIXES: dict[str, type[ProviderError]] = {"InvalidAMIID.": InvalidSpec}
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError,
                      TokenRetrievalError)


def _map_error(operation: str, exc: Exception) -> ProviderError:
    """The typed error for an SDK exception: by AWS error code first, then HTTP status."""
    if isinstance(exc, ClientError):
        code = _code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        cls = _ERRORS.get(code) or next(
            (c for prefix, c in _ERROR_PREFIXES.items() if code.startswith(prefix)), None)
        if cls is None and status == 429:
            cls = RateLimited
        if cls is None:
            cls = ProviderUnavailable if status >= 500 else PermanentProviderError
        return cls(f"AWS {operation} failed: {code} (HTTP {status}): {message}")
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return AuthError(f"AWS {operation} failed: no usable credentials ({type(exc).__name__})")
    if isinstance(exc, ParamValidationError):
        report = re.sub(r"value: .*", "value: <hidden>", str(exc))  # values may be secrets
        return InvalidSpec(f"AWS {operation} parameters were rejected by botocore: {report}")
    if isinstance(exc, (ConnectionError, HTTPClientError, ResponseParserError)):
        return ProviderUnavailable(
            f"AWS {operation} failed: {type(exc).__name__}: {str(exc)[:300]}")
    return PermanentProviderError(f"AWS {operation} failed: {type(exc).__name__}")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))
