"""RL tests run on one torch thread (small graphs: two intra-op threads were ~100x slower here
while the other core was busy), and restore the setting afterwards (RL runs also set it)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
