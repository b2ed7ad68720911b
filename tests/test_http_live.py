"""The HTTP side live: /metrics after real SMTP sessions, /healthz with the
upstream up and down, the page over HTTP, and `smtpguard serve --http`."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtpguard.observe import http as observe_http
from tests.fixtures_smtp import Guard, Recorder, free_port, wait_for, wait_port

MESSAGE = b"Subject: metrics\r\n\r\nbody line\r\n"


def start_http(guard: Guard) -> observe_http.HttpServer:
    """The HTTP server of a test's smtpguard, in its own event loop (as serve() starts it)."""
    http = guard._loop.run(observe_http.start(guard.services, guard.server))
    guard.http = http  # type: ignore[attr-defined]
    return http


def stop_http(guard: Guard, http: observe_http.HttpServer) -> None:
    guard._loop.run(http.stop())


def get(url: str, accept: str = "*/*") -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode("utf-8")


def samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus-client's own parser."""
    status, headers, body = get(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def served(recorder: Recorder, guard_factory: Any) -> Any:
    guard = guard_factory(upstream=recorder.address)
    http = start_http(guard)
    yield guard, http, f"http://127.0.0.1:{http.bound[1]}"
    stop_http(guard, http)


def send(guard: Guard, rcpts: list[str], message: bytes = MESSAGE) -> None:
    with smtplib.SMTP(guard.host, guard.port, timeout=10) as s:
        s.ehlo("client.test")
        s.sendmail("a@sender.test", rcpts, message)


def test_counters_move_by_exactly_the_sessions_sent(served: Any, recorder: Recorder) -> None:
    guard, http, base = served
    before = samples(base)
    assert value(before, "smtpguard_relayed_messages_total") == 0
    send(guard, ["b@example.test"])
    send(guard, ["c@example.test", "d@example.test"])
    with smtplib.SMTP(guard.host, guard.port, timeout=10) as s:   # a relay attempt: 550 [RELAY]
        s.ehlo("client.test")
        s.mail("a@sender.test")
        code, _ = s.rcpt("x@elsewhere.test")
        assert code == 550
    with smtplib.SMTP(guard.host, guard.port, timeout=10) as s:   # a session that sends nothing
        s.ehlo("client.test")
        open_now = samples(base)
        assert value(open_now, "smtpguard_sessions_current") == 1
        assert value(open_now, "smtpguard_connections_current") == 1
    wait_for(lambda: len(guard.events("close")) == 4)
    m = samples(base)
    sizes = [e["size"] for e in guard.events("relay.accepted")]
    assert len(recorder.messages) == 2 and len(sizes) == 2
    assert value(m, "smtpguard_relayed_messages_total") == 2
    assert value(m, "smtpguard_relayed_recipients_total") == 3
    assert value(m, "smtpguard_relayed_bytes_total") == sum(sizes) > 2 * len(MESSAGE) - 1
    assert value(m, "smtpguard_sessions_total", outcome="delivered", stage="data") == 2
    assert value(m, "smtpguard_sessions_total", outcome="refused", stage="rcpt") == 1
    assert value(m, "smtpguard_sessions_total", outcome="closed", stage="none") == 1
    assert value(m, "smtpguard_refusals_total", reason="RELAY", stage="rcpt", kind="reject") == 1
    assert sum(v for (name, _), v in m.items() if name == "smtpguard_refusals_total") == 1
    # one fact-gathering observation per session at connect; relay time per message
    assert value(m, "smtpguard_fact_gathering_seconds_count", stage="connect") == 4
    assert value(m, "smtpguard_relay_seconds_count") == 2
    wait_for(lambda: value(samples(base), "smtpguard_connections_current") == 0)
    assert value(m, "smtpguard_sessions_current") == 0
    assert value(m, "smtpguard_upstream_errors_total", kind="connect") == 0
    # no label carries an address or a name
    assert not any("127.0.0.1" in str(labels) or "example" in str(labels) for _, labels in m)


def test_upstream_errors_and_deferrals_are_counted_by_kind_and_reason(guard_factory: Any) -> None:
    guard = guard_factory(upstream=f"127.0.0.1:{free_port()}")   # nothing listens there: connect errors
    http = start_http(guard)
    try:
        base = f"http://127.0.0.1:{http.bound[1]}"
        with smtplib.SMTP(guard.host, guard.port, timeout=10) as s:
            s.ehlo("client.test")
            s.mail("a@sender.test")
            code, text = s.rcpt("b@example.test")
            assert code == 451 and b"[UPSTREAM]" in text
        wait_for(lambda: guard.events("close"))
        m = samples(base)
        # one by the session; the health probe adds its own attempts
        assert value(m, "smtpguard_upstream_errors_total", kind="connect") >= 1
        assert value(m, "smtpguard_refusals_total", reason="UPSTREAM", stage="rcpt", kind="defer") == 1
        assert value(m, "smtpguard_sessions_total", outcome="deferred", stage="rcpt") == 1
    finally:
        stop_http(guard, http)


def test_graylist_outcomes_new_then_passed(recorder: Recorder, guard_factory: Any) -> None:
    now = [2_000_000.0]
    guard = guard_factory({"rule": [{"name": "graylist", "action": "graylist"}], "state": {"url": "memory://"}},
                          clock=lambda: now[0], upstream=recorder.address)
    http = start_http(guard)
    try:
        base = f"http://127.0.0.1:{http.bound[1]}"
        with smtplib.SMTP(guard.host, guard.port, timeout=10) as s:
            s.ehlo("client.test")
            s.mail("a@sender.test")
            assert s.rcpt("b@example.test")[0] == 451
        now[0] += 200   # past postgrey's 180 s delay
        send(guard, ["b@example.test"])
        wait_for(lambda: len(guard.events("close")) == 2)
        m = samples(base)
        assert value(m, "smtpguard_graylist_total", outcome="new") == 1
        assert value(m, "smtpguard_graylist_total", outcome="passed") == 1
        assert value(m, "smtpguard_refusals_total", reason="GRAYLIST", stage="rcpt", kind="defer") == 1
        assert value(m, "smtpguard_relayed_messages_total") == 1
    finally:
        stop_http(guard, http)


def test_healthz_follows_the_upstream_and_the_listeners(guard_factory: Any) -> None:
    up = Recorder()
    guard = guard_factory(upstream=up.address)
    http = start_http(guard)
    stopped = False
    try:
        base = f"http://127.0.0.1:{http.bound[1]}"
        assert guard._loop.run(http.check_upstream()) is True
        status, _, body = get(base + "/healthz")
        assert (status, body) == (200, "ok\n")
        assert value(samples(base), "smtpguard_upstream_up") == 1
        up.stop()   # the MTA goes away
        stopped = True
        guard._loop.run(_drop_connections(guard))              # and with it the open connections
        assert guard._loop.run(http.check_upstream()) is False
        status, _, body = get(base + "/healthz")
        assert status == 503 and f"upstream MTA {up.address} did not answer" in body
        assert value(samples(base), "smtpguard_upstream_up") == 0
        assert get(base + "/livez")[:3:2] == (200, "ok\n")   # alive all the same
        guard._loop.run(guard.server.stop())                   # listeners closed: not ready either
        status, _, body = get(base + "/healthz")
        assert status == 503 and "SMTP listeners are not serving" in body
    finally:
        stop_http(guard, http)
        if not stopped:
            up.stop()


def test_the_page_over_http_html_for_browsers_text_for_curl(served: Any) -> None:
    guard, http, base = served
    url = base + "/smtp?code=RDNS&ip=192.0.2.7&session=0a1b2c000001&rcpt=secret%40example.test"
    status, headers, body = get(url, accept="text/html,*/*;q=0.8")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "<h1>No reverse DNS</h1>" in body and "192.0.2.7" in body and "secret" not in body
    status, headers, body = get(url)   # curl's Accept: */*
    assert status == 200 and headers["Content-Type"] == "text/plain; charset=utf-8"
    assert body.startswith("No reverse DNS\n") and "Session id: 0a1b2c000001" in body
    assert get(url + "&format=html")[2].startswith("<!DOCTYPE html>")
    status, _, body = get(base + "/smtp?code=%3Cscript%3E&ip=%3Cscript%3Ealert(1)%3C/script%3E&session=%00%ff")
    assert status == 200 and "Reason code: unknown" in body and "Session id: unknown" in body
    assert get(base + "/nothing-here")[0] == 404


def test_serve_with_http_and_two_workers_answers_on_consecutive_ports(recorder: Recorder, dns_server: Any) -> None:
    smtp, http = free_port(), free_port()
    if not all(_free(p) for p in (http + 1,)):
        pytest.skip("the port after the chosen one is taken")
    proc = subprocess.Popen(
        [sys.executable, "-m", "smtpguard", "serve", "--listen", f"127.0.0.1:{smtp}", "--upstream", recorder.address,
         "--domain", "example.test", "--hostname", "mx.example.test", "--dns-server", dns_server.address,
         "--http", f"127.0.0.1:{http}", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for port in (http, http + 1):
            wait_port("127.0.0.1", port, timeout=20)
            wait_for(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout=20)
            assert get(f"http://127.0.0.1:{port}/livez")[0] == 200
        # the container's HEALTHCHECK command reads the same endpoint
        check = subprocess.run([sys.executable, "-m", "smtpguard", "health", "--http",
                                f"http://127.0.0.1:{http}/healthz"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        wait_port("127.0.0.1", smtp)
        with smtplib.SMTP("127.0.0.1", smtp, timeout=10) as s:
            s.ehlo("client.test")
            s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
        # each worker counts its own sessions; the sum is what was sent
        wait_for(lambda: sum(value(samples(f"http://127.0.0.1:{p}"), "smtpguard_relayed_messages_total")
                             for p in (http, http + 1)) == 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


async def _drop_connections(guard: Guard) -> None:
    """Close the pooled connections and the health probe's own (as the MTA's
    going away would, where its host answers with a reset)."""
    upstream = guard.services.upstream
    upstream.purge(now=float("inf"))
    if upstream._health is not None:
        upstream._health.close()


def test_the_dnsbl_page_names_the_lists_that_list_the_address_with_their_removal_links(
        recorder: Recorder, guard_factory: Any, dns_server: Any) -> None:
    dns_server.set("7.2.0.192.bl.test", "A", ["127.0.0.2"])
    dns_server.set("7.2.0.192.other.test", "A", ["127.0.0.2"])
    dns_server.set("7.2.0.192.wl.test", "A", ["127.0.0.2"])   # an allowlist is never named
    doc = {"dnsbl": [{"zone": "bl.test", "name": "Example-BL"}, {"zone": "other.test"},
                     {"zone": "quiet.test"}, {"zone": "wl.test", "weight": -2}],
           "http": {"removal": {"bl.test": "https://bl.example/remove"}}}
    guard = guard_factory(doc, upstream=recorder.address)
    http = start_http(guard)
    try:
        base = f"http://127.0.0.1:{http.bound[1]}"
        body = get(base + "/smtp?code=DNSBL&ip=192.0.2.7&format=text")[2]
        assert "Listed by Example-BL; removal: https://bl.example/remove" in body
        assert "Listed by other.test\n" in body
        assert "quiet.test" not in body and "wl.test" not in body
        page = get(base + "/smtp?code=DNSBL&ip=192.0.2.7", accept="text/html")[2]
        assert '<li>Example-BL (removal: <a href="https://bl.example/remove" rel="noreferrer nofollow">' in page
        # only for DNSBL, and only for a valid address: no lookups for anything else
        asked = dns_server.total_queries()
        get(base + "/smtp?code=GEO&ip=192.0.2.7")
        get(base + "/smtp?code=DNSBL&ip=not-an-ip")
        assert dns_server.total_queries() == asked
    finally:
        stop_http(guard, http)


def test_the_screens_results_pregreet_and_limits(recorder: Recorder, guard_factory: Any) -> None:
    import socket

    doc = {"pregreet": {"wait": "0.3s"}, "state": {"url": "memory://"}, "limits": {"per_ip_sessions": 1},
           "rule": [{"name": "pregreet", "stage": "connect", "when": {"pregreet": True}, "action": "drop",
                     "reason": "PREGREET"}]}
    guard = guard_factory(doc, upstream=recorder.address)
    http = start_http(guard)
    try:
        base = f"http://127.0.0.1:{http.bound[1]}"
        with socket.create_connection((guard.host, guard.port), timeout=5) as early:   # talks at once
            early.sendall(b"EHLO fast.bot\r\n")
            assert b"521 5.7.1 [PREGREET]" in early.makefile("rb").read()
        with smtplib.SMTP(guard.host, guard.port, timeout=10) as s:   # waits for the whole greeting
            s.ehlo("client.test")
            with socket.create_connection((guard.host, guard.port), timeout=5) as second:   # one too many
                assert second.makefile("rb").readline().startswith(b"421 4.7.0 [BUSY]")
        wait_for(lambda: len(guard.events("close")) == 1)   # the one that became a session
        m = samples(base)
        assert value(m, "smtpguard_screen_total", test="pregreet", result="fail") == 1
        assert value(m, "smtpguard_screen_total", test="pregreet", result="pass") == 1
        assert value(m, "smtpguard_screen_total", test="limits", result="per_ip_sessions") == 1
        assert value(m, "smtpguard_refusals_total", reason="BUSY", stage="screen", kind="defer") == 1
        assert value(m, "smtpguard_refusals_total", reason="PREGREET", stage="connect", kind="reject") == 1
        # three connections, three sessions counted, each once
        assert value(m, "smtpguard_sessions_total", outcome="refused", stage="connect") == 1
        assert value(m, "smtpguard_sessions_total", outcome="deferred", stage="screen") == 1
        assert value(m, "smtpguard_sessions_total", outcome="closed", stage="none") == 1
        assert sum(v for (name, _), v in m.items() if name == "smtpguard_sessions_total") == 3
    finally:
        stop_http(guard, http)


def test_a_reload_changes_the_pages_words_and_path(tmp_path: Any, recorder: Recorder, dns_server: Any) -> None:
    smtp, http = free_port(), free_port()
    conf = tmp_path / "smtpguard.toml"

    def write(path: str, contact: str, geo: str) -> None:
        conf.write_text(f"""
[server]
listen = ["127.0.0.1:{smtp}"]
hostname = "mx.example.test"
domains = ["example.test"]
resolution_url = "https://mx.example.test{path}?code={{code}}&ip={{ip}}"
[upstream]
address = "{recorder.address}"
[dns]
servers = ["{dns_server.address}"]
[log]
format = "json"
[http]
listen = "127.0.0.1:{http}"
contact = "{contact}"
[http.texts]
GEO = "{geo}"
""")

    write("/smtp", "postmaster@first.example", "First words.")
    proc = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    import threading

    threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True).start()
    base = f"http://127.0.0.1:{http}"
    try:
        wait_port("127.0.0.1", http, timeout=20)
        body = get(base + "/smtp?code=GEO&ip=192.0.2.7")[2]
        assert "What happened: First words." in body and "postmaster@first.example" in body
        write("/help/mail", "postmaster@second.example", "Second words.")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any('"reload.done"' in line for line in lines), timeout=20)
        body = get(base + "/help/mail?code=GEO&ip=192.0.2.7")[2]
        assert "What happened: Second words." in body and "postmaster@second.example" in body
        assert get(base + "/smtp?code=GEO")[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, "".join(lines)[-2000:]


def test_strangers_cannot_make_the_page_ask_the_lists_without_bound(
        recorder: Recorder, guard_factory: Any, dns_server: Any) -> None:
    import concurrent.futures

    ips = [f"192.0.2.{n}" for n in range(1, 13)]   # twelve addresses: no cache or shared query helps
    for ip in ips:
        dns_server.delay(".".join(reversed(ip.split("."))) + ".slow.test", 2.0)   # a slow list
    guard = guard_factory({"dnsbl": [{"zone": "slow.test"}]}, upstream=recorder.address)
    http = start_http(guard)
    try:
        base = f"http://127.0.0.1:{http.bound[1]}/smtp?code=DNSBL&ip="
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(ips)) as pool:
            answers = list(pool.map(lambda ip: get(base + ip)[0], ips))
        assert answers == [200] * len(ips)                 # every page is shown ...
        asked = [ip for ip in ips if dns_server.queries(".".join(reversed(ip.split("."))) + ".slow.test", "A")]
        assert 1 <= len(asked) <= observe_http.MAX_PAGE_LOOKUPS < len(ips)   # ... but few make the proxy ask the list
    finally:
        stop_http(guard, http)
