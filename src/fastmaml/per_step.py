"""Per-step parameters: MAML++'s per-step batch-norm weights and biases, for any parameters."""
from __future__ import annotations

from torch import Tensor, nn

from .inner_lr import _key


class PerStepParameters(nn.Module):
    """One meta-learned copy of each selected outer-loop parameter per inner step.

    MAML++ (Antoniou et al. 2019, "BNWB") gives batch norm its own weights and biases at each
    inner step, because the features they normalise change as the inner loop adapts the
    network. Here the forward with the parameters after ``k`` inner steps uses copy ``k`` of each
    selected parameter: copy 0 is the model's own parameter, this module holds copies 1 to
    ``steps`` (initialised as the model's values), and more steps than trained reuse the last.
    """

    def __init__(self, params: dict[str, Tensor], steps: int):
        super().__init__()
        self.names = list(params)
        self.copies = nn.ParameterDict(
            {_key(n): nn.Parameter(p.detach().unsqueeze(0).repeat(steps, *[1] * p.dim()))
             for n, p in params.items()})

    def own_copies(self, names: set[str]) -> set[str]:
        """The names of the copies of the parameters ``names``."""
        return {f"copies.{_key(n)}" for n in self.names if n in names}

    def forward(self, step: int) -> dict[str, Tensor]:
        """The copies for the forward after ``step`` inner steps: none (the model's own) at 0."""
        if step == 0:
            return {}
        return {n: self.copies[_key(n)][min(step, len(self.copies[_key(n)])) - 1]
                for n in self.names}

