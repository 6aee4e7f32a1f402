"""Shared fixtures: each area keeps its fixtures in tests/support/ and they are imported here."""
