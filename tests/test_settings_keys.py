"""core/settings.py: every settings reader refuses an unknown key with the
same one-line message it gave before the readers shared the check (issue 16):
the key named as `table.key`, the known keys listed."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from smtpguard.adapters.dns import DnsSettings
from smtpguard.core.settings import reject_unknown_keys
from smtpguard.errors import ConfigError
from smtpguard.sources import dkim, fingerprint
from smtpguard.sources.dnsbl import parse_lists
from smtpguard.sources.geo import GeoSettings
from smtpguard.sources.graylist import GraylistSettings, StateSettings
from smtpguard.sources.rdns import RdnsSettings

READERS: list[tuple[str, Callable[[dict[str, Any]], Any], str, str]] = [
    ("dns", DnsSettings.from_mapping, "dns.bogus",
     "unknown key; allowed: servers, timeout, stage_budget, cache_size, negative_ttl_max, "
     "max_answer_bytes, cache_bytes, session_lookups"),
    ("dkim", dkim.from_mapping, "dkim.bogus", "unknown key; allowed: authserv_id, max_signatures, verify_timeout"),
    ("fingerprint", fingerprint.from_mapping, "fingerprint.bogus",
     "unknown key; allowed: signatures, p0f_socket, p0f_timeout"),
    ("rdns", RdnsSettings.from_mapping, "rdns.bogus",
     "unknown key; allowed: generic_patterns, generic_exceptions, max_ptr_names"),
    ("dnsbl", lambda t: parse_lists([{"zone": "zen.example", **t}]), "dnsbl[1].bogus",
     "unknown key; allowed: zone, weight, codes, name"),
    ("geo", GeoSettings.from_mapping, "geo.bogus",
     "unknown setting; known: allow, cache, deny, mmdb, strict, unknown, zones"),
    ("state", StateSettings.from_mapping, "state.bogus", "unknown setting; allowed: url, timeout"),
    ("graylist", GraylistSettings.from_mapping, "graylist.bogus",
     "unknown setting; allowed: delay, retry_window, max_age, strict_max_age, trap_ttl, auto_allow_after, "
     "traps, on_error, ipv4_prefix, ipv6_prefix"),
]


@pytest.mark.parametrize("name, reader, key, message", READERS, ids=[r[0] for r in READERS])
def test_an_unknown_key_is_refused_with_the_readers_message(name: str, reader: Callable[[dict[str, Any]], Any],
                                                            key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        reader({"bogus": 1})
    assert (err.value.key, err.value.message) == (key, message)


def test_known_keys_pass_and_the_first_unknown_one_is_named() -> None:
    reject_unknown_keys({"a": 1, "b": 2}, "t", ("a", "b"))
    with pytest.raises(ConfigError) as err:
        reject_unknown_keys({"a": 1, "x": 2, "y": 3}, "t", ("a", "b"), wording="unknown setting; known")
    assert (err.value.key, err.value.message) == ("t.x", "unknown setting; known: a, b")


@pytest.mark.parametrize("raw, error", [
    ("5s", None), (2, None), ("10s", None),
    ("0s", "more than 0"), ("11s", "at most 10s"), ("soon", "duration"), (-1, "negative"),
])
def test_bounded_duration(raw: Any, error: str | None) -> None:
    from smtpguard.core.settings import bounded_duration

    if error is None:
        assert bounded_duration({"t": raw}, "t", "area", 10.0, 1.0) > 0
    else:
        with pytest.raises(ConfigError, match=error) as info:
            bounded_duration({"t": raw}, "t", "area", 10.0, 1.0)
        assert info.value.key == "area.t"
    assert bounded_duration({}, "t", "area", 10.0, 1.5) == 1.5    # absent: the default


@pytest.mark.parametrize("machine, ok", [("mx.example.com", True), ("vm", True), ("my_host.example.com", False),
                                         ("localhost.localdomain\r\n250 x", False)])
def test_the_machines_name_as_the_default_hostname_is_validated_like_a_configured_one(
        monkeypatch: pytest.MonkeyPatch, machine: str, ok: bool) -> None:
    """It goes on the wire (banner, EHLO, Received). The machine's name cannot be
    changed in a test, so config's lookup of it is replaced."""
    from smtpguard import config as cfg

    monkeypatch.setattr(cfg, "_machine_fqdn", lambda: machine)
    flags = {"upstream": "127.0.0.1:2526", "domain": ["example.test"]}
    if ok:
        assert cfg.build({}, flags).server.hostname == machine
    else:
        with pytest.raises(ConfigError) as e:
            cfg.build({}, flags)
        assert e.value.key == "server.hostname" and "set this key" in str(e.value)
