"""Shared fixtures. Tests marked ``kafka`` need the services the test command starts.

The test command (``scripts/test.sh``) brings the broker, the schema registry and PostgreSQL
up and exports ``QTASKS_TEST_BOOTSTRAP``, ``QTASKS_TEST_SCHEMA_REGISTRY_URL`` and
``QTASKS_TEST_POSTGRES_DSN``; without them, the tests needing them skip locally and fail
under CI, so a CI run can never pass by silently skipping the real services.
"""

from __future__ import annotations

import os

import pytest


def _service(variable: str) -> str:
    value = os.environ.get(variable, "")
    if not value:
        message = f"{variable} is not set: run the tests through scripts/test.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return value


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return _service("QTASKS_TEST_BOOTSTRAP")


@pytest.fixture(scope="session")
def schema_registry_url() -> str:
    return _service("QTASKS_TEST_SCHEMA_REGISTRY_URL")


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The PostgreSQL server the test command starts (``QTASKS_TEST_POSTGRES_DSN``)."""
    return _service("QTASKS_TEST_POSTGRES_DSN")
