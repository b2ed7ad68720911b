"""`smtpguard graylist …` through its own argparse parser, on real stores."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from smtpguard.adapters.store import open_store
from smtpguard.commands import graylist as command
from smtpguard.sources import graylist as source
from smtpguard.sources.graylist import GraylistSettings
from tests.fixtures_redis import free_port

SETTINGS = GraylistSettings.from_mapping({"traps": ["trap@example.com"]})


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="smtpguard")
    command.add_parser(top.add_subparsers(dest="command"))
    return top


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = parser().parse_args(["graylist", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/state.db"


def populate(url: str, *, triplets: int = 0, passed: int = 0, trap_ip: str | None = None) -> None:
    """Real check() calls on the real clock: `triplets` new ones, `passed`
    of which are retried after the delay."""
    async def go() -> None:
        store = open_store(url)
        now = time.time() - 1000
        for i in range(triplets):
            await source.check(store, SETTINGS, ip="192.0.2.1", rdns_confirmed_domain=None,
                               sender="alice@example.org", rcpt=f"u{i:03d}@example.net", strict=False, now=now)
        for i in range(passed):
            await source.check(store, SETTINGS, ip="192.0.2.1", rdns_confirmed_domain=None,
                               sender="alice@example.org", rcpt=f"u{i:03d}@example.net", strict=False,
                               now=now + 200)
        if trap_ip:
            await source.check(store, SETTINGS, ip=trap_ip, rdns_confirmed_domain=None,
                               sender="x@example.org", rcpt="trap@example.com", strict=False, now=now)
        await store.close()
    asyncio.run(go())


def test_list_shows_triplets_as_a_table(url: str, capsys: Any) -> None:
    populate(url, triplets=2, passed=1)
    code, out, err = cli(capsys, "list", "--state", url)
    lines = out.splitlines()
    assert code == 0 and err == ""
    assert lines[0].split() == ["STATE", "ATTEMPTS", "FIRST_SEEN", "EXPIRES", "CLIENT", "SENDER", "RCPT"]
    assert [line.split()[0] for line in lines[1:]] == ["passed", "deferred"]
    assert lines[1].split()[4:] == ["192.0.2.0/24", "alice@example.org", "u000@example.net"]


def test_list_json_is_an_array_of_objects(url: str, capsys: Any) -> None:
    populate(url, triplets=1)
    code, out, _ = cli(capsys, "list", "--json", "--state", url)
    [row] = json.loads(out)
    assert code == 0
    assert (row["state"], row["client"], row["rcpt"], row["attempts"]) == (
        "deferred", "192.0.2.0/24", "u000@example.net", 1)


def test_list_never_shows_more_than_the_limit(url: str, capsys: Any) -> None:
    populate(url, triplets=60)
    code, out, err = cli(capsys, "list", "--json", "--limit", "7", "--state", url)
    assert code == 0 and len(json.loads(out)) == 7
    assert "--limit 7" in err
    _, out, err = cli(capsys, "list", "--state", url)
    assert len(out.splitlines()) == 1 + command.DEFAULT_LIMIT
    _, out, err = cli(capsys, "list", "--limit", "60", "--state", url)
    assert len(out.splitlines()) == 61 and err == ""


def test_list_trapped_shows_the_network_and_the_trap(url: str, capsys: Any) -> None:
    populate(url, trap_ip="198.51.100.7")
    code, out, _ = cli(capsys, "list", "--trapped", "--json", "--state", url)
    [row] = json.loads(out)
    assert (row["network"], row["trap"]) == ("198.51.100.0/24", "trap@example.com")


def test_untrap_lifts_the_trap_on_the_network(url: str, capsys: Any) -> None:
    populate(url, trap_ip="198.51.100.7")
    code, out, _ = cli(capsys, "untrap", "198.51.100.200", "--state", url)
    assert (code, out.strip()) == (0, "lifted the trap on 198.51.100.0/24")
    code, out, _ = cli(capsys, "list", "--trapped", "--json", "--state", url)
    assert json.loads(out) == []
    code, out, _ = cli(capsys, "untrap", "198.51.100.0/24", "--state", url)
    assert (code, out.strip()) == (0, "no trap on 198.51.100.0/24")
    code, _, err = cli(capsys, "untrap", "not-an-ip", "--state", url)
    assert code == 2 and err.count("\n") == 1 and "IP|NETWORK" in err


def test_allow_list_and_deny(url: str, capsys: Any) -> None:
    code, out, _ = cli(capsys, "allow", "192.0.2.9/24", "--state", url)
    assert (code, out.strip()) == (0, "allowed 192.0.2.0/24 until never")
    code, out, _ = cli(capsys, "allow", "Partner.Example", "--ttl", "1d", "--state", url)
    assert code == 0 and out.startswith("allowed partner.example until 20")
    _, out, _ = cli(capsys, "list", "--allowed", "--json", "--state", url)
    assert {(r["target"], r["expires"] == "never") for r in json.loads(out)} == {
        ("192.0.2.0/24", True), ("partner.example", False)}
    assert cli(capsys, "deny", "192.0.2.0/24", "--state", url)[1].strip() == "removed the allow entry for 192.0.2.0/24"
    assert cli(capsys, "deny", "192.0.2.0/24", "--state", url)[1].strip() == "no allow entry for 192.0.2.0/24"
    _, out, _ = cli(capsys, "list", "--allowed", "--json", "--state", url)
    assert [r["target"] for r in json.loads(out)] == ["partner.example"]


def test_an_allowed_network_really_skips_graylisting(url: str, capsys: Any) -> None:
    assert cli(capsys, "allow", "192.0.2.0/24", "--state", url)[0] == 0

    async def go() -> str:
        store = open_store(url)
        fact = await source.check(store, SETTINGS, ip="192.0.2.200", rdns_confirmed_domain=None,
                                  sender="a@example.org", rcpt="b@example.net", strict=False, now=time.time())
        await store.close()
        return fact.graylist
    assert asyncio.run(go()) == "allowed"


def test_purge_removes_expired_entries(url: str, capsys: Any) -> None:
    async def go() -> None:
        store = open_store(url)
        now = time.time()
        await store.set("grey:t:old", "d 1 1 1", expires_at=now - 10, now=now - 20)
        await store.set("grey:t:new", "d 1 1 1", expires_at=now + 600, now=now)
        await store.close()
    asyncio.run(go())
    assert cli(capsys, "purge", "--state", url)[:2] == (0, "purged 1 expired entries\n")
    assert cli(capsys, "purge", "--state", url)[1] == "purged 0 expired entries\n"


def test_stats_counts_entries_by_kind(url: str, capsys: Any) -> None:
    populate(url, triplets=7, passed=5, trap_ip="198.51.100.7")
    cli(capsys, "allow", "example.com", "--state", url)
    code, out, _ = cli(capsys, "stats", "--json", "--state", url)
    assert code == 0
    assert json.loads(out) == {"deferred": 2, "passed": 5, "clients": 1, "auto_allowed": 1,
                               "trapped": 1, "allowed": 1}
    _, out, _ = cli(capsys, "stats", "--state", url)
    assert "auto-allowed: 1" in out.splitlines()


def test_the_state_url_comes_from_the_config_file_and_state_overrides_it(
        url: str, tmp_path: Path, capsys: Any) -> None:
    config = tmp_path / "smtpguard.toml"
    config.write_text(f'[state]\nurl = "{url}"\n[graylist]\nauto_allow_after = 2\n[other]\nignored = 1\n')
    populate(url, triplets=2, passed=2)
    _, out, _ = cli(capsys, "stats", "--json", "--config", str(config))
    assert json.loads(out)["passed"] == 2
    assert json.loads(out)["auto_allowed"] == 1, "auto_allow_after read from [graylist]"
    other = f"sqlite://{tmp_path}/other.db"
    _, out, _ = cli(capsys, "stats", "--json", "--config", str(config), "--state", other)
    assert json.loads(out)["passed"] == 0


def test_it_works_on_redis_too(redis_url: str, capsys: Any) -> None:
    populate(redis_url, triplets=3, passed=1)
    assert cli(capsys, "allow", "2001:db8::/32", "--state", redis_url)[0] == 0
    _, out, _ = cli(capsys, "stats", "--json", "--state", redis_url)
    assert json.loads(out) == {"deferred": 2, "passed": 1, "clients": 1, "auto_allowed": 0,
                               "trapped": 0, "allowed": 1}


BAD_INPUT = [
    ("a limit that is not a number", ["list", "--limit", "many"], "--limit"),
    ("a zero limit", ["list", "--limit", "0"], "--limit"),
    ("an allow target that is neither network nor domain", ["allow", "not a host!"], "CIDR|DOMAIN"),
    ("an allow network wider than /8", ["allow", "10.0.0.0/4"], "CIDR|DOMAIN"),
    ("a bad ttl", ["allow", "example.com", "--ttl", "forever"], "--ttl"),
    ("a deny target that is neither", ["deny", "???"], "CIDR|DOMAIN"),
    ("an unusable state url", ["list", "--state", "mysql://x"], "--state"),
    ("a missing config file", ["list", "--config", "/nonexistent/smtpguard.toml"], "--config"),
]


@pytest.mark.parametrize("argv,flag", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_naming_the_flag_and_exit_2(argv: list[str], flag: str, url: str,
                                                          capsys: Any) -> None:
    if "--state" not in argv and "--config" not in argv:
        argv = [*argv, "--state", url]
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"graylist: {flag}")


def test_a_bad_graylist_setting_in_the_config_names_its_key(tmp_path: Path, url: str, capsys: Any) -> None:
    config = tmp_path / "smtpguard.toml"
    config.write_text('[graylist]\ndelay = "soon"\n')
    code, _, err = cli(capsys, "stats", "--config", str(config), "--state", url)
    assert code == 2 and err.startswith("graylist: graylist.delay:")


@pytest.mark.parametrize("action", ["list", "stats", "purge", "deny 192.0.2.0/24"])
def test_a_store_that_cannot_answer_exits_1(action: str, capsys: Any) -> None:
    code, out, err = cli(capsys, *action.split(), "--state", f"redis://127.0.0.1:{free_port()}/0")
    assert code == 1 and out == ""
    assert err.startswith("graylist: the state store could not answer")
