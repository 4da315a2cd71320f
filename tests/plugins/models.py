"""Fixtures: models."""
