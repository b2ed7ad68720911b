"""Delivery status notification parameters (RFC 3461), checked and kept verbatim
(and RFC 4954's AUTH=, checked and dropped).

Decides: whether the DSN parameters on a MAIL or RCPT line are well formed.
Inputs: the command's argument as received (`FROM:<a@b> RET=HDRS ENVID=x`).
Output: the argument without them, and the parameters exactly as written,
so the MTA behind gets them byte for byte.
Failure modes: ValueError with a message for the client for a malformed or
repeated parameter.
Defaults and why: the limits are RFC 3461's: ENVID at most 100 characters
(§4.4), ORCPT at most 500 (§4.2); xtext as §4.
"""

from __future__ import annotations

import re

DSN_MAIL = ("RET", "ENVID")
DSN_RCPT = ("NOTIFY", "ORCPT")
# RFC 4954 §5's AUTH= on MAIL (the submitter's identity, "<>" for none). We
# offer no AUTH, yet some clients send it anyway; Postfix without SASL takes
# and ignores it. So do we: checked, then dropped, never passed on, so a
# stranger's claim to be an authenticated sender never reaches the MTA.
DROPPED_MAIL = ("AUTH",)

# RFC 3461 §4: xtext is printable ASCII but "+" and "=", or "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")
_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


def _check(name: str, value: str) -> None:
    if name == "RET":
        if value.upper() not in ("FULL", "HDRS"):
            raise ValueError("RET must be FULL or HDRS (RFC 3461 section 4.3)")
    elif name == "ENVID":
        if len(value) > 100 or not _XTEXT.fullmatch(value):
            raise ValueError("ENVID must be xtext of at most 100 characters (RFC 3461 section 4.4)")
    elif name == "NOTIFY":
        words = value.upper().split(",")
        if words != ["NEVER"] and (len(set(words)) != len(words) or not all(w in _NOTIFY for w in words)):
            raise ValueError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY (RFC 3461 section 4.1)")
    elif name == "AUTH":
        if value != "<>" and (len(value) > 500 or not _XTEXT.fullmatch(value)):
            raise ValueError("AUTH must be <> or xtext (RFC 4954 section 5)")
    elif name == "ORCPT":
        kind, sep, addr = value.partition(";")
        if not sep or not _ADDR_TYPE.fullmatch(kind) or len(value) > 500 or not _XTEXT.fullmatch(addr):
            raise ValueError("ORCPT must be addr-type;xtext of at most 500 characters (RFC 3461 section 4.2)")


def split_params(arg: str, names: tuple[str, ...]) -> tuple[str, list[str]]:
    """(the argument without the parameters `names`, those parameters as written)."""
    tokens = arg.split(" ")
    # Parameters follow the address: after the token that closes it.
    start = next((i + 1 for i, t in enumerate(tokens) if ">" in t), 1)
    keep: list[str] = tokens[:start]
    params: list[str] = []
    seen: set[str] = set()
    for token in tokens[start:]:
        name, eq, value = token.partition("=")
        if name.upper() in names:
            if not eq or not value:
                raise ValueError(f"{name.upper()} needs a value")
            if name.upper() in seen:
                raise ValueError(f"{name.upper()} given twice")
            seen.add(name.upper())
            _check(name.upper(), value)
            params.append(token)
        else:
            keep.append(token)
    return " ".join(keep), params
