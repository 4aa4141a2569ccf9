"""Shared fixtures. Tests marked ``kafka`` need the services the test command starts.

The test command (``scripts/test.sh``) brings the broker, the schema registry and PostgreSQL
up and exports ``QTASKS_TEST_BOOTSTRAP``, ``QTASKS_TEST_SCHEMA_REGISTRY_URL`` and
``QTASKS_TEST_POSTGRES_DSN``, and for the secured broker (``dev up --secure``, its own home
and ports) ``QTASKS_TEST_SECURE_BOOTSTRAP``, ``QTASKS_TEST_SECURE_CAFILE``,
``QTASKS_TEST_SECURE_ADMIN_PASSWORD_FILE``, ``QTASKS_TEST_SECURE_HOME`` and its registry's
``QTASKS_TEST_SECURE_SCHEMA_REGISTRY_URL``; without them,
the tests needing them skip locally and fail under CI, so a CI run can never pass by
silently skipping the real services.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SecureCluster:
    """The secured dev broker the test command starts: SASL_SSL, deny-by-default ACLs."""

    bootstrap: str
    ca_file: str
    #: The super user's password file (the user is ``admin``).
    admin_password_file: str
    #: Its ``dev`` home: the broker's and the registry's logs are checked for leaked secrets.
    home: str
    #: Its registry, which requires basic auth (users admin, app and reader).
    registry_url: str

    def registry_auth_file(self, user: str) -> str:
        """The ``user:password`` file of one of the registry's users, beside the CA."""
        return os.path.join(os.path.dirname(self.ca_file), f"{user}.registry")


@pytest.fixture(scope="session")
def secure_cluster() -> SecureCluster:
    return SecureCluster(
        bootstrap=_service("QTASKS_TEST_SECURE_BOOTSTRAP"),
        ca_file=_service("QTASKS_TEST_SECURE_CAFILE"),
        admin_password_file=_service("QTASKS_TEST_SECURE_ADMIN_PASSWORD_FILE"),
        home=_service("QTASKS_TEST_SECURE_HOME"),
        registry_url=_service("QTASKS_TEST_SECURE_SCHEMA_REGISTRY_URL"),
    )
