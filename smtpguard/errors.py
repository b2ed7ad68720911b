"""Errors by cause (STYLE.md §9).

ConfigError is fatal at start and is printed as one line, never a traceback:
it names the key, the bad value and what is allowed.
"""


class SmtpguardError(Exception):
    """Base of the project's own errors."""


class ConfigError(SmtpguardError):
    """A bad setting: `key` names where it came from (a TOML key or a flag)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class UpstreamError(SmtpguardError):
    """The real MTA could not be reached, timed out or misbehaved.

    `reason` is the reply's reason code (UPSTREAM or UPSTREAM-TIMEOUT);
    `detail` is for the log only, never for the client.
    """

    def __init__(self, reason: str = "UPSTREAM", detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class StoreError(SmtpguardError):
    """The state store (sqlite, redis) could not answer."""
