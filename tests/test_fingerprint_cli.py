"""`smtpguard fingerprint HEX`: JSON out, bad input one line naming the flag, exit 2.

The command is driven through its own add_parser() and run(), as the CLI
will call it (the --listen mode runs end to end in test_fingerprint_live.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from smtpguard.commands import fingerprint
from tests.test_syn import APPLE_OPTS, WINDOWS_OPTS, build_syn

P0F_FP = Path("/etc/p0f/p0f.fp")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="smtpguard")
    sub = top.add_subparsers(dest="command", required=True)
    fingerprint.add_parser(sub)
    return top


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = parser().parse_args(["fingerprint", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


WINDOWS_10 = build_syn(ttl=117, window=64240, layout=WINDOWS_OPTS, ws=8).hex()
MACOS = build_syn(ttl=57, window=65535, layout=APPLE_OPTS, ws=6).hex()


@pytest.mark.parametrize("text, family, name, hops", [
    pytest.param(WINDOWS_10, "windows", "Windows 10/11 or Server 2016+", 11,
                 id="a Windows 10 SYN eleven hops away prints windows"),
    pytest.param(MACOS, "macos", "macOS 11 or newer (or iOS 14+)", 7, id="a macOS SYN prints macos"),
    pytest.param(" ".join(WINDOWS_10[i:i + 2] for i in range(0, len(WINDOWS_10), 2)), "windows",
                 "Windows 10/11 or Server 2016+", 11, id="hex with spaces between bytes is read"),
    pytest.param("0x" + WINDOWS_10.upper(), "windows", "Windows 10/11 or Server 2016+", 11,
                 id="upper-case hex with a 0x prefix is read"),
])
def test_hex_prints_the_fingerprint_as_json(capsys: pytest.CaptureFixture[str], text: str, family: str,
                                            name: str, hops: int) -> None:
    code, out, err = run(capsys, text)
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert (result["os"], result["os_name"], result["os_distance"], result["os_match"]) == (family, name, hops, "exact")
    assert set(result) >= {"os", "os_name", "os_distance", "os_match", "fields", "label", "signature"}
    assert result["fields"]["layout"] and result["fields"]["signature"].count(":") == 7


def test_bytes_that_are_no_syn_print_unknown_and_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "4500")
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert (result["os"], result["os_match"], result["fields"]) == ("unknown", "unknown", None)


@pytest.mark.skipif(not P0F_FP.exists(), reason="p0f's p0f.fp is not installed")
def test_signatures_flag_uses_another_database(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--signatures", str(P0F_FP), WINDOWS_10)
    assert code == 0
    result = json.loads(out)
    assert (result["os"], result["os_match"]) == ("windows", "generic")   # p0f predates Windows 10


@pytest.mark.parametrize("argv, flag", [
    pytest.param(["zz"], "HEX", id="letters that are not hex name HEX"),
    pytest.param(["450"], "HEX", id="an odd number of hex digits names HEX"),
    pytest.param([], "HEX", id="neither HEX nor --listen names HEX"),
    pytest.param([WINDOWS_10, "--listen", "127.0.0.1:0"], "--listen", id="both HEX and --listen are refused"),
    pytest.param(["--listen", "localhost:25"], "--listen", id="a host name for --listen is refused"),
    pytest.param(["--listen", "127.0.0.1"], "--listen", id="--listen without a port is refused"),
    pytest.param(["--listen", "127.0.0.1:70000"], "--listen", id="--listen with port 70000 is refused"),
    pytest.param(["--listen", "127.0.0.1:0", "--count", "-1"], "--count", id="a negative --count is refused"),
    pytest.param(["--listen", "127.0.0.1:0", "--count", "many"], "--count", id="a wordy --count is refused"),
    pytest.param(["--signatures", "/nonexistent/p0f.fp", WINDOWS_10], "--signatures",
                 id="a missing --signatures file is refused"),
])
def test_bad_input_is_one_line_naming_the_flag_and_exit_2(capsys: pytest.CaptureFixture[str],
                                                          argv: list[str], flag: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and flag in err and err.startswith("smtpguard fingerprint: ")


def test_a_broken_signature_file_names_the_flag_and_the_line(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    broken = tmp_path / "mine.fp"
    broken.write_text("[tcp:request]\nlabel = s:unix:Mine:1\nsig = *:64:0:*:1024,0:mss,bogus::0\n")
    code, _, err = run(capsys, "--signatures", str(broken), WINDOWS_10)
    assert code == 2
    assert "--signatures" in err and "line 3" in err and err.count("\n") == 1


def test_help_describes_both_modes_and_every_flag() -> None:
    sub = parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    text = sub.choices["fingerprint"].format_help()  # type: ignore[union-attr]
    for word in ("HEX", "--listen", "HOST:PORT", "--count", "--signatures", "examples:"):
        assert word in text
