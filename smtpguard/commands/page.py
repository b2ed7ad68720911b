"""`smtpguard page CODE`: the resolution page's text for a reason code, on the terminal.

The same words as the page at the resolution URL (observe/page.py), with
the configuration's contact line and text overrides when `--config` is
given; `--html` prints the HTML instead. An unknown code prints the
generic text and exits 1, so a script can tell.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "page", help="print the resolution page's text for a reason code",
        description="Print what the resolution page says for a reason code (GEO, RDNS, GRAYLIST, ...): "
        "the words a refused sender's admin reads. With --config, the [http] contact line and text "
        "overrides of that file apply.")
    p.add_argument("code", metavar="CODE", help="a reason code, as in the [BRACKETS] of a reply; 'list' lists them")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file ([http] contact, [http.texts])")
    p.add_argument("--ip", default="", metavar="IP", help="the client address to show")
    p.add_argument("--session", default="", metavar="ID", help="the session id to show")
    p.add_argument("--html", action="store_true", help="print the HTML page instead of the text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from smtpguard import config as cfg
    from smtpguard.observe import page as pages
    from smtpguard.observe.http import HttpSettings, known_codes, rule_texts

    config = cfg.load(args.config, {}) if args.config else None   # ConfigError: exit 2
    http = config.http if config is not None else HttpSettings()
    policy = config.policy if config is not None else None
    codes = known_codes(policy)
    if args.code.lower() == "list":
        for code in sorted(codes):
            print(f"{code:20} {pages.text_for(code, http.overrides, rule_texts(policy)).title}")
        return 0
    graylist_delay = config.graylist.policy.delay if config is not None else 180.0
    built = pages.build({"code": args.code, "ip": args.ip, "session": args.session}, time.time(), codes,
                        contact=http.contact, overrides=http.overrides, rule_texts=rule_texts(policy),
                        graylist_delay=graylist_delay)
    sys.stdout.write(pages.render_html(built) if args.html else pages.render_text(built))
    if built.code == pages.UNKNOWN:
        print(f"smtpguard: {args.code[:40]!r} is not a reason code here; `smtpguard page list` lists them",
              file=sys.stderr)
        return 1
    return 0
