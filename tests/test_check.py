"""`smtpguard check`: the same facts and policy as a live session, printed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.fixtures_dns import DnsServer
from tests.test_syn import WINDOWS_OPTS, build_syn

CONFIG = """
[server]
hostname = "mx.example.test"
domains = ["example.test"]
resolution_url = "https://help.example.test/smtp?code={code}&ip={ip}"
[upstream]
address = "127.0.0.1:1"
[[dnsbl]]
zone = "bl.test"
weight = 3
"""


def check(tmp_path: Path, dns: DnsServer, *args: str, extra: str = "") -> dict[str, Any]:
    conf = tmp_path / "c.toml"
    conf.write_text(CONFIG + extra + _default_rules())
    r = subprocess.run([sys.executable, "-m", "smtpguard", "check", *args, "--config", str(conf),
                        "--dns-server", dns.address, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _default_rules() -> str:
    from smtpguard.core.policy import default_rules_toml
    return "\n" + default_rules_toml()


def test_check_shows_every_dns_fact(tmp_path: Path, dns_server: DnsServer) -> None:
    dns_server.set("7.2.0.192.in-addr.arpa", "PTR", ["dsl-192-0-2-7.pool.isp.test."])
    dns_server.set("dsl-192-0-2-7.pool.isp.test", "A", ["192.0.2.7"])
    dns_server.set("7.2.0.192.bl.test", "A", ["127.0.0.2"])
    dns_server.set("helo.sender.test", "A", ["192.0.2.99"])
    out = check(tmp_path, dns_server, "192.0.2.7", "--helo", "helo.sender.test", "--sender", "a@sender.test",
                "--rcpt", "b@example.test")
    f = out["facts"]
    assert (f["rdns"], f["rdns_name"], f["rdns_domain"], f["rdns_generic"]) == \
        ("confirmed", "dsl-192-0-2-7.pool.isp.test", "isp.test", True)
    assert f["dnsbl"] == "listed" and f["dnsbl_score"] == 3 and f["dnsbl_hits"] == ["bl.test=127.0.0.2"]
    assert (f["helo_valid"], f["helo_resolves"], f["helo_matches_ip"], f["helo_is_us"]) == (True, True, False, False)
    assert f["helo_matches_rdns"] is False and f["helo_bare_ip"] is False
    [connect] = [s for s in out["stages"] if s["stage"] == "connect"]
    assert connect["rule"] == "dnsbl" and connect["deferred_to"] == "rcpt"
    assert out["reply"].startswith("550 5.7.1 [DNSBL] ") and "bl.test (127.0.0.2)" in out["reply"]
    assert out["reply"].endswith("https://help.example.test/smtp?code=DNSBL&ip=192.0.2.7")


def test_check_shows_the_os_fact_from_a_syn(tmp_path: Path, dns_server: DnsServer) -> None:
    dns_server.nxdomain("7.2.0.192.in-addr.arpa")
    syn = build_syn(ttl=117, window=64240, layout=WINDOWS_OPTS, ws=8).hex()
    out = check(tmp_path, dns_server, "192.0.2.7", "--syn", syn, "--rcpt", "b@example.test")
    f = out["facts"]
    assert (f["os"], f["os_match"], f["os_distance"]) == ("windows", "exact", 11)
    assert out["reply"].startswith("550 5.7.1 [OS-RDNS] ")  # Windows without rDNS, by the default policy


def test_check_refuses_a_relay_recipient(tmp_path: Path, dns_server: DnsServer) -> None:
    dns_server.nxdomain("7.2.0.192.in-addr.arpa")
    out = check(tmp_path, dns_server, "192.0.2.7", "--rcpt", "x@other.test")
    assert out["reply"].startswith("550 5.7.1 [RELAY] ")


def test_check_with_a_bad_ip_is_exit_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "smtpguard", "check", "not-an-ip"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
