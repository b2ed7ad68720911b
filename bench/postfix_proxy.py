"""A private Postfix smtpd acting as a before-queue proxy (smtpd_proxy_filter)
in front of a given SMTP server, for benchmarks side by side with smtpguard.

The recipe of tests/fixtures_postfix.py (whose main.cf and master.cf builders it uses): `postfix -c DIR` under one
world-traversable temporary directory, loopback only. Every command of the
client is proxied in real time to the filter (Postfix's SMTPD_PROXY_README),
which here is the same smtp-sink that smtpguard relays to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fixtures_postfix import instance_main_cf, instance_master_cf  # noqa: E402


def available() -> bool:
    return os.path.exists("/usr/sbin/postfix") and os.path.exists("/etc/postfix/master.cf") and os.geteuid() == 0


def start(port: int, filter_port: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="smtpguard-bench-postfix-"))
    root.chmod(0o755)
    for sub in ("etc", "queue", "data"):
        (root / sub).mkdir()
    shutil.chown(root / "data", "postfix")
    (root / "etc" / "main.cf").write_text(instance_main_cf(root, "proxy.example.test") + """relay_domains = example.test
mynetworks = 127.0.0.0/8
default_transport = discard:benchmark
relay_transport = discard:benchmark
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
""")
    (root / "etc" / "master.cf").write_text(instance_master_cf([
        f"127.0.0.1:{port} inet n - n - - smtpd", f"  -o smtpd_proxy_filter=127.0.0.1:{filter_port}"]))
    subprocess.run(["postfix", "-c", str(root / "etc"), "set-permissions"], capture_output=True, timeout=60)
    subprocess.run(["postfix", "-c", str(root / "etc"), "start"], check=True, capture_output=True, timeout=60)
    return root


def master_pid(root: Path) -> int:
    return int((root / "queue" / "pid" / "master.pid").read_text().split()[0])


def stop(root: Path) -> None:
    subprocess.run(["postfix", "-c", str(root / "etc"), "stop"], capture_output=True, timeout=60)
    shutil.rmtree(root, ignore_errors=True)
