"""Per-step parameters: MAML++'s per-step batch-norm weights and biases, for any parameters."""
from __future__ import annotations

from torch import Tensor, nn

from .inner_lr import _key, check_keys


class PerStepParameters(nn.Module):
    """One meta-learned set of the selected outer-loop parameters per inner step.

    MAML++ (Antoniou et al. 2019, "BNWB") gives batch norm its own weights and biases at each
    inner step, because the features they normalise change as the inner loop adapts the
    network. As in its code, inner step k's forward on the support set and the query forward
    after that step use set k (0-based). Set 0 is the model's own parameters; this module holds
    sets 1 to ``steps - 1`` in ``copies`` (one ``(steps - 1, *shape)`` tensor per parameter,
    keyed by its name with ``__`` for dots), initialised as the model's values. Steps past the
    trained number reuse the last set.
    """

    def __init__(self, params: dict[str, Tensor], steps: int):
        super().__init__()
        self.names = list(params)
        check_keys(self.names, "per-step copy")
        self.copies = nn.ParameterDict(
            {_key(n): nn.Parameter(p.detach().unsqueeze(0).repeat(steps - 1, *[1] * p.dim()))
             for n, p in params.items()})

    def own_copies(self, names: set[str]) -> set[str]:
        """The names of the copies of the parameters ``names``."""
        return {f"copies.{_key(n)}" for n in self.names if n in names}

    def forward(self, step: int) -> dict[str, Tensor]:
        """The copies in inner step ``step``'s set: none (the model's own) at step 0."""
        if step <= 0:
            return {}
        return {n: self.copies[_key(n)][min(step, len(self.copies[_key(n)])) - 1]
                for n in self.names}
