"""Know your traffic: sessions and delivered mail by country, OS, rDNS class and outcome.

Decides:
    nothing about clients: it counts what the decision log says happened,
    so that an admin can see where legitimate mail comes from before
    turning on `[geo] allow` or an OS rule.
Inputs:
    lines of the JSON decision log (`--log-format json`, observe/log.py),
    plain, rotated or gzip'ed; `close` lines are read, one per session
    (`seen`: the facts of the connection; `steps`: every decision; the
    older `facts` digest is read when `seen` is absent), and the refusal
    lines of clients the screen refused before any session (stage connect
    or screen: the client's only line, without facts, so its country, OS
    and rDNS are "-"). `since`: the earliest timestamp kept.
Output:
    `Report.result()`, a JSON-able dict of tables (by country, os, rdns
    class, outcome, country x os, country x rdns), each row with sessions,
    delivered messages and the share of all delivered mail; `text()` and
    `html()` render it (html: one self-contained page, charts drawn by
    matplotlib as inline SVG, no network resources).
Failure modes:
    a line that is not JSON, or not a close line, is skipped and counted
    (`skipped`); an unreadable file is the caller's error (the command
    names it). Strangers' strings (HELO, names) never reach the tables:
    rows are keyed by country codes, OS families, rDNS classes, rule names
    and reason codes, and every string shown in the page is escaped.
Defaults and why:
    * Streaming: counters only, keyed by small vocabularies (about 250
      countries, 9 OS families, 6 rDNS classes, the configured rules), plus
      EXAMPLES per outcome: memory does not grow with the number of sessions
      (bench/bench_report.py measures time and peak RSS on 1 million).
    * An unknown fact is "unknown" (the lookup failed); a fact the running
      policy never read is "-" (sources run only when a rule reads their
      fact): study the traffic with rules that read country, os and rdns,
      in observe mode if need be.
"""

from __future__ import annotations

import gzip
import html as htmlmod
import io
import json
import re
from collections import Counter
from typing import IO, Any, Iterable, Iterator, Mapping

from smtpguard.observe.replay import DEFERRED, REFUSED, outcome

# Examples (ip, session) kept per outcome row.
EXAMPLES = 3
# Rows shown per table in text and HTML (the JSON has them all).
TOP = 20
NOT_GATHERED = "-"
# What the log carries, and its cheap pre-filter: json.dumps writes `"event": "close"`.
CLOSE_MARK = '"event": "close"'
# Refused before any session (the screen: the greeting refused, `drop`, a
# limit): that refusal is the client's only line.
BEFORE_SESSION = ("connect", "screen")
STAGE_MARKS = ('"stage": "connect"', '"stage": "screen"')
TABLES: tuple[tuple[str, str], ...] = (
    ("country", "by country"),
    ("os", "by OS family"),
    ("rdns", "by rDNS class"),
    ("outcome", "by action and reason"),
    ("country_os", "country x OS"),
    ("country_rdns", "country x rDNS"),
)
# What a chart label may contain: the page is built from our own vocabulary,
# but a log file is input, so labels are cut to a safe alphabet.
_LABEL = re.compile(r"[^A-Za-z0-9 ._:/-]")


def open_log(path: str) -> IO[str]:
    """A log file, gzip'ed or not (by its magic bytes, so `x.log.1` and `x.log.2.gz` both work)."""
    if path == "-":
        import sys
        return sys.stdin
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _refused_before_session(obj: Mapping[str, Any]) -> bool:
    """A refusal at the greeting or by a limit: the screen's one log line for
    a client that never got an SMTP session, so no close line follows."""
    return obj.get("event") in ("reject", "defer") and obj.get("stage") in BEFORE_SESSION


def close_records(lines: Iterable[str], since: float = 0.0, stats: Counter[str] | None = None) -> Iterator[dict[str, Any]]:
    """The `close` objects of a JSON decision log at or after `since` (a Unix time),
    and the refusals of clients that never had a session (no close line)."""
    for line in lines:
        if CLOSE_MARK not in line and not (STAGE_MARKS[0] in line or STAGE_MARKS[1] in line):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            if stats is not None:
                stats["skipped"] += 1
            continue
        if not isinstance(obj, dict) or not (obj.get("event") == "close" or _refused_before_session(obj)):
            continue
        ts = obj.get("ts")
        if since and not (isinstance(ts, (int, float)) and ts >= since):
            if stats is not None:
                stats["before_since"] += 1
            continue
        yield obj


def _digest(text: Any) -> dict[str, str]:
    """The older close line's `facts` digest: `country=US os=linux rdns=confirmed`."""
    if not isinstance(text, str):
        return {}
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def rdns_class(facts: Mapping[str, Any]) -> str:
    """none / unconfirmed / confirmed / generic (a dynamic-pool name), unknown, or not gathered."""
    rdns = facts.get("rdns")
    if rdns is None:
        return NOT_GATHERED
    if rdns in ("confirmed", "unconfirmed") and facts.get("rdns_generic") is True:
        return "generic"
    return str(rdns)


def session_outcome(record: Mapping[str, Any]) -> tuple[str, str, str]:
    """(action, reason, rule) of a session: its first refusal or deferral by
    the policy; else the accept rule that let it through; else a refusal of
    the proxy's own (relay, limits, upstream); else delivered or no mail."""
    steps = record.get("steps")
    if isinstance(steps, list):
        # one pass over the raw steps (the report's hot path): only the
        # graylist state is followed, the one fact an outcome depends on
        graylist = None
        accepted: tuple[str, str, str] | None = None
        for step in steps:
            if not isinstance(step, dict):
                break
            gone = step.get("unset")
            if isinstance(gone, list) and "graylist" in gone:
                graylist = None
            changed = step.get("set")
            if isinstance(changed, dict) and "graylist" in changed:
                graylist = changed["graylist"]
            action = step.get("action")
            if action == "accept" and accepted is None:
                accepted = ("accept", str(step.get("reason") or ""), str(step.get("rule") or ""))
            if action in ("continue", "accept", "tarpit", None):
                continue
            seen = outcome(str(action), bool(step.get("held")), bool(step.get("needs")), graylist)
            if seen in (REFUSED, DEFERRED):
                return str(action), str(step.get("reason") or ""), str(step.get("rule") or "")
        if accepted is not None:
            return accepted  # an accept rule (an allowlist, postmaster@) let it through
    if record.get("event") in ("reject", "defer"):
        return str(record.get("action") or record.get("event")), str(record.get("reason") or ""), \
            str(record.get("rule") or "")
    refusals = record.get("refusals")
    if isinstance(refusals, int) and refusals > 0:
        return "refused", str(record.get("reason") or ""), ""
    messages = record.get("messages")
    if isinstance(messages, int) and messages > 0:
        return "delivered", "", ""
    return "no mail", "", ""


def _clean(value: Any) -> str:
    return _LABEL.sub("?", str(value))[:40]


class Report:
    """Counters over close records; add() one at a time, result() at the end."""

    def __init__(self) -> None:
        self.sessions = 0
        self.messages = 0
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.counts: dict[str, Counter[tuple[str, ...]]] = {name: Counter() for name, _ in TABLES}
        self.delivered: dict[str, Counter[tuple[str, ...]]] = {name: Counter() for name, _ in TABLES}
        self.examples: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        self.stats: Counter[str] = Counter()

    def add(self, record: Mapping[str, Any]) -> None:
        seen = record.get("seen")
        facts: Mapping[str, Any] = seen if isinstance(seen, dict) else _digest(record.get("facts"))
        messages = record.get("messages")
        messages = messages if isinstance(messages, int) and messages > 0 else 0
        country = _clean(facts.get("country", NOT_GATHERED))
        os_family = _clean(facts.get("os", NOT_GATHERED))
        rdns = _clean(rdns_class(facts))
        action, reason, rule = (_clean(x) for x in session_outcome(record))
        keys = {
            "country": (country,), "os": (os_family,), "rdns": (rdns,),
            "outcome": (action, reason, rule),
            "country_os": (country, os_family), "country_rdns": (country, rdns),
        }
        for name, key in keys.items():
            self.counts[name][key] += 1
            if messages:
                self.delivered[name][key] += messages
        self.sessions += 1
        self.messages += messages
        ts = record.get("ts")
        if isinstance(ts, (int, float)):
            self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
            self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
        examples = self.examples.setdefault(keys["outcome"], [])
        if len(examples) < EXAMPLES:
            examples.append({"ip": _clean(record.get("ip", "")), "session": _clean(record.get("session", "")),
                             "country": country, "os": os_family, "rdns": rdns})

    def result(self) -> dict[str, Any]:
        tables: dict[str, list[dict[str, Any]]] = {}
        for name, _title in TABLES:
            rows = []
            for key, sessions in sorted(self.counts[name].items(), key=lambda kv: (-kv[1], kv[0])):
                delivered = self.delivered[name][key]
                row: dict[str, Any] = {"key": list(key), "sessions": sessions, "delivered": delivered,
                                       "session_share": round(sessions / self.sessions, 4) if self.sessions else 0.0,
                                       "delivered_share": round(delivered / self.messages, 4) if self.messages else 0.0}
                if name == "outcome":
                    row["examples"] = self.examples.get(key, [])
                rows.append(row)
            tables[name] = rows
        return {"sessions": self.sessions, "delivered": self.messages, "first_ts": self.first_ts,
                "last_ts": self.last_ts, "skipped_lines": self.stats["skipped"],
                "before_since": self.stats["before_since"], "tables": tables}


COLUMNS: dict[str, tuple[str, ...]] = {
    "country": ("country",), "os": ("os",), "rdns": ("rdns",),
    "outcome": ("action", "reason", "rule"),
    "country_os": ("country", "os"), "country_rdns": ("country", "rdns"),
}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def text(result: Mapping[str, Any], top: int = TOP) -> str:
    lines = [f"{result['sessions']} sessions, {result['delivered']} messages delivered"]
    if result.get("skipped_lines"):
        lines.append(f"({result['skipped_lines']} unreadable lines skipped)")
    for name, title in TABLES:
        rows = result["tables"][name]
        cols = COLUMNS[name]
        widths = [max([len(c)] + [len(r["key"][i] or "-") for r in rows[:top]]) for i, c in enumerate(cols)]
        lines.append("")
        lines.append(title)
        head = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
        lines.append(f"  {head}  {'sessions':>9} {'share':>6}  {'delivered':>9} {'of mail':>7}")
        for r in rows[:top]:
            key = "  ".join((k or "-").ljust(w) for k, w in zip(r["key"], widths))
            lines.append(f"  {key}  {r['sessions']:>9} {_pct(r['session_share']):>6}  "
                         f"{r['delivered']:>9} {_pct(r['delivered_share']):>7}")
        if len(rows) > top:
            lines.append(f"  ... {len(rows) - top} more rows (--format json has them all)")
    return "\n".join(lines) + "\n"


def replay_text(result: Mapping[str, Any]) -> str:
    lines = [f"replayed {result['replayed']} of {result['sessions']} sessions through the new policy: "
             f"{result['changed']} would be treated differently"]
    if result.get("not_replayable"):
        lines.append(f"  {result['not_replayable']} sessions have no logged facts (refused before a session, "
                     "or an older log)")
    if result.get("truncated_by_accept"):
        lines.append(f"  {result['truncated_by_accept']} sessions were accepted for the whole session by the "
                     "old policy: their later stages were not logged")
    for fact, n in (result.get("missing_facts") or {}).items():
        lines.append(f"  the new policy reads {fact}, which {n} sessions did not gather (unknown to it)")
    for row in result["differences"]:
        who = f"rule {row['rule']} [{row['reason']}]" if row["rule"] else "no rule"
        if row["would"] == "through":
            head = f"would let through at {row['stage']} what was {row['was']} by the old {who}"
        else:
            head = f"would be {row['would']} at {row['stage']} by {who}, was {row['was']}"
        lines.append("")
        lines.append(f"{head}: {row['sessions']} sessions, {row['decisions']} decisions")
        for ex in row["examples"]:
            shown = " ".join(f"{k}={_clean_text(v)}" for k, v in ex.items())
            lines.append(f"    {shown}")
    return "\n".join(lines) + "\n"


def _clean_text(value: Any) -> str:
    """A logged value shown on a terminal: control characters escaped, bounded."""
    text = str(value)[:80]
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: "\\x%02x" % ord(m.group()), text)


# ---------------------------------------------------------------------------
# HTML

def _svg_bars(rows: list[dict[str, Any]], title: str, top: int = 12) -> str:
    """A horizontal bar chart (sessions and delivered messages) as inline SVG."""
    from matplotlib.figure import Figure  # imported here: only the page needs it

    rows = rows[:top]
    labels = [_clean(" / ".join(k or "-" for k in r["key"])) for r in rows][::-1]
    sessions = [r["sessions"] for r in rows][::-1]
    delivered = [r["delivered"] for r in rows][::-1]
    fig = Figure(figsize=(7, 0.35 * max(len(rows), 2) + 1.0))
    ax = fig.add_subplot()
    y = list(range(len(rows)))
    ax.barh([v + 0.2 for v in y], sessions, height=0.4, label="sessions", color="#4878a8")
    ax.barh([v - 0.2 for v in y], delivered, height=0.4, label="delivered messages", color="#58a858")
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.set_title(_clean(title))
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    # the XML prolog and the RDF metadata block are no use inline
    return re.sub(r"<metadata>.*?</metadata>", "", svg[svg.index("<svg"):], flags=re.S)


def html(result: Mapping[str, Any], replayed: Mapping[str, Any] | None = None, top: int = TOP) -> str:
    e = htmlmod.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>smtpguard traffic report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:60em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
             "td.n{text-align:right}svg{max-width:100%;height:auto}</style></head><body>",
             "<h1>smtpguard traffic report</h1>",
             f"<p>{int(result['sessions'])} sessions, {int(result['delivered'])} messages delivered.</p>"]
    for name, title in TABLES:
        rows = result["tables"][name]
        parts.append(f"<h2>{e(title)}</h2>")
        if name in ("country", "os", "rdns", "outcome") and rows:
            parts.append(_svg_bars(rows, title))
        cols = COLUMNS[name]
        parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols)
                     + "<th>sessions</th><th>share</th><th>delivered</th><th>of mail</th></tr>")
        for r in rows[:top]:
            parts.append("<tr>" + "".join(f"<td>{e(k or '-')}</td>" for k in r["key"])
                         + f"<td class=n>{int(r['sessions'])}</td><td class=n>{e(_pct(r['session_share']))}</td>"
                         f"<td class=n>{int(r['delivered'])}</td><td class=n>{e(_pct(r['delivered_share']))}</td></tr>")
        parts.append("</table>")
    if replayed is not None:
        parts.append("<h2>Replay through the new policy</h2><pre>" + e(replay_text(replayed)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
