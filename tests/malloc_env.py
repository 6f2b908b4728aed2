"""The environment for a child process with glibc's malloc settings as they come by default."""
from __future__ import annotations

import os


def clean_env(**env: str) -> dict[str, str]:
    """This environment without malloc settings of its own, plus ``env``."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return {**keep, **env}
