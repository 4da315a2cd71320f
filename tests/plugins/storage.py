"""Fixtures: storage."""
