"""A model's tensors held under several names, for ``torch.func.functional_call``.

A module registered twice (``self.block`` and ``self.blocks = ModuleList([self.block] * 3)``)
holds each of its tensors once, under two names; ``functional_call``'s own tying
(``tie_weights=True``) swaps such a tensor in once per name and leaves the model holding the
swapped-in tensor (no meta-gradient reaches the parameter, and the next call finds it gone).
So fastmaml calls it with ``tie_weights=False`` and names each tensor once per module that
holds it: a Parameter shared by two modules (weight tying) gets both names, a module under two
names one.
"""
from __future__ import annotations

from torch import Tensor, nn


def tensor_aliases(module: nn.Module) -> dict[str, str]:
    """Each further name of a parameter or buffer that another module also holds, mapped to
    its name in ``named_parameters()`` / ``named_buffers()`` (``tied.weight`` ->
    ``head.weight``); a second name of the same module's tensor is none."""
    first: dict[int, str] = {}  # id(tensor) -> its first name
    held: set[tuple[int, str]] = set()  # (id(module), attribute) already named
    aliases = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for attribute, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            if tensor is None or (id(owner), attribute) in held:
                continue
            held.add((id(owner), attribute))
            name = f"{prefix}.{attribute}" if prefix else attribute
            if id(tensor) in first:
                aliases[name] = first[id(tensor)]
            else:
                first[id(tensor)] = name
    return aliases


def with_aliases(state: dict[str, Tensor], aliases: dict[str, str]) -> dict[str, Tensor]:
    """``state`` (tensors by their first names) with every alias of a tensor it holds; a name
    of ``state`` itself wins (a tie undone since ``aliases`` was taken: build MAML again after
    changing the model's modules)."""
    if not aliases:  # most models: no copy on the forward's path
        return state
    return {**{alias: state[name] for alias, name in aliases.items() if name in state}, **state}


def parameter_names(module: nn.Module) -> dict[str, list[str]]:
    """Each parameter's name in ``named_parameters()`` -> every name it is held under (a
    module registered twice, a weight tied to another module's), that one first."""
    first: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(first.setdefault(id(param), name), []).append(name)
    return names
