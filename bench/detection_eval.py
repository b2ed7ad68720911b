"""Detection quality on the held-out evaluation sets: OS fingerprint and generic rDNS.

Reads the labelled sets in tests/data/ (each row has its provenance), keeps
only the rows marked `eval` — rows the signatures and the classifier were
never tuned on — and prints accuracy, precision and recall:

  * OS from the SYN (tests/data/syn_labelled.tsv): accuracy by family group
    (Windows, Linux/Android, Apple, BSD, other), Windows precision and recall
    (the shipped policy graylists and refuses on `os = windows`), the
    fine-grained accuracy (the exact `os` value: Android, iOS, OpenBSD told
    apart), how many "other" systems came out `unknown`, and the same with
    Debian's /etc/p0f/p0f.fp loaded into our matcher when it is installed;
    for the eval set round 1 (the rows seen in earlier before/after runs)
    and round 3 (ROUND3_SOURCES, converted before the matcher ran on them
    and scored once) apart, round 3 again without the rows whose label does
    not fit its SYN's initial TTL (a proxy or NAT between; a rule on the
    label, not on a matcher), then both together (round 2, Satori's SYNs,
    was scored once and is now tuning data);
  * for each set, the ceiling of any matcher on it: rows whose SYN is
    identical (all but the hop count and per-connection values) to a row with
    another label can only all get one answer;
  * generic rDNS (tests/data/rdns_eval.tsv): precision, recall, accuracy,
    false positives on mail servers, recall on names without address octets.

`--set tune` prints the tuning figures instead (for work on the rules; never
quote them as the result). `--syn-module FILE --signatures FILE` and
`--rdns-module FILE` evaluate another version of core/fingerprint.py / core/rdns.py
(e.g. the previous commit's, from `git show`), for before/after figures.
Measured, never asserted; no network.

    python bench/detection_eval.py [--set eval|tune] [--misses]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smtpguard.core import fingerprint as current_syn  # noqa: E402

DATA = ROOT / "tests" / "data"
P0F_FP = Path("/etc/p0f/p0f.fp")

ROUND3_SOURCES = ("PCAP",)   # provenance code of the third evaluation round

GROUP = {"windows": "windows", "linux": "linux", "android": "linux", "macos": "apple", "ios": "apple",
         "freebsd": "bsd", "openbsd": "bsd", "other": "other", "unknown": "unknown"}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        lines = [ln for ln in f if ln.strip() and not ln.startswith("#")]
    header = open(path, encoding="utf-8").readline().lstrip("# ").rstrip("\n").split("\t")
    return [dict(zip(header, r)) for r in csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)]


def syn_rows(which: str) -> list[dict[str, str]]:
    return [r for r in _rows(DATA / "syn_labelled.tsv") if which in ("all", r["set"])]


def syn_bytes(text: str) -> bytes:
    return bytes.fromhex(text[4:]) if text.startswith("hex:") else current_syn.synthesize(text)


def rdns_rows(which: str) -> list[dict[str, str]]:
    rows = [r for r in _rows(DATA / "rdns_eval.tsv") if which in ("all", r["set"])]
    if which in ("tune", "all"):   # the older labelled set is the tuning set
        for line in (DATA / "rdns_labelled.tsv").read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                name, ip, confirmed, label, note = line.split("\t")
                rows.append({"set": "tune", "name": name, "ip": ip, "confirmed": confirmed, "helo": "",
                             "octets": "", "label": label, "source": "rdns_labelled.tsv", "note": note})
    return rows


def _load(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ratio(a: int, b: int) -> float:
    return a / b if b else 1.0


def syn_report(title: str, rows: list[dict[str, str]], classify: Callable[[bytes], Any], misses: bool) -> None:
    n = len(rows)
    got = [(r, classify(syn_bytes(r["syn"]))) for r in rows]
    group_ok = sum(GROUP[f.os] == GROUP[r["os"]] for r, f in got)
    fine_ok = sum(f.os == r["os"] for r, f in got)
    win_tp = sum(f.os == "windows" and r["os"] == "windows" for r, f in got)
    win_fp = sum(f.os == "windows" and r["os"] != "windows" for r, f in got)
    win_fn = sum(f.os != "windows" and r["os"] == "windows" for r, f in got)
    others = [(r, f) for r, f in got if r["os"] == "other"]
    print(f"  {title}: n={n}  accuracy {ratio(group_ok, n):.3f}  fine-grained {ratio(fine_ok, n):.3f}  "
          f"windows precision {ratio(win_tp, win_tp + win_fp):.3f} recall {ratio(win_tp, win_tp + win_fn):.3f} "
          f"(false windows {win_fp})  other->unknown {sum(f.os == 'unknown' for _, f in others)}/{len(others)}")
    per = []
    for fam in ("windows", "linux", "android", "macos", "ios", "freebsd", "openbsd", "other"):
        sub = [(r, f) for r, f in got if r["os"] == fam]
        if sub:
            per.append(f"{fam} {sum(f.os == fam for r, f in sub)}/{len(sub)}")
    print("    recall by os: " + ", ".join(per))
    tiers: dict[str, int] = {}
    for _, f in got:
        tiers[f.os_match] = tiers.get(f.os_match, 0) + 1
    print("    match tiers: " + ", ".join(f"{k} {v}" for k, v in sorted(tiers.items())))
    if misses:
        for r, f in got:
            if f.os != r["os"]:
                print(f"    miss: {r['what']} ({r['source']}): want {r['os']}, got {f.os} "
                      f"{f.os_match} {f.os_name!r}")


def syn_key(data: bytes) -> tuple[object, ...]:
    """What any matcher can read from a SYN, less the hop count and the
    per-connection values (IP ID's value, timestamps): two rows with the same
    key cannot be told apart from the SYN alone."""
    f = current_syn.parse_syn(data)
    if f is None:
        return ("unparsable", data)
    return (f.version, f.initial_ttl, f.olen, f.df, f.ip_id != 0, f.ecn, f.flow_label != 0, f.window, f.mss,
            f.wscale, f.layout, f.eol_pad, f.quirk_bits, f.payload != 0)


# Every Windows starts at TTL 128; Linux, Android, the BSDs, macOS and iOS at 64.
INITIAL_TTL = {"windows": 128, "linux": 64, "android": 64, "macos": 64, "ios": 64, "freebsd": 64, "openbsd": 64}


def ttl_agrees(row: dict[str, str]) -> bool:
    """Whether a row's label fits its SYN's initial TTL: a rule on the label
    alone, not on any matcher. A User-Agent's label on a SYN that starts
    elsewhere came through a proxy, VPN, NAT or VM ("other" rows are kept)."""
    f = current_syn.parse_syn(syn_bytes(row["syn"]))
    want = INITIAL_TTL.get(row["os"])
    return want is None or (f is not None and f.initial_ttl == want)


def ceiling(rows: list[dict[str, str]]) -> tuple[int, int]:
    """The most rows any function of the SYN can get right, by family group and
    by exact family: identical SYNs with different labels can only all get the
    one answer, so each such group counts its commonest label once."""
    by_key: dict[tuple[object, ...], list[str]] = {}
    for r in rows:
        by_key.setdefault(syn_key(syn_bytes(r["syn"])), []).append(r["os"])
    group = fine = 0
    for labels in by_key.values():
        fine += max(labels.count(x) for x in set(labels))
        groups = [GROUP[x] for x in labels]
        group += max(groups.count(g) for g in set(groups))
    return group, fine


class _P0fFact:
    """The fields syn_report reads, from one p0f log line."""

    def __init__(self, os_text: str, params: str) -> None:
        self.os_name = os_text
        self.os_match = {"none": "exact", "fuzzy": "fuzzy", "generic": "generic"}.get(params.split()[0], params) \
            if os_text != "???" else "none"
        name = os_text.lower()
        if os_text == "???":
            self.os = "unknown"
        elif name.startswith("windows"):
            self.os = "windows"
        elif name.startswith("linux"):
            self.os = "android" if "android" in name else "linux"
        elif name.startswith(("mac os", "macos")):
            self.os = "macos"
        elif name.startswith("ios"):
            self.os = "ios"
        elif name.startswith("freebsd"):
            self.os = "freebsd"
        elif name.startswith("openbsd"):
            self.os = "openbsd"
        else:
            self.os = "other"


def p0f_itself(rows: list[dict[str, str]]) -> Callable[[bytes], Any] | None:
    """p0f 3's own matcher (`p0f -r` on a pcap of the rows, Debian's p0f.fp):
    the reference our matcher must at least equal with the same signatures."""
    binary = shutil.which("p0f") or ("/usr/sbin/p0f" if os.path.exists("/usr/sbin/p0f") else None)
    if binary is None or not P0F_FP.exists():
        return None
    by_bytes: dict[bytes, _P0fFact] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pcap, logf = os.path.join(tmp, "syn.pcap"), os.path.join(tmp, "p0f.log")
        originals = []
        with open(pcap, "wb") as out:
            out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))   # LINKTYPE_RAW
            for i, r in enumerate(rows):
                raw = syn_bytes(r["syn"])
                d = bytearray(raw)
                if d[0] >> 4 == 4:      # one flow per row: its own source address and port
                    d[12:16] = bytes([10, 0, i // 250, i % 250 + 1])
                    ihl = (d[0] & 15) * 4
                    d[10:12] = b"\0\0"
                    total = sum(struct.unpack(f"!{ihl // 2}H", bytes(d[:ihl])))
                    while total >> 16:
                        total = (total & 0xFFFF) + (total >> 16)
                    d[10:12] = struct.pack("!H", ~total & 0xFFFF)
                    tcp_at = ihl
                else:
                    d[8:24] = bytes.fromhex("20010db8000000000000000000%06x" % (i + 1))
                    tcp_at = 40
                d[tcp_at:tcp_at + 2] = struct.pack("!H", 20000 + i)
                out.write(struct.pack("<IIII", i, 0, len(d), len(d)) + bytes(d))
                originals.append(raw)
        try:
            subprocess.run([binary, "-r", pcap, "-f", str(P0F_FP), "-o", logf], capture_output=True, timeout=60,
                           check=False)
            lines = open(logf, encoding="utf-8", errors="replace").read().splitlines()
        except (OSError, subprocess.SubprocessError):
            return None
    for line in lines:
        fields = dict(f.split("=", 1) for f in line.split("] ", 1)[-1].split("|") if "=" in f)
        if fields.get("mod") != "syn" or fields.get("subj") != "cli":
            continue
        port = int(fields["cli"].rsplit("/", 1)[1]) - 20000
        if 0 <= port < len(originals):
            by_bytes[originals[port]] = _P0fFact(fields.get("os", "???"), fields.get("params", "none"))
    return lambda b: by_bytes.get(b, _P0fFact("???", "none"))


def rdns_report(rows: list[dict[str, str]], classify: Callable[..., Any], misses: bool) -> None:
    from smtpguard.sources.rdns import registrable_domain
    tp = fp = fn = tn = 0
    noaddr_tp = noaddr_n = 0
    wrong = []
    for r in rows:
        want = r["label"] == "generic"
        kwargs: dict[str, Any] = {"confirmed": r["confirmed"] == "yes",
                                  "domain": registrable_domain(r["name"]) or None}
        if r.get("helo") and "helo" in classify.__code__.co_varnames:
            kwargs["helo"] = r["helo"]
        v = classify(r["name"], r["ip"], **kwargs)
        tp += v.generic and want
        fp += v.generic and not want
        fn += want and not v.generic
        tn += not want and not v.generic
        if want and r.get("octets") == "no":
            noaddr_n += 1
            noaddr_tp += v.generic
        if v.generic != want:
            wrong.append((r, v))
    n = len(rows)
    servers = fp + tn
    print(f"  n={n} ({tp + fn} generic, {servers} servers)  precision {ratio(tp, tp + fp):.3f}  "
          f"recall {ratio(tp, tp + fn):.3f}  accuracy {ratio(tp + tn, n):.3f}  "
          f"false generic on servers {fp}/{servers} ({ratio(fp, servers):.1%})  "
          f"recall without address octets {ratio(noaddr_tp, noaddr_n):.3f} ({noaddr_tp}/{noaddr_n})")
    if misses:
        for r, v in wrong:
            kind = "missed generic" if r["label"] == "generic" else "false generic"
            print(f"    {kind}: {r['name']} [{r['ip']}] score {v.score} ({' '.join(v.reasons)}) - {r['source']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="eval", choices=("eval", "tune", "all"))
    ap.add_argument("--misses", action="store_true", help="list every misclassified row")
    ap.add_argument("--quick", action="store_true", help="accepted for make bench; the run is fast anyway")
    ap.add_argument("--syn-module", help="another core/fingerprint.py to evaluate (before/after)")
    ap.add_argument("--signatures", help="the .fp file to use with it (default: the shipped one)")
    ap.add_argument("--rdns-module", help="another core/rdns.py to evaluate (before/after)")
    args = ap.parse_args()

    syn = _load(args.syn_module, "_syn_under_test") if args.syn_module else current_syn
    if args.signatures:
        sigs = syn.load_signatures(Path(args.signatures).read_text(encoding="utf-8"))
    else:
        sigs = syn.load_signatures((ROOT / "smtpguard" / "data" / "smtpguard.fp").read_text(encoding="utf-8"))
    rows = syn_rows(args.set)
    p0f = syn.load_signatures(P0F_FP.read_text(encoding="utf-8", errors="replace")) if P0F_FP.exists() else None
    if args.set == "eval":
        # Round 1: the rows before issue 14's last steps (seen in earlier
        # before/after runs). Round 2 (Satori, SAT) was scored once and is now
        # tuning data. Round 3: SYNs converted from sources the project had not
        # used (ROUND3_SOURCES), before the matcher ran on them; scored once
        # after the tuning was committed (data file header).
        later = [r for r in rows if r["source"].split(":")[0] in ROUND3_SOURCES]
        earlier = [r for r in rows if r["source"].split(":")[0] not in ROUND3_SOURCES]
        parts = [("round 1 (seen in earlier before/after runs)", earlier)]
        if later:
            parts += [("round 3 (held out until the tuning was committed)", later),
                      ("round 3, rows whose label agrees with its system's initial TTL",
                       [r for r in later if ttl_agrees(r)]),
                      ("both rounds", rows)]
    else:
        parts = [("", rows)]
    for part, part_rows in parts:
        print(f"OS fingerprint, {args.set} set (tests/data/syn_labelled.tsv){': ' + part if part else ''}")
        group_top, fine_top = ceiling(part_rows)
        print(f"  the best any matcher can do from the SYN alone (identical SYNs, different labels): "
              f"accuracy {ratio(group_top, len(part_rows)):.3f}  fine-grained {ratio(fine_top, len(part_rows)):.3f}")
        syn_report("shipped smtpguard.fp", part_rows, lambda b: syn.classify(b, sigs), args.misses)
        if p0f is not None:
            syn_report("Debian p0f.fp in our matcher", part_rows, lambda b: syn.classify(b, p0f), False)
            itself = p0f_itself(part_rows)
            if itself is not None:
                syn_report("p0f 3.09b itself (p0f -r)", part_rows, itself, False)

    if (DATA / "rdns_eval.tsv").exists():
        if args.rdns_module:
            rdns = _load(args.rdns_module, "_rdns_under_test")
        else:
            from smtpguard.core import rdns
        where = "rdns_eval.tsv" if args.set == "eval" else "rdns_eval.tsv + rdns_labelled.tsv"
        print(f"generic rDNS, {args.set} set (tests/data/{where})")
        rows_r = rdns_rows(args.set)
        rdns_report(rows_r, rdns.classify, args.misses)
        later = [r for r in rows_r if r.get("note", "").startswith("round 2")]
        if later:
            print("  of which round 2 (added after the classifier changed, evaluated once):")
            rdns_report(later, rdns.classify, False)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
