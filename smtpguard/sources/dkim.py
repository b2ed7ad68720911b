"""DKIM: does a valid signature vouch for this message?

Decides: nothing; it gives the facts `dkim` (pass: at least one signature
verifies; fail: signatures, none verifies; none: no signature; unknown: a
key could not be fetched and no other signature verified) and
`dkim_domains` (the d= of every signature that verifies), at the data stage.
Inputs: the message as received, the one resolver (keys are TXT records at
`selector._domainkey.domain`, RFC 6376 §3.6.2.1), a deadline.
Output: DkimFact.
Failure modes: a malformed signature or key counts as a failed signature
(RFC 6376 §6.1: PERMFAIL); a key lookup that times out or SERVFAILs is
TEMPFAIL, the fact `unknown`; never an exception.
Defaults and why: at most MAX_SIGNATURES signatures are checked (RFC 6376
§6.1 lets a verifier limit them; a message with more is abusive), keys
shorter than 1024 bits fail (RFC 8301 §3.2). Verification is CPU work (RSA
over the whole body) and runs in a thread, never on the event loop; dkimpy
does the cryptography and canonicalisation, our resolver the DNS.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import dkim  # type: ignore[import-untyped]
from dkim.util import parse_tag_value  # type: ignore[import-untyped]

from smtpguard.adapters.dns import Answer, gather_within
from smtpguard.core.facts import NONE, OK, UNKNOWN, FactValue

# RFC 6376 §6.1 allows a limit; opendkim's default MaximumSignaturesToVerify is 3.
MAX_SIGNATURES = 5
# RFC 8301 §3.2: verifiers MUST NOT accept RSA keys under 1024 bits.
MIN_KEY_BITS = 1024


@dataclass(frozen=True, slots=True)
class DkimFact:
    status: str                       # OK (some signature checked), NONE (no signature), UNKNOWN
    dkim: str                         # pass fail none unknown
    domains: tuple[str, ...] = ()     # d= of the signatures that verify
    error: str = ""                   # for the log

    def as_facts(self) -> dict[str, FactValue]:
        return {"dkim": self.dkim, "dkim_domains": self.domains}


def _key_name(value: bytes) -> str | None:
    try:
        tags = parse_tag_value(value)
        return f"{tags[b's'].decode('ascii')}._domainkey.{tags[b'd'].decode('ascii')}".lower().rstrip(".")
    except Exception:  # dkimpy raises several kinds for a malformed tag list
        return None


def _verify(message: bytes, count: int, keys: dict[str, Answer]) -> list[tuple[bool, str]]:
    """(verified, d=) per signature; runs in a worker thread."""

    def dnsfunc(name: Any, timeout: float = 5) -> bytes | None:
        text = (name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)).lower().rstrip(".")
        answer = keys.get(text)
        if answer is None or answer.status != OK or not answer.values:
            return None
        return answer.values[0].encode("utf-8", "replace")

    out: list[tuple[bool, str]] = []
    for idx in range(count):
        d = dkim.DKIM(message, minkey=MIN_KEY_BITS)
        try:
            ok = bool(d.verify(idx=idx, dnsfunc=dnsfunc))
        except dkim.DKIMException:
            ok = False
        domain = d.domain.decode("ascii", "replace").lower() if getattr(d, "domain", None) else ""
        out.append((ok, domain))
    return out


async def gather(message: bytes, resolver: Any, budget: float) -> DkimFact:
    """The DKIM facts of one message (the bytes as the client sent them)."""
    try:
        headers = dkim.DKIM(message).headers
    except Exception as e:  # a message dkimpy cannot even split into headers
        return DkimFact(OK, "fail", error=f"unparsable message: {type(e).__name__}")
    signatures = [v for k, v in headers if k.lower() == b"dkim-signature"][:MAX_SIGNATURES]
    if not signatures:
        return DkimFact(NONE, "none")
    names = {name for name in map(_key_name, signatures) if name}
    answers = await gather_within(budget, **{f"k{i}": resolver.query(n, "TXT") for i, n in enumerate(sorted(names))})
    keys = {n: answers[f"k{i}"] for i, n in enumerate(sorted(names))}
    results = await asyncio.to_thread(_verify, message, len(signatures), keys)
    passed = tuple(dict.fromkeys(domain for ok, domain in results if ok and domain))
    if passed:
        return DkimFact(OK, "pass", passed)
    failed_lookups = [n for n, a in keys.items() if a.status == UNKNOWN]
    if failed_lookups:
        return DkimFact(UNKNOWN, UNKNOWN, error=f"key lookup failed: {', '.join(failed_lookups)}")
    return DkimFact(OK, "fail")
