"""Inner-loop learning rates: fixed, one learned scalar, Meta-SGD, or MAML++ per-layer per-step."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .errors import ConfigError

LrMode = Literal["fixed", "scalar", "per_param", "per_layer_step"]
LR_MODES: tuple[str, ...] = ("fixed", "scalar", "per_param", "per_layer_step")


def _key(name: str) -> str:
    """ParameterDict keys may not contain dots."""
    return name.replace(".", "__")


def check_keys(names: list[str], what: str) -> None:
    """A ``ConfigError`` where two parameter names give one ``_key`` (``a.b__c`` and ``a__b.c``):
    they would share one learned tensor, ``what`` (e.g. "learned inner learning rate")."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(_key(name), name)
        if other != name:
            raise ConfigError(f"the parameters {other} and {name} would share one {what}, kept "
                              f"under the name {_key(name)} (dots written as __): rename the "
                              "module whose name holds '__'")


def check_lr_mode(mode: str, steps: int) -> None:
    """A known mode; a learned one needs inner steps to learn through (else ``adapt`` and
    ``evaluate`` would later use rates no meta-gradient ever reached)."""
    if mode not in LR_MODES:
        raise ConfigError(f"unknown inner-lr mode {mode!r}; choose one of {', '.join(LR_MODES)}")
    if mode != "fixed" and steps < 1:
        raise ConfigError(f"lr_mode={mode} learns the inner learning rates through the inner "
                          "steps: it needs inner_steps >= 1")


class InnerLearningRates(nn.Module):
    """Holds the inner learning rates and hands out the ones for a given inner step.

    - ``fixed``: the scalar ``init``, not learned.
    - ``scalar``: one learned scalar shared by all parameters and steps.
    - ``per_param`` (Meta-SGD, Li et al. 2017): one learned rate per parameter element.
    - ``per_layer_step`` (MAML++, Antoniou et al. 2019): one learned scalar per parameter tensor
      and inner step; steps past the trained number reuse the last step's rates.
    """

    def __init__(self, mode: str, init: float, shapes: dict[str, torch.Size], steps: int,
                 like: Tensor | None = None):
        """``like``: a parameter of the model, whose dtype and device the learned rates take."""
        super().__init__()
        check_lr_mode(mode, steps)
        self.mode = mode
        self.init = float(init)
        self.names = list(shapes)
        if mode in ("per_param", "per_layer_step"):
            check_keys(self.names, "learned inner learning rate")
        where = {} if like is None else {"dtype": like.dtype, "device": like.device}
        if mode == "scalar":
            self.scalar = nn.Parameter(torch.tensor(self.init, **where))
        elif mode == "per_param":
            self.rates = nn.ParameterDict(
                {_key(n): nn.Parameter(torch.full(s, self.init, **where))
                 for n, s in shapes.items()})
        elif mode == "per_layer_step":
            self.rates = nn.ParameterDict(
                {_key(n): nn.Parameter(torch.full((max(steps, 1),), self.init, **where))
                 for n in shapes})

    def own_rates(self, names: set[str]) -> set[str]:
        """The names of the learned rates that only the parameters ``names`` use."""
        if self.mode not in ("per_param", "per_layer_step"):
            return set()
        return {f"rates.{_key(n)}" for n in self.names if n in names}

    def forward(self, step: int) -> dict[str, Tensor | float]:
        """The learning rate of each adapted parameter at inner step ``step`` (0-based)."""
        if self.mode == "fixed":
            return dict.fromkeys(self.names, self.init)
        if self.mode == "scalar":
            return dict.fromkeys(self.names, self.scalar)
        if self.mode == "per_param":
            return {n: self.rates[_key(n)] for n in self.names}
        return {n: self.rates[_key(n)][min(step, self.rates[_key(n)].numel() - 1)]
                for n in self.names}
