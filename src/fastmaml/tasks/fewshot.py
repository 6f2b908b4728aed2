"""N-way K-shot classification tasks drawn from in-memory images, fully vectorised."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..inputs import TaskBatch
from ..errors import ConfigError, DataError


class _Draws(NamedTuple):
    """The random choices behind a batch of tasks (on the CPU, so they do not depend on device)."""

    classes: Tensor  # (tasks, n_way): class indices, distinct within a task
    shots: Tensor  # (tasks, n_way, k_shot + k_query): image indices, distinct within a class
    rotations: Tensor  # (tasks, n_way): quarter turns, 0..3

    def chunk(self, start: int, stop: int) -> _Draws:
        return _Draws(*(t[start:stop] for t in self))


class FewShotSampler:
    """Samples N-way K-shot tasks from ``images``: a tensor of (classes, per_class, C, H, W), or
    a sequence of per-class tensors of (count, C, H, W) whose counts may differ.

    Each task takes ``n_way`` distinct classes in random order; the i-th class drawn gets label
    i, so the class-to-label assignment is a uniformly random permutation in every task. Each
    class contributes ``k_shot`` support and ``k_query`` query images, distinct from each other.
    With ``rotate`` every class of a task is turned by its own random multiple of 90 degrees
    (the Omniglot protocol); since the classes of a task are distinct characters, two rotations
    of one character never share a task. uint8 images are scaled to [0, 1] float32 (pixels /
    255); floating images are returned as they are. Examples are ordered class by class:
    ``support_y`` of a 3-way 2-shot task is ``[0, 0, 1, 1, 2, 2]``.

    ``groups`` gives each class a group (an Omniglot alphabet); with ``within_group`` all the
    classes of a task come from one group, chosen uniformly among the groups that have at least
    ``n_way`` classes (harder tasks: similar classes). ``names`` (of the classes) name a class
    too short for a task, and ``query_name`` the setting that gave ``k_query``.
    """

    def __init__(self, images: Tensor | Sequence[Tensor], n_way: int, k_shot: int, k_query: int,
                 rotate: bool = False, device: torch.device | str | None = None,
                 groups: Tensor | None = None, within_group: bool = False,
                 names: Sequence[str] | None = None, query_name: str = "k_query"):
        for name, value in (("n_way", n_way), ("k_shot", k_shot), ("k_query", k_query)):
            _check_positive(name, value)
        flat, counts = _class_by_class(images)
        num_classes = len(counts)
        height, width = flat.shape[-2:]
        if n_way > num_classes:
            raise DataError(f"n_way={n_way} needs at least {n_way} classes, but this split has "
                            f"only {num_classes}")
        if k_shot + k_query > int(counts.min()):
            short = int(counts.argmin())
            raise DataError(f"k_shot + {query_name} = {k_shot} + {k_query} = {k_shot + k_query} "
                            "images per class needed, but "
                            + (f"class {names[short]}" if names else "a class")
                            + f" has only {int(counts.min())}")
        if rotate and height != width:
            raise ConfigError(f"rotate needs square images, got {height}x{width}")
        self.eligible_groups = None
        if within_group:
            if groups is None or groups.shape != (num_classes,):
                raise ConfigError(f"within_group needs one group per class ({num_classes})")
            names, sizes = groups.unique(return_counts=True)
            self.eligible_groups = names[sizes >= n_way]
            if not len(self.eligible_groups):
                raise DataError(f"within-group tasks need a group of at least n_way={n_way} "
                                f"classes, but the largest group here has {int(sizes.max())}")
        self.groups = groups
        self.images = flat.to(device) if device is not None else flat
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts
        self.n_way, self.k_shot, self.k_query, self.rotate = n_way, k_shot, k_query, rotate

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def sample(self, meta_batch: int, generator: torch.Generator | None = None) -> TaskBatch:
        """``meta_batch`` random tasks, drawn with the (CPU) ``generator``."""
        _check_positive("meta_batch", meta_batch)
        return self._gather(self._draw(meta_batch, generator))

    def fixed_tasks(self, num_tasks: int, seed: int,
                    chunk: int | None = None) -> Iterator[TaskBatch]:
        """The same ``num_tasks`` tasks for a given ``seed``, in batches of at most ``chunk``.

        All random choices are made up front, so the tasks do not depend on ``chunk``; the
        images of a chunk are only gathered when it is reached, which bounds memory.
        """
        _check_positive("num_tasks", num_tasks)
        size = num_tasks if chunk is None else chunk
        _check_positive("chunk", size)
        draws = self._draw(num_tasks, torch.Generator().manual_seed(seed))
        return (self._gather(draws.chunk(start, start + size))
                for start in range(0, num_tasks, size))

    def _draw(self, num_tasks: int, generator: torch.Generator | None) -> _Draws:
        """Classes and instances for all tasks at once: the top-k of random keys, i.e. the first
        k of a random permutation (a partial argsort, O(n) instead of O(n log n))."""
        shots = self.k_shot + self.k_query
        class_keys = torch.rand(num_tasks, self.num_classes, generator=generator)
        shot_keys = torch.rand(num_tasks, self.n_way, int(self.counts.max()), generator=generator)
        rotations = (torch.randint(4, (num_tasks, self.n_way), generator=generator)
                     if self.rotate else torch.zeros(num_tasks, self.n_way, dtype=torch.long))
        if self.eligible_groups is not None:
            chosen = self.eligible_groups[torch.randint(len(self.eligible_groups), (num_tasks,),
                                                        generator=generator)]
            class_keys[self.groups[None, :] != chosen[:, None]] = -1.0  # keys are in [0, 1)
        classes = class_keys.topk(self.n_way, dim=1).indices
        # a class with fewer images than the largest never draws a missing one
        shot_keys[torch.arange(shot_keys.shape[2]) >= self.counts[classes][..., None]] = -1.0
        return _Draws(classes, shot_keys.topk(shots, dim=2).indices, rotations)

    def _gather(self, draws: _Draws) -> TaskBatch:
        device = self.images.device
        classes, shots, rotations = (t.to(device) for t in draws)
        index = self.starts.to(device)[classes][:, :, None] + shots
        x = self.images[index]  # (tasks, n_way, k_shot + k_query, C, H, W)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x
        for turns in (1, 2, 3):
            mask = rotations == turns
            x[mask] = torch.rot90(x[mask], turns, dims=(-2, -1))
        tasks, n, _, *image = x.shape
        labels = torch.arange(n, device=device).expand(tasks, n)[:, :, None]
        support, query = x.split([self.k_shot, self.k_query], dim=2)
        return TaskBatch(support.reshape(tasks, n * self.k_shot, *image),
                         labels.expand(-1, -1, self.k_shot).reshape(tasks, -1),
                         query.reshape(tasks, n * self.k_query, *image),
                         labels.expand(-1, -1, self.k_query).reshape(tasks, -1))


def _class_by_class(images: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(every image, class by class: (total, C, H, W); images per class) of either form."""
    if isinstance(images, Tensor):
        if images.dim() != 5:
            raise DataError("images must be (classes, per_class, channels, height, width), got "
                            f"shape {tuple(images.shape)}")
        return images.flatten(0, 1), torch.full((images.shape[0],), images.shape[1])
    if not images or any(c.dim() != 4 or c.shape[1:] != images[0].shape[1:] for c in images):
        raise DataError("images must be a non-empty sequence of per-class tensors of (count, "
                        "channels, height, width) with one image shape")
    joined = _joined_views(images)
    return (torch.cat(list(images)) if joined is None else joined,
            torch.tensor([len(c) for c in images]))


def _joined_views(classes: Sequence[Tensor]) -> Tensor | None:
    """The one tensor that ``classes`` are consecutive contiguous views of, as ``torch.split``
    makes them (a loader's split of one decoded array), without a copy; None where they are
    not (``torch.cat`` copies them)."""
    first = classes[0]
    offset = first.storage_offset()
    for part in classes:
        if (not part.is_contiguous() or part.storage_offset() != offset
                or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        offset += part.numel()
    return first.as_strided((sum(len(c) for c in classes), *first.shape[1:]), first.stride())


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
