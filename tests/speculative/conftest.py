"""The speculative tests run many tiny forwards (batch 1 decoding): one thread each (tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
