"""Small meta-learning problems (models and task batches) and gradient helpers that the engine's
tests share (``test_core.py``, ``test_paths.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from fastmaml import MAML, TaskBatch
from fastmaml.core import multi_step_loss_weights
from fastmaml.models import ConvNet, MLP, SequenceNet

TASKS = 3


def mlp_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = MLP([1, 8, 8, 1])
    batch = TaskBatch(torch.randn(TASKS, 5, 1), torch.randn(TASKS, 5, 1),
                      torch.randn(TASKS, 6, 1), torch.randn(TASKS, 6, 1))
    return model, F.mse_loss, batch


def weight_norm_problem(seed: int = 0):
    """An MLP with weight norm per output row and over a whole weight: torch's kernel of it has
    a wrong double backward (``fastmaml.norms``)."""
    torch.manual_seed(seed)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(1, 8)), nn.Tanh(),
                          parametrizations.weight_norm(nn.Linear(8, 1), dim=None))
    return model, F.mse_loss, mlp_problem(seed)[2]


class Prototypes(nn.Module):
    """Classes scored by an embedding's distances to learned prototypes, as metric learners do:
    torch's ``cdist`` has no double backward for p other than 2, nor for sets of at most 25 rows
    (``fastmaml.twice``); a hard sigmoid (MobileNetV3's) neither."""

    def __init__(self):
        super().__init__()
        self.embed, self.prototypes = nn.Linear(1, 6), nn.Parameter(torch.randn(3, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedded = F.hardsigmoid(self.embed(x))
        return -torch.cdist(embedded, self.prototypes) - torch.cdist(embedded, self.prototypes, 1.5)


def prototypes_problem(seed: int = 0):
    torch.manual_seed(seed)
    batch = TaskBatch(torch.randn(TASKS, 6, 1), torch.randint(0, 3, (TASKS, 6)),
                      torch.randn(TASKS, 6, 1), torch.randint(0, 3, (TASKS, 6)))
    return Prototypes(), F.cross_entropy, batch


def conv_problem(seed: int = 0):
    """A small paper-style conv net with batch norm (offset only), 3-way tasks on 8x8 images."""
    torch.manual_seed(seed)
    model = ConvNet(1, 3, hidden=4, strided=True, image_size=8, blocks=2)
    batch = TaskBatch(torch.randn(TASKS, 6, 1, 8, 8), torch.randint(0, 3, (TASKS, 6)),
                      torch.randn(TASKS, 6, 1, 8, 8), torch.randint(0, 3, (TASKS, 6)))
    return model, F.cross_entropy, batch


def recurrent_problem(layer: type[nn.RNNBase], **options):
    """Regression on sequences (4 support and 5 query sequences of 5 steps per task)."""
    def problem(seed: int = 0):
        torch.manual_seed(seed)
        model = SequenceNet(layer(2, 5, batch_first=True, **options), outputs=1)
        batch = TaskBatch(torch.randn(TASKS, 4, 5, 2), torch.randn(TASKS, 4, 1),
                          torch.randn(TASKS, 5, 5, 2), torch.randn(TASKS, 5, 1))
        return model, F.mse_loss, batch
    return problem


class SelfAttention(nn.Module):
    """Attention written as users do, with ``F.scaled_dot_product_attention``, then a head."""

    def __init__(self, features: int, steps: int):
        super().__init__()
        self.qkv, self.head = nn.Linear(features, 3 * features), nn.Linear(features * steps, 1)

    def forward(self, x):
        return self.head(F.scaled_dot_product_attention(*self.qkv(x).chunk(3, -1)).flatten(1))


def attention_problem(encoder_layer: bool):
    """Regression on 5-step sequences of 4 features: torch's transformer encoder layer
    (attention, layer norm, feed-forward) or ``SelfAttention``."""
    def problem(seed: int = 0):
        torch.manual_seed(seed)
        model = (nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True),
                               nn.Flatten(), nn.Linear(20, 1)) if encoder_layer
                 else SelfAttention(4, 5))
        batch = TaskBatch(torch.randn(TASKS, 4, 5, 4), torch.randn(TASKS, 4, 1),
                          torch.randn(TASKS, 5, 5, 4), torch.randn(TASKS, 5, 1))
        return model, F.mse_loss, batch
    return problem


class EvalAttention(nn.Module):
    """Self-attention by nn.MultiheadAttention, then a classifier; put in eval() (no dropout),
    as a user does, its attention takes torch's native fast path unless told otherwise."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(3, 4), nn.Linear(4, 3)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        z = self.embed(x)
        return self.head(self.attention(z, z, z, need_weights=False)[0].mean(1))


def attention_batch() -> TaskBatch:
    """Two 3-way tasks of 5-step sequences of 3 features, for ``EvalAttention``."""
    generator = torch.Generator().manual_seed(0)
    return TaskBatch(torch.randn(2, 3, 5, 3, generator=generator), torch.tensor([[0, 1, 2]] * 2),
                     torch.randn(2, 4, 5, 3, generator=generator),
                     torch.tensor([[0, 1, 2, 0]] * 2))


class BagRegression(nn.Module):
    """Token bags (padding 0 left out of each bag's mean) -> a value, as text models do."""

    def __init__(self):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(10, 6, mode="mean", padding_idx=0), nn.Linear(6, 1)

    def forward(self, tokens):
        return self.head(torch.tanh(self.bag(tokens)))


def bag_problem(seed: int = 0):
    """Regression on bags of 4 tokens: torch's embedding bag has no second derivative, the
    lookup and reduction that runs instead (``fastmaml.embeddings``) has."""
    torch.manual_seed(seed)
    batch = TaskBatch(torch.randint(0, 10, (TASKS, 5, 4)), torch.randn(TASKS, 5, 1),
                      torch.randint(0, 10, (TASKS, 6, 4)), torch.randn(TASKS, 6, 1))
    return BagRegression(), F.mse_loss, batch


PROBLEMS = {"mlp": mlp_problem, "conv_bn": conv_problem}
# torch's recurrent kernels cannot run under vmap (fastmaml.recurrent steps them in plain ops);
# its fused attention kernels neither, and their backward has no derivative (second order)
MORE_MODELS = {**PROBLEMS, "lstm": recurrent_problem(nn.LSTM, num_layers=2),
               "gru": recurrent_problem(nn.GRU, bidirectional=True),
               "transformer": attention_problem(encoder_layer=True),
               "attention": attention_problem(encoder_layer=False), "embedding_bag": bag_problem,
               "weight_norm": weight_norm_problem, "prototypes": prototypes_problem}


def meta_grad(maml: MAML, batch: TaskBatch, **kwargs) -> torch.Tensor:
    loss, _ = maml.meta_loss(batch, **kwargs)
    params = [p for p in maml.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params)])


def flat_grads(maml: MAML) -> torch.Tensor:
    """The .grad of every trainable parameter, flattened (zeros where there is none)."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                      for p in maml.parameters() if p.requires_grad])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


HEADS = {"mlp": ["4"], "conv_bn": ["head"], "lstm": ["head"], "gru": ["head"],  # ANIL: the last
         "transformer": ["2"], "attention": ["head"], "embedding_bag": ["head"],  # layer
         "weight_norm": ["2"], "prototypes": ["prototypes"]}
VARIANTS = {"plain": {}, "first_order": {"first_order": True}, "anil": {"adapt": "head"},
            "anil_first_order": {"adapt": "head", "first_order": True},
            "no_inner_steps": {"inner_steps": 0}, "multi_step_loss": {}}


def with_lr_modes(modes: list[str]) -> list[tuple[str, str]]:
    """(variant, lr_mode) pairs: a learned lr_mode needs inner steps (refused without)."""
    return [(variant, mode) for variant in VARIANTS for mode in modes
            if not (variant == "no_inner_steps" and mode != "fixed")]


def variant_kwargs(problem: str, variant: str) -> dict:
    kwargs = {"inner_lr": 0.1, "inner_steps": 3, **VARIANTS[variant]}
    if kwargs.get("adapt") == "head":
        kwargs["adapt"] = HEADS[problem]
    return kwargs


def variant_weights(variant: str) -> torch.Tensor | None:
    return multi_step_loss_weights(3, 0.3) if variant == "multi_step_loss" else None
