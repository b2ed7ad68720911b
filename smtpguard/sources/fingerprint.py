"""Passive OS fingerprint source: the client's own SYN, read from the kernel.

What it decides: the `os`, `os_name`, `os_distance` and `os_match` facts of
a client (core/fingerprint.py does the matching; this module does the I/O).

Inputs: ClientInfo.syn — the IP + TCP headers of the client's SYN, which the
server reads with `read_saved_syn()` from each accepted socket after calling
`enable_save_syn()` on its listening sockets (Linux ≥ 4.2 `TCP_SAVE_SYN`,
unprivileged, no pcap, no daemon) — and a SignatureSet (the shipped
`smtpguard/data/smtpguard.fp` or any p0f v3 `p0f.fp`). Optionally a running
p0f v3 daemon, asked over its unix API socket when there is no SYN (the
client for that socket is adapters/p0f.py).

Output: an OsFact (core/fingerprint.py).

Failure modes: a connection that came through the PROXY protocol
(`via_proxy`) gives UNKNOWN: the SYN we hold is the proxy's, never a guess
at the client's. No SYN (not Linux, option unsupported, already read) and no
p0f socket gives UNKNOWN. A p0f daemon that is absent, slow (p0f_timeout),
answers with a bad magic or "no match" gives UNKNOWN. Nothing raises into the
session. A bad signatures file is a ConfigError at start naming
`fingerprint.signatures`.

Defaults and why:
  * signatures = "" -> the shipped smtpguard.fp: our own entries, each with
    its source; p0f's 2012-2016 file lacks Windows 10/11 and Linux 4.19+.
  * p0f_socket = "" -> no daemon: our own SYN read needs none.
  * p0f_timeout = 0.5 s: p0f answers from memory over a local socket in
    microseconds; half a second bounds a hung daemon well inside the connect
    stage (postscreen's greet wait is 6 s).
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping

from smtpguard.adapters.p0f import query_p0f
from smtpguard.core.facts import ClientInfo
from smtpguard.core.settings import bounded_duration, reject_unknown_keys
from smtpguard.core.fingerprint import UNKNOWN_OS, OsFact, SignatureSet, classify, load_signatures
from smtpguard.errors import ConfigError
from smtpguard.core.facts import FactSpec, Kind, SourceSpec
from smtpguard.sources import Context, table

# The source's declaration (sources/registry.py; docs/adding-a-fact.md):
# settings FingerprintSettings from [fingerprint] (read_settings), entry
# point gather_facts.
SOURCE = SourceSpec(
    name="fingerprint",
    stage="connect",
    area="fingerprint",
    facts=(
        # the families of core/fingerprint.FAMILIES ("unknown" is every fact's)
        FactSpec("os", Kind.TEXT, values=frozenset(
            {"windows", "linux", "macos", "ios", "android", "freebsd", "openbsd", "other"})),
        FactSpec("os_name", Kind.TEXT),
        FactSpec("os_distance", Kind.NUMBER),
        FactSpec("os_match", Kind.TEXT, values=frozenset({"exact", "fuzzy", "generic", "none"})),
    ),
)

# include/uapi/linux/tcp.h (Linux 4.2, commit cd8ae85299d5 "tcp: provide SYN
# headers for passive connections"); Python's socket module does not name them.
SAVE_SYN = 27
SAVED_SYN = 28
# Room for the largest SYN headers: IPv4 60 or IPv6 40 + extension headers,
# plus TCP 60. The kernel refuses a smaller buffer than the saved headers.
SAVED_SYN_BUFFER = 512

DEFAULT_SIGNATURES = "smtpguard.fp"   # in smtpguard/data


def enable_save_syn(sock: socket.socket) -> bool:
    """Ask the kernel to keep each client's SYN headers; call before listen().

    False where unsupported (not Linux, kernel < 4.2, not a TCP socket): the
    server then runs without fingerprints, and the facts say "unknown".
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, SAVE_SYN, 1)
    except OSError:
        return False
    return True


def read_saved_syn(sock: socket.socket | None) -> bytes | None:
    """The accepted connection's SYN headers, or None.

    The kernel hands them out once and then frees them: call this once per
    accepted socket, right after accept (transport.get_extra_info("socket")).
    """
    if sock is None or not sys.platform.startswith("linux"):
        return None
    try:
        data = sock.getsockopt(socket.IPPROTO_TCP, SAVED_SYN, SAVED_SYN_BUFFER)
    except OSError:
        return None
    return bytes(data) or None


def load_signature_file(path: str | os.PathLike[str], key: str = "fingerprint.signatures") -> SignatureSet:
    """Read and parse a p0f v3 signature file; ConfigError naming `key` if bad."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read signature file {os.fspath(path)!r}: {exc.strerror or exc}") from None
    try:
        sigs = load_signatures(text, source=os.fspath(path))
    except ValueError as exc:
        raise ConfigError(key, f"{os.fspath(path)}: {exc} (p0f v3 syntax expected)") from None
    if not len(sigs):
        raise ConfigError(key, f"{os.fspath(path)}: no [tcp:request] signatures in the file")
    return sigs


@functools.lru_cache(maxsize=1)
def default_signatures() -> SignatureSet:
    """The shipped smtpguard/data/smtpguard.fp, parsed once per process."""
    text = resources.files("smtpguard").joinpath("data", DEFAULT_SIGNATURES).read_text(encoding="utf-8")
    return load_signatures(text, source=DEFAULT_SIGNATURES)


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FingerprintSettings:
    """The `[fingerprint]` table."""

    # "" = the shipped smtpguard.fp (see the module docstring); else a path
    # to a p0f v3 file such as /etc/p0f/p0f.fp.
    signatures: str = ""
    # "" = do not ask a p0f daemon (our own SYN read needs none).
    p0f_socket: str = ""
    # seconds; p0f answers a local query in microseconds (module docstring).
    p0f_timeout: float = 0.5

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], prefix: str = "fingerprint") -> FingerprintSettings:
        return from_mapping(table, prefix)


P0F_TIMEOUT_MAX = 10.0  # a fingerprint is not worth holding a client longer
_KEYS = ("signatures", "p0f_socket", "p0f_timeout")


def from_mapping(table: Mapping[str, Any], prefix: str = "fingerprint") -> FingerprintSettings:
    """Validate the `[fingerprint]` TOML table; ConfigError names the key."""
    reject_unknown_keys(table, prefix, _KEYS)
    defaults = FingerprintSettings()
    values: dict[str, Any] = {}
    for key in ("signatures", "p0f_socket"):
        if key in table:
            value = table[key]
            if not isinstance(value, str):
                raise ConfigError(f"{prefix}.{key}", f"expected a file path as a string, got {value!r}")
            values[key] = value.strip()
    values["p0f_timeout"] = bounded_duration(table, "p0f_timeout", prefix, P0F_TIMEOUT_MAX, defaults.p0f_timeout)
    return FingerprintSettings(
        signatures=values.get("signatures", defaults.signatures),
        p0f_socket=values.get("p0f_socket", defaults.p0f_socket),
        p0f_timeout=values.get("p0f_timeout", defaults.p0f_timeout),
    )


def signature_set(settings: FingerprintSettings, key: str = "fingerprint.signatures") -> SignatureSet:
    """The signatures the settings name: call once at start (ConfigError if bad)."""
    if not settings.signatures:
        return default_signatures()
    return load_signature_file(settings.signatures, key)


# --------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------


async def gather(client: ClientInfo, settings: FingerprintSettings, sigs: SignatureSet) -> OsFact:
    """The client's OS fact: from its own SYN, else from p0f if configured."""
    if client.via_proxy:
        return UNKNOWN_OS
    if client.syn:
        return classify(client.syn, sigs)
    if settings.p0f_socket:
        return await query_p0f(settings.p0f_socket, client.ip, settings.p0f_timeout, client.session_id)
    return UNKNOWN_OS


# --- the registry's entry points (smtpguard/sources/__init__.py) -------------

def read_settings(raw: Any) -> FingerprintSettings:
    """`[fingerprint]` from the TOML document (None when absent)."""
    return from_mapping(table(raw, "fingerprint"))


async def gather_facts(ctx: Context) -> OsFact:
    """The client's OS fact (gather), with the signatures loaded at start."""
    return await gather(ctx.client, ctx.settings, ctx.signatures)
