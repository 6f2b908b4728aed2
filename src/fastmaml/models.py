"""The paper's networks, as ordinary ``nn.Module`` s (the engine needs nothing special from them)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError


class MLP(nn.Sequential):
    """Fully connected ReLU network, e.g. ``MLP([1, 40, 40, 1])`` for the sinusoid experiment.

    ``flatten`` first flattens each example (images into vectors, for the paper's MLP variant).
    ``norm_scale`` learns batch norm's scale too (MAML++), which the paper fixes at 1.
    """

    def __init__(self, sizes: Sequence[int], batch_norm: bool = False, flatten: bool = False,
                 norm_scale: bool = False):
        layers: list[nn.Module] = [nn.Flatten()] if flatten else []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(sizes) - 2:
                if batch_norm:
                    layers.append(_paper_batch_norm(nn.BatchNorm1d(fan_out), norm_scale))
                layers.append(nn.ReLU())
        super().__init__(*layers)


def _paper_batch_norm(norm: nn.modules.batchnorm._BatchNorm, learn_scale: bool) -> nn.Module:
    """Batch norm as the official code: offset (bias) learned, scale fixed at 1 (unless
    ``learn_scale``)."""
    norm.weight.requires_grad_(learn_scale)
    return norm


class ConvBlock(nn.Sequential):
    """conv 3x3 -> batch norm -> ReLU [-> 2x2 max-pool]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, max_pool: bool,
                 norm_scale: bool = False):
        layers = [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
                  _paper_batch_norm(nn.BatchNorm2d(out_channels), norm_scale), nn.ReLU()]
        if max_pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class ConvNet(nn.Module):
    """The paper's 4-block conv net.

    Omniglot: ``ConvNet(1, n_way, 64, strided=True)`` (stride-2 convs, global average pool).
    MiniImagenet: ``ConvNet(3, n_way, 32, strided=False)`` (2x2 max-pools, flatten to 800).
    ``norm_scale`` learns batch norm's scale too (MAML++), which the paper fixes at 1.
    """

    def __init__(self, in_channels: int, n_way: int, hidden: int = 64, strided: bool = True,
                 image_size: int = 28, blocks: int = 4, norm_scale: bool = False):
        super().__init__()
        channels = [in_channels] + [hidden] * blocks
        self.features = nn.Sequential(*(
            ConvBlock(c_in, c_out, stride=2 if strided else 1, max_pool=not strided,
                      norm_scale=norm_scale)
            for c_in, c_out in zip(channels[:-1], channels[1:])))
        self.strided = strided
        side = image_size
        for _ in range(blocks):
            side = (side + 1) // 2 if strided else side // 2
        self.head = nn.Linear(hidden if strided else hidden * side * side, n_way)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        h = h.mean(dim=(2, 3)) if self.strided else h.flatten(1)
        return self.head(h)


class SequenceNet(nn.Module):
    """A recurrent layer over (batch, time, features) sequences, then a linear head on what it
    read of the whole sequence (the last step's output; of a bidirectional layer, the forward
    direction's last and the backward direction's first):
    ``SequenceNet(nn.LSTM(1, 40, batch_first=True), outputs=1)``. torch's ``nn.LSTM``,
    ``nn.GRU`` and ``nn.RNN`` run batched over tasks (``fastmaml.recurrent``)."""

    def __init__(self, recurrent: nn.RNNBase, outputs: int):
        super().__init__()
        if not recurrent.batch_first:
            raise ConfigError("SequenceNet reads (batch, time, features): build its recurrent "
                              "layer with batch_first=True")
        self.recurrent = recurrent
        width = (recurrent.proj_size or recurrent.hidden_size) * (1 + recurrent.bidirectional)
        self.head = nn.Linear(width, outputs)

    def forward(self, x: Tensor) -> Tensor:
        out = self.recurrent(x)[0]
        if self.recurrent.bidirectional:
            forward, backward = out.chunk(2, -1)
            return self.head(torch.cat([forward[:, -1], backward[:, 0]], -1))
        return self.head(out[:, -1])


INITS = ("default", "official")


def initialise(model: nn.Module, init: str) -> nn.Module:
    """``model`` (an ``MLP`` or a ``ConvNet``) initialised as ``init`` says, in place:
    ``default`` leaves torch's own initialisation; ``official`` is the paper's code's
    (cbfinn/maml): zero biases, fully connected weights from a normal of std 0.01 truncated at
    two stds, conv weights Xavier-uniform, and a conv net's output layer standard normal after a
    global average pool (Omniglot) or Xavier-uniform after a flatten (MiniImagenet)."""
    if init == "default":
        return model
    if init != "official" or not isinstance(model, (MLP, ConvNet)):
        raise ConfigError(f"init must be one of {', '.join(INITS)} (official: of an MLP or a "
                          f"ConvNet), got {init!r} for a {type(model).__name__}")
    head = getattr(model, "head", None)  # a ConvNet's output layer
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            if module is head and model.strided:
                nn.init.normal_(module.weight)
            elif isinstance(module, nn.Conv2d) or module is head:
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.trunc_normal_(module.weight, std=0.01, a=-0.02, b=0.02)
            nn.init.zeros_(module.bias)
    return model


def is_norm_param(name: str, model: nn.Module) -> bool:
    """True for parameters owned by a normalisation layer (not adapted in the paper's inner loop)."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(owner, (nn.modules.batchnorm._BatchNorm,
                              nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm,
                              nn.RMSNorm))
