"""Shared fixtures: tiny real models built from config, seeded; the bundled tokenizer; small prompt sets."""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread per xdist worker (`make test` runs two workers on two cores), else up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models, batch-1 decoding: the thread pool's overhead dominates ops
    this small, and a shared CPU stays usable); the previous count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bundled_path():
    from common.models import bundled_smollm2_path

    return bundled_smollm2_path()
