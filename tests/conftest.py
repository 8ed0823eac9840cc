"""Shared fixtures: the fleet PKI, a real broker, and a whole running fleet."""

pytest_plugins = [
    "tests.fixtures.pki",
    "tests.fixtures.broker",
    "tests.fixtures.fleet",
    "tests.fixtures.browser",
]
