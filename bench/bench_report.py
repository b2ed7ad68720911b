"""`smtpguard report` over a month of logs: time and peak RSS at 100,000 and 1,000,000 sessions.

Generates decision logs in /tmp (JSON close lines as live sessions write
them: `seen` facts and the per-stage `steps`, a realistic mix of countries,
OS families, rDNS classes and outcomes), then runs `smtpguard report` in a
fresh process on each, three times, and prints the median wall time,
sessions per second and the process's peak RSS side by side. The report
streams (counters only), so RSS should not grow with the log: the ratio of
the two peaks is the figure to watch. Then the replay (`--policy`) of the
same logs through the shipped rules plus a country rule, once each.
`--quick`: 20,000 and 100,000 sessions, one run each. Figures are printed,
never asserted.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("/tmp/smtpguard-bench-report")
COUNTRIES = [("US", 40), ("DE", 10), ("FR", 6), ("GB", 6), ("CN", 12), ("RU", 8), ("BR", 6), ("IN", 6),
             ("VN", 4), ("local", 2)]
OSES = [("linux", 55), ("windows", 25), ("freebsd", 5), ("unknown", 15)]
RDNS = [("confirmed", 50), ("unconfirmed", 15), ("none", 25), ("unknown", 2), ("generic", 8)]

RUNNER = r"""
import resource, sys, time
from smtpguard.commands import report
policy = report.load_policy(sys.argv[2]) if len(sys.argv) > 2 else None
t = time.perf_counter()
result, replayed = report.build(sys.argv[1:2], policy=policy)
wall = time.perf_counter() - t
print(result["sessions"], wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      replayed["changed"] if replayed else 0)
"""
# The replayed policy: the shipped rules plus a country rule, so that the
# replay reads facts at every stage and changes some sessions.
REPLAY_POLICY = """
[[rule]]
name = "far-away"
stage = "connect"
when = { country_in = ["CN", "RU", "VN"] }
action = "reject"
reason = "GEO"
"""


def _pick(rng: random.Random, table: list[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


def _templates(rng: random.Random, n: int = 500) -> list[str]:
    """Close lines with a placeholder for the session id and time (json.dumps once per template)."""
    out = []
    for i in range(n):
        country, os_family, rdns = _pick(rng, COUNTRIES), _pick(rng, OSES), _pick(rng, RDNS)
        ip = f"198.51.{i % 256}.{(i * 7) % 256}"
        seen = {"ip": ip, "tls": False, "country": country, "os": os_family, "os_name": os_family.title(),
                "os_distance": 12, "os_match": "exact",
                "rdns": "confirmed" if rdns == "generic" else rdns,
                "rdns_name": f"host{i}.example.net" if rdns != "none" else "",
                "rdns_domain": "example.net" if rdns != "none" else "", "rdns_generic": rdns == "generic",
                "dnsbl": "none", "dnsbl_score": 0, "dnsbl_hits": []}
        refused = os_family == "windows" and rdns in ("none", "unconfirmed")
        geo = country in ("CN", "RU") and rng.random() < 0.3
        rule = "windows-no-rdns" if refused else ("geo" if geo else None)
        verdict: dict[str, object] = {"action": "reject", "rule": rule, "reason": "OS-RDNS" if refused else "GEO"} \
            if rule else {"action": "continue"}
        held = dict(verdict, held="rcpt") if rule else verdict
        steps = [dict({"stage": "connect"}, **held),
                 dict({"stage": "helo", "set": {"helo": f"host{i}.example.net", "helo_valid": True}}, **held),
                 dict({"stage": "mail", "set": {"sender": f"a{i}@example.org", "sender_domain": "example.org"}},
                      **held),
                 dict({"stage": "rcpt", "set": {"rcpt": "b@example.com", "rcpt_domain": "example.com"}}, **verdict)]
        messages = 0
        if not rule:
            steps.append({"stage": "data", "set": {"dkim": "pass", "dkim_domains": ["example.org"]},
                          "action": "continue"})
            messages = 1
        line = {"ts": 0, "level": "info", "event": "close", "session": "SESSION", "ip": ip, "port": 40000,
                "helo": f"host{i}.example.net", "duration": 0.8, "messages": messages,
                "refusals": 1 if rule else 0, "reason": verdict.get("reason"), "rule": None,
                "facts": f"country={country} os={os_family} rdns={seen['rdns']}", "seen": seen, "steps": steps}
        out.append(json.dumps(line, ensure_ascii=False).replace('"ts": 0', '"ts": {ts}')
                   .replace('"SESSION"', '"{sid}"'))
    return out


def generate(path: Path, sessions: int, start: float) -> int:
    """A log of `sessions` close lines over 30 days, with other events between them; its size in bytes."""
    if path.exists() and path.stat().st_size > 0 and path.with_suffix(".count").exists() \
            and path.with_suffix(".count").read_text() == str(sessions):
        return path.stat().st_size
    rng = random.Random(13)
    templates = _templates(rng)
    step = 30 * 86400 / sessions
    with open(path, "w", encoding="utf-8") as f:
        for n in range(sessions):
            ts = start + n * step
            f.write('{"ts": %.3f, "level": "info", "event": "relay.accepted", "session": "%012x"}\n' % (ts, n))
            f.write(templates[n % len(templates)].replace("{ts}", "%.3f" % ts).replace("{sid}", "%012x" % n) + "\n")
    path.with_suffix(".count").write_text(str(sessions))
    return path.stat().st_size


def measure(path: Path, policy: Path | None = None) -> tuple[int, float, int, int]:
    args = [str(path)] + ([str(policy)] if policy else [])
    r = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=550, check=True)
    sessions, wall, rss_kb, changed = r.stdout.split()
    return int(sessions), float(wall), int(rss_kb), int(changed)


def main() -> int:
    quick = "--quick" in sys.argv
    sizes = (20_000, 100_000) if quick else (100_000, 1_000_000)
    runs = 1 if quick else 3
    OUT.mkdir(exist_ok=True)
    start = time.time() - 30 * 86400
    rows = []
    for n in sizes:
        path = OUT / f"decisions-{n}.log"
        t = time.perf_counter()
        size = generate(path, n, start)
        made = time.perf_counter() - t
        walls, rsss = [], []
        for _ in range(runs):
            got, wall, rss, _changed = measure(path)
            assert got == n, (got, n)
            walls.append(wall)
            rsss.append(rss)
        rows.append((n, size, statistics.median(walls), max(rsss), made))
    print(f"report: {runs} run(s) each, median")
    print(f"{'sessions':>10} {'log MB':>8} {'median s':>9} {'sessions/s':>11} {'peak RSS MB':>12}")
    for n, size, wall, rss, _made in rows:
        print(f"{n:>10} {size / 1e6:>8.0f} {wall:>9.1f} {n / wall:>11.0f} {rss / 1024:>12.1f}")
    (n0, _, w0, r0, _), (n1, _, w1, r1, _) = rows
    print(f"ratios {n1 // n0}x sessions: time x{w1 / w0:.2f}, peak RSS x{r1 / r0:.2f} "
          f"(constant memory: the RSS ratio stays near 1)")
    policy = OUT / "replay.toml"
    sys.path.insert(0, str(ROOT))  # the shipped rules, read from examples/ (tests/fixtures_policy.py)
    from tests.fixtures_policy import default_rules_toml
    policy.write_text(default_rules_toml() + REPLAY_POLICY)
    print("report --policy (replay through the shipped rules plus a country rule), one run each")
    print(f"{'sessions':>10} {'s':>9} {'sessions/s':>11} {'peak RSS MB':>12} {'changed':>9}")
    for n, *_ in rows:
        got, wall, rss, changed = measure(OUT / f"decisions-{n}.log", policy)
        print(f"{got:>10} {wall:>9.1f} {got / wall:>11.0f} {rss / 1024:>12.1f} {changed:>9}")
    if "--keep" not in sys.argv:
        for n, *_ in rows:
            for suffix in (".log", ".count"):
                p = OUT / f"decisions-{n}{suffix}"
                if p.exists():
                    os.unlink(p)
        if policy.exists():
            os.unlink(policy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
