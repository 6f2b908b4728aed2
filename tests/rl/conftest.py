"""RL tests run on one torch thread (small graphs: two intra-op threads were ~100x slower here
while the other core was busy); the suite's ``process_state`` fixture restores the setting."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
