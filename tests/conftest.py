"""Shared fixtures. Tests marked ``kafka`` need the broker the test command starts.

The test command (``scripts/test.sh``) brings the broker up and exports
``QTASKS_TEST_BOOTSTRAP``; without it, kafka tests skip locally and fail under CI, so a CI
run can never pass by silently skipping the real broker.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    bootstrap = os.environ.get("QTASKS_TEST_BOOTSTRAP", "")
    if not bootstrap:
        message = "QTASKS_TEST_BOOTSTRAP is not set: run the tests through scripts/test.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return bootstrap
