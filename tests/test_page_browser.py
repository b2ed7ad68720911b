"""The resolution page in a real headless Chromium (Debian's `chromium`),
served by smtpguard's own HTTP server: every reason code's text is there, a
hostile `ip=<script>…` is shown escaped and runs nothing, the page loads
nothing but itself; and the screenshot helper a person uses to look at it."""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from smtpguard.core import reply as replies
from smtpguard.observe import page as pages
from tests.fixtures_smtp import Recorder
from tests.test_http_live import start_http, stop_http

ROOT = Path(__file__).resolve().parent.parent
# The flags of the brief: no network of Chromium's own, a throw-away profile.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = "<script>document.title='PWNED'</script><img src=x onerror=\"document.title='PWNED'\">"
# Elements that would load something or run something.
LOADING = re.compile(r"<(script|link|img|iframe|object|embed|video|audio|source|frame)\b|url\(|@import", re.I)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium (Debian package chromium) is missing: scripts/system-deps.sh must install it")
        pytest.skip("chromium is not installed here, so the page was not opened in a browser "
                    "(scripts/system-deps.sh installs the Debian package chromium)")
    return path


def browse(tmp: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{name}"
    profile.mkdir()
    r = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "HOME": str(tmp)})
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture
def base(recorder: Recorder, guard_factory: Any) -> Any:
    chromium()   # skip (visibly) before starting anything
    guard = guard_factory({"http": {"contact": "postmaster@other.example"}}, upstream=recorder.address)
    http = start_http(guard)
    yield guard, f"http://127.0.0.1:{http.bound[1]}"
    stop_http(guard, http)


def test_every_reason_code_renders_with_its_text(base: Any, tmp_path: Path) -> None:
    guard, url = base
    # read at run time: a code added to core/reply.py is opened here too
    codes = sorted(set(replies.REASONS) | set(pages.TEXTS))
    # one browser, one tab, every code in turn (DevTools protocol over its pipe-less websocket)
    doms = asyncio.run(dump_doms(tmp_path, [f"{url}/smtp?code={code}&ip=192.0.2.7&session=0a1b2c000001"
                                            for code in codes]))
    for code, dom in zip(codes, doms):
        text = pages.text_for(code)
        values = {"ip": "192.0.2.7", "delay": "3", "code": code}
        assert f"<h1>{html.escape(pages.fill(text.title, values), quote=False)}</h1>" in dom, code
        assert html.escape(pages.fill(text.what, values), quote=False) in dom, code
        assert html.escape(pages.fill(text.fix, values), quote=False) in dom, code
        assert "<dd>0a1b2c000001</dd>" in dom and "<dd>192.0.2.7</dd>" in dom and f"<dd>{code}</dd>" in dom
        assert "postmaster@other.example" in dom
        assert not LOADING.search(dom), (code, LOADING.search(dom))
    assert [e["path"] for e in guard.events("http.request")] == ["/smtp"] * len(codes)


async def dump_doms(tmp: Path, urls: list[str]) -> list[str]:
    """Each URL's DOM after its load event, from one headless Chromium driven
    by the DevTools protocol (as --dump-dom, without a browser start per page)."""
    import aiohttp

    profile = tmp / "profile-cdp"
    profile.mkdir()
    proc = await asyncio.create_subprocess_exec(
        chromium(), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env={**os.environ, "HOME": str(tmp)})
    try:
        assert proc.stderr is not None
        endpoint = ""
        async with asyncio.timeout(60):
            while not endpoint:
                line = (await proc.stderr.readline()).decode()
                assert line, "chromium ended before its DevTools endpoint was up"
                m = re.search(r"DevTools listening on (ws://\S+)", line)
                endpoint = m.group(1) if m else ""
        out = []
        async with aiohttp.ClientSession() as http, http.ws_connect(endpoint, max_msg_size=0) as ws:
            ids = iter(range(1, 1_000_000))
            events: list[dict[str, Any]] = []   # events that came while waiting for a reply

            async def call(method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
                n = next(ids)
                await ws.send_json({"id": n, "method": method, "params": params,
                                    **({"sessionId": session} if session else {})})
                while True:
                    msg = await ws.receive_json()
                    if msg.get("id") == n:
                        assert "error" not in msg, msg
                        return msg["result"]  # type: ignore[no-any-return]
                    events.append(msg)

            async def loaded(session: str) -> None:
                def is_load(msg: dict[str, Any]) -> bool:
                    return msg.get("method") == "Page.loadEventFired" and msg.get("sessionId") == session
                while not any(is_load(m) for m in events):
                    events.append(await ws.receive_json())
                events.clear()

            async with asyncio.timeout(120):
                target = (await call("Target.createTarget", url="about:blank"))["targetId"]
                session = (await call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
                await call("Page.enable", session)
                for url in urls:
                    await call("Page.navigate", session, url=url)
                    await loaded(session)
                    got = await call("Runtime.evaluate", session, returnByValue=True,
                                     expression="document.documentElement.outerHTML")
                    out.append(got["result"]["value"])
        return out
    finally:
        proc.kill()
        await proc.wait()


def test_an_unknown_code_shows_the_generic_text(base: Any, tmp_path: Path) -> None:
    _, url = base
    dom = browse(tmp_path, "unknown", "--dump-dom", f"{url}/smtp?code=NO-SUCH-CODE&ip=192.0.2.7").stdout
    assert f"<h1>{pages.UNKNOWN_TEXT.title}</h1>" in dom and "<dd>unknown</dd>" in dom
    assert "NO-SUCH-CODE" not in dom


def test_a_hostile_ip_is_shown_escaped_and_runs_nothing(base: Any, tmp_path: Path) -> None:
    guard, url = base
    target = (f"{url}/smtp?code=GEO&ip={quote(HOSTILE)}&session={quote(HOSTILE)}&helo={quote(HOSTILE)}"
              f"&sender={quote(HOSTILE)}")
    dom = browse(tmp_path, "hostile", "--dump-dom", target).stdout
    # the title is ours: no script ran, no event handler fired
    assert f"<title>{pages.TEXTS['GEO'].title}</title>" in dom and "PWNED</title>" not in dom
    # nothing of it became an element; what the link carried is shown as text
    assert not LOADING.search(dom)
    quoted = HOSTILE[:pages.MAX_QUOTED]
    assert html.escape(quoted, quote=False) in dom
    assert "<dd>unknown</dd>" in dom   # the session id was not hex
    # the page loaded nothing but itself
    assert [e["path"] for e in guard.events("http.request")] == ["/smtp"]


def test_the_page_fits_a_phone_screen(base: Any, tmp_path: Path) -> None:
    _, url = base
    shot = tmp_path / "phone.png"
    browse(tmp_path, "phone", f"--screenshot={shot}", "--window-size=412,915", "--hide-scrollbars",
           f"{url}/smtp?code=RDNS&ip=2001:db8::25&session=0a1b2c000001")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # PNG IHDR: width and height as the window was
    assert int.from_bytes(data[16:20], "big") == 412 and int.from_bytes(data[20:24], "big") == 915


def test_the_screenshot_helper_makes_a_png_per_code(tmp_path: Path) -> None:
    chromium()
    out = tmp_path / "shots"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "screenshot-page.sh"), str(out), "GRAYLIST"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HOME": str(tmp_path),
                            "SMTPGUARD": str(Path(os.sys.executable).parent / "smtpguard")})
    assert r.returncode == 0, r.stderr[-2000:]
    for code in ("GRAYLIST",):
        for size in ("phone", "desktop"):
            png = out / f"{code}-{size}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert (out / f"{code}.html").read_text().startswith("<!DOCTYPE html>")
