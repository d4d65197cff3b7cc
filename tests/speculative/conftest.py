"""The speculative tests run many tiny forwards (batch 1 decoding): one thread avoids thread-pool overhead
that dominates ops this small, and keeps a shared CPU usable."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
