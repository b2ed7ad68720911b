"""Round 2 of the OS fingerprint evaluation set: Satori's SYNs as labelled rows.

Reads Satori's fingerprints/tcp.xml (http://github.com/xnih/satori, GPL-2
repository; its fingerprint terms ask for credit and a link) and prints one
`eval` row per exact `tcpflag="S"` test, in tests/data/syn_labelled.tsv's
format, by the rules in that file's header (source code SAT). Written and
run once, before the matcher saw any of these rows; kept so that the rows
can be rebuilt and the rules read as code. Not part of the test suite.

    python tests/data/satori_syn_rows.py path/to/tcp.xml >> tests/data/syn_labelled.tsv
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET

OPTION_TOKENS = {"N": ("nop", 1), "S": ("sok", 2), "T": ("ts", 10)}


def family(name: str, os_class: str) -> str | None:
    """The `os` a rule should see, from Satori's name and os_class; None: no single OS."""
    n = name.lower()
    if name in ("EZProxy", "Solstice") or n.startswith("big-ip"):
        return None                      # software, or an appliance with two stacks
    if os_class == "Windows" or n.startswith("xbox one"):
        return "windows"
    if os_class == "Android" or n.startswith(("amazon fire", "amazon echo")):
        return "android"
    if n.startswith("esx"):
        return "other"                   # VMkernel, not Linux
    if os_class == "Linux" or n.startswith(("roku", "google home", "brightsign", "cisco ise")):
        return "linux"
    if os_class == "Mac OS":
        return "other" if "os 9" in n else "macos"
    if os_class in ("iOS", "Apple TV OS"):
        return "ios"
    if os_class == "FreeBSD" or n.startswith("pc-bsd"):
        return "freebsd"
    if os_class == "OpenBSD":
        return "openbsd"
    return "other"                       # AIX, SunOS, NetWare, printers, phones, consoles, routers


def observed(tcpsig: str, ttl: int) -> str | None:
    """Satori's `window:ittl:df:hdrlen:options:oddities` as an observed p0f signature."""
    win, _ittl, df, hlen, opts, odd = tcpsig.split(":")
    if "I" in odd or opts.startswith("W10,N,M265"):
        return None                      # IP options; nmap's OS-detection probe
    room = int(hlen) - 40
    tokens: list[str] = []
    mss: int | None = None
    scale = used = 0
    items = opts.split(",") if opts else []
    for k, item in enumerate(items):
        if item.startswith("M"):
            tokens.append("mss")
            mss, used = int(item[1:]), used + 4
        elif item.startswith("W"):
            tokens.append("ws")
            scale, used = int(item[1:]), used + 3
        elif item in OPTION_TOKENS:
            token, size = OPTION_TOKENS[item]
            tokens.append(token)
            used += size
        elif item == "E":
            pad = room - used - 1
            if pad < 0 or any(x != "E" for x in items[k:]):
                return None
            tokens.append(f"eol+{pad}")
            used = room
            break
        else:
            return None
    if used != room:
        return None
    quirks = []
    if df == "1":
        quirks += ["df"] if "Z" in odd else ["df", "id+"]
    elif "Z" in odd:
        quirks.append("id-")
    if "T" in odd:
        quirks.append("ts2+")
    if "A" in odd:
        quirks.append("ack+")
    pclass = "+" if "D" in odd else "0"
    return (f"4:{ttl}:0:{'*' if mss is None else mss}:{win},{scale}:{','.join(tokens)}:"
            f"{','.join(quirks)}:{pclass}")


def rows(path: str) -> list[str]:
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    for fp in ET.parse(path).getroot().iter("fingerprint"):
        name = fp.attrib["name"]
        os_ = family(name, fp.attrib.get("os_class", ""))
        for test in fp.iter("test"):
            if test.attrib.get("tcpflag") != "S" or test.attrib.get("matchtype") != "exact":
                continue
            tcpsig = test.attrib["tcpsig"]
            if os_ is None or (os_, tcpsig) in seen:
                continue
            ttl = max(1, int(tcpsig.split(":")[1]) - (3 + len(out) % 15))   # 3..17 hops
            sig = observed(tcpsig, ttl)
            if sig is None:
                continue
            seen.add((os_, tcpsig))
            out.append(f"eval\t{os_}\t{sig}\t{name} (Satori {tcpsig})\tSAT")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tcp_xml", help="Satori's fingerprints/tcp.xml")
    print("\n".join(rows(ap.parse_args().tcp_xml)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
