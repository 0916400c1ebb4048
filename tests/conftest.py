"""Shared fixtures: temporary projects, the store URLs to run on."""

from __future__ import annotations

import os

import pytest

POSTGRES_URL = os.environ.get("PUSHRULES_TEST_POSTGRES", "")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def postgres_url() -> str:
    """The PostgreSQL to test on; in CI a missing one fails the test instead of skipping it."""
    url = POSTGRES_URL or ("postgresql+psycopg://postgres@127.0.0.1:5432/test" if IN_CI else "")
    if not url:
        pytest.skip("set PUSHRULES_TEST_POSTGRES to run the PostgreSQL tests")
    return url
