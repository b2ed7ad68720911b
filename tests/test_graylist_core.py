"""Pure graylist core: transitions with an injected clock, keys, sender normalisation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from smtpguard.core import graylist as g
from smtpguard.core.graylist import Decision

D = g.DAY
P = g.GraylistPolicy()
NEW, DEFERRED, PASSED = Decision.NEW, Decision.DEFERRED, Decision.PASSED


@dataclass
class Slot:
    """One stored triplet as a store would keep it: gone at its expiry."""

    entry: g.TripletEntry | None = None
    expires_at: float = 0.0

    def attempt(self, now: float, strict: bool = False, policy: g.GraylistPolicy = P) -> g.TripletStep:
        current = self.entry if self.entry is not None and self.expires_at > now else None
        step = g.triplet_step(current, now=now, strict=strict, policy=policy)
        if step.write is not None:
            self.entry, self.expires_at = step.write, step.expires_at
        elif current is None:
            self.entry = None
        return step


T0 = 1_700_000_000.0

# (offset from T0, strict, expected decision, expected wait)
SCENARIOS = [
    ("a first attempt is deferred for the whole delay",
     [(0, False, NEW, 180)]),
    ("an early retry is deferred again without resetting the clock",
     [(0, False, NEW, 180), (60, False, DEFERRED, 120), (170, False, DEFERRED, 10), (180, False, PASSED, 0)]),
    ("a retry after the delay passes",
     [(0, False, NEW, 180), (300, False, PASSED, 0)]),
    ("a retry just inside the retry window passes",
     [(0, False, NEW, 180), (2 * D - 1, False, PASSED, 0)]),
    ("an unretried entry expires after the retry window and starts again",
     [(0, False, NEW, 180), (2 * D, False, NEW, 180)]),
    ("a bot hammering early does not extend its entry past the retry window",
     [(0, False, NEW, 180)] + [(30 * i, False, DEFERRED, 180 - 30 * i) for i in range(1, 6)]
     + [(2 * D, False, NEW, 180)]),
    ("a passed triplet is remembered for max_age",
     [(0, False, NEW, 180), (200, False, PASSED, 0), (200 + 35 * D - 1, False, PASSED, 0)]),
    ("a passed triplet is forgotten max_age after its last use",
     [(0, False, NEW, 180), (200, False, PASSED, 0), (200 + 35 * D, False, NEW, 180)]),
    ("using a passed triplet refreshes its memory",
     [(0, False, NEW, 180), (200, False, PASSED, 0), (200 + 30 * D, False, PASSED, 0),
      (200 + 60 * D, False, PASSED, 0)]),
    ("a strict client's pass is remembered for strict_max_age only",
     [(0, True, NEW, 180), (200, True, PASSED, 0), (200 + D - 1, True, PASSED, 0),
      (200 + 2 * D, True, NEW, 180)]),
    ("strict mode gives no credit for a pass older than strict_max_age",
     [(0, False, NEW, 180), (200, False, PASSED, 0), (200 + 2 * D, True, NEW, 180)]),
    ("strict mode accepts a pass used within strict_max_age",
     [(0, False, NEW, 180), (200, False, PASSED, 0), (200 + 3600, True, PASSED, 0)]),
    ("a strict restart keeps a non-strict client's retry to one delay",
     [(0, False, NEW, 180), (200, False, PASSED, 0), (200 + 2 * D, True, NEW, 180),
      (200 + 2 * D + 180, True, PASSED, 0)]),
]


@pytest.mark.parametrize("steps", [s for _, s in SCENARIOS], ids=[i for i, _ in SCENARIOS])
def test_triplet_transitions(steps: list[tuple[float, bool, Decision, float]]) -> None:
    slot = Slot()
    for offset, strict, decision, wait in steps:
        step = slot.attempt(T0 + offset, strict)
        assert (step.decision, step.wait) == (decision, pytest.approx(wait)), f"at +{offset}"


def test_an_early_retry_counts_the_attempt_and_keeps_first_seen_and_expiry() -> None:
    slot = Slot()
    slot.attempt(T0)
    step = slot.attempt(T0 + 60)
    assert step.write == g.TripletEntry(g.TripletState.DEFERRED, T0, T0 + 60, 2)
    assert step.expires_at == T0 + P.retry_window


def test_the_passing_retry_is_marked_newly_passed_once() -> None:
    slot = Slot()
    assert [slot.attempt(T0 + t).newly_passed for t in (0, 200, 300, 5000)] == [False, True, False, False]


def test_a_passed_triplet_is_rewritten_at_most_once_per_refresh_interval() -> None:
    slot = Slot()
    slot.attempt(T0)
    slot.attempt(T0 + 200)
    assert slot.attempt(T0 + 200 + P.refresh_every - 1).write is None
    step = slot.attempt(T0 + 200 + P.refresh_every)
    assert step.write is not None and step.expires_at == T0 + 200 + P.refresh_every + P.max_age


def test_a_strict_pass_is_stored_with_the_strict_memory() -> None:
    slot = Slot()
    slot.attempt(T0, strict=True)
    assert slot.attempt(T0 + 200, strict=True).expires_at == T0 + 200 + P.strict_max_age


def test_the_delay_is_configurable() -> None:
    policy = g.GraylistPolicy(delay=600)
    slot = Slot()
    assert slot.attempt(T0, policy=policy).wait == 600
    assert slot.attempt(T0 + 599, policy=policy).decision is DEFERRED
    assert slot.attempt(T0 + 600, policy=policy).decision is PASSED


# -- auto-allow ---------------------------------------------------------------


def passes(n: int, policy: g.GraylistPolicy = P) -> g.ClientEntry | None:
    entry: g.ClientEntry | None = None
    for i in range(n):
        entry = g.client_passed(entry, now=T0 + i, policy=policy).write
    return entry


AUTO_ALLOW = [
    ("a client with 4 passed triplets is still graylisted", 4, False, P, False),
    ("a client with 5 passed triplets is auto-allowed", 5, False, P, True),
    ("strict mode ignores auto-allow", 50, True, P, False),
    ("auto_allow_after 0 switches auto-allow off", 50, False, g.GraylistPolicy(auto_allow_after=0), False),
    ("an unknown client is not auto-allowed", 0, False, P, False),
]


@pytest.mark.parametrize("n,strict,policy,allowed", [c[1:] for c in AUTO_ALLOW], ids=[c[0] for c in AUTO_ALLOW])
def test_auto_allow(n: int, strict: bool, policy: g.GraylistPolicy, allowed: bool) -> None:
    assert g.auto_allowed(passes(n, policy), strict=strict, policy=policy) is allowed


def test_a_pass_extends_the_client_memory_to_max_age() -> None:
    step = g.client_passed(None, now=T0, policy=P)
    assert step.write == g.ClientEntry(1, T0) and step.expires_at == T0 + P.max_age


def test_an_auto_allowed_client_is_refreshed_at_most_once_per_refresh_interval() -> None:
    entry = g.ClientEntry(5, T0)
    assert g.client_seen(entry, now=T0 + 10, policy=P).write is None
    step = g.client_seen(entry, now=T0 + P.refresh_every, policy=P)
    assert step.write == g.ClientEntry(5, T0 + P.refresh_every)
    assert step.expires_at == T0 + P.refresh_every + P.max_age


# -- identity and keys ------------------------------------------------------------

IDENTITIES = [
    ("an IPv4 client without rDNS is its /24", "192.0.2.77", None, "192.0.2.0/24"),
    ("an IPv6 client without rDNS is its /64", "2001:db8:1:2:3:4:5:6", None, "2001:db8:1:2::/64"),
    ("an IPv4-mapped IPv6 client is its IPv4 /24", "::ffff:192.0.2.77", None, "192.0.2.0/24"),
    ("a client with confirmed rDNS is its registrable domain", "192.0.2.77", "Outlook.COM.", "outlook.com"),
    ("an empty domain falls back to the network", "198.51.100.1", "", "198.51.100.0/24"),
]


@pytest.mark.parametrize("ip,domain,identity", [c[1:] for c in IDENTITIES], ids=[c[0] for c in IDENTITIES])
def test_client_identity(ip: str, domain: str | None, identity: str) -> None:
    assert g.client_identity(ip, domain, P) == identity


def test_the_network_prefixes_are_configurable() -> None:
    policy = g.GraylistPolicy(ipv4_prefix=32, ipv6_prefix=48)
    assert g.network_of("192.0.2.77", policy) == "192.0.2.77/32"
    assert g.network_of("2001:db8:1:2::9", policy) == "2001:db8:1::/48"


def test_a_triplet_key_splits_back_even_with_spaces_in_a_quoted_local_part() -> None:
    parts = ("192.0.2.0/24", '"john smith"@example.com', "100%@example.org")
    key = g.triplet_key(*parts)
    assert key.count(" ") == 2
    assert g.split_triplet_key(key) == parts
    assert g.split_triplet_key("grey:c:x") is None


ALLOW_TARGETS = [
    ("an address becomes its /32", "192.0.2.1", "192.0.2.1/32"),
    ("a network with host bits is normalised", "192.0.2.77/24", "192.0.2.0/24"),
    ("an IPv4 /8 is the widest allowed", "10.1.2.3/8", "10.0.0.0/8"),
    ("an IPv6 /48 is kept", "2001:DB8:1::/48", "2001:db8:1::/48"),
    ("an IPv6 address becomes its /128", "2001:db8::1", "2001:db8::1/128"),
    ("a domain is lowercased without its final dot", "Example.COM.", "example.com"),
]


@pytest.mark.parametrize("text,canonical", [c[1:] for c in ALLOW_TARGETS], ids=[c[0] for c in ALLOW_TARGETS])
def test_allow_targets(text: str, canonical: str) -> None:
    assert g.parse_allow_target(text) == canonical


BAD_ALLOW_TARGETS = [
    ("an IPv4 network wider than /8", "10.0.0.0/4"),
    ("an IPv6 network wider than /16", "2000::/12"),
    ("a bad address", "300.1.2.3"),
    ("not a domain", "not a domain!"),
    ("an empty value", " "),
]


@pytest.mark.parametrize("text", [c[1] for c in BAD_ALLOW_TARGETS], ids=[c[0] for c in BAD_ALLOW_TARGETS])
def test_bad_allow_targets_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        g.parse_allow_target(text)


COVERS = [
    ("an allowed address covers itself", "192.0.2.77", "192.0.2.77", True),
    ("an allowed /24 covers its addresses", "192.0.2.77", "192.0.2.0/24", True),
    ("an allowed /8 covers its addresses", "10.200.3.4", "10.0.0.0/8", True),
    ("an allowed /24 does not cover its neighbour", "192.0.3.1", "192.0.2.0/24", False),
    ("an IPv4-mapped client is covered by its IPv4 network", "::ffff:192.0.2.77", "192.0.2.0/25", True),
    ("an allowed IPv6 /32 covers its addresses", "2001:db8:1:2::9", "2001:db8::/32", True),
    ("an allowed IPv6 /48 does not cover another /48", "2001:db8:2::9", "2001:db8:1::/48", False),
    ("an allowed ::/16 covers ::1-style addresses", "::1", "::/16", True),
]


@pytest.mark.parametrize("ip,target,covered", [c[1:] for c in COVERS], ids=[c[0] for c in COVERS])
def test_a_client_is_covered_by_the_networks_in_its_bucket(ip: str, target: str, covered: bool) -> None:
    network = g.parse_allow_target(target)
    entries, _ = g.bucket_put((), g.AllowEntry(network, T0 + 60, T0), drop=network, now=T0)
    stored = g.decode_bucket(g.encode_bucket(entries))
    assert g.bucket_covers(stored, ip, now=T0) is covered
    if covered:
        assert g.bucket_key(ip) == g.bucket_key(network), "the check reads the bucket the entry is in"


def test_a_bucket_drops_expired_entries_and_replaces_an_entry_for_the_same_network() -> None:
    a = g.AllowEntry("192.0.2.0/24", T0 + 10, T0)
    b = g.AllowEntry("192.0.3.0/24", T0 + 100, T0)
    entries, expiry = g.bucket_put((), a, drop=a.network, now=T0)
    entries, expiry = g.bucket_put(entries, b, drop=b.network, now=T0)
    assert (entries, expiry) == ((a, b), T0 + 100)
    assert g.bucket_covers(entries, "192.0.2.1", now=T0 + 10) is False, "expired"
    longer = g.AllowEntry("192.0.2.0/24", T0 + 500, T0 + 5)
    entries, expiry = g.bucket_put(entries, longer, drop=longer.network, now=T0 + 20)
    assert (entries, expiry) == ((b, longer), T0 + 500)
    assert g.bucket_put(entries, None, drop="192.0.3.0/24", now=T0 + 600) == ((), T0 + 600), "empty: delete"


def test_bucket_keys_are_the_slash_8_or_slash_16() -> None:
    assert g.bucket_key("192.0.2.77") == "grey:allownet:192.0.0.0/8"
    assert g.bucket_key("192.0.2.0/24") == "grey:allownet:192.0.0.0/8"
    assert g.bucket_key("2001:db8::1") == "grey:allownet:2001::/16"
    assert g.bucket_key("::1") == "grey:allownet:::/16"
    assert g.bucket_key("::ffff:10.1.2.3") == "grey:allownet:10.0.0.0/8"


def test_an_unreadable_bucket_line_allows_nothing() -> None:
    assert g.decode_bucket("garbage\n192.0.2.0/24 inf 5") == (g.AllowEntry("192.0.2.0/24", math.inf, 5.0),)
    assert g.decode_bucket(None) == () and g.decode_bucket("") == ()


# -- sender normalisation ----------------------------------------------------------

SENDERS = [
    ("the null sender stays its own key", "<>", "<>"),
    ("an empty sender is the null sender", "", "<>"),
    ("case is folded and angle brackets removed", "<John.Doe@Example.COM>", "john.doe@example.com"),
    ("a plain hyphenated sender is kept", "no-reply@example.com", "no-reply@example.com"),
    ("BATV prvs is stripped", "prvs=0123456789=alice@example.com", "alice@example.com"),
    ("BATV prvs in capitals is stripped", "PRVS=4206A1F2C3=Alice@Example.org", "alice@example.org"),
    ("msprvs1 BATV with a VERP bounce address", "msprvs1=19318UkDZ8vrj=bounces-235432-1@bounces.example.com",
     "bounces-#@bounces.example.com"),
    ("Barracuda btv1 is stripped", "btv1==00233e8c0a4==alice@example.net", "alice@example.net"),
    # issue 19 item 6: SRS keeps the forwarder, drops its hash and day
    ("SRS0 keeps the original and the forwarder", "SRS0=x8Kd=5Q=example.org=alice@fwd.example.net",
     "srs0=example.org=alice@fwd.example.net"),
    ("SRS0 with the + separator", "SRS0+x8Kd=5Q=example.org=alice@fwd.example.net",
     "srs0=example.org=alice@fwd.example.net"),
    ("SRS1 keeps both forwarders and the original",
     "SRS1=Hq2P=fwd1.example.net==x8Kd=5Q=example.org=alice@fwd2.example.com",
     "srs1=fwd1.example.net=example.org=alice@fwd#.example.com"),
    ("BATV inside SRS is stripped", "SRS0=abcd=TT=example.com=prvs=1234567890=bob@fwd.example",
     "srs0=example.com=bob@fwd.example"),
    ("a local part with = after SRS is kept", "SRS0=abcd=TT=example.com=a=b@fwd.example",
     "srs0=example.com=a=b@fwd.example"),
    ("SendGrid VERP", "bounces+1234567-abcd-user=example.com@em1234.mail.example.com",
     "bounces@em#.mail.example.com"),
    ("Mailchimp VERP", "bounce-mc.us5_123456.789012-user=example.com@mail42.atl11.mcsv.net",
     "bounce-mc.us5_#-user=example.com@mail#.atl#.mcsv.net"),
    ("Amazon SES message id", "0100018c1a2b3c4d-5e6f7a8b-1c2d-4e5f-9a0b-1c2d3e4f5a6b-000000@email.amazonses.com",
     "#@email.amazonses.com"),
    ("Mailman VERP after +", "list-bounces+alice=example.com@lists.example.org", "list-bounces@lists.example.org"),
    ("ezmlm VERP with a message number", "list-return-4711-alice=example.com@lists.example.org",
     "list-return-#-alice=example.com@lists.example.org"),
    ("a long hex run without digits is a tag", "bounce-deadbeefcafe@example.com", "bounce-#@example.com"),
    ("the registrable part of the domain keeps its digits", "alice@mail7.123.com", "alice@mail#.123.com"),
    ("a final dot on the domain is dropped", "alice@example.com.", "alice@example.com"),
    ("an address without a domain is only folded", "Postmaster", "postmaster"),
]


@pytest.mark.parametrize("raw,key", [c[1:] for c in SENDERS], ids=[c[0] for c in SENDERS])
def test_sender_normalisation(raw: str, key: str) -> None:
    assert g.normalise_sender(raw) == key


SAME = [
    ("two SendGrid messages", "bounces+111-aaa-u=x.com@sg.example.com", "bounces+222-bbb-u=x.com@sg.example.com"),
    ("BATV on two days", "prvs=1123abcdef=bob@example.com", "prvs=2124fedcba=bob@example.com"),
    ("SRS through one forwarder on two days", "SRS0=aaaa=AB=example.org=bob@fwd1.example",
     "SRS0=bbbb=CD=example.org=bob@fwd1.example"),
    ("Mailchimp from two pool hosts", "bounce-mc.us5_1.2-u=x.com@mail1.atl1.mcsv.net",
     "bounce-mc.us5_3.4-u=x.com@mail9.atl8.mcsv.net"),
    ("two SES messages", "0100018c1a2b3c4d-aaaa1111-000000@amazonses.com",
     "0100018cffeeddcc-bbbb2222-000000@amazonses.com"),
]


@pytest.mark.parametrize("a,b", [c[1:] for c in SAME], ids=[c[0] for c in SAME])
def test_retries_and_later_messages_of_one_sender_share_a_key(a: str, b: str) -> None:
    assert g.normalise_sender(a) == g.normalise_sender(b)


DIFFERENT = [
    ("two people at one domain", "alice@example.com", "bob@example.com"),
    ("one name at two domains", "alice@example.com", "alice@example.org"),
    ("SRS originals from two domains", "SRS0=aaaa=AB=example.org=bob@fwd.example",
     "SRS0=aaaa=AB=example.net=bob@fwd.example"),
    ("the null sender and a real one", "<>", "mailer-daemon@example.com"),
    ("SRS through two forwarders (issue 19)", "SRS0=aaaa=AB=example.org=bob@fwd1.example",
     "SRS0=bbbb=CD=example.org=bob@fwd2.example"),
]


@pytest.mark.parametrize("a,b", [c[1:] for c in DIFFERENT], ids=[c[0] for c in DIFFERENT])
def test_different_senders_keep_different_keys(a: str, b: str) -> None:
    assert g.normalise_sender(a) != g.normalise_sender(b)


def test_recipients_are_folded_but_keep_their_tags() -> None:
    assert g.normalise_rcpt("<Alice+Lists@Example.COM>") == "alice+lists@example.com"


# -- stored forms ------------------------------------------------------------------


def test_entries_round_trip_through_their_string_form() -> None:
    entry = g.TripletEntry(g.TripletState.PASSED, T0 + 0.25, T0 + 300.5, 3)
    assert g.decode_triplet(g.encode_triplet(entry)) == entry
    client = g.ClientEntry(7, T0 + 1.5)
    assert g.decode_client(g.encode_client(client)) == client


@pytest.mark.parametrize("value", ["", "x 1 2 3", "d 1 2", "p one two three", "garbage"], ids=repr)
def test_an_unreadable_stored_value_is_treated_as_absent(value: str) -> None:
    assert g.decode_triplet(value) is None
    assert g.decode_client(value) is None

