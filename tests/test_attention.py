"""The engine's switch of nn.MultiheadAttention's fast path: one flag for the process."""
from __future__ import annotations

import torch

from fastmaml.attention import mha_fast_path_off


def test_the_fast_path_stays_off_until_the_last_of_interleaved_forwards_ends() -> None:
    """Two learners' forwards (threads) ending in another order than they began: restored per
    call, the first to end turned it on under the other, and the last left it off for good."""
    first, second = mha_fast_path_off(), mha_fast_path_off()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not torch.backends.mha.get_fastpath_enabled()  # the second still runs
    second.__exit__(None, None, None)
    assert torch.backends.mha.get_fastpath_enabled()


def test_a_users_own_setting_is_kept() -> None:
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with mha_fast_path_off():
            pass
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
