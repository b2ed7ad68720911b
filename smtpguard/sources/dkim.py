"""DKIM: which signatures vouch for this message, and for whose From: domain?

Decides: nothing; it gives the data-stage facts
  * `dkim`: pass (at least one signature verifies), fail (signatures, none
    verifies), none (no signature), unknown (a key could not be fetched or
    the verification ran out of time, and no other signature verified);
  * `dkim_domains`: the d= of every signature that verifies;
  * `from_domain`: the domain of the RFC 5322 From: address ("" when there is
    not exactly one From: field with exactly one parsable address);
  * `dkim_aligned`: a passing signature's d= is the From: domain or shares
    its organisational domain (the registrable domain, ICANN Public Suffix
    List), DMARC's relaxed alignment (RFC 7489 §3.1.1); unknown when no
    signature passed but one could not be checked.
It also keeps each signature's RFC 8601 result (pass fail neutral temperror
permerror) for the `Authentication-Results:` header that the relay adds for
the MTA behind (`authentication_results`), after removing any incoming one
that claims our authserv-id (`strip_authentication_results`, RFC 8601 §5).

Inputs: the message as received (the session's `content`: its spooled
`message` read whole when it is small enough), the one resolver (keys
are TXT records at `selector._domainkey.domain`, RFC 6376 §3.6.2.1), a DNS
budget, and DkimSettings.

Output: DkimFact (its `results` carry one SignatureResult per signature).

Failure modes: never an exception. A malformed signature (bad tag list,
missing tags, unknown algorithm), a key record that is absent (NXDOMAIN /
no TXT, RFC 6376 §6.1.2), malformed or too short, is `permerror`; a body or
header that no longer matches is `fail`; a key lookup that times out or
SERVFAILs, or a verification cut short by `verify_timeout`, is `temperror`.
A message dkimpy cannot split into headers is `fail` with the reason logged.

Defaults and why:
  * max_signatures = 10: RFC 6376 §6.1 lets a verifier limit how many it
    checks; 10 covers every legitimate chain of forwarders and list servers
    while bounding the work a hostile message can ask for (each signature is
    a hash of the whole body and a key lookup). Signatures past the limit are
    not verified and get no result.
  * verify_timeout = 5 s: verification is CPU work in a thread; a message
    near the content limit with 10 RSA-4096 signatures takes well under a
    second, so 5 s only ever stops abuse, inside RFC 5321 §4.5.3.2's 10
    minutes for the end-of-data reply.
  * keys shorter than 1024 bits are refused (RFC 8301 §3.2).
  * authserv_id = "" means the server's hostname ([server] hostname), the
    usual choice (RFC 8601 §2.5).
Verification runs in a worker thread, never on the event loop; dkimpy does
the cryptography and canonicalisation (pynacl for Ed25519, RFC 8463), our
resolver the DNS.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import email.utils
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Union

import dkim  # type: ignore[import-untyped]
from dkim.util import InvalidTagValueList, parse_tag_value  # type: ignore[import-untyped]

from smtpguard.adapters.dns import Answer, gather_within
from smtpguard.core.facts import NONE, OK, UNKNOWN, FactValue
from smtpguard.core.settings import bounded_duration, reject_unknown_keys
from smtpguard.errors import ConfigError
from smtpguard.core.facts import FactSpec, Kind, SourceSpec
from smtpguard.observe.log import event
from smtpguard.sources import Context, table

# The source's declaration (sources/registry.py; docs/adding-a-fact.md):
# settings DkimSettings from [dkim] (read_settings), entry point
# gather_facts. Always run: the MTA behind gets the results in an
# Authentication-Results header (RFC 8601), rules or not; it keeps the stage
# budget itself (each signature's result stands on its own).
SOURCE = SourceSpec(
    name="dkim",
    stage="data",
    area="dkim",
    facts=(
        FactSpec("dkim", Kind.TEXT, values=frozenset({"pass", "fail", "none"})),
        FactSpec("dkim_domains", Kind.LIST),     # d= of the signatures that verify
        FactSpec("from_domain", Kind.TEXT, domain=True),      # RFC 5322 From: domain ("" unless exactly one)
        FactSpec("dkim_aligned", Kind.BOOL),     # a passing d= aligned with from_domain (RFC 7489 §3.1.1 relaxed)
    ),
    always=True,
    own_deadline=True,
)

# RFC 6376 §6.1 allows a limit (see the module docstring).
MAX_SIGNATURES = 10
MAX_SIGNATURES_LIMIT = 50          # a config may lower or raise it, within reason
# RFC 8301 §3.2: verifiers MUST NOT accept RSA keys under 1024 bits.
MIN_KEY_BITS = 1024
VERIFY_TIMEOUT = 5.0               # seconds; see the module docstring
VERIFY_TIMEOUT_MAX = 60.0

# RFC 8601 §2.7.1 result values for the dkim method.
PASS, FAIL, NEUTRAL, TEMPERROR, PERMERROR = "pass", "fail", "neutral", "temperror", "permerror"

# Our reason texts (RFC 8601 §2.2 `reason=`): never text from the message.
REASONS: dict[str, str] = {
    "bad_signature": "signature did not verify",
    "body_hash": "body hash did not verify",
    "malformed": "malformed signature",
    "no_key": "no key for signature",
    "bad_key": "malformed key record",
    "short_key": "key too short",
    "key_lookup": "key lookup failed",
    "timeout": "verification timed out",
}

# A d= or s= value we are willing to copy into a header we write (RFC 6376
# §3.5: d= is a domain, s= a dot-separated list of sub-domain labels).
_TOKEN = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)*")
_B64 = re.compile(r"[A-Za-z0-9+/]+")
_HEADER_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.ASCII)

Tri = Union[bool, str]  # True, False or UNKNOWN


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DkimSettings:
    """The `[dkim]` table."""

    # "" = [server] hostname (module docstring).
    authserv_id: str = ""
    # RFC 6376 §6.1 (module docstring).
    max_signatures: int = MAX_SIGNATURES
    # seconds of verification per message (module docstring).
    verify_timeout: float = VERIFY_TIMEOUT

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], prefix: str = "dkim") -> DkimSettings:
        return from_mapping(table, prefix)


_KEYS = ("authserv_id", "max_signatures", "verify_timeout")


def from_mapping(table: Mapping[str, Any], prefix: str = "dkim") -> DkimSettings:
    """Validate the `[dkim]` TOML table; ConfigError names the key."""
    reject_unknown_keys(table, prefix, _KEYS)
    out = DkimSettings()
    authserv = out.authserv_id
    if "authserv_id" in table:
        value = table["authserv_id"]
        text = value.strip().lower().rstrip(".") if isinstance(value, str) else None
        if text is None or (text and not _TOKEN.fullmatch(text)) or len(text or "") > 253:
            raise ConfigError(f"{prefix}.authserv_id",
                              f"expected a host name such as mx.example.com (RFC 8601 §2.5), got {value!r}")
        authserv = text
    count = out.max_signatures
    if "max_signatures" in table:
        value = table["max_signatures"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIGNATURES_LIMIT:
            raise ConfigError(f"{prefix}.max_signatures",
                              f"expected a whole number 1..{MAX_SIGNATURES_LIMIT}, got {value!r}")
        count = value
    timeout = bounded_duration(table, "verify_timeout", prefix, VERIFY_TIMEOUT_MAX, out.verify_timeout)
    return DkimSettings(authserv_id=authserv, max_signatures=count, verify_timeout=timeout)


# --------------------------------------------------------------------------
# The fact
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignatureResult:
    """One DKIM-Signature's outcome (RFC 8601 §2.7.1), values validated."""

    result: str                 # pass fail neutral temperror permerror
    domain: str = ""            # d=, "" when absent or not a valid domain
    selector: str = ""          # s=, "" when absent or not valid
    algorithm: str = ""         # a=, e.g. rsa-sha256, ed25519-sha256
    b: str = ""                 # the first 8 characters of b= (RFC 6008 header.b)
    reason: str = ""            # a REASONS key, "" for pass


@dataclass(frozen=True, slots=True)
class DkimFact:
    status: str                       # OK (some signature checked), NONE (no signature), UNKNOWN
    dkim: str                         # pass fail none unknown
    domains: tuple[str, ...] = ()     # d= of the signatures that verify
    error: str = ""                   # for the log
    # RFC 5322 From: domain, "" if none or several; None when not read (no
    # rule reads from_domain or dkim_aligned), and both facts are then absent
    from_domain: str | None = ""
    aligned: Tri = False              # dkim_aligned
    results: tuple[SignatureResult, ...] = ()

    def as_facts(self) -> dict[str, FactValue]:
        if self.from_domain is None:
            return {"dkim": self.dkim, "dkim_domains": self.domains}
        return {"dkim": self.dkim, "dkim_domains": self.domains,
                "from_domain": self.from_domain, "dkim_aligned": self.aligned}


# --------------------------------------------------------------------------
# Headers: From:, Authentication-Results
# --------------------------------------------------------------------------


def authserv(settings: DkimSettings, hostname: str) -> str:
    """The authserv-id we write and strip: `[dkim] authserv_id`, else the hostname."""
    return settings.authserv_id or hostname.strip().lower().rstrip(".")


def header_block(message: bytes) -> bytes:
    """The header block of a message (up to and including the blank line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = message.find(sep)
        if at >= 0:
            return message[:at + len(sep)]
    return message


def _clean_domain(text: str) -> str:
    """A domain as a rule sees it: lowercase A-labels, or "" if it is none."""
    name = text.strip().strip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")   # U-labels as A-labels (RFC 5890)
        except UnicodeError:
            return ""
    if "." not in name or len(name) > 253 or not _TOKEN.fullmatch(name) or "_" in name:
        return ""
    return name


def from_domain(headers: bytes) -> str:
    """The RFC 5322 From: domain; "" unless exactly one field with one address.

    RFC 5322 §3.6 allows one From: field; a message with several, or with a
    mailbox list, names no single author domain (DMARC §6.6.1 rejects or
    ignores such messages), so the fact is empty rather than a guess.
    """
    fields = [value for name, value in map(_split_field, _fields(headers)) if name == b"from"]
    if len(fields) != 1:
        return ""
    # decoded as the email package decodes a header (ASCII, the rest escaped),
    # unfolded (RFC 5322 §2.2.3)
    value = fields[0].decode("ascii", "surrogateescape").replace("\r", "").replace("\n", "")
    try:
        addresses = [a for _, a in email.utils.getaddresses([value]) if a]
    except Exception:  # the email package raises several kinds on hostile input
        return ""
    if len(addresses) != 1 or addresses[0].count("@") != 1:
        return ""
    return _clean_domain(addresses[0].rpartition("@")[2])


def organisational_domain(name: str) -> str:
    """The registrable domain (ICANN PSL) of a name, or the name itself."""
    from smtpguard.sources.rdns import registrable_domain   # the one PSL instance
    return registrable_domain(name) or name


def aligned(from_dom: str, passed: tuple[str, ...]) -> bool:
    """DMARC relaxed alignment (RFC 7489 §3.1.1) of any passing d= with From:."""
    if not from_dom:
        return False
    org = organisational_domain(from_dom)
    return any(d == from_dom or organisational_domain(d) == org for d in passed)


def _split_field(field: bytes) -> tuple[bytes, bytes]:
    """A header field's lower-case name (RFC 5322 §3.6.8; the obsolete
    white space before the colon, §4.5, dropped) and its raw value; a line
    without a colon has no name."""
    name, colon, value = field.partition(b":")
    return (name.rstrip(b" \t").lower(), value) if colon else (b"", field)


def verifiable(headers: bytes) -> bool:
    """Whether dkimpy must read the message: it has a DKIM-Signature field,
    or a header line that is no field (dkimpy's verdict on it is kept). A
    plainly unsigned message (most of them) is `none` without that parse."""
    names = {name for name, _ in map(_split_field, _fields(headers.rstrip(b"\r\n")))}
    return b"dkim-signature" in names or b"" in names


def _fields(headers: bytes) -> list[bytes]:
    """Header fields with their continuation lines, byte-exact, in order."""
    out: list[bytes] = []
    for line in headers.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line
        else:
            out.append(line)
    return out


def _authserv_id(value: bytes) -> str:
    """The authserv-id of an Authentication-Results value (RFC 8601 §2.2)."""
    text = value.decode("utf-8", "replace")
    text = re.sub(r"\([^()]*\)", " ", text)      # CFWS comments (one level is what senders write)
    text = text.split(";", 1)[0].strip()
    token = text.split()[0] if text.split() else ""
    return token.strip('"').lower().rstrip(".")


def strip_authentication_results(headers: bytes, authserv_id: str) -> bytes:
    """The header block without Authentication-Results fields claiming `authserv_id`.

    RFC 8601 §5: a border MTA MUST remove (or rename) such fields from
    incoming mail, or the MTA behind would trust a forgery. Fields naming
    other authserv-ids, and every other field, are kept byte for byte.
    """
    ours = authserv_id.strip().lower().rstrip(".")
    kept: list[bytes] = []
    for field in _fields(headers):
        m = _HEADER_FIELD.match(field)
        if m and m.group(1).lower() == b"authentication-results" and ours \
                and _authserv_id(field[m.end():]) == ours:
            continue
        kept.append(field)
    return b"".join(kept)


def authentication_results(authserv_id: str, fact: DkimFact) -> bytes:
    """Our `Authentication-Results:` field (RFC 8601) for one message, CRLF-ended.

    One `dkim=` resinfo per verified signature, with header.d, header.s,
    header.a and header.b (RFC 6008) when the signature's values are valid;
    `dkim=none` for an unsigned message. Only validated tokens and our own
    reason texts reach the header.
    """
    parts: list[str] = []
    for r in fact.results:
        item = f"dkim={r.result}"
        if r.reason:
            item += f' reason="{REASONS[r.reason]}"'
        if r.domain:
            item += f" header.d={r.domain}"
        if r.selector:
            item += f" header.s={r.selector}"
        if r.algorithm:
            item += f" header.a={r.algorithm}"
        if r.b:
            item += f" header.b={r.b}"
        parts.append(item)
    if not parts:   # no signature, or a message too broken to find them in
        parts.append({"none": "dkim=none", "fail": f"dkim={PERMERROR}"}.get(fact.dkim, f"dkim={TEMPERROR}"))
    return ("Authentication-Results: " + authserv_id + ";\r\n\t" + ";\r\n\t".join(parts) + "\r\n").encode("ascii")


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        tags = parse_tag_value(value)
    except (InvalidTagValueList, ValueError, TypeError):
        return None
    return tags if isinstance(tags, dict) else None


def _text(value: bytes | None, pattern: re.Pattern[str] = _TOKEN) -> str:
    if not value:
        return ""
    text = value.decode("ascii", "replace").strip().lower()
    return text if pattern.fullmatch(text) and len(text) <= 253 else ""


def _describe(value: bytes) -> SignatureResult:
    """What a signature claims, validated, before any verification."""
    tags = _tags(value) or {}
    b = re.sub(rb"\s+", b"", tags.get(b"b", b""))[:8].decode("ascii", "replace")
    algorithm = tags.get(b"a", b"").decode("ascii", "replace").strip().lower()
    return SignatureResult(
        result=NEUTRAL, domain=_text(tags.get(b"d")), selector=_text(tags.get(b"s")),
        algorithm=algorithm if re.fullmatch(r"[a-z0-9]{1,16}-[a-z0-9]{1,16}", algorithm) else "",
        b=b if _B64.fullmatch(b) else "")


def _key_name(value: bytes) -> str | None:
    tags = _tags(value)
    if not tags or b"s" not in tags or b"d" not in tags:
        return None
    name = f"{_text(tags[b's'])}._domainkey.{_text(tags[b'd'])}"
    return None if name.startswith(".") or name.endswith(".") else name


def _verify(message: bytes, signatures: list[bytes], keys: dict[str, Answer], deadline: float,
            stop: threading.Event, out: list[SignatureResult]) -> None:
    """One SignatureResult per signature into `out`; runs in a worker thread.

    Checks the deadline and `stop` before each signature; the caller marks
    the ones not reached as temperror.
    """

    def dnsfunc(name: Any, timeout: float = 5) -> bytes | None:
        text = (name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)).lower().rstrip(".")
        answer = keys.get(text)
        if answer is None or answer.status != OK or not answer.values:
            return None
        return answer.values[0].encode("utf-8", "replace")

    try:
        d = dkim.DKIM(message, minkey=MIN_KEY_BITS)
    except Exception:  # a message dkimpy cannot parse: every signature is unreadable
        out.extend(_with_result(_describe(v), PERMERROR, "malformed") for v in signatures)
        return
    for idx, value in enumerate(signatures):
        if stop.is_set() or time.monotonic() > deadline:
            return
        claimed = _describe(value)
        tags = _tags(value)
        if tags is None:
            out.append(_with_result(claimed, PERMERROR, "malformed"))
            continue
        try:
            dkim.validate_signature_fields(tags)
        except dkim.DKIMException:
            out.append(_with_result(claimed, PERMERROR, "malformed"))
            continue
        name = _key_name(value)
        answer = keys.get(name or "")
        if answer is None or answer.status == UNKNOWN:
            out.append(_with_result(claimed, TEMPERROR, "key_lookup"))
            continue
        if answer.status != OK or not answer.values:
            out.append(_with_result(claimed, PERMERROR, "no_key"))     # RFC 6376 §6.1.2
            continue
        try:
            _pk, bits, ktag, _tlsrpt = dkim.evaluate_pk(name, answer.values[0].encode("utf-8", "replace"))
        except Exception:  # KeyFormatError, and the errors of a key that does not decode
            out.append(_with_result(claimed, PERMERROR, "bad_key"))
            continue
        if ktag == b"rsa" and bits < MIN_KEY_BITS:
            out.append(_with_result(claimed, PERMERROR, "short_key"))
            continue
        try:
            ok = bool(d.verify(idx=idx, dnsfunc=dnsfunc))
        except dkim.ValidationError as e:
            # dkimpy reports a changed body as a ValidationError, not False.
            body = str(e).startswith("body hash mismatch")
            out.append(_with_result(claimed, FAIL if body else PERMERROR, "body_hash" if body else "malformed"))
            continue
        except Exception:  # MessageFormatError, KeyFormatError, ... never into the session
            out.append(_with_result(claimed, PERMERROR, "malformed"))
            continue
        out.append(_with_result(claimed, PASS, "") if ok else _with_result(claimed, FAIL, "bad_signature"))


def _with_result(r: SignatureResult, result: str, reason: str) -> SignatureResult:
    return SignatureResult(result, r.domain, r.selector, r.algorithm, r.b, reason)


async def gather(message: bytes, resolver: Any, budget: float,
                 settings: DkimSettings | None = None, *, author_facts: bool = True) -> DkimFact:
    """The DKIM facts of one message (the bytes as the client sent them).

    `author_facts=False`: the From: domain is not read (no rule reads
    from_domain or dkim_aligned; the Authentication-Results header does not
    need it), and those two facts are absent."""
    settings = settings or DkimSettings()
    block = header_block(message)
    author = from_domain(block) if author_facts else None
    if not verifiable(block):
        return DkimFact(NONE, "none", from_domain=author)
    try:
        headers = dkim.DKIM(message).headers
    except Exception as e:  # a message dkimpy cannot even split into headers
        return DkimFact(OK, "fail", error=f"unparsable message: {type(e).__name__}",
                        from_domain="" if author_facts else None)
    signatures = [v for k, v in headers if k.lower() == b"dkim-signature"][:settings.max_signatures]
    if not signatures:
        return DkimFact(NONE, "none", from_domain=author)
    names = sorted({name for name in map(_key_name, signatures) if name})
    answers = await gather_within(budget, **{f"k{i}": resolver.query(n, "TXT") for i, n in enumerate(names)})
    keys = {n: answers[f"k{i}"] for i, n in enumerate(names)}

    out: list[SignatureResult] = []
    stop = threading.Event()
    deadline = time.monotonic() + settings.verify_timeout
    error = ""
    try:
        await asyncio.wait_for(asyncio.to_thread(_verify, message, signatures, keys, deadline, stop, out),
                               settings.verify_timeout)
    except (asyncio.TimeoutError, TimeoutError):
        error = f"verification stopped after {settings.verify_timeout:g}s"
    stop.set()
    done = list(out)
    results = tuple(done) + tuple(_with_result(_describe(v), TEMPERROR, "timeout")
                                  for v in signatures[len(done):])
    if len(done) < len(signatures) and not error:
        error = f"verification stopped after {settings.verify_timeout:g}s"

    passed = tuple(dict.fromkeys(r.domain for r in results if r.result == PASS and r.domain))
    temp = any(r.result == TEMPERROR for r in results)
    if passed:
        return DkimFact(OK, "pass", passed, error, author, aligned(author or "", passed), results)
    if temp:
        failed = [n for n, a in keys.items() if a.status == UNKNOWN]
        why = error or f"key lookup failed: {', '.join(failed)}"
        return DkimFact(UNKNOWN, UNKNOWN, (), why, author, UNKNOWN if author else False, results)
    return DkimFact(OK, "fail", (), error, author, False, results)


# The facts only the From: domain tells: without a rule that reads one, From: is not parsed.
AUTHOR_FACTS = frozenset({"from_domain", "dkim_aligned"})


# --- the registry's entry points (smtpguard/sources/__init__.py) -------------

def read_settings(raw: Any) -> DkimSettings:
    """`[dkim]` from the TOML document (None when absent)."""
    return from_mapping(table(raw, "dkim"))


async def gather_facts(ctx: Context) -> DkimFact | None:
    """The message's DKIM facts (gather); nothing without a message. An
    error (a message dkimpy cannot split) is logged with the session id."""
    if ctx.message is None:
        return None
    fact = await gather(ctx.message, ctx.resolver, ctx.budget, ctx.settings,
                        author_facts=ctx.wanted is None or bool(ctx.wanted & AUTHOR_FACTS))
    if fact.error:
        event("dkim.error", session=ctx.client.session_id, ip=ctx.client.ip, error=fact.error)
    return fact
