"""Fixtures for a real DNS server on loopback (filled by the DNS work)."""
