from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fastmaml import ConfigError, DataError, as_task_batch
from fastmaml.tasks.fewshot import FewShotSampler

CLASSES, PER_CLASS = 12, 9


def marked_images(classes: int = CLASSES, per_class: int = PER_CLASS) -> Tensor:
    """uint8 (classes, per_class, 1, 4, 4): pixel (0, 0) is class + 1, pixel (0, 1) instance + 1."""
    images = torch.zeros(classes, per_class, 1, 4, 4, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(1, classes + 1)[:, None]
    images[:, :, 0, 0, 1] = torch.arange(1, per_class + 1)
    return images


def decode(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(class, instance, quarter turns) of every (..., 1, 4, 4) image made by ``marked_images``."""
    pixels = (x * 255).round().long()
    found = [(torch.rot90(pixels, -k, dims=(-2, -1))[..., 0, :2], k) for k in range(4)]
    turns = sum(k * (p > 0).all(-1).long() for p, k in found)
    canonical = torch.stack([p for p, _ in found], dim=-2).max(dim=-2).values
    return canonical[..., 0] - 1, canonical[..., 1] - 1, turns


def test_shapes_dtypes_and_labels() -> None:
    sampler = FewShotSampler(marked_images(), n_way=5, k_shot=2, k_query=3)
    batch = sampler.sample(7, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (7, 10, 1, 4, 4) and batch.query_x.shape == (7, 15, 1, 4, 4)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.long
    assert batch.support_y.shape == (7, 10) and batch.query_y.shape == (7, 15)
    assert torch.equal(batch.support_y[0], torch.arange(5).repeat_interleave(2))
    assert torch.equal(batch.query_y[0], torch.arange(5).repeat_interleave(3))
    assert as_task_batch(batch).num_tasks == 7
    assert batch.support_x.min() >= 0.0 and batch.support_x.max() <= 1.0


def test_classes_distinct_labels_consistent_instances_disjoint() -> None:
    sampler = FewShotSampler(marked_images(), n_way=5, k_shot=2, k_query=3)
    batch = sampler.sample(50, torch.Generator().manual_seed(1))
    s_cls, s_inst, _ = decode(batch.support_x[:, :, 0])
    q_cls, q_inst, _ = decode(batch.query_x[:, :, 0])
    s_cls, q_cls = s_cls.view(50, 5, 2), q_cls.view(50, 5, 3)
    assert (s_cls == s_cls[:, :, :1]).all() and (q_cls == s_cls[:, :, :1]).all()  # label <-> class
    per_task = s_cls[:, :, 0]
    assert all(len(set(task.tolist())) == 5 for task in per_task)  # distinct classes per task
    instances = torch.cat([s_inst.view(50, 5, 2), q_inst.view(50, 5, 3)], dim=2)
    assert all(len(set(c.tolist())) == 5 for c in instances.view(-1, 5))  # no image twice
    # the label of a class is random: class 0 shows up under several labels
    assert len(set((per_task == 0).nonzero()[:, 1].tolist())) > 1


def test_rotation_one_per_class_and_all_four_used() -> None:
    sampler = FewShotSampler(marked_images(), n_way=5, k_shot=1, k_query=2, rotate=True)
    batch = sampler.sample(40, torch.Generator().manual_seed(2))
    cls, _, turns = decode(torch.cat([batch.support_x, batch.query_x], 1)[:, :, 0])
    labels = torch.cat([batch.support_y, batch.query_y], 1)
    for t in range(40):
        for label in range(5):
            assert len(set(turns[t][labels[t] == label].tolist())) == 1
        assert len(set(cls[t].tolist())) == 5  # distinct characters: never two rotations of one
    assert set(turns.unique().tolist()) == {0, 1, 2, 3}


def test_no_rotation_by_default() -> None:
    batch = FewShotSampler(marked_images(), 4, 1, 1).sample(30, torch.Generator().manual_seed(3))
    assert (decode(batch.support_x[:, :, 0])[2] == 0).all()


def test_determinism_under_a_seed() -> None:
    sampler = FewShotSampler(marked_images(), 5, 1, 2, rotate=True)
    a = sampler.sample(8, torch.Generator().manual_seed(5))
    b = sampler.sample(8, torch.Generator().manual_seed(5))
    c = sampler.sample(8, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.support_x, c.support_x)


def test_fixed_tasks_reproducible_and_independent_of_chunking() -> None:
    sampler = FewShotSampler(marked_images(), 5, 1, 2, rotate=True)
    whole = list(sampler.fixed_tasks(23, seed=7))
    chunks = list(sampler.fixed_tasks(23, seed=7, chunk=5))
    assert len(whole) == 1 and [c.num_tasks for c in chunks] == [5, 5, 5, 5, 3]
    for field in range(4):
        assert torch.equal(whole[0][field], torch.cat([c[field] for c in chunks]))
    other = next(sampler.fixed_tasks(23, seed=8))
    assert not torch.equal(whole[0].support_x, other.support_x)


def test_float_images_are_not_rescaled() -> None:
    images = torch.rand(6, 4, 3, 5, 5)
    batch = FewShotSampler(images, 3, 1, 1, device="cpu").sample(2)
    assert batch.support_x.dtype == torch.float32
    assert any(torch.equal(batch.support_x[0, 0], img) for img in images.view(-1, 3, 5, 5))


@pytest.mark.parametrize("kwargs, error, words", [
    ({"n_way": 13}, DataError, ["n_way=13", "only 12"]),
    ({"k_shot": 5, "k_query": 5}, DataError, ["10", "only 9"]),
    ({"n_way": 0}, ConfigError, ["n_way", "0"]),
    ({"k_query": 0}, ConfigError, ["k_query"]),
    ({"k_shot": 1.5}, ConfigError, ["k_shot"]),
])
def test_errors_name_the_numbers(kwargs: dict, error: type, words: list[str]) -> None:
    args = {"n_way": 5, "k_shot": 1, "k_query": 1, **kwargs}
    with pytest.raises(error) as info:
        FewShotSampler(marked_images(), **args)
    assert all(word in str(info.value) for word in words)


def test_bad_images_and_batch_sizes() -> None:
    with pytest.raises(DataError, match="classes, per_class"):
        FewShotSampler(torch.zeros(5, 4, 4, 4), 2, 1, 1)
    with pytest.raises(ConfigError, match="square"):
        FewShotSampler(torch.zeros(5, 4, 1, 4, 6), 2, 1, 1, rotate=True)
    sampler = FewShotSampler(marked_images(), 2, 1, 1)
    with pytest.raises(ConfigError, match="meta_batch"):
        sampler.sample(0)
    with pytest.raises(ConfigError, match="chunk"):
        sampler.fixed_tasks(10, seed=0, chunk=0)


def test_classes_of_different_sizes_draw_only_their_own_images() -> None:
    full = marked_images()
    sizes = [3, 9, 4, 6, 3, 5, 7, 3, 8, 4, 3, 9]
    ragged = [full[c, :n] for c, n in enumerate(sizes)]
    sampler = FewShotSampler(ragged, n_way=5, k_shot=1, k_query=2)
    batch = sampler.sample(200, torch.Generator().manual_seed(4))
    cls, inst, _ = decode(torch.cat([batch.support_x, batch.query_x], 1)[:, :, 0])
    assert (inst < torch.tensor(sizes)[cls]).all()  # never an image past its class's count
    for c, n in enumerate(sizes):  # and every image of a class can be drawn
        assert set(inst[cls == c].tolist()) == set(range(n))
    with pytest.raises(DataError, match="a class has only 3"):
        FewShotSampler(ragged, n_way=5, k_shot=2, k_query=2)
    with pytest.raises(DataError, match="but class c00 has only 3"):  # the first one that short
        FewShotSampler(ragged, n_way=5, k_shot=2, k_query=2,
                       names=[f"c{c:02d}" for c in range(len(sizes))])


def test_equal_classes_as_a_list_or_a_tensor_give_the_same_tasks() -> None:
    images = marked_images()
    as_list = FewShotSampler(list(images), 4, 1, 2, rotate=True)
    as_tensor = FewShotSampler(images, 4, 1, 2, rotate=True)
    for a, b in zip(as_list.sample(10, torch.Generator().manual_seed(5)),
                    as_tensor.sample(10, torch.Generator().manual_seed(5))):
        assert torch.equal(a, b)


def test_classes_split_from_one_tensor_are_sampled_from_it_without_a_copy() -> None:
    """A loader's classes of different sizes, views of one decoded array (``torch.split``), are
    read in place (MiniImagenet's train split is 800 MB); other views are copied together."""
    sizes = [3, 9, 4, 6, 3, 5]
    flat = marked_images().flatten(0, 1)[:sum(sizes)]
    split = FewShotSampler(list(flat.split(sizes)), n_way=3, k_shot=1, k_query=2)
    assert split.images.data_ptr() == flat.data_ptr()
    copied = FewShotSampler([part.clone() for part in flat.split(sizes)], 3, 1, 2)
    assert copied.images.data_ptr() != flat.data_ptr() and torch.equal(copied.images, flat)
    for a, b in zip(split.sample(10, torch.Generator().manual_seed(6)),
                    copied.sample(10, torch.Generator().manual_seed(6))):
        assert torch.equal(a, b)
    gaps = FewShotSampler([flat[:3], flat[4:9]], 2, 1, 2)  # views, but not consecutive
    assert torch.equal(gaps.images, torch.cat([flat[:3], flat[4:9]]))


def test_within_group_tasks_take_every_class_from_one_group() -> None:
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])  # group 0 is too small for 4-way
    sampler = FewShotSampler(marked_images(), 4, 1, 1, groups=groups, within_group=True)
    batch = sampler.sample(100, torch.Generator().manual_seed(6))
    cls, _, _ = decode(batch.support_x[:, :, 0])
    task_groups = groups[cls]
    assert (task_groups == task_groups[:, :1]).all()
    assert set(task_groups[:, 0].tolist()) == {1, 2}  # both large groups are used
    with pytest.raises(DataError, match="largest group here has 5"):
        FewShotSampler(marked_images(), 6, 1, 1, groups=groups, within_group=True)
    with pytest.raises(ConfigError, match="one group per class"):
        FewShotSampler(marked_images(), 2, 1, 1, within_group=True)
