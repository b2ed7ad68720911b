"""Shared fixtures: each fixture module owns one real part (a DNS server on
loopback, a redis-server process, an SMTP upstream recorder)."""

pytest_plugins = [
    "tests.fixtures_dns",
    "tests.fixtures_redis",
    "tests.fixtures_smtp",
    "tests.fixtures_faults",
    "tests.fixtures_postfix",
]
