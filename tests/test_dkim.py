"""DKIM facts at the data stage: real signatures (dkimpy), keys from the
test's own DNS server on loopback."""

from __future__ import annotations

import asyncio
import base64
import smtplib
from typing import Any

import dkim
import pytest

from smtpguard.adapters.dns import Resolver
from smtpguard.sources import dkim as dkim_source
from tests.fixtures_dns import DnsServer
from tests.fixtures_smtp import Recorder

cryptography = pytest.importorskip("cryptography")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

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


def signed(key: tuple[bytes, str], message: bytes = MESSAGE, domain: bytes = b"sender.test") -> bytes:
    return dkim.sign(message, b"s1", domain, key[0], include_headers=[b"from", b"to", b"subject"]) + message


def publish(dns_server: DnsServer, key: tuple[bytes, str], domain: str = "sender.test") -> None:
    dns_server.set(f"s1._domainkey.{domain}", "TXT", [f"v=DKIM1; k=rsa; p={key[1]}"])


def fact(dns_server: DnsServer, message: bytes) -> dkim_source.DkimFact:
    async def go() -> dkim_source.DkimFact:
        return await dkim_source.gather(message, Resolver([dns_server.address], timeout=1.0), budget=2.0)
    return asyncio.run(go())


def test_a_valid_signature_passes_and_names_its_domain(dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    f = fact(dns_server, signed(key))
    assert (f.dkim, f.domains) == ("pass", ("sender.test",))
    assert f.as_facts() == {"dkim": "pass", "dkim_domains": ("sender.test",)}


def test_a_changed_body_fails(dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    tampered = signed(key).replace(b"Hello", b"Howdy")
    assert fact(dns_server, tampered).dkim == "fail"


def test_no_signature_is_none(dns_server: DnsServer) -> None:
    assert fact(dns_server, MESSAGE).dkim == "none"


def test_a_missing_key_fails_and_a_failed_lookup_is_unknown(dns_server: DnsServer, key: Any) -> None:
    dns_server.nxdomain("s1._domainkey.sender.test")
    assert fact(dns_server, signed(key)).dkim == "fail"
    dns_server.servfail("s1._domainkey.sender.test")
    assert fact(dns_server, signed(key)).dkim == "unknown"


def test_one_good_signature_among_bad_ones_passes(dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    dns_server.nxdomain("s1._domainkey.other.test")
    twice = signed(key, signed(key, MESSAGE, b"other.test"))
    f = fact(dns_server, twice)
    assert (f.dkim, f.domains) == ("pass", ("sender.test",))


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
