"""fastmaml.recurrent: torch's recurrent layers run under vmap as their kernels do.

The meta-gradients of recurrent models (batched against looped, and against finite
differences) are checked in test_core.py beside the other models'."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from fastmaml import MAML, TaskBatch
from fastmaml.errors import ConfigError, FastMAMLWarning, ShapeError
from fastmaml.models import SequenceNet
from fastmaml.recurrent import StepwiseRNNs

LAYERS = {"lstm": lambda **options: nn.LSTM(3, 4, **options),
          "lstm_projected": lambda **options: nn.LSTM(3, 4, proj_size=2, **options),
          "gru": lambda **options: nn.GRU(3, 4, **options),
          "rnn_tanh": lambda **options: nn.RNN(3, 4, **options),
          "rnn_relu": lambda **options: nn.RNN(3, 4, nonlinearity="relu", **options)}
SHAPES = [dict(num_layers=1), dict(num_layers=2, bidirectional=True, batch_first=True),
          dict(num_layers=2, bias=False)]


def initial_state(layer: nn.RNNBase, tasks: int, batch: int) -> torch.Tensor | tuple:
    rows = layer.num_layers * (1 + layer.bidirectional)
    h = torch.randn(tasks, rows, batch, layer.proj_size or layer.hidden_size, dtype=torch.float64)
    if isinstance(layer, nn.LSTM):
        return h, torch.randn(tasks, rows, batch, layer.hidden_size, dtype=torch.float64)
    return h


def task_state(state, index: int):
    """One task's initial state."""
    return tuple(s[index] for s in state) if isinstance(state, tuple) else state[index]


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("options", SHAPES)
@pytest.mark.parametrize("given_state", [False, True])
def test_the_stepwise_recurrence_equals_torchs_kernel(kind, options, given_state):
    torch.manual_seed(0)
    layer = LAYERS[kind](**options).double()
    tasks, batch = 3, 2
    x = torch.randn(tasks, 6, batch, 3, dtype=torch.float64)  # per task: (time, batch, features)
    if options.get("batch_first"):
        x = x.transpose(1, 2)
    state = initial_state(layer, tasks, batch) if given_state else None

    def every_output(x, state):
        return torch.cat([t.flatten() for t in tree_leaves(layer(x, state))])

    expected = torch.stack([every_output(x[i], None if state is None else task_state(state, i))
                            for i in range(tasks)])
    with StepwiseRNNs():
        got = torch.func.vmap(every_output, in_dims=(0, None if state is None else 0))(x, state)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_an_unbatched_sequence_and_inter_layer_dropout_in_eval_mode():
    torch.manual_seed(0)
    layer = nn.LSTM(3, 4, num_layers=2, dropout=0.5).double().eval()
    x = torch.randn(3, 6, 3, dtype=torch.float64)  # per task one sequence: (time, features)
    with StepwiseRNNs():
        got = torch.func.vmap(lambda x: layer(x)[0])(x)
    torch.testing.assert_close(got, torch.stack([layer(task_x)[0] for task_x in x]),
                               rtol=0, atol=1e-12)


def test_inter_layer_dropout_draws_a_mask_per_task_in_training():
    torch.manual_seed(0)
    layer = nn.GRU(3, 4, num_layers=2, dropout=0.5).train()
    x = torch.randn(1, 6, 3).expand(8, -1, -1)  # the same sequence for every task
    with StepwiseRNNs():
        out = torch.func.vmap(lambda x: layer(x)[0], randomness="different")(x)
    assert not torch.allclose(out[0], out[1])  # different masks, as the looped path draws


class Unrolled(nn.Module):
    """A model that steps a recurrent cell itself (``nn.LSTMCell`` and kin), then a head."""

    def __init__(self, cell: nn.RNNCellBase):
        super().__init__()
        self.cell, self.head = cell, nn.Linear(cell.hidden_size, 1)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
@pytest.mark.parametrize("bias", [True, False])
def test_models_stepping_a_cell_meta_train_batched_with_the_looped_meta_gradient(cell, bias):
    torch.manual_seed(0)
    model = Unrolled(cell(2, 5, bias=bias)).double()
    batch = TaskBatch(*(torch.randn(3, 4, *shape, dtype=torch.float64)
                        for shape in [(5, 2), (1,), (5, 2), (1,)]))
    grads = {}
    for batched in (True, False):
        maml = MAML(model, F.mse_loss, 0.1, 2, batched=batched)
        model.zero_grad(set_to_none=True)
        maml.meta_backward(batch)
        grads[batched] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert maml.path == ("batched" if batched else "looped")
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-12, atol=1e-14)


class Packed(nn.Module):
    """Packs its (examples, time, features) input: variable-length sequences."""

    def __init__(self):
        super().__init__()
        self.recurrent, self.head = nn.GRU(2, 4, batch_first=True), nn.Linear(4, 1)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        return self.head(self.recurrent(packed)[1][-1])


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch, under vmap
def test_packed_sequences_run_the_looped_path_with_a_warning():
    torch.manual_seed(0)
    batch = TaskBatch(torch.randn(2, 3, 4, 2), torch.randn(2, 3, 1),
                      torch.randn(2, 3, 4, 2), torch.randn(2, 3, 1))
    maml = MAML(Packed(), F.mse_loss, 0.1, 1)
    # the warning names the user's line that vmap could not run (torch's and ours are passed)
    with pytest.warns(FastMAMLWarning, match=r"vmap could not run this model at .*test_recurrent"
                      r"\.py:\d+, `return self.head\(self.recurrent\(packed\)\[1\]\[-1\]\)` "
                      r"\(.+\); using the looped path"):
        loss, _ = maml.meta_backward(batch)
    assert maml.path == "looped" and torch.isfinite(loss)
    assert set(maml.path_choices.values()) == {("looped", None)}  # was the compiled role's
    # (was a ShapeError, though no shape was at fault: the loop runs the same input)
    with pytest.raises(ConfigError, match=r"vmap cannot run this model at .*test_recurrent\.py:"
                                          r"\d+, `return self.head.+` \(.+\) and batched=True "
                                          "forbids the looped path: use batched=None"):
        MAML(Packed(), F.mse_loss, 0.1, 1, batched=True).meta_backward(batch)
    with pytest.raises(ShapeError, match="per-task input of shape") as raised:  # the input's
        MAML(Packed(), F.mse_loss, 0.1, 1, batched=True).meta_backward(
            TaskBatch(batch.support_x[..., :1], batch.support_y, batch.query_x[..., :1],
                      batch.query_y))  # one feature of the two the model reads
    assert "vmap" not in str(raised.value)  # as the looped path raised it


def test_compile_is_declined_for_recurrent_models_with_a_warning():
    model = nn.Sequential(nn.RNN(2, 3, batch_first=True))
    with pytest.warns(FastMAMLWarning, match="cannot compile recurrent layers"):
        maml = MAML(model, lambda out, y: F.mse_loss(out[0], y), 0.1, 1, compile=True)
    assert maml._compiled_batched is None and maml._compiled_gradient is None


def test_the_default_path_search_times_a_recurrent_model_without_falling_back():
    torch.manual_seed(0)
    model = nn.LSTM(2, 3, batch_first=True)
    batch = TaskBatch(torch.randn(4, 3, 5, 2), torch.randn(4, 3, 5, 3),
                      torch.randn(4, 3, 5, 2), torch.randn(4, 3, 5, 3))
    maml = MAML(model, lambda out, y: F.mse_loss(out[0], y), 0.1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "vmap could not run this model"
        maml.meta_backward(batch)
    assert len(maml.path_choices) == 1  # timed, the batched path among the candidates


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_sequence_net_reads_batch_first_sequences_of_any_recurrent_layer():
    with pytest.raises(ConfigError, match="batch_first=True"):
        SequenceNet(nn.GRU(2, 3), outputs=1)
    net = SequenceNet(nn.LSTM(2, 4, proj_size=3, bidirectional=True, batch_first=True), outputs=2)
    x = torch.randn(5, 7, 2)
    final_h = net.recurrent(x)[1][0]  # (layers x directions, batch, 3): both read all 7 steps
    torch.testing.assert_close(net(x), net.head(torch.cat([final_h[0], final_h[1]], -1)))
