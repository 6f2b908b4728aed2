"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells) run under vmap, exactly.

torch 2.13 has no batching rule for its fused recurrent kernels (``aten::lstm`` and kin), so an
unmodified model with a recurrent layer could only run the looped path, one task at a time.
``StepwiseRNNs`` replaces the kernel, under ``vmap`` only, with the same recurrence written in
ordinary ops (one matrix product for the input of all time steps, then one per step for the
hidden state), which vmap batches over tasks and differentiates to any order. Outside vmap (the
looped path) torch's kernel runs as usual. Packed sequences are left to torch (and so to the
looped path).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.overrides import TorchFunctionMode

State = tuple[Tensor, ...]  # (h,) or, for an LSTM, (h, c)
Weights = tuple[Tensor | None, ...]  # (w_hh, b_hh, w_hr) of one layer and direction
Cell = Callable[[Tensor, State, Weights], State]


def _lstm_cell(x_gates: Tensor, state: State, weights: Weights) -> State:
    h, c = state
    w_hh, b_hh, w_hr = weights
    i, f, g, o = (x_gates + F.linear(h, w_hh, b_hh)).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w_hr is None else F.linear(h, w_hr)), c


def _gru_cell(x_gates: Tensor, state: State, weights: Weights) -> State:
    (h,) = state
    w_hh, b_hh, _ = weights
    x_r, x_z, x_n = x_gates.chunk(3, -1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, -1)
    reset, update = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    new = torch.tanh(x_n + reset * h_n)
    return ((1 - update) * new + update * h,)


def _simple_cell(activation: Callable[[Tensor], Tensor]) -> Cell:
    def cell(x_gates: Tensor, state: State, weights: Weights) -> State:
        w_hh, b_hh, _ = weights
        return (activation(x_gates + F.linear(state[0], w_hh, b_hh)),)
    return cell


_RNN_TANH, _RNN_RELU = _simple_cell(torch.tanh), _simple_cell(torch.relu)
LAYERS: dict[Callable, Cell] = {torch.lstm: _lstm_cell, torch.gru: _gru_cell,
                                torch.rnn_tanh: _RNN_TANH, torch.rnn_relu: _RNN_RELU}
CELLS: dict[Callable, Cell] = {torch.lstm_cell: _lstm_cell, torch.gru_cell: _gru_cell,
                               torch.rnn_tanh_cell: _RNN_TANH, torch.rnn_relu_cell: _RNN_RELU}


def stepwise_rnn(cell: Cell, input: Tensor, hx: Tensor | State, params: list[Tensor],
                 has_biases: bool, num_layers: int, dropout: float, train: bool,
                 bidirectional: bool, batch_first: bool) -> tuple[Tensor, ...]:
    """What ``torch.lstm`` (``gru``, ``rnn_tanh``, ``rnn_relu``) returns for a padded batch:
    the last layer's output at every step, then the final state of every layer and direction."""
    states = hx if isinstance(hx, (tuple, list)) else (hx,)
    sequence = input.transpose(0, 1) if batch_first else input  # (time, batch, features)
    directions = 2 if bidirectional else 1
    # per layer and direction: w_ih, w_hh[, b_ih, b_hh][, w_hr (an LSTM's projection)]
    count = len(params) // (num_layers * directions)
    finals: list[State] = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            weights = params[index * count:(index + 1) * count]
            w_ih, w_hh = weights[:2]
            b_ih, b_hh = weights[2:4] if has_biases else (None, None)
            w_hr = weights[4 if has_biases else 2] if len(weights) % 2 else None
            x_gates = F.linear(sequence, w_ih, b_ih).unbind(0)  # the input's part, all steps
            state = tuple(s[index] for s in states)
            hidden = []
            for t in (reversed(range(len(x_gates))) if direction else range(len(x_gates))):
                state = cell(x_gates[t], state, (w_hh, b_hh, w_hr))
                hidden.append(state[0])
            outputs.append(torch.stack(hidden[::-1] if direction else hidden))
            finals.append(state)
        sequence = torch.cat(outputs, -1) if bidirectional else outputs[0]
        if train and dropout and layer < num_layers - 1:  # as torch: between layers only
            sequence = F.dropout(sequence, dropout, training=True)
    output = sequence.transpose(0, 1) if batch_first else sequence
    return (output, *(torch.stack(parts) for parts in zip(*finals)))


def stepwise_cell(cell: Cell, input: Tensor, hx: Tensor | State, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Tensor | State:
    """What ``torch.lstm_cell`` (``gru_cell``, ``rnn_tanh_cell``, ``rnn_relu_cell``) returns:
    one step's new state, ``(h, c)`` for an LSTM, else ``h``."""
    state = cell(F.linear(input, w_ih, b_ih), tuple(hx) if isinstance(hx, (tuple, list)) else (hx,),
                 (w_hh, b_hh, None))
    return state if len(state) == 2 else state[0]


def _under_vmap() -> bool:
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


class StepwiseRNNs(TorchFunctionMode):
    """Inside this mode, under ``vmap``, torch's recurrent kernels run as ``stepwise_rnn``
    (layers on padded input) and ``stepwise_cell`` (``nn.LSTMCell`` and kin)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in CELLS and _under_vmap():
            return stepwise_cell(CELLS[func], *args, **(kwargs or {}))
        # the padded overloads: (input, hx, params, has_biases: bool, ...); packed ones have
        # (data, batch_sizes, hx, params, ...)
        if func in LAYERS and not kwargs and isinstance(args[3], bool) and _under_vmap():
            return stepwise_rnn(LAYERS[func], *args)
        return func(*args, **(kwargs or {}))


def has_recurrent(model: nn.Module) -> bool:
    """True when ``model`` contains an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``, or one of their
    cells."""
    return any(isinstance(m, (nn.RNNBase, nn.RNNCellBase)) for m in model.modules())
