"""Fixtures shared by the whole suite live in tests/plugins, one module per concern."""

pytest_plugins = [
    "tests.plugins.services",
    "tests.plugins.storage",
    "tests.plugins.models",
]
