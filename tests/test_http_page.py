"""The resolution page's words (observe/page.py) and the [http] settings: pure, in milliseconds."""

from __future__ import annotations

import pytest

from smtpguard import cli
from smtpguard import config as cfg
from smtpguard.core import reply as replies
from smtpguard.errors import ConfigError
from smtpguard.observe import page as pages
from smtpguard.observe.http import HttpSettings, known_codes, page_path, wants_text

BASE = {"upstream": "127.0.0.1:25", "domain": ["example.com"], "hostname": "mx.example.com"}
HOSTILE = "<script>document.title='PWNED'</script><img src=x onerror=alert(1)>"


def test_every_reason_code_of_the_reply_table_has_a_text() -> None:
    # REASONS is read now, not copied: a code added to core/reply.py without
    # a text here fails this test.
    missing = sorted(code for code in replies.REASONS if code not in pages.TEXTS)
    assert missing == [], f"reason codes without a page text: {missing}"


@pytest.mark.parametrize("code", ["PREGREET", "BUSY", "RATE", "GEO", "RDNS", "RDNS-GENERIC", "GRAYLIST", "DNSBL",
                                  "HELO-FORGED", "RELAY", "OS"])
def test_the_screen_and_policy_codes_of_the_issue_have_their_own_text(code: str) -> None:
    text = pages.text_for(code)
    assert text is pages.TEXTS[code] and text is not pages.GENERIC
    assert text.title and text.what and text.fix


@pytest.mark.parametrize("code", sorted(set(replies.REASONS) | set(pages.TEXTS)))
def test_each_text_fills_without_leftover_placeholders(code: str) -> None:
    page = pages.build({"code": code, "ip": "192.0.2.7", "session": "0a1b2c000001"}, 0.0, known_codes())
    body = pages.render_text(page)
    assert page.code == code
    assert "{" not in body and "}" not in body
    assert page.text.title in body and "192.0.2.7" in body and "0a1b2c000001" in body


def test_a_code_without_a_text_gets_the_generic_one_naming_the_code() -> None:
    page = pages.build({"code": "MY-RULE"}, 0.0, known_codes() | {"MY-RULE"})
    assert page.text.title == pages.GENERIC.title
    assert "MY-RULE" in page.text.what


def test_a_rules_own_text_explains_its_own_reason_code() -> None:
    page = pages.build({"code": "GEO-WIN"}, 0.0, {"GEO-WIN"}, rule_texts={"GEO-WIN": "Windows hosts abroad are not accepted"})
    assert page.text.what == "Windows hosts abroad are not accepted."


@pytest.mark.parametrize("code", ["NOT-A-CODE", "geo<script>", "", "G" * 200])
def test_a_code_the_server_does_not_know_is_shown_as_unknown(code: str) -> None:
    page = pages.build({"code": code}, 0.0, known_codes())
    assert page.code == "unknown" and page.text is not None
    assert code not in pages.render_html(page) or code == ""


@pytest.mark.parametrize("raw, shown", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:DB8::0:1", "2001:db8::1"),
    (" 198.51.100.1 ", "198.51.100.1"),
    ("192.0.2.300", "unknown"),
    ("example.com", "unknown"),
    (HOSTILE, "unknown"),
], ids=["IPv4", "IPv6 canonical", "trimmed", "no such IPv4", "a name", "markup"])
def test_ip_is_validated_as_an_address(raw: str, shown: str) -> None:
    assert pages.build({"ip": raw}, 0.0, ()).ip == shown


@pytest.mark.parametrize("raw, shown", [
    ("0a1b2c000001", "0a1b2c000001"), ("0A1B2C", "0a1b2c"), ("f" * 32, "f" * 32), ("f" * 33, "unknown"),
    ("xyz", "unknown"), ("12 34", "unknown"), ("<b>", "unknown")])
def test_session_is_hex_of_bounded_length(raw: str, shown: str) -> None:
    assert pages.build({"session": raw}, 0.0, ()).session == shown


def test_hostile_parameters_are_escaped_in_html_and_never_markup() -> None:
    page = pages.build({"code": "GEO", "ip": HOSTILE, "session": HOSTILE, "helo": HOSTILE}, 0.0, known_codes(),
                       contact="<b>x</b>@example.com")
    html = pages.render_html(page)
    assert "<script" not in html.lower() and "<img" not in html.lower()
    # the bad address is quoted back, escaped and cut to MAX_QUOTED characters
    assert "&lt;script&gt;document.title=&#x27;PWNED&#x27;&lt;/script&gt;" in html
    assert "&lt;b&gt;x&lt;/b&gt;@example.com" in html


def test_the_page_never_shows_recipients_senders_or_helo() -> None:
    params = {"code": "GRAYLIST", "ip": "192.0.2.7", "session": "abc", "rcpt": "secret@example.com",
              "sender": "boss@sender.example", "helo": "bot.example"}
    page = pages.build(params, 0.0, known_codes())
    for body in (pages.render_html(page), pages.render_text(page)):
        assert "secret@example.com" not in body and "boss@sender.example" not in body
        assert "bot.example" not in body


def test_the_page_shows_address_time_session_and_contact() -> None:
    page = pages.build({"code": "RDNS", "ip": "192.0.2.7", "session": "0a1b2c000001"}, 1_800_000_000.0,
                       known_codes(), contact="postmaster@other.example")
    text = pages.render_text(page)
    assert "Your address: 192.0.2.7" in text
    assert "Time: 2027-01-15 08:00:00 UTC" in text
    assert "Session id: 0a1b2c000001" in text
    assert "Contact: postmaster@other.example" in text
    html = pages.render_html(page)
    assert '<a href="mailto:postmaster@other.example">' in html
    assert "forward-confirmed reverse DNS for 192.0.2.7" in html


def test_without_an_address_the_text_still_reads() -> None:
    page = pages.build({"code": "GEO"}, 0.0, known_codes())
    assert "your address your address" not in page.text.what
    assert "{ip}" not in page.text.what + page.text.fix


def test_graylist_says_after_how_many_minutes_it_passes() -> None:
    page = pages.build({"code": "GRAYLIST"}, 0.0, known_codes(), graylist_delay=300.0)
    assert "after about 5 minutes" in page.text.what


def test_the_html_has_no_script_no_external_resource_and_fits_a_phone() -> None:
    html = pages.render_html(pages.build({"code": "GEO", "ip": "192.0.2.7"}, 0.0, known_codes(),
                                         contact="https://example.com/contact"))
    lower = html.lower()
    for marker in ("<script", "<link", "<img", "<iframe", "<object", "<embed", "url(", "@import", "src="):
        assert marker not in lower, marker
    assert 'name="viewport"' in html
    assert '<a href="https://example.com/contact" rel="noreferrer nofollow">' in html


def test_the_text_variant_carries_no_control_characters() -> None:
    page = pages.build({"code": "GEO", "ip": "192.0.2.7"}, 0.0, known_codes(), contact="a@b.example")
    text = pages.render_text(pages.Page(page.code, page.ip, "x\x1b[31mred\x07", page.session, page.when, page.text,
                                        page.contact))
    assert "\x1b" not in text and "\x07" not in text


@pytest.mark.parametrize("query, accept, text", [
    ({}, "*/*", True),
    ({}, "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", False),
    ({}, "text/plain", True),
    ({"format": "text"}, "text/html", True),
    ({"format": "html"}, "*/*", False),
], ids=["curl", "a browser", "asks for text", "?format=text wins", "?format=html wins"])
def test_html_for_browsers_and_text_for_curl(query: dict[str, str], accept: str, text: bool) -> None:
    assert wants_text(query, accept) is text


@pytest.mark.parametrize("url, path", [
    ("", "/smtp"), ("https://example.com/smtp?code={code}", "/smtp"),
    ("https://example.com/help/mail?c={code}&ip={ip}", "/help/mail"), ("https://example.com/", "/smtp")])
def test_the_page_lives_at_the_path_of_the_resolution_url(url: str, path: str) -> None:
    assert page_path(url) == path


# --- [http] settings -------------------------------------------------------------


def test_http_settings_from_the_file_and_the_flag() -> None:
    config = cfg.build({"http": {"contact": "postmaster@other.example",
                                 "texts": {"GEO": "We take mail from {ip} through our partner relay only.",
                                           "GRAYLIST": {"title": "Please wait", "fix": "Retry."}},
                                 "removal": {"zen.spamhaus.org": "https://check.spamhaus.org/"}}},
                       {**BASE, "http": "127.0.0.1:8025"})
    http = config.http
    assert http.listen == ("127.0.0.1", 8025)
    assert http.contact == "postmaster@other.example"
    assert http.overrides["GEO"].what.startswith("We take mail from {ip}")
    assert http.overrides["GEO"].title == pages.TEXTS["GEO"].title      # the rest stays ours
    assert http.overrides["GRAYLIST"].title == "Please wait" and http.overrides["GRAYLIST"].what == pages.TEXTS["GRAYLIST"].what
    page = pages.build({"code": "GEO", "ip": "192.0.2.7"}, 0.0, known_codes(), overrides=http.overrides)
    assert page.text.what == "We take mail from 192.0.2.7 through our partner relay only."


def test_http_is_off_by_default() -> None:
    assert cfg.build({}, dict(BASE)).http == HttpSettings()
    assert HttpSettings().listen is None


def test_a_rules_reason_code_may_have_a_text() -> None:
    doc = {"rule": [{"name": "r", "stage": "connect", "when": {"os": "windows"}, "action": "reject",
                     "reason": "WIN"}], "http": {"texts": {"WIN": "Windows hosts send through a relay."}}}
    assert cfg.build(doc, dict(BASE)).http.overrides["WIN"].what == "Windows hosts send through a relay."


@pytest.mark.parametrize("doc, flags, key", [
    ({"http": {"listen": "nope"}}, {}, "http.listen"),
    ({}, {"http": "127.0.0.1"}, "--http"),
    ({}, {"http": "127.0.0.1:99999"}, "--http"),
    ({"http": {"contact": "a@b\nInjected: yes"}}, {}, "http.contact"),
    ({"http": {"contact": 5}}, {}, "http.contact"),
    ({"http": {"colour": "red"}}, {}, "http.colour"),
    ({"http": {"texts": {"NO-SUCH": "x"}}}, {}, "http.texts.NO-SUCH"),
    ({"http": {"texts": {"GEO": "see {url}"}}}, {}, "http.texts.GEO.what"),
    ({"http": {"texts": {"GEO": {"body": "x"}}}}, {}, "http.texts.GEO.body"),
    ({"http": {"texts": {"GEO": "x" * 3000}}}, {}, "http.texts.GEO.what"),
    ({"http": {"texts": "GEO"}}, {}, "http.texts"),
    ({"http": {"removal": {"zen": "javascript:alert(1)"}}}, {}, "http.removal.zen"),
    ({"http": {"health_interval": "0s"}}, {}, "http.health_interval"),
], ids=["listen without port", "flag without port", "flag port out of range", "contact with a line break",
        "contact not a string", "unknown key", "text for an unknown code", "unknown placeholder",
        "unknown part of a text", "text too long", "texts not a table", "removal link not http",
        "zero health interval"])
def test_bad_http_settings_name_the_key(doc: dict, flags: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg.build(doc, {**BASE, **flags})
    assert e.value.key == key


def test_a_bad_http_flag_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["serve", "--upstream", "127.0.0.1:25", "--domain", "example.com", "--hostname", "mx.example.com",
                     "--http", "127.0.0.1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--http" in err


# --- smtpguard page CODE -----------------------------------------------------------


def test_page_command_prints_the_same_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["page", "GRAYLIST", "--ip", "192.0.2.7", "--session", "0a1b2c000001"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(pages.TEXTS["GRAYLIST"].title + "\n")
    assert "after about 3 minutes" in out and "Your address: 192.0.2.7" in out


def test_page_command_uses_the_config(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "smtpguard.toml"
    conf.write_text('[server]\ndomains = ["example.com"]\nhostname = "mx.example.com"\n'
                    '[upstream]\naddress = "127.0.0.1:25"\n'
                    '[http]\ncontact = "postmaster@other.example"\n[http.texts]\nGEO = "Ask us."\n')
    assert cli.main(["page", "geo", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "What happened: Ask us." in out and "Contact: postmaster@other.example" in out


def test_page_command_for_an_unknown_code_prints_the_generic_text_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["page", "NOPE"]) == 1
    captured = capsys.readouterr()
    assert pages.UNKNOWN_TEXT.title in captured.out and "NOPE" in captured.err


def test_page_command_lists_every_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["page", "list"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert set(replies.REASONS) <= listed
