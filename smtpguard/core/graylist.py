"""Graylisting: who is asking (keys), and what the stored state says (transitions).

Decides: for one RCPT, whether the (client, sender, recipient) triplet is
  seen for the first time (`new`), retried too early (`deferred`), retried
  after the delay (`passed`), trusted without graylisting (`allowed`), or sent
  from a network caught writing to a spamtrap (`trapped`).
Inputs: the client address, its forward-confirmed registrable rDNS domain (or
  None), MAIL FROM, RCPT TO, the stored entries for the triplet and the client
  identity (already decoded, or None), a `strict` flag and `now` (epoch
  seconds, passed in: this module reads no clock).
Output: a `TripletStep` (decision, seconds still to wait, the entry to write
  and its expiry, whether the triplet passed just now) or a `ClientStep`; the
  caller (sources/graylist.py) does the I/O and writes what it is told to.
Failure modes: none raised for data that came from the store: a value that
  does not decode is treated as absent (the triplet starts again as `new`,
  which costs a sender one more delay and never accepts mail it should not).
  A malformed client address is a ValueError (the session never has one).
Defaults and why (see `GraylistPolicy`): delay 180 s (many MTAs retry first
  between 200 and 300 s and next only after an hour or more, so postgrey's
  300 s costs real senders hours), retry window 2 days (postgrey's), passed
  triplets and auto-allowed clients remembered 35 days after last use
  (postgrey's max-age), auto-allow after 5 passed triplets (postgrey's
  --auto-whitelist-clients), strict clients remembered 1 day, traps last
  24 hours (spamd's greytrap blacklist time).

Client identity: large senders retry from another address of their pool, so
the identity is the confirmed registrable rDNS domain when there is one, else
the /24 (IPv4) or /64 (IPv6) network. Traps are keyed by the network only: a
confirmed domain may cover a provider's whole fleet, and one address writing
to a trap should not cost every customer of that provider a day of mail.

Sender normalisation: retries of one message and later messages of one sender
must map to one key although bounce addresses carry per-message tags (VERP),
daily signatures (BATV) or forwarder wrappers (SRS). See `normalise_sender`.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, replace

from smtpguard.core.ip import unmapped

# ---------------------------------------------------------------------------
# Policy (numbers only; the sources module parses them from [graylist]).

DAY = 86400.0


@dataclass(frozen=True, slots=True)
class GraylistPolicy:
    """The numbers that drive the transitions. Durations in seconds."""

    # Many MTAs first retry between 200 and 300 s and the next time only an
    # hour or more later; postgrey's 300 s misses that first retry and costs
    # real senders hours. 180 s still stops bots, which mostly never retry.
    delay: float = 180.0
    # postgrey's --retry-window (2 days): an MTA gives up after 4-5 days, so a
    # retry two days later is still a real MTA; unretried entries expire then.
    retry_window: float = 2 * DAY
    # postgrey's --max-age (35 days): a passed triplet, refreshed on each use.
    max_age: float = 35 * DAY
    # postgrey's --auto-whitelist-clients default: 5 successful retries.
    auto_allow_after: int = 5
    # Suspicious clients (e.g. Windows fingerprints) must have passed a retry
    # within the last day; one day keeps daily correspondents cheap.
    strict_max_age: float = 1 * DAY
    # spamd's greytrap blacklist lifetime (GREYTRAP 24 h, spamd(8)).
    trap_ttl: float = 1 * DAY
    # /24 and /64: the granularity postgrey (--lookup-by-subnet) and spamd
    # use for pools; a provider's retry comes from a neighbour address.
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    # Refresh a remembered entry's expiry at most this often: each refresh is
    # a write, and a 35-day memory does not care about an hour. Also bounds
    # the imprecision of strict_max_age (an hour of a day).
    refresh_every: float = 3600.0


class Decision(enum.Enum):
    """The graylist fact values (FACTS['graylist']), minus `unknown`, which
    only the source produces when the store cannot answer."""

    NEW = "new"
    DEFERRED = "deferred"
    PASSED = "passed"
    ALLOWED = "allowed"
    TRAPPED = "trapped"


# ---------------------------------------------------------------------------
# Keys. One namespace per kind of entry; the store adds its own prefix.
# KEY_PREFIX keeps the feature's old spelling on purpose: it is the format of
# the data in every existing store, and renaming it would drop the triplets,
# traps and admin allow entries of a running site on upgrade.

KEY_PREFIX = "grey:"
TRIPLET_PREFIX = KEY_PREFIX + "t:"
CLIENT_PREFIX = KEY_PREFIX + "c:"
TRAP_PREFIX = KEY_PREFIX + "trap:"
ALLOW_PREFIX = KEY_PREFIX + "allow:"         # + domain: one admin allow entry
ALLOW_NET_PREFIX = KEY_PREFIX + "allownet:"  # + /8 or /16 bucket: the admin networks inside it

# Admin network entries are grouped by the IPv4 /8 or IPv6 /16 that holds
# them, so a check reads ONE bucket key whatever the entry's prefix length
# (and parses it only when the bucket holds anything, which is rare).
# Entries wider than the bucket are refused: an admin allowing more than a
# /8 or a /16 is a typo.
BUCKET_V4 = 8
BUCKET_V6 = 16


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return unmapped(ipaddress.ip_address(ip.split("%", 1)[0]))


def network_of(ip: str, policy: GraylistPolicy) -> str:
    """The client's pool network: `192.0.2.0/24`, `2001:db8:1:2::/64`."""
    addr = _address(ip)
    length = policy.ipv4_prefix if addr.version == 4 else policy.ipv6_prefix
    return str(ipaddress.ip_network(f"{addr}/{length}", strict=False))


def client_identity(ip: str, rdns_confirmed_domain: str | None, policy: GraylistPolicy) -> str:
    """The confirmed registrable rDNS domain, else the pool network."""
    if rdns_confirmed_domain:
        return rdns_confirmed_domain.strip().rstrip(".").lower()
    return network_of(ip, policy)


def _key_part(text: str) -> str:
    # Keys stay readable (`grey:t:<client> <sender> <rcpt>`); a space inside
    # a quoted local part (RFC 5321 §4.1.2) is escaped so the join is
    # unambiguous.
    return text.replace("%", "%25").replace(" ", "%20")


def _unkey_part(text: str) -> str:
    return text.replace("%20", " ").replace("%25", "%")


def triplet_key(identity: str, sender: str, rcpt: str) -> str:
    return TRIPLET_PREFIX + " ".join(_key_part(p) for p in (identity, sender, rcpt))


def split_triplet_key(key: str) -> tuple[str, str, str] | None:
    """(identity, sender, rcpt) from a triplet key, None for another key."""
    if not key.startswith(TRIPLET_PREFIX):
        return None
    parts = key[len(TRIPLET_PREFIX):].split(" ")
    if len(parts) != 3:
        return None
    return (_unkey_part(parts[0]), _unkey_part(parts[1]), _unkey_part(parts[2]))


def client_key(identity: str) -> str:
    return CLIENT_PREFIX + _key_part(identity)


def trap_key(network: str) -> str:
    return TRAP_PREFIX + network


def allow_key(domain: str) -> str:
    """`grey:allow:<domain>`, the domain as `parse_allow_target` gives it."""
    return ALLOW_PREFIX + domain


def is_network(target: str) -> bool:
    """Whether a canonical allow target is a network (domains have no `/`)."""
    return "/" in target


def parse_allow_target(text: str) -> str:
    """Canonical form of an admin allow target: a CIDR network (an address
    is its /32 or /128) or a domain. ValueError says what is allowed."""
    text = text.strip().rstrip(".").lower()
    if not text:
        raise ValueError("expected a CIDR network or a domain, got an empty value")
    if re.fullmatch(r"[0-9a-f:.]+(/\d+)?", text) and (":" in text or text[0].isdigit()):
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            raise ValueError(f"{text!r} is not a network: {exc}") from None
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
            raise ValueError(f"{text!r}: write IPv4-mapped networks as IPv4")
        if net.prefixlen < (BUCKET_V4 if net.version == 4 else BUCKET_V6):
            raise ValueError(f"{text!r}: a network must be at most an IPv4 /{BUCKET_V4} or an IPv6 /{BUCKET_V6}")
        return str(net)
    if not _DOMAIN.fullmatch(text):
        raise ValueError(f"{text!r} is neither a CIDR network nor a domain name")
    return text


_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9-]{2,63}")


def bucket_key(ip_or_network: str) -> str:
    """`grey:allownet:<the /8 or /16>` holding an address or an allowed network."""
    addr = _address(ip_or_network.partition("/")[0])
    value = int(addr)
    if addr.version == 4:
        return f"{ALLOW_NET_PREFIX}{value >> 24}.0.0.0/{BUCKET_V4}"
    top = value >> 112
    return f"{ALLOW_NET_PREFIX}{top:x}::/{BUCKET_V6}" if top else f"{ALLOW_NET_PREFIX}::/{BUCKET_V6}"


@dataclass(frozen=True, slots=True)
class AllowEntry:
    network: str        # canonical, as parse_allow_target gives it
    expires_at: float   # math.inf: until denied
    added: float


def decode_bucket(value: str | None) -> tuple[AllowEntry, ...]:
    if not value:
        return ()
    out = []
    for line in value.split("\n"):
        try:
            network, expires, added = line.split(" ")
            out.append(AllowEntry(network, float(expires), float(added)))
        except ValueError:
            continue  # an unreadable line allows nothing
    return tuple(out)


def encode_bucket(entries: tuple[AllowEntry, ...]) -> str:
    return "\n".join(f"{e.network} {e.expires_at!r} {e.added!r}" for e in entries)


def bucket_put(entries: tuple[AllowEntry, ...], entry: AllowEntry | None, *, drop: str, now: float
               ) -> tuple[tuple[AllowEntry, ...], float]:
    """The bucket without expired entries and without `drop`, plus `entry`;
    and the bucket key's expiry (its longest-lived entry; `now` when empty,
    which deletes it)."""
    kept = tuple(e for e in entries if e.expires_at > now and e.network != drop)
    if entry is not None:
        kept += (entry,)
    return kept, max((e.expires_at for e in kept), default=now)


def bucket_covers(entries: tuple[AllowEntry, ...], ip: str, *, now: float) -> bool:
    if not entries:
        return False
    addr = _address(ip)
    for entry in entries:
        if entry.expires_at > now:
            net = ipaddress.ip_network(entry.network)
            if net.version == addr.version and addr in net:
                return True
    return False


# ---------------------------------------------------------------------------
# Sender normalisation.

# BATV (draft-levine-smtp-batv-01 §3.1): `prvs=TAG=user@domain`, where TAG is
# K DDD SSSSSS (a key digit, three day digits, six hex digits of hash): ten
# characters that change daily. `msprvs1=TAG=user@` (Microsoft, 8-16
# letters and digits) and Barracuda's `btv1==TAG==user@` (hex) are variants
# seen from bulk senders. Only these exact forms are unwrapped (issue 19
# item 6): `prvs=1234abcd=q9@` is no BATV address and stays as it is.
_BATV = (
    re.compile(r"^prvs=[0-9a-f]{10}=(.+)$"),
    re.compile(r"^msprvs1=[0-9a-z]{8,16}=(.+)$"),
    re.compile(r"^btv1==[0-9a-f]{8,16}==(.+)$"),
)
# SRS (libsrs2 / Shevek's SRS spec): SRS0=HHH=TT=orig.domain=user@forwarder;
# the separator after SRS0/SRS1 may be `=`, `+` or `-`; HHH is the hash, TT
# two base32 characters of the day. SRS1 wraps an SRS0 address once more:
# SRS1=HHH=first.forwarder==HHH=TT=orig.domain=user@second. Only the hash
# and the day change per message; the forwarder stays in the key, so that
# an address rewritten by a forwarder someone chose does not inherit the
# original sender's pass (issue 19 item 6).
_SRS0 = re.compile(r"^srs0[=+-][^=]+=[0-9a-z]{2}=([^=]+)=(.+)$")
_SRS1 = re.compile(r"^srs1[=+-][^=]+=([^=]+)=[=+-][^=]+=[0-9a-z]{2}=([^=]+)=(.+)$")
# Local-part tokens between separators. A whole number, or a run of 8 or
# more hex digits (message ids: SES, ezmlm, list servers), is a per-message
# tag; nothing else is (postgrey's rule: `s/\b\d+\b/#/g`). A token that
# merely holds a digit (`a1x`, `zz99top`) is a name: random bot senders
# must not collapse into one key.
_TOKEN_SPLIT = re.compile(r"([-=._])")
_NUMBER = re.compile(r"^\d+$")
_HEX_RUN = re.compile(r"^[0-9a-f]{8,}$")
_VOLATILE = re.compile(r"#(?:[-=._]#)+")
# A UUID (RFC 9562 §4 text form), as SES and others put in bounce addresses.
_UUID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}")
_DIGITS = re.compile(r"\d+")

NULL_SENDER = "<>"


def _volatile(token: str) -> bool:
    return bool(_NUMBER.match(token) or _HEX_RUN.match(token))


def _verp_extension(extension: str) -> bool:
    """Whether a `+extension` is a VERP tag: an encoded recipient (`user=domain`,
    as Mailman and SendGrid write) or per-message numbers."""
    return "=" in extension or any(_volatile(t) for t in _TOKEN_SPLIT.split(extension)[::2])


def _unwrap(local: str, domain: str) -> tuple[str, str]:
    """Strip BATV wrappers and the changing parts of SRS ones; bounded nesting."""
    for _ in range(4):
        for pattern in _BATV:
            m = pattern.match(local)
            if m:
                local = m.group(1)
                break
        else:
            m = _SRS1.match(local)
            if m:
                inner, _ = _unwrap(m.group(3), domain)
                return f"srs1={m.group(1)}={m.group(2)}={inner}", domain
            m = _SRS0.match(local)
            if m:
                inner, _ = _unwrap(m.group(2), domain)
                return f"srs0={m.group(1)}={inner}", domain
            break
    return local, domain


def normalise_sender(sender: str) -> str:
    """The graylist form of MAIL FROM, stable across retries and messages.

    1. `<>` (null sender, RFC 5321 §4.5.5) stays its own key.
    2. The whole address is lowercased. RFC 5321 §2.4 lets a server treat
       local parts case-sensitively, but also says exploiting that hinders
       interoperability; a retry re-sends the same bytes anyway, so folding
       can only merge two mailboxes that differ in case, which at worst lets
       one skip a delay the other earned.
    3. Recognised BATV wrappers are removed; SRS keeps the original domain
       and user and the forwarder, and drops its hash and day.
    4. A `+extension` that is a VERP tag (an encoded `user=domain` or
       per-message numbers) is dropped; any other stays (`a+x` and `a` are
       two senders).
    5. UUIDs and local-part tokens that are whole numbers or runs of 8+ hex
       digits become `#`, a run of them one `#` (list VERP numbers, message ids).
    6. Digit runs in domain labels other than the last two become `#`
       (bulk senders use per-host bounce domains like mail42.atl11.example.net).
    """
    addr = sender.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    if not addr:
        return NULL_SENDER
    addr = addr.lower()
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr
    domain = domain.rstrip(".")
    local, domain = _unwrap(local, domain)
    base, plus, extension = local.partition("+")
    if plus and _verp_extension(extension):
        local = base
    parts = _TOKEN_SPLIT.split(_UUID.sub("#", local))
    # parts alternates token, separator, token, ...
    local = "".join(
        "#" if i % 2 == 0 and _volatile(p) else p for i, p in enumerate(parts)
    )
    local = _VOLATILE.sub("#", local)
    labels = domain.split(".")
    if len(labels) > 2:
        labels = [_DIGITS.sub("#", lab) for lab in labels[:-2]] + labels[-2:]
    return f"{local}@{'.'.join(labels)}"


def normalise_rcpt(rcpt: str) -> str:
    """RCPT TO as a key: angle brackets off, lowercased (see step 2 above).
    No tag stripping: user+tag is a real, distinct destination."""
    addr = rcpt.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    return addr.lower().rstrip(".")


# ---------------------------------------------------------------------------
# Stored entries and their string form (the store keeps strings).


class TripletState(enum.Enum):
    DEFERRED = "d"   # seen, not yet retried after the delay
    PASSED = "p"     # retried after the delay: remembered for max_age


@dataclass(frozen=True, slots=True)
class TripletEntry:
    state: TripletState
    first_seen: float   # the first attempt: the clock the delay runs from
    last_seen: float    # last refresh (DEFERRED: last attempt; PASSED: last use, +-refresh_every)
    attempts: int       # attempts while deferred, including the first
    # PASSED only: when a strict client started its own retry of this
    # triplet (0: none). The PASSED state stays for non-strict clients.
    strict_since: float = 0.0


@dataclass(frozen=True, slots=True)
class ClientEntry:
    passed: int         # triplets of this identity that passed a retry
    last_seen: float    # last refresh; the entry lives max_age after it


def encode_triplet(entry: TripletEntry) -> str:
    text = f"{entry.state.value} {entry.first_seen:.3f} {entry.last_seen:.3f} {entry.attempts}"
    return f"{text} {entry.strict_since:.3f}" if entry.strict_since else text


def decode_triplet(value: str | None) -> TripletEntry | None:
    if value is None:
        return None
    try:
        state, first, last, attempts, *strict = value.split(" ")
        if len(strict) > 1:
            return None
        return TripletEntry(TripletState(state), float(first), float(last), int(attempts),
                            float(strict[0]) if strict else 0.0)
    except ValueError:
        return None  # unreadable: start again (see Failure modes)


def encode_client(entry: ClientEntry) -> str:
    return f"{entry.passed} {entry.last_seen:.3f}"


def decode_client(value: str | None) -> ClientEntry | None:
    if value is None:
        return None
    try:
        passed, last = value.split(" ")
        return ClientEntry(int(passed), float(last))
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# Transitions.


@dataclass(frozen=True, slots=True)
class TripletStep:
    decision: Decision            # NEW, DEFERRED or PASSED
    wait: float                   # seconds until a retry would pass (0 when passed)
    write: TripletEntry | None    # None: leave the stored entry as it is
    expires_at: float             # expiry of `write` (ignored when write is None)
    newly_passed: bool            # this attempt turned DEFERRED into PASSED


def _new(now: float, policy: GraylistPolicy) -> TripletStep:
    entry = TripletEntry(TripletState.DEFERRED, now, now, 1)
    return TripletStep(Decision.NEW, policy.delay, entry, now + policy.retry_window, False)


def _deferred_step(entry: TripletEntry, now: float, policy: GraylistPolicy, strict: bool) -> TripletStep:
    elapsed = now - entry.first_seen
    if elapsed < policy.delay:
        # Too early: count the attempt but keep the clock and the expiry
        # (a bot hammering every minute must not keep its entry alive).
        again = replace(entry, last_seen=now, attempts=entry.attempts + 1)
        return TripletStep(Decision.DEFERRED, policy.delay - elapsed, again,
                           entry.first_seen + policy.retry_window, False)
    passed = TripletEntry(TripletState.PASSED, entry.first_seen, now, entry.attempts)
    memory = policy.strict_max_age if strict else policy.max_age
    return TripletStep(Decision.PASSED, 0.0, passed, now + memory, True)


def _strict_again(entry: TripletEntry, now: float, policy: GraylistPolicy) -> TripletStep:
    """A strict client meets a pass older than strict_max_age: it must retry
    once more, but the PASSED entry stays, for the non-strict clients of the
    same identity (issue 19 item 11: a weekly correspondent sharing a /24
    with a suspicious host was graylisted again). The strict retry runs on
    `strict_since`; the entry keeps the expiry its pass gave it."""
    kept_until = entry.last_seen + policy.max_age
    started = entry.strict_since
    if not started or now - started >= policy.retry_window:
        again = replace(entry, strict_since=now)
        return TripletStep(Decision.NEW, policy.delay, again, max(kept_until, now + policy.retry_window), False)
    if now - started < policy.delay:
        return TripletStep(Decision.DEFERRED, policy.delay - (now - started), None, 0.0, False)
    passed = replace(entry, last_seen=now, strict_since=0.0)
    return TripletStep(Decision.PASSED, 0.0, passed, max(kept_until, now + policy.strict_max_age), True)


def _passed_step(entry: TripletEntry, now: float, policy: GraylistPolicy, strict: bool) -> TripletStep:
    retrying = bool(entry.strict_since) and now - entry.strict_since < policy.retry_window
    if strict and (retrying or now - entry.last_seen > policy.strict_max_age):
        # Strict clients get no credit for old traffic: they retry again (and
        # a non-strict client's use meanwhile does not end their retry).
        return _strict_again(entry, now, policy)
    if not strict and now - entry.last_seen >= policy.max_age:
        # Kept a little past max_age for a strict retry only (_strict_again).
        return _new(now, policy)
    if now - entry.last_seen < policy.refresh_every:
        return TripletStep(Decision.PASSED, 0.0, None, 0.0, False)
    memory = policy.strict_max_age if strict else policy.max_age
    return TripletStep(Decision.PASSED, 0.0, replace(entry, last_seen=now), now + memory, False)


_BY_STATE = {
    TripletState.DEFERRED: _deferred_step,
    TripletState.PASSED: _passed_step,
}


def triplet_step(entry: TripletEntry | None, *, now: float, strict: bool, policy: GraylistPolicy) -> TripletStep:
    """The decision for one attempt of a triplet and what to store.

    `entry` is what the store returned for the triplet key (expired entries
    are already gone: the store drops them at their expiry).
    """
    if entry is None:
        return _new(now, policy)
    return _BY_STATE[entry.state](entry, now, policy, strict)


@dataclass(frozen=True, slots=True)
class ClientStep:
    write: ClientEntry | None
    expires_at: float


def client_passed(entry: ClientEntry | None, *, now: float, policy: GraylistPolicy) -> ClientStep:
    """One more triplet of this identity passed a retry (postgrey counts
    successful retries for --auto-whitelist-clients)."""
    passed = (entry.passed if entry else 0) + 1
    return ClientStep(ClientEntry(passed, now), now + policy.max_age)


def client_seen(entry: ClientEntry, *, now: float, policy: GraylistPolicy) -> ClientStep:
    """An auto-allowed identity came back: keep it for max_age after its
    last use, refreshing at most every `refresh_every`."""
    if now - entry.last_seen < policy.refresh_every:
        return ClientStep(None, 0.0)
    return ClientStep(replace(entry, last_seen=now), now + policy.max_age)


def auto_allowed(entry: ClientEntry | None, *, strict: bool, policy: GraylistPolicy) -> bool:
    """Whether the identity skips graylisting. Strict mode never does."""
    if strict or entry is None or policy.auto_allow_after <= 0:
        return False
    return entry.passed >= policy.auto_allow_after
