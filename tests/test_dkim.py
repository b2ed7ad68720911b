"""DKIM at the data stage: real signatures made by dkimpy with keys generated
here (RSA 2048 and Ed25519), published in the test's own DNS server on
loopback; the per-signature results, the From: facts, our
Authentication-Results header and the removal of forged ones."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import time
from typing import Any

import dkim
import pytest

from smtpguard.adapters.dns import Resolver
from smtpguard.errors import ConfigError
from smtpguard.sources import dkim as dkim_source
from smtpguard.sources.dkim import DkimSettings
from tests.fixtures_dns import DnsServer
from tests.fixtures_smtp import Recorder

cryptography = pytest.importorskip("cryptography")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa  # noqa: E402

MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: signed\r\n"
           b"Message-ID: <1@sender.test>\r\n\r\nHello, this message is signed.\r\n")


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    """A 2048-bit RSA key: (private PEM, the p= value of its DNS record)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode("ascii")


@pytest.fixture(scope="module")
def ed_key() -> tuple[bytes, str]:
    """An Ed25519 key (RFC 8463): (base64 private seed as dkimpy wants it, p= value)."""
    private = ed25519.Ed25519PrivateKey.generate()
    seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed), base64.b64encode(public).decode("ascii")


def signed(key: tuple[bytes, str], message: bytes = MESSAGE, domain: bytes = b"sender.test",
           selector: bytes = b"s1") -> bytes:
    return dkim.sign(message, selector, domain, key[0], include_headers=[b"from", b"to", b"subject"]) + message


def ed_signed(key: tuple[bytes, str], message: bytes = MESSAGE, domain: bytes = b"sender.test") -> bytes:
    return dkim.sign(message, b"ed", domain, key[0], signature_algorithm=b"ed25519-sha256",
                     include_headers=[b"from", b"to", b"subject"]) + message


def publish(dns_server: DnsServer, key: tuple[bytes, str], domain: str = "sender.test",
            selector: str = "s1", kind: str = "rsa") -> None:
    dns_server.set(f"{selector}._domainkey.{domain}", "TXT", [f"v=DKIM1; k={kind}; p={key[1]}"])


def fact(dns_server: DnsServer, message: bytes, settings: DkimSettings | None = None,
         timeout: float = 1.0, budget: float = 2.0) -> dkim_source.DkimFact:
    async def go() -> dkim_source.DkimFact:
        return await dkim_source.gather(message, Resolver([dns_server.address], timeout=timeout),
                                        budget=budget, settings=settings)
    return asyncio.run(go())


def results(f: dkim_source.DkimFact) -> list[tuple[str, str, str]]:
    return [(r.result, r.domain, r.reason) for r in f.results]


# -- verification results ---------------------------------------------------------

def test_a_valid_rsa_signature_passes_and_names_its_domain(dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    f = fact(dns_server, signed(key))
    assert (f.dkim, f.domains) == ("pass", ("sender.test",))
    assert f.as_facts() == {"dkim": "pass", "dkim_domains": ("sender.test",),
                            "from_domain": "sender.test", "dkim_aligned": True}
    (r,) = f.results
    assert (r.result, r.domain, r.selector, r.algorithm) == ("pass", "sender.test", "s1", "rsa-sha256")


def test_a_valid_ed25519_signature_passes(dns_server: DnsServer, ed_key: Any) -> None:
    publish(dns_server, ed_key, selector="ed", kind="ed25519")
    f = fact(dns_server, ed_signed(ed_key))
    assert (f.dkim, results(f)) == ("pass", [("pass", "sender.test", "")])
    assert f.results[0].algorithm == "ed25519-sha256"


def test_a_changed_body_fails_with_the_body_hash_reason(dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    f = fact(dns_server, signed(key).replace(b"Hello", b"Howdy"))
    assert (f.dkim, results(f)) == ("fail", [("fail", "sender.test", "body_hash")])
    assert f.as_facts()["dkim_aligned"] is False


def test_a_changed_signed_header_fails(dns_server: DnsServer, key: Any, ed_key: Any) -> None:
    publish(dns_server, key)
    publish(dns_server, ed_key, selector="ed", kind="ed25519")
    for message in (signed(key), ed_signed(ed_key)):
        f = fact(dns_server, message.replace(b"Subject: signed", b"Subject: changed"))
        assert (f.dkim, results(f)) == ("fail", [("fail", "sender.test", "bad_signature")])


def test_a_missing_key_is_permerror_and_a_failed_lookup_temperror(dns_server: DnsServer, key: Any) -> None:
    dns_server.nxdomain("s1._domainkey.sender.test")
    f = fact(dns_server, signed(key))
    assert (f.dkim, results(f)) == ("fail", [("permerror", "sender.test", "no_key")])
    dns_server.servfail("s1._domainkey.sender.test")
    f = fact(dns_server, signed(key))
    assert (f.dkim, results(f)) == ("unknown", [("temperror", "sender.test", "key_lookup")])
    assert f.as_facts()["dkim_aligned"] == "unknown"


def test_a_key_lookup_that_times_out_is_temperror_within_the_budget(dns_server: DnsServer, key: Any) -> None:
    dns_server.silent("s1._domainkey.sender.test")
    started = time.monotonic()
    f = fact(dns_server, signed(key), timeout=0.3, budget=0.6)
    assert time.monotonic() - started < 3
    assert (f.dkim, results(f)) == ("unknown", [("temperror", "sender.test", "key_lookup")])


def test_one_good_signature_among_bad_ones_passes(dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    dns_server.nxdomain("s1._domainkey.other.test")
    twice = signed(key, signed(key, MESSAGE, b"other.test"))
    f = fact(dns_server, twice)
    assert (f.dkim, f.domains) == ("pass", ("sender.test",))
    assert sorted(results(f)) == [("pass", "sender.test", ""), ("permerror", "other.test", "no_key")]


@pytest.mark.parametrize("header, reason", [
    pytest.param(b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; s=s1; h=from; bh=abc=; b=",
                 "malformed", id="an empty b= is permerror"),
    pytest.param(b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; h=from; bh=abc=; b=abcd",
                 "malformed", id="a missing s= is permerror"),
    pytest.param(b"DKIM-Signature: v=1; a=rot13-md5; d=sender.test; s=s1; h=from; bh=abc=; b=abcd",
                 "malformed", id="an unknown algorithm is permerror"),
    pytest.param(b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; d=sender.test; s=s1; h=from; bh=; b=x",
                 "malformed", id="a repeated tag is permerror"),
    pytest.param(b"DKIM-Signature: \x00\xff garbage ;;; ===", "malformed", id="binary garbage is permerror"),
])
def test_malformed_signatures_are_permerror_never_an_exception(dns_server: DnsServer, key: Any,
                                                               header: bytes, reason: str) -> None:
    publish(dns_server, key)
    f = fact(dns_server, header + b"\r\n" + MESSAGE)
    assert f.dkim == "fail"
    assert [(r.result, r.reason) for r in f.results] == [("permerror", reason)]


def test_a_malformed_or_short_key_is_permerror(dns_server: DnsServer, key: Any) -> None:
    dns_server.set("s1._domainkey.sender.test", "TXT", ["v=DKIM1; k=rsa; p=not-base64!!"])
    assert results(fact(dns_server, signed(key))) == [("permerror", "sender.test", "bad_key")]
    # cryptography will not generate a 512-bit key; a 512-bit modulus is all the record needs.
    small = rsa.RSAPublicNumbers(65537, (1 << 511) | 0x1F3).public_key()
    der = small.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    dns_server.set("s1._domainkey.sender.test", "TXT", [f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"])
    assert results(fact(dns_server, signed(key))) == [("permerror", "sender.test", "short_key")]


def test_at_most_max_signatures_are_verified(dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    message = signed(key)
    for _ in range(14):
        message = signed(key, message)
    f = fact(dns_server, message)
    assert len(f.results) == dkim_source.MAX_SIGNATURES == 10
    assert f.dkim == "pass"
    f3 = fact(dns_server, message, DkimSettings(max_signatures=3))
    assert len(f3.results) == 3


def test_verification_is_bounded_in_time(dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    body = b"x" * 70 + b"\r\n"
    message = MESSAGE + body * 40_000                   # ~3 MB: each signature hashes it
    for _ in range(10):
        message = signed(key, message)
    started = time.monotonic()
    f = fact(dns_server, message, DkimSettings(verify_timeout=0.05))
    assert time.monotonic() - started < 5
    assert len(f.results) == 10
    assert any(r.reason == "timeout" and r.result == "temperror" for r in f.results)
    assert f.error.startswith("verification stopped")


# -- From: and alignment -------------------------------------------------------------

@pytest.mark.parametrize("headers, domain", [
    pytest.param(b"From: Alice <alice@Sender.TEST>\r\n\r\n", "sender.test", id="the address's domain, lowercased"),
    pytest.param(b"From: alice@sender.test\r\n\r\n", "sender.test", id="a bare address"),
    pytest.param(b"From: \"Bank, Inc\" <x@bank.example>\r\n\r\n", "bank.example", id="a quoted display name"),
    pytest.param(b"From: =?utf-8?q?B=C3=A4nk?= <x@xn--bnk-qla.example>\r\n\r\n", "xn--bnk-qla.example",
                 id="an encoded display name and an A-label domain"),
    pytest.param(b"From: a@one.example, b@two.example\r\n\r\n", "", id="two authors name no single domain"),
    pytest.param(b"From: a@one.example\r\nFrom: b@two.example\r\n\r\n", "", id="two From fields name none"),
    pytest.param(b"To: b@example.test\r\n\r\n", "", id="no From at all"),
    pytest.param(b"From: <a@bad\r\n domain..example>\r\n\r\n", "", id="an invalid domain is empty"),
    pytest.param(b"From: a@\x00\xff.example\r\n\r\n", "", id="bytes that are no domain are empty"),
    pytest.param(b"FROM : Alice\r\n <alice@sender.test>\r\n\r\n", "sender.test",
                 id="any case, white space before the colon, a folded value"),
    pytest.param(b"From-Alias: a@one.example\r\nFrom: b@two.example\r\n\r\n", "two.example",
                 id="only the field named From"),
])
def test_from_domain(headers: bytes, domain: str) -> None:
    assert dkim_source.from_domain(headers) == domain


@pytest.mark.parametrize("headers, verifiable", [
    (b"From: a@sender.test\r\nSubject: hi\r\n\r\n", False),
    (b"From: a@sender.test\r\nDKIM-Signature: v=1; d=x\r\n\r\n", True),
    (b"dkim-signature : v=1;\r\n\td=x\r\n\r\n", True),
    (b"X-Note: about DKIM-Signature: headers\r\n\r\n", False),
    (b"no colon here\r\n\r\n", True),   # dkimpy's verdict on a broken block is kept
])
def test_only_a_signed_or_broken_message_is_parsed_by_dkimpy(headers: bytes, verifiable: bool) -> None:
    # the fast path for unsigned mail (issue 15) must never skip a signature
    assert dkim_source.verifiable(headers) is verifiable


@pytest.mark.parametrize("from_dom, passed, ok", [
    pytest.param("sender.test", ("sender.test",), True, id="the same domain is aligned"),
    pytest.param("news.bank.co.uk", ("bank.co.uk",), True, id="a parent in the same organisational domain"),
    pytest.param("bank.co.uk", ("mail.bank.co.uk",), True, id="a child in the same organisational domain"),
    pytest.param("bank.co.uk", ("other.co.uk",), False, id="a sibling under a public suffix is not"),
    pytest.param("bank.example", ("esp.example",), False, id="an ESP's signature is not aligned"),
    pytest.param("", ("sender.test",), False, id="no From: domain is never aligned"),
])
def test_relaxed_alignment(from_dom: str, passed: tuple[str, ...], ok: bool) -> None:
    assert dkim_source.aligned(from_dom, passed) is ok


def test_an_esp_signature_passes_but_is_not_aligned(dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key, domain="esp.test")
    f = fact(dns_server, signed(key, domain=b"esp.test"))
    assert f.as_facts() == {"dkim": "pass", "dkim_domains": ("esp.test",),
                            "from_domain": "sender.test", "dkim_aligned": False}


# -- Authentication-Results ----------------------------------------------------------

def test_the_authentication_results_header(dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    dns_server.nxdomain("s1._domainkey.other.test")
    f = fact(dns_server, signed(key, signed(key, MESSAGE, b"other.test")))
    header = dkim_source.authentication_results("mx.example.net", f)
    assert header.startswith(b"Authentication-Results: mx.example.net;\r\n\t") and header.endswith(b"\r\n")
    lines = header.decode().split(";\r\n\t")[1:]
    b = {r.domain: r.b for r in f.results}
    assert sorted(x.strip() for x in lines) == sorted([
        f"dkim=pass header.d=sender.test header.s=s1 header.a=rsa-sha256 header.b={b['sender.test']}",
        f'dkim=permerror reason="no key for signature" header.d=other.test header.s=s1 header.a=rsa-sha256 '
        f"header.b={b['other.test']}",
    ])
    assert all(len(line) <= 998 for line in header.split(b"\r\n"))   # RFC 5322 §2.1.1
    assert dkim_source.authentication_results("mx.example.net", fact(dns_server, MESSAGE)) == \
        b"Authentication-Results: mx.example.net;\r\n\tdkim=none\r\n"


def test_a_message_too_broken_to_parse_is_permerror(dns_server: DnsServer) -> None:
    f = fact(dns_server, b"no header here, no colon\r\n\r\nbody\r\n")
    header = dkim_source.authentication_results("mx.example.net", f)
    assert (f.dkim, f.results) == ("fail", ()) and f.error.startswith("unparsable message")
    assert header == b"Authentication-Results: mx.example.net;\r\n\tdkim=permerror\r\n"


def test_hostile_signature_values_never_reach_our_header(dns_server: DnsServer) -> None:
    header = (b'DKIM-Signature: v=1; a=rsa-sha256; d=evil.test"; x=1\r\n\tX-Injected: yes; s=s1\r\n\tbad;'
              b' h=from; bh=abc=; b=abcd\r\n')
    f = fact(dns_server, header + MESSAGE)
    out = dkim_source.authentication_results("mx.example.net", f)
    assert b"X-Injected" not in out and b'"' not in out.replace(b'reason="malformed signature"', b"")
    assert out.count(b"\r\n") == 2


FORGED = (b"Received: from a by b\r\n"
          b"Authentication-Results: MX.Example.NET; dkim=pass header.d=bank.example\r\n"
          b"authentication-results: mx.example.net. 1;\r\n\tdkim=pass\r\n"
          b"Authentication-Results: (comment) mx.example.net (another); spf=pass\r\n"
          b"Authentication-Results: other.example; dkim=pass header.d=bank.example\r\n"
          b"Authentication-Results: mx.example.network; dkim=pass\r\n"
          b"Subject: hello\r\n\r\n")


def test_forged_authentication_results_claiming_us_are_removed() -> None:
    out = dkim_source.strip_authentication_results(FORGED, "mx.example.net")
    assert out == (b"Received: from a by b\r\n"
                   b"Authentication-Results: other.example; dkim=pass header.d=bank.example\r\n"
                   b"Authentication-Results: mx.example.network; dkim=pass\r\n"
                   b"Subject: hello\r\n\r\n")
    assert dkim_source.strip_authentication_results(b"", "mx.example.net") == b""
    assert dkim_source.strip_authentication_results(FORGED, "") == FORGED


# -- settings ------------------------------------------------------------------------

@pytest.mark.parametrize("table, key", [
    ({"authserv_id": "mx example"}, "dkim.authserv_id"),
    ({"authserv_id": "mx.example.net;\r\nX: y"}, "dkim.authserv_id"),
    ({"authserv_id": 5}, "dkim.authserv_id"),
    ({"max_signatures": 0}, "dkim.max_signatures"),
    ({"max_signatures": True}, "dkim.max_signatures"),
    ({"verify_timeout": "forever"}, "dkim.verify_timeout"),
    ({"verify_timeout": 0}, "dkim.verify_timeout"),
    ({"colour": "red"}, "dkim.colour"),
])
def test_bad_dkim_settings_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        DkimSettings.from_mapping(table)
    assert key in str(e.value)


def test_authserv_id_defaults_to_the_hostname() -> None:
    assert dkim_source.authserv(DkimSettings(), "MX1.Example.NET.") == "mx1.example.net"
    assert dkim_source.authserv(DkimSettings(authserv_id="auth.example.net"), "mx1.example.net") == "auth.example.net"


# -- live --------------------------------------------------------------------------

def test_a_bad_signature_is_refused_at_the_end_of_data(recorder: Recorder, guard_factory: Any,
                                                        dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    doc = {"rule": [{"name": "dkim-fail", "stage": "data", "when": {"dkim": "fail"}, "action": "reject"}]}
    g = guard_factory(doc, upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("c.test")
        s.sendmail("alice@sender.test", ["bob@example.test"], signed(key))  # passes
        s.mail("alice@sender.test")
        s.rcpt("bob@example.test")
        code, text = s.data(signed(key).replace(b"Hello", b"Howdy"))
    assert code == 550 and text.startswith(b"5.7.1 [POLICY] ")
    assert len(recorder.messages) == 1


def test_unsigned_mail_claiming_a_listed_bank_is_refused(recorder: Recorder, guard_factory: Any,
                                                         dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key, domain="bank.test")
    doc = {"rule": [{"name": "bank-unsigned", "stage": "data",
                     "when": {"from_domain_in": [".bank.test", "bank.test"], "dkim_aligned": False},
                     "action": "reject"}]}
    g = guard_factory(doc, upstream=recorder.address)
    forged = MESSAGE.replace(b"alice@sender.test", b"security@bank.test")
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("c.test")
        s.mail("x@elsewhere.test")
        s.rcpt("bob@example.test")
        code, _ = s.data(forged)
        assert code == 550
        s.sendmail("x@elsewhere.test", ["bob@example.test"], signed(key, forged, b"bank.test"))
        s.sendmail("alice@sender.test", ["bob@example.test"], MESSAGE)      # another From: passes
    assert len(recorder.messages) == 2


# -- smtpguard check --message ---------------------------------------------------------

def _check(tmp_path: Any, dns_server: DnsServer, *args: str) -> Any:
    import subprocess
    import sys
    conf = tmp_path / "c.toml"
    conf.write_text('[server]\nhostname = "mx.example.test"\ndomains = ["example.test"]\n'
                    '[upstream]\naddress = "127.0.0.1:1"\n[dkim]\nauthserv_id = "auth.example.test"\n')
    return subprocess.run([sys.executable, "-m", "smtpguard", "check", "192.0.2.7", "--config", str(conf),
                           "--dns-server", dns_server.address, *args], capture_output=True, text=True, timeout=60)


def test_check_message_shows_the_dkim_facts_of_a_stored_message(tmp_path: Any, dns_server: DnsServer,
                                                                 key: Any) -> None:
    import json
    publish(dns_server, key)
    eml = tmp_path / "m.eml"
    eml.write_bytes(signed(key).replace(b"\r\n", b"\n"))        # saved with Unix line ends
    r = _check(tmp_path, dns_server, "--message", str(eml), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["message"]
    assert m["facts"] == {"dkim": "pass", "dkim_domains": ["sender.test"], "from_domain": "sender.test",
                          "dkim_aligned": True}
    assert [(s["result"], s["domain"], s["selector"]) for s in m["signatures"]] == [("pass", "sender.test", "s1")]
    assert m["authentication_results"].startswith("Authentication-Results: auth.example.test;\r\n\tdkim=pass ")
    text = _check(tmp_path, dns_server, "--message", str(eml)).stdout
    assert "dkim_aligned" in text and "signature 1: pass d=sender.test s=s1 a=rsa-sha256" in text


def test_check_message_errors_name_the_flag(tmp_path: Any, dns_server: DnsServer) -> None:
    r = _check(tmp_path, dns_server, "--message", str(tmp_path / "missing.eml"))
    assert r.returncode == 2 and "--message" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- properties: hostile bytes ---------------------------------------------------------

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa: E402

_TAGS = st.lists(st.tuples(st.sampled_from(["v", "a", "b", "bh", "d", "s", "h", "c", "l", "t", "x", "i", "q", "z"]),
                           st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=40)),
                 max_size=10)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tags=_TAGS, junk=st.binary(max_size=60))
def test_any_signature_header_gives_results_never_an_exception(dns_server: DnsServer, tags: list[tuple[str, str]],
                                                               junk: bytes) -> None:
    value = "; ".join(f"{k}={v}" for k, v in tags).encode("utf-8", "replace").replace(b"\r", b"").replace(b"\n", b"")
    message = b"DKIM-Signature: " + value + junk.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n" + MESSAGE
    f = fact(dns_server, message, timeout=0.2, budget=0.4)
    assert f.dkim in ("pass", "fail", "none", "unknown")
    assert all(r.result in ("pass", "fail", "neutral", "temperror", "permerror") for r in f.results)
    header = dkim_source.authentication_results("mx.example.net", f)
    assert header.count(b"\r\n") == max(len(f.results), 1) + 1
    assert all(32 <= c < 127 or c in (9, 10, 13) for c in header)


_FIELD = st.one_of(
    st.builds(lambda n, v: n + b": " + v + b"\r\n", st.sampled_from([b"Subject", b"Received", b"X-A", b"From"]),
              st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
    st.builds(lambda pre, idv, rest: b"Authentication-Results: " + pre + idv + rest + b"\r\n",
              st.sampled_from([b"", b"(c) ", b" "]),
              st.sampled_from([b"mx.example.net", b"MX.example.NET.", b"other.example", b"mx.example.net.evil"]),
              st.sampled_from([b"; dkim=pass", b" 1; spf=pass", b";\r\n\tdkim=pass", b""])),
)


@hsettings(max_examples=200, deadline=None)
@given(st.lists(_FIELD, max_size=12))
def test_stripping_removes_exactly_the_fields_claiming_us(fields: list[bytes]) -> None:
    block = b"".join(fields) + b"\r\n"
    out = dkim_source.strip_authentication_results(block, "mx.example.net")
    kept = [f for f in fields if not (f.startswith(b"Authentication-Results:")
                                      and f.split(b":", 1)[1].replace(b"(c)", b"").split(b";")[0].split()
                                      and f.split(b":", 1)[1].replace(b"(c)", b"").split(b";")[0].split()[0]
                                      .lower().rstrip(b".") == b"mx.example.net")]
    assert out == b"".join(kept) + b"\r\n"


def test_the_from_domain_is_read_only_when_a_rule_reads_it(dns_server: DnsServer, key: Any) -> None:
    # issue 15: without a rule on from_domain or dkim_aligned, From: is not
    # parsed and those facts are absent; the signature results are the same
    publish(dns_server, key)
    resolver = Resolver([dns_server.address], timeout=1.0)

    async def both(message: bytes) -> tuple[dkim_source.DkimFact, dkim_source.DkimFact]:
        return (await dkim_source.gather(message, resolver, 2.0),
                await dkim_source.gather(message, resolver, 2.0, author_facts=False))

    for message in (signed(key), b"From: a@sender.test\r\n\r\nbody\r\n"):
        full, lean = asyncio.run(both(message))
        assert full.as_facts()["from_domain"] == "sender.test"
        assert lean.as_facts() == {k: v for k, v in full.as_facts().items()
                                   if k not in ("from_domain", "dkim_aligned")}
        assert lean.results == full.results
