"""RSS per idle session, plain and after STARTTLS (issue: strangers' data and
dependency faults, item 10: 290 KiB per idle TLS session against 11 KiB plain).

Opens N sessions to a `smtpguard serve` subprocess (EHLO, then idle), reads
the process's RSS, closes them, then N sessions that complete STARTTLS and
EHLO again, and prints the RSS per session of each kind and their ratio.
Target: at most 64 KiB per idle TLS session. Loopback only, bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, status, wait_port  # noqa: E402


async def open_sessions(port: int, n: int, tls: bool) -> list[asyncio.StreamWriter]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    writers = []

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if line[3:4] != b"-":
                    return line

        await reply()
        writer.write(b"EHLO bench.test\r\n")
        await reply()
        if tls:
            writer.write(b"STARTTLS\r\n")
            await reply()
            await writer.start_tls(ctx)
            writer.write(b"EHLO bench.test\r\n")
            await reply()
        return writer

    for start in range(0, n, 100):
        writers += await asyncio.gather(*(one() for _ in range(min(100, n - start))))
    return writers


async def measure(pid: int, port: int, n: int, tls: bool) -> float:
    before = status(pid, "VmRSS")
    writers = await open_sessions(port, n, tls)
    await asyncio.sleep(0.5)  # let the server settle before reading its RSS (a measurement, not synchronisation)
    after = status(pid, "VmRSS")
    for w in writers:
        w.close()
    await asyncio.sleep(0.5)
    return (after - before) / n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 300 if args.quick else 1000
    import trustme

    tmp = Path(tempfile.mkdtemp())
    trustme.CA().issue_cert("mx.example.test").private_key_and_cert_chain_pem.write_to_path(str(tmp / "c.pem"))
    port = free_port()
    guard = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--listen", f"127.0.0.1:{port}",
                              "--upstream", "127.0.0.1:9", "--domain", "example.test", "--hostname", "mx.example.test",
                              "--dns-server", "127.0.0.1:9", "--tls-cert", str(tmp / "c.pem"),
                              "--tls-key", str(tmp / "c.pem"), "--log-level", "error", "--state", "memory://",
                              "--limits-exempt", "127.0.0.0/8", "--max-sessions", "0"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        asyncio.run(measure(guard.pid, port, 20, True))  # warm up (and close again)
        plain = asyncio.run(measure(guard.pid, port, n, False))
        tls = asyncio.run(measure(guard.pid, port, n, True))
        print(f"{n} idle sessions each: plain {plain / 1024:.1f} KiB, after STARTTLS {tls / 1024:.1f} KiB "
              f"(ratio {tls / plain:.1f}); target ≤ 64 KiB per TLS session")
    finally:
        guard.terminate()
        guard.wait(90)  # a TLS session closing waits for the peer's close_notify (asyncio: up to 30 s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
