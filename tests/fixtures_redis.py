"""Fixtures for a real redis-server process (filled by the store work)."""
