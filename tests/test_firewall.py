"""`smtpguard firewall export`: the [geo] policy as nft, ipset and pf rule sets.

Each output is parsed back and compared with what the zones and the policy
say (netaddr sets): the networks, the exempt ones, the port, accept or drop.
Where Debian's nftables is installed the nft output is checked with
`nft -c -f`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPNetwork, IPSet

from smtpguard.cli import main
from smtpguard.core.geo import LOCAL_NETWORKS

US = ["192.0.2.0/25", "192.0.2.128/25", "198.51.100.0/24", "2001:db8:1::/49", "2001:db8:1:8000::/49"]
CA = ["198.51.101.0/24", "2001:db8:2::/48"]
CN = ["203.0.113.0/24", "2001:db8:3::/48", "192.0.2.64/26"]   # nested inside a US block: innermost wins
LOCAL = IPSet(n for n, _ in LOCAL_NETWORKS)


@pytest.fixture
def zones(tmp_path: Path) -> Path:
    d = tmp_path / "zones"
    d.mkdir()
    for cc, nets in (("us", US), ("ca", CA), ("cn", CN)):
        (d / f"{cc}.zone").write_text("\n".join(nets) + "\n")
    return d


def _export(capsys: Any, *args: str) -> str:
    assert main(["firewall", "export", *args]) == 0
    return capsys.readouterr().out


def _cidrs(text: str) -> list[IPNetwork]:
    return [IPNetwork(m) for m in re.findall(r"[0-9a-f:.]+/\d+", text)]


def _nft_sets(text: str) -> dict[str, list[IPNetwork]]:
    sets = {}
    for name, body in re.findall(r"set (\w+) \{(.*?)\n    \}", text, re.S):
        sets[name] = _cidrs(body)
    return sets


def _expected(*nets: list[str]) -> IPSet:
    out = IPSet()
    for group in nets:
        out |= IPSet(group)
    return out


def test_nft_allow_list_round_trips(capsys: Any, zones: Path) -> None:
    out = _export(capsys, "--zones", str(zones), "--allow-country", "US,CA")
    sets = _nft_sets(out)
    allowed = _expected(US, CA) - IPSet(["192.0.2.64/26"])   # the CN block inside the US one stays out
    assert IPSet(sets["geo4"]) | IPSet(sets["geo6"]) == allowed
    assert all(n.version == 4 for n in sets["geo4"]) and all(n.version == 6 for n in sets["geo6"])
    # merged to the fewest CIDRs: nothing in the set could be merged further
    from netaddr import cidr_merge
    assert len(sets["geo4"]) + len(sets["geo6"]) == len(cidr_merge(sets["geo4"] + sets["geo6"]))
    assert IPNetwork("2001:db8:1::/48") in sets["geo6"]                # two /49 halves merged
    assert IPSet(sets["exempt4"]) | IPSet(sets["exempt6"]) == LOCAL
    rules = [line.strip() for line in out.splitlines() if "dport" in line]
    assert rules == ["tcp dport 25 ip saddr @exempt4 accept", "tcp dport 25 ip6 saddr @exempt6 accept",
                     "tcp dport 25 ip saddr @geo4 accept", "tcp dport 25 ip6 saddr @geo6 accept",
                     "tcp dport 25 drop"]


def test_nft_output_passes_nft_check(capsys: Any, zones: Path, tmp_path: Path) -> None:
    nft = shutil.which("nft") or ("/usr/sbin/nft" if Path("/usr/sbin/nft").exists() else None)
    if nft is None:
        pytest.skip("nftables is not installed here (scripts/system-deps.sh installs it): nft -c not run")
    path = tmp_path / "smtpguard.nft"
    path.write_text(_export(capsys, "--zones", str(zones), "--allow-country", "US,CA", "--port", "2525"))
    r = subprocess.run([nft, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 and ("Operation not permitted" in r.stderr or "netlink" in r.stderr.lower()):
        pytest.skip(f"nft -c cannot run here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    broken = tmp_path / "broken.nft"
    broken.write_text(path.read_text().replace("flags interval", "flags intervall", 1))
    assert subprocess.run([nft, "-c", "-f", str(broken)], capture_output=True, timeout=30).returncode != 0


def test_deny_list_with_unknown_allowed_drops_only_the_denied(capsys: Any, zones: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[geo]\nzones = "{zones}"\ndeny = ["CN"]\nunknown = "allow"\n'
                      '[[rule]]\nname = "partner"\nstage = "connect"\nwhen = { ip_in = ["203.0.113.8/29"] }\n'
                      'action = "accept"\n'
                      '[limits]\nexempt = ["2001:db8:3:1::/64"]\n')
    out = _export(capsys, "--config", str(config))
    sets = _nft_sets(out)
    assert IPSet(sets["geo4"]) | IPSet(sets["geo6"]) == _expected(CN)
    # the allowlisted partner inside the denied country is exempt, ahead of the drop
    assert IPNetwork("203.0.113.8/29") in sets["exempt4"]
    assert IPNetwork("2001:db8:3:1::/64") in sets["exempt6"]   # [limits] exempt too
    assert "tcp dport 25 ip saddr @geo4 drop" in out and "tcp dport 25 drop" not in out


def test_deny_list_with_unknown_denied_accepts_every_other_zoned_country(capsys: Any, zones: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[geo]\nzones = "{zones}"\ndeny = ["CN"]\n')   # unknown = "deny" by default
    sets = _nft_sets(_export(capsys, "--config", str(config)))
    assert IPSet(sets["geo4"]) | IPSet(sets["geo6"]) == _expected(US, CA) - IPSet(["192.0.2.64/26"])


def test_ipset_restore_file_round_trips(capsys: Any, zones: Path) -> None:
    assert main(["firewall", "export", "--format", "ipset", "--zones", str(zones), "--allow-country", "US"]) == 0
    captured = capsys.readouterr()
    members: dict[str, IPSet] = {}
    for line in captured.out.splitlines():
        verb, name, *rest = line.split()
        if verb == "create":
            assert rest[:3] == ["hash:net", "family", "inet" if name.endswith("4") else "inet6"]
            members[name] = IPSet()
        elif verb == "add":
            members[name].add(IPNetwork(rest[0]))
        else:
            assert verb == "flush"
    assert members["smtpguard-geo4"] | members["smtpguard-geo6"] == _expected(US) - IPSet(["192.0.2.64/26"])
    assert members["smtpguard-exempt4"] | members["smtpguard-exempt6"] == LOCAL
    assert "--dport 25 -m set --match-set smtpguard-geo4 src -j ACCEPT" in captured.err


def test_pf_table_round_trips(capsys: Any, zones: Path) -> None:
    out = _export(capsys, "--format", "pf", "--zones", str(zones), "--allow-country", "CA", "--port", "25")
    tables = dict(re.findall(r"table <(\w+)> const \{(.*?)\n\}", out, re.S))
    assert IPSet(_cidrs(tables["smtpguard_geo"])) == _expected(CA)
    assert IPSet(_cidrs(tables["smtpguard_exempt"])) == LOCAL
    assert out.rstrip().splitlines()[-3:] == [
        "pass in quick proto tcp from <smtpguard_exempt> to any port 25",
        "pass in quick proto tcp from <smtpguard_geo> to any port 25",
        "block in quick proto tcp to any port 25"]


@pytest.mark.parametrize("args, key", [
    pytest.param(["--zones", "ZONES"], "geo.allow", id="no country policy is exit 2 naming geo.allow"),
    pytest.param(["--zones", "ZONES", "--allow-country", "US", "--port", "70000"], "--port",
                 id="a port out of range is exit 2 naming --port"),
    pytest.param(["--allow-country", "US"], "--allow-country", id="a country list without zone data names the flag"),
    pytest.param(["--zones", "ZONES", "--allow-country", "XX"], "--allow-country",
                 id="a bad country code names the flag"),
])
def test_bad_input_is_one_line_and_exit_2(capsys: Any, zones: Path, args: list[str], key: str) -> None:
    args = [str(zones) if a == "ZONES" else a for a in args]
    assert main(["firewall", "export", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{key}:" in err


def test_an_allowed_country_without_zone_data_is_warned_about(capsys: Any, zones: Path) -> None:
    assert main(["firewall", "export", "--zones", str(zones), "--allow-country", "US,MX"]) == 0
    assert "no zone data for allowed MX" in capsys.readouterr().err
