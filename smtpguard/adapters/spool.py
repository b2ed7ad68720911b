"""One message in transit: kept on disk beyond a small buffer.

Decides nothing. The DATA reader writes the message here line by line (the
client's dot-stuffing undone, line endings normalised to CRLF), the
data-stage sources read it, and the relay sends it to the MTA in
line-aligned blocks. Memory per message stays bounded whatever its size
(issue: the two promises, item 5): the header block up to HEADER_LIMIT
stays in memory (data-stage sources read and rewrite headers), the rest
goes through a SpooledTemporaryFile that moves to disk past SPOOL_MEMORY.

Inputs: lines of the message. Output: `headers`, `size`, `read(limit)`,
`blocks()`. Failure modes: OSError from the temporary file (a full disk)
propagates; the session turns it into a 451 and nothing is relayed.
"""

from __future__ import annotations

import re
import tempfile
from typing import Iterator

# A message below this size never touches the disk; above it, the buffer's
# size is the memory a message in DATA costs beyond the reader's line buffer.
SPOOL_MEMORY = 256 * 1024
# Headers kept in memory for the data-stage sources; RFC 5322 sets no limit,
# Postfix's header_size_limit is 100 KB per header and most MTAs cap the
# block near 1 MB. Lines beyond this go to the body file as they are.
HEADER_LIMIT = 256 * 1024
# Blocks sent to the MTA: large enough to amortise a write, small enough to
# keep the transport's buffer bounded.
BLOCK = 64 * 1024

_LEADING_DOT = re.compile(rb"(?m)^\.")


class MessageSpool:
    """The message as received, without the transparency dots."""

    def __init__(self, spool_dir: str | None = None) -> None:
        self._head: list[bytes] = []
        self._head_size = 0
        self._in_headers = True
        self._body = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY, dir=spool_dir)
        self.size = 0

    def add_line(self, line: bytes) -> None:
        """One line as read from the client (ending CRLF), leading dot already removed.

        Inside a line (read up to CRLF) every CR and LF is bare. Passed on as
        they are, they could end the message early at an MTA that takes a
        bare LF or CR as a line end (SMTP smuggling: `\n.\n`, `\r.\r`). As
        Postfix stores them: a bare LF ends the line (CRLF, and a dot that
        then starts a line is stuffed again on the way out), a bare CR becomes
        a space (it never starts a line, nor a header; before, it became CRLF
        and a `\r` inside a header made a header line of its own).
        """
        if b"\r" in line[:-2] or b"\n" in line[:-2]:
            line = line[:-2].replace(b"\r", b" ").replace(b"\n", b"\r\n") + b"\r\n"
        self.size += len(line)
        if self._in_headers and self._head_size + len(line) <= HEADER_LIMIT:
            self._head.append(line)
            self._head_size += len(line)
            if line == b"\r\n":
                self._in_headers = False
            return
        self._in_headers = False
        self._body.write(line)

    @property
    def headers(self) -> bytes:
        """The header block (with the blank line that ends it, when one was seen)."""
        return b"".join(self._head)

    def read(self, limit: int) -> bytes | None:
        """The whole message when it is at most `limit` bytes, else None."""
        if self.size > limit:
            return None
        self._body.seek(0)
        return self.headers + self._body.read()

    def blocks(self, headers: bytes | None = None, prefix: bytes = b"") -> Iterator[bytes]:
        """The message for the wire: line-aligned blocks with dots stuffed (RFC 5321 §4.5.2).

        `prefix` (trace headers of our own, whole lines) goes first in the
        same block; `headers` replaces the header block (a source may have
        removed forged headers); the terminating dot is not included.
        """
        head = prefix + (self.headers if headers is None else headers)
        if head:
            yield _LEADING_DOT.sub(b"..", head)
        self._body.seek(0)
        rest = b""
        while True:
            chunk = self._body.read(BLOCK)
            if not chunk:
                break
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            rest = data[cut:]
            yield _LEADING_DOT.sub(b"..", data[:cut])
        if rest:
            yield _LEADING_DOT.sub(b"..", rest)

    def close(self) -> None:
        self._body.close()
