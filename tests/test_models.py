"""The paper's networks and the official code's initialisation of them."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastmaml.config import ConfigError
from fastmaml.experiments import preset_config
from fastmaml.experiments.fewshot import FewShotExperiment
from fastmaml.experiments.sinusoid import SinusoidExperiment
from fastmaml.models import MLP, ConvNet, initialise


def test_the_official_initialisation_is_cbfinn_mamls() -> None:
    torch.manual_seed(0)
    omniglot = initialise(ConvNet(1, 20, 64, strided=True), "official")
    miniimagenet = initialise(ConvNet(3, 5, 32, strided=False, image_size=84), "official")
    mlp = initialise(MLP([784, 256, 128, 64, 64, 5], batch_norm=True, flatten=True), "official")
    convs = [m for net in (omniglot, miniimagenet) for m in net.modules()
             if isinstance(m, nn.Conv2d)]
    for conv in convs:  # Xavier-uniform: U(+-sqrt(6 / (fan_in + fan_out))), fans over 3x3
        out_channels, in_channels, k, _ = conv.weight.shape
        bound = math.sqrt(6 / (k * k * (in_channels + out_channels)))
        assert conv.weight.abs().max() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    # Omniglot's output layer after the global average pool: a standard normal
    assert omniglot.head.weight.std().item() == pytest.approx(1.0, rel=0.15)
    fan_in, fan_out = miniimagenet.head.in_features, miniimagenet.head.out_features
    assert miniimagenet.head.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    for linear in linears:  # a normal of std 0.01 truncated at two stds
        assert linear.weight.abs().max() <= 0.02
        assert linear.weight.std().item() == pytest.approx(0.0088, rel=0.1)
    for layer in [*convs, *linears, omniglot.head, miniimagenet.head]:
        assert not layer.bias.any()


def test_the_default_leaves_torchs_initialisation_and_other_models_are_refused() -> None:
    torch.manual_seed(0)
    net = MLP([1, 40, 40, 1])
    before = [p.clone() for p in net.parameters()]
    assert initialise(net, "default") is net
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ConfigError, match="official: of an MLP or a ConvNet.*for a Linear"):
        initialise(nn.Linear(2, 2), "official")


@pytest.mark.parametrize("experiment, preset", [(SinusoidExperiment, "sinusoid"),
                                                (FewShotExperiment, "omniglot-5w1s")])
def test_a_runs_init_setting_initialises_its_network(tmp_path, experiment, preset) -> None:
    def layers(init: str) -> list[nn.Module]:
        model = experiment(preset_config(preset, [f"init={init}"]), tmp_path).build_maml().model
        return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    official, default = layers("official"), layers("default")
    assert official and not any(layer.bias.any() for layer in official)
    assert all(layer.bias.any() for layer in default)  # torch's own: biases drawn too
    assert all(torch.equal(a.weight, b.weight)  # seeded
               for a, b in zip(official, layers("official")))
