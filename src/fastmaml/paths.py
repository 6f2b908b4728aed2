"""How ``MAML`` runs a meta-batch: batched (``vmap`` over tasks, in chunks), looped (the
reference), or batched and compiled; by default the fastest of them for each input shape, chosen
by timing each once (``MAML(batched=None)``), and together with the other ranks under
``torch.distributed``. Every path computes the same meta-gradient; a compiled one is checked
against the eager one, and a path that cannot run (vmap, compiling) falls back with a warning.

``ExecutionPaths`` is a part of ``MAML`` (``fastmaml.core``), where the task function it runs
(``_task``, by ``_batched`` or ``_run_looped``) and the algorithm are.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import sysconfig
import time
import traceback
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from .aliases import with_aliases
from .errors import (ConfigError, FastMAMLError, PathWarning, ShapeError, first_line,
                     is_out_of_memory, warn)
from .inputs import Params, TaskBatch, has_active_dropout, listed

# a searched input shape: its (tasks, elements per task), the role chosen for it (e.g. "one
# task") and the fastest role without compiling
SearchedShape = tuple[tuple[int, int], str, str]
# execution paths chosen by timing in this process: model, settings and shapes -> (path, chunk)
_PATHS_CHOSEN: dict[str, tuple[str, int | None]] = {}
# (compiled function, learners alike) -> the copy of the function whose code holds their graphs
_CODE_COPIES: dict[tuple[str, str], types.FunctionType] = {}
# raised whenever a candidate path's implementation changes, so that choices timed on the old
# one (a checkpoint keeps them) are timed again; the torch version is in the key for the same reason
# 3: first order detaches the outer-only parameters; norms.py. 4: recurrent layers and attention
# run batched (a recurrent model's saved choice was the looped fallback). 5: norms and embeddings
# found by the first call's forward (``_probe``): exact batch norm in training mode, padded lookups.
# 6: batch norm by torch's kernel (under vmap its weight and bias applied after it), not layer norm.
# 7: a metric is taken of the query loss's own forward pass, not a second one
PATHS_REVISION = 7
CPU_CHUNK_ELEMENTS = 2**18  # input elements per vmap chunk on CPU (see ``MAML(chunk_size=...)``)
# the relative difference from the eager meta-gradient beyond which a compiled one counts as off
COMPILED_TOLERANCE = 1e-3
# calls of an input shape, in a row, whose compiled meta-gradient must differ beyond the tolerance
# before compiling stops. Inductor's float32 sums round more than eager's, and near a minimum,
# where the mean gradient is small beside the terms it sums, some batches take that past the
# tolerance: the trained Omniglot 5w5s net's compiled meta-gradient was over 1e-3 off at 6 of 48
# batches on CPU (up to 2e-2; eager float32 within 3e-5 of float64 at all, and the graph exact
# in float64; docs/results.md, session 26). The trade-off: a graph wrong at every batch still
# stops compiling (after five calls, each given the eager gradient), but one wrong at only some
# batches is now caught only where five of them come in a row.
COMPILED_CHECKS = 5
# new input shapes a learner times its paths for, per setting (dtype, device, order, ...); a
# later new shape within a factor of ``NEAR_SHAPE`` of a searched one (in tasks times elements
# per task) takes the path chosen for the nearest, uncompiled (compiling would build a graph
# per shape, at most 8 per function), and one farther off is searched. A meta-batch whose size
# varies (K drawn per batch) otherwise searched at every new shape: about 7 calls' work each.
SEARCHED_SHAPES = 4
ESCAPE_CHECKS = 3  # batched calls at which a learner looks for tensors its model keeps
NEAR_SHAPE = 2.0
# searched shapes of a learner's setting in this process: signature -> (tasks, elements per
# task), the role chosen and the fastest uncompiled role, so that a second run reuses them
_SHAPES_SEARCHED: dict[str, list[SearchedShape]] = {}


def random_state(device: torch.device) -> tuple[Tensor, ...]:
    """The default generators' states: the CPU's, and ``device``'s when it is a GPU."""
    cpu = torch.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(device)) if device.type == "cuda" else (cpu,)


def set_random_state(state: tuple[Tensor, ...], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def _code_for(function: Callable[..., Any], learner: str) -> Callable[..., Any]:
    """A copy of ``function`` whose code object the learners alike (``learner``, see
    ``_learner_key``) share. torch.compile keeps a function's graphs on its code object, at
    most ``torch._dynamo.config.recompile_limit`` (8) of them, and beyond runs it uncompiled:
    shared by every learner of a process, a sweep's ninth inner rate ran uncompiled (about 10
    times slower) while its path said compiled. Learners alike reuse their graphs, as before."""
    key = function.__qualname__, learner
    if key not in _CODE_COPIES:
        own = types.FunctionType(function.__code__.replace(), function.__globals__,
                                 function.__name__, function.__defaults__, function.__closure__)
        own.__kwdefaults__ = function.__kwdefaults__
        _CODE_COPIES[key] = own
    return _CODE_COPIES[key]


class _CompiledMethod:
    """A learner's ``method`` compiled at its first call (``function``: ``torch.compile`` of
    ``_code_for``'s copy for the learner's settings), called with the learner; a deepcopy of the
    learner calls it with the copy (a bound method went on computing with the original
    learner's learned rates). A pickled one (in ``torch.save`` of the learner) holds the
    method's name and compiles again (the code copy cannot be pickled)."""

    def __init__(self, method: Callable[..., Any], learner: Any,
                 function: Callable[..., Any] | None = None) -> None:
        self.method, self.learner, self.function = method, learner, function

    def __call__(self, *args: Any) -> Any:
        if self.function is None:
            self.function = torch.compile(_code_for(self.method, self.learner._learner_key()),
                                          dynamic=False)
        # the learner's attention mode (fastmaml.attention) around the call: compiled code
        # cannot turn MultiheadAttention's fast path off itself
        with self.learner._attention_mode():
            return self.function(self.learner, *args)

    def __deepcopy__(self, memo: dict[int, Any]) -> _CompiledMethod:
        return _CompiledMethod(self.method, copy.deepcopy(self.learner, memo), self.function)

    def __getstate__(self) -> dict[str, Any]:
        return {"method": self.method.__name__, "learner": self.learner}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # (the learner may be unpickled but not yet filled in)
        self.learner, self.function = state["learner"], None
        self.method = getattr(type(self.learner), state["method"])


def _full_name(thing: Any) -> str:
    """A function's module, qualified name and line (two lambdas of one scope differ by it), a
    partial's print (its function and arguments), or an object's class's full name."""
    if isinstance(thing, functools.partial):
        return repr(thing)
    named = thing if hasattr(thing, "__qualname__") else type(thing)
    code = getattr(thing, "__code__", None)
    return f"{named.__module__}.{named.__qualname__}" + (f":{code.co_firstlineno}" if code else "")


class ExecutionPaths:
    """The path machinery of ``MAML``: dispatch, the path search, compiling and its check. It
    runs ``MAML``'s own ``_batched`` (vmap) and ``_run_looped`` (a loop), its ``meta_backward``
    (timed by the search), ``_backward`` (meta_loss and autograd, the eager fallback) and, in a
    compiled graph, ``forward`` (through ``functional_call``); it reads ``MAML``'s
    ``_split_params``, ``named_parameters``, ``model``, ``_aliases``, ``batched``,
    ``first_order`` and ``inner_steps``."""

    def _init_paths(self, compile: bool, batched: bool | None, chunk_size: int | None,
                    checkpoint_steps: bool) -> None:
        """The paths' state, at ``MAML``'s construction (see its ``batched``, ``compile``,
        ``chunk_size`` and ``checkpoint_steps``)."""
        self.chunk_size = chunk_size
        self._compiled_batched, self._compiled_gradient = (
            _CompiledMethod(method, self) if compile else None
            for method in (type(self)._batched, type(self)._gradient))
        self.path: str | None = None  # "batched", "compiled" or "looped" once a call ran (+ chunk)
        # input shapes -> (path, chunk size) chosen by timing; saved with the training state
        self.path_choices: dict[str, tuple[str, int | None]] = {}
        self._trying: tuple[str, int | None] | None = None  # the candidate being timed
        self._vmap_failed = False
        self._predict_vmap_failed = False  # predict's rows with a context (``_dispatch``)
        self._compiled_checked: set[str] = set()  # input shapes of a checked compiled gradient
        self._compiled_misses: dict[str, list[float]] = {}  # per shape: its differences so far
        self._auto = batched is None and chunk_size is None and not checkpoint_steps
        # under torch.distributed: every rank's value of an object, in rank order
        # (``fastmaml.distributed.gather_ranks``), so that the ranks search paths together
        self.gather_ranks: Callable[[Any], list[Any]] | None = None
        # (first_order, inner_steps) pairs the ranks were asked in
        self._asked_settings: set[tuple[bool, int]] = set()
        self._escape_checks = ESCAPE_CHECKS  # batched calls left to look for escaped tensors
        # per setting (``_setting_key``): the shapes searched; saved with the training state
        self.searched_shapes: dict[str, list[SearchedShape]] = {}

    def _run(self, batch: TaskBatch, steps: int, create_graph: bool,
             record: Sequence[int]) -> tuple[Tensor, ...]:
        """The task function's outputs for every task of ``batch`` (support loss, query losses at
        the ``record`` steps, metrics; tasks first), by the path chosen for its shapes."""
        fast, frozen = self._split_params(detach=not torch.is_grad_enabled())
        args = (fast, frozen, steps, create_graph, record)
        chunk = self._chunk(batch)
        if torch.compiler.is_compiling():  # inside meta_backward's graph: one graph, not nested
            return self._batched(*args, chunk, *batch)
        choice = self._choice(batch)
        if choice is not None and not self._vmap_failed:
            path, chunk = choice
            if path == "looped":
                self.path = "looped"
                return self._run_looped(args, batch)
        compiled = self._compiled_batched is not None and (choice is None or choice[0] == "compiled")

        def batched() -> tuple[Tensor, ...]:
            if not compiled:
                return self._batched(*args, chunk, *batch)
            layout = _graph_layout(fast), _graph_layout(frozen)  # one graph call per chunk
            try:
                return _concatenated([self._compiled_batched(*layout, *args[2:], None, *part)
                                      for part in _chunks(batch, chunk)])
            except torch._dynamo.exc.TorchDynamoException as error:
                return self._uncompiled_from_now(error, lambda: self._batched(*args, chunk, *batch))
        out = self._dispatch(batched, lambda: self._run_looped(args, batch),
                             lambda: self._run_looped(args, TaskBatch(*(t[:1] for t in batch))))
        if self.path == "batched":  # as it ran (uncompiled if compiling just failed)
            if compiled and self._compiled_batched is not None:
                self.path = _label(choice or ("compiled", chunk))
            elif choice is not None:
                self.path = _label(("batched", chunk))
        return out

    def _choice(self, batch: TaskBatch) -> tuple[str, int | None] | None:
        """The path chosen for this batch's shapes (or being timed), if any."""
        return self._trying or (self.path_choices.get(self._path_key(batch)) if self._auto else None)

    def _compiles_gradient(self, batch: TaskBatch) -> bool:
        """Whether ``meta_backward`` runs as one compiled graph: where compiling is allowed and,
        with the path search, where it won; with ``batched=True``, always; otherwise once the
        first call ran batched."""
        if self._compiled_gradient is None or self._vmap_failed:
            return False
        choice = self._choice(batch)
        if choice is not None:
            return choice[0] == "compiled"
        return self.batched is True or self.path not in (None, "looped")

    def _dispatch(self, batched: Callable[[], Any], looped: Callable[[], Any],
                  looped_first: Callable[[], Any], prediction: bool = False) -> Any:
        """Run the batched (vmap) path, or the looped one when asked for or already fallen back
        to. A meta-batch records its path in ``self.path``; a ``prediction`` (``predict``'s rows,
        another function of the model) falls back on its own, and out of memory is no reason
        to (its rows are chunked). ``looped_first``, the looped path on the first task (or row)
        alone, tells where ``batched=True`` fails whether vmap or the input is at fault."""
        failed = "_predict_vmap_failed" if prediction else "_vmap_failed"
        if self.batched is False or getattr(self, failed):
            if not prediction:
                self.path = "looped"
            return looped()
        try:
            out = batched()
        except Exception as error:  # noqa: BLE001 - auto mode falls back to the loop below
            if self.batched or prediction and is_out_of_memory(error):
                if not is_out_of_memory(error) and (isinstance(error, ShapeError) or not
                                                    isinstance(error, FastMAMLError)):
                    looped_first()  # the input's fault: raised as the looped path raises it
                    reason = first_line(error.__cause__ or error)
                    raise ConfigError(f"vmap cannot run this model{users_line(error)} ({reason}) "
                                      "and batched=True forbids the looped path: use "
                                      "batched=None, which falls back to it") from error
                raise
            out = looped()  # a user error fails here too, and is raised
            setattr(self, failed, True)
            if not prediction:
                self.path = "looped"
            warn(f"vmap could not run this model{users_line(error)} ({first_line(error)}); "
                 "using the looped path", PathWarning)
            return out
        if not prediction:
            self.path = "batched"
        self._warn_of_escaped_tensors()
        return out

    def _warn_of_escaped_tensors(self) -> None:
        """Say once that the model kept a tensor of the batched path on itself (``self.features
        = h`` in its forward, for logging): made inside ``vmap``, torch cannot use it after the
        call, and reading it later fails deep inside torch. Looked for at the first
        ``ESCAPE_CHECKS`` batched calls only (a model of many modules costs milliseconds)."""
        if self._escape_checks <= 0:  # a forward that keeps one does so at every call
            return
        self._escape_checks -= 1
        escaped = escaped_tensors(self.model)
        if escaped:
            self._escape_checks = 0
            warn(f"the model keeps {listed(escaped)}, set in its forward inside the batched "
                 "path (vmap over tasks): torch cannot use such a tensor after the call (it "
                 "'escaped' vmap). Return it from forward instead, or use batched=False where "
                 "the model must keep it", PathWarning)

    def _uncompiled_from_now(self, error: Exception, eager: Callable[[], Any]) -> Any:
        """Where ``torch.compile`` failed (on CPU, inductor needs a C++ compiler) but the eager
        call runs, compiling is off for this learner from now on, with a warning: ``compile`` is
        a speed option, never the reason a run stops. A user's error fails eagerly too; it is
        raised, and compiling stays on."""
        compiled = self._compiled_batched, self._compiled_gradient
        self._compiled_batched = self._compiled_gradient = None
        try:
            out = eager()
        except BaseException:
            self._compiled_batched, self._compiled_gradient = compiled
            raise
        warn(f"torch.compile failed ({first_line(error)}); running uncompiled",
             PathWarning)
        return out

    def _searches(self, batch: TaskBatch) -> str | None:
        """Whether this ``meta_backward`` times the candidate paths (see ``batched``): "alone",
        "together" (with every rank) or not (None). A choice made in this process for the same
        model, settings and shapes is reused, so that two runs with one seed take the same path.
        With ``gather_ranks``, the first call in each derivative order and number of inner
        steps asks every rank (they make it together: the driver switches the order, or sets
        ``inner_steps``, on all at once), and all search together
        where any has no choice; a choice missing at a later call (this rank's compiling fell
        back, which changes its key alone, or a new input shape) is searched alone. A rank
        whose vmap failed runs looped and searches only with the others."""
        if not self._auto or self._trying:
            return None
        key = self._path_key(batch)
        known = self.path_choices.get(key)
        if known is None and not self._vmap_failed:  # a new shape: the process's record too
            setting = self._setting_key(batch)
            shared = _SHAPES_SEARCHED.get(self._signature(setting), [])
            self.searched_shapes[setting] = _merged(self.searched_shapes.get(setting, []), shared)
            chosen = self._signature(key)  # (the model's print: once per new shape)
            known = _PATHS_CHOSEN.get(chosen) or self._nearest_choice(batch, setting)
            if known is not None:
                _PATHS_CHOSEN[chosen] = known
        if known is not None:
            self.path_choices[key] = known
        missing = known is None and not self._vmap_failed
        asked = (self.first_order, self.inner_steps)
        if self.gather_ranks is not None and asked not in self._asked_settings:
            self._asked_settings.add(asked)
            if any(self.gather_ranks(missing)):
                return "together"
        return "alone" if missing else None

    def _path_key(self, batch: Sequence[Tensor]) -> str:
        """What the fastest path depends on, besides the model: the meta-batch's shapes and
        ``_setting_key``."""
        return f"{[tuple(t.shape) for t in batch]} {self._setting_key(batch)}"

    def _setting_key(self, batch: Sequence[Tensor]) -> str:
        """The meta-batch's dtype and device, the derivative order (which ``first_order_until``
        switches in a run), the inner steps (``maml.inner_steps = n`` changes the work per
        task), the thread count, the CPU's vector instructions, whether compiling is allowed
        and the paths' implementations. A run resumed with other threads, CPU, ``compile``,
        torch or paths so searches again instead of reusing a choice timed without its
        candidates or kernels."""
        order = f"{'first' if self.first_order else 'second'} order, {self.inner_steps} steps"
        compiled = self._compiled_gradient is not None
        device = batch[0].device.type
        if device == "cpu":  # AVX2 and AVX512 kernels rank the paths differently
            device += f" {torch.backends.cpu.get_cpu_capability()}"
        return (f"{batch[0].dtype} {device} {order}, {torch.get_num_threads()} threads, "
                f"compile={compiled}, paths r{PATHS_REVISION}, torch {torch.__version__}")

    def _nearest_choice(self, batch: TaskBatch, setting: str) -> tuple[str, int | None] | None:
        """Once ``SEARCHED_SHAPES`` shapes of this setting were searched (by this learner, a
        run it resumes, or one alike in this process), the path for a new shape within
        ``NEAR_SHAPE`` of one: the role (e.g. "one task") chosen for the nearest, at this
        batch's chunk sizes, its fastest uncompiled one where compiled won; else None (search).
        ``setting``: the batch's ``_setting_key``."""
        searched = self.searched_shapes.get(setting, [])
        if len(searched) < SEARCHED_SHAPES:
            return None
        size = _size(batch)
        distance, role, eager = min((sum(abs(math.log(a / b)) for a, b in zip(shape, size)),
                                     role, eager) for shape, role, eager in searched)
        if distance > math.log(NEAR_SHAPE):
            return None
        return self._roles(batch)[eager if role == "compiled" else role]

    def _roles(self, batch: TaskBatch) -> dict[str, tuple[str, int | None]]:
        """The search's candidates as every rank names them: role -> (path, tasks per chunk)."""
        default = self._chunk(batch) or batch.num_tasks
        return {"compiled": ("compiled", default), "default chunk": ("batched", default),
                "one task": ("batched", 1), "all tasks": ("batched", batch.num_tasks),
                "looped": ("looped", None)}

    def _compiled_check_key(self, batch: TaskBatch, step_weights: Tensor | None) -> str:
        """Under what the compiled meta-gradient's comparison with the eager one is kept: the
        path's key, and whether the objective is weighted (the multi-step loss: another graph,
        which a run leaves after ``msl_anneal_iterations``)."""
        return self._path_key(batch) + (" weighted" if step_weights is not None else "")

    def _signature(self, key: str) -> str:
        """The learner (its model's class by its full name; its modules as they print: the
        model, learned rates and per-step sets; its loss and metric functions by name; its
        adapted and trainable parameters; its batch-norm mode), the inner steps and ``key``:
        another model of one class name and shapes (another dropout, say), or a loss that vmap
        cannot run, times its own paths."""
        params = [(n, tuple(p.shape)) for n, p in self.named_parameters() if p.requires_grad]
        functions = [_full_name(self.model), _full_name(self.loss_fn), _full_name(self.metric_fn)]
        return (f"{functions} {self!r} {self.adapted_names} {params} {self._transductive} "
                f"{self.inner_steps} {key}")

    def _learner_key(self) -> str:
        """What the compiled graphs hold besides the input shapes: the learner
        (``_signature``), its inner rate's initial value (a constant of a fixed rate's graph),
        its mode and derivative order."""
        return (f"{self._signature('')} {self.inner_lrs.mode} {self.inner_lrs.init!r} "
                f"{self.first_order}")

    def _search_path(self, batch: TaskBatch, step_weights: Tensor | None, trainable: Params,
                     together: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """``meta_backward`` by each candidate path (after a warm-up call of the default chunk,
        eager and compiled), then the two fastest once more, keeping the fastest for this input
        shape; ``.grad`` gets the chosen candidate's gradient, as later calls (and runs that
        reuse the choice) compute it (where a compiled winner differed from the eager gradient,
        the eager one, as ``_checked_compiled_gradient`` gives). Every call starts from the same
        random state (dropout), and the search leaves it as one call of the chosen path does, so
        a seeded run that searches draws what one reusing the choice draws."""
        roles = self._roles(batch)
        default = roles["default chunk"][1]
        candidates = [c for c in dict.fromkeys(roles.values())
                      if c[0] != "compiled" or self._compiled_gradient is not None]
        warm_ups = [c for c in candidates if c[1] == default]
        before = {n: p.grad for n, p in trainable.items()}
        timings: dict[tuple[str, int | None], float] = {}
        results: dict[tuple[str, int | None], tuple[Params, Tensor, dict[str, Tensor]]] = {}

        def runnable(candidate: tuple[str, int | None]) -> bool:  # vmap and compile may fail
            return candidate[0] == "looped" or not self._vmap_failed and (
                candidate[0] != "compiled" or self._compiled_gradient is not None)

        device = batch.support_x.device
        start_state = random_state(device)
        end_states: dict[tuple[str, int | None], tuple[Tensor, ...]] = {}

        def run(candidate: tuple[str, int | None]) -> None:
            self._trying = candidate
            for p in trainable.values():
                p.grad = None
            set_random_state(start_state, device)
            start = time.perf_counter()
            loss, metrics = self.meta_backward(batch, step_weights)
            if runnable(candidate):
                elapsed = time.perf_counter() - start
                timings[candidate] = min(elapsed, timings.get(candidate, elapsed))
                results[candidate] = ({n: p.grad for n, p in trainable.items()}, loss.detach(),
                                      metrics)
                end_states[candidate] = random_state(device)

        try:
            for candidate in warm_ups:  # their timings (and compiling) are replaced below
                run(candidate)
            timings.clear()
            for candidate in filter(runnable, candidates):
                run(candidate)
            for candidate in sorted(timings, key=timings.get)[:2]:  # noise: time the two again
                run(candidate)
        except BaseException:  # (a non-finite loss, the user's error): their gradients stay
            for name, p in trainable.items():
                p.grad = before[name]
            raise
        finally:
            self._trying = None
        best = self._agreed_path(batch, roles, timings, together)
        self.path = _label(best)
        set_random_state(end_states[best], device)
        # a graph that differed from the eager gradient gives the eager one, as later calls do
        missed = self._compiled_check_key(batch, step_weights) in self._compiled_misses
        grads, loss, metrics = results[("batched", best[1]) if missed and best[0] == "compiled"
                                       else best]
        for name, p in trainable.items():
            p.grad = (grads[name] if before[name] is None else before[name] if grads[name] is None
                      else before[name] + grads[name])
        return loss, metrics

    def _agreed_path(self, batch: TaskBatch, roles: dict[str, tuple[str, int | None]],
                     timings: dict[tuple[str, int | None], float], together: bool
                     ) -> tuple[str, int | None]:
        """The searched path to keep for this input shape (``batch``'s), recorded, and the one this
        rank runs (looped where its vmap failed): the fastest here or, with every rank
        (``together``), the role (e.g. "all tasks") fastest on the slowest rank, which sets the
        pace of ranks that step together; each rank's choice is then recorded on every rank, so
        that the ranks' records (and checkpoints) agree. A role not timed here (compiling off)
        counts as infinitely slow; where vmap failed, every role runs looped, and a shape whose
        every rank runs looped is recorded so (the role's path would never have run)."""
        def runs(candidate: tuple[str, int | None]) -> tuple[str, int | None]:
            return ("looped", None) if self._vmap_failed else candidate

        key = self._path_key(batch)
        mine = (key, {role: (runs(candidate), timings.get(runs(candidate), math.inf))
                      for role, candidate in roles.items()}, _size(batch))
        offers = self.gather_ranks(mine) if together else [mine]

        def slowest(role: str) -> float:
            return max(offer[role][1] for _, offer, _ in offers)
        best = min(roles, key=slowest)
        eager = min((role for role in roles if role != "compiled"), key=slowest)
        # every rank's shape, so that the ranks' records agree
        setting = self._setting_key(batch)
        self.searched_shapes[setting] = _merged(self.searched_shapes.get(setting, []),
                                                [(size, best, eager) for _, _, size in offers])
        signature = self._signature(setting)
        _SHAPES_SEARCHED[signature] = _merged(_SHAPES_SEARCHED.get(signature, []),
                                              self.searched_shapes[setting])
        for rank_key in dict.fromkeys(rank_key for rank_key, _, _ in offers):
            ran = [offer[best][0] for offered_key, offer, _ in offers if offered_key == rank_key]
            self.path_choices[rank_key] = _PATHS_CHOSEN[self._signature(rank_key)] = next(
                (path for path in ran if path != ("looped", None)), ("looped", None))
        return mine[1][best][0]

    def _chunk(self, batch: Sequence[Tensor]) -> int | None:
        """Tasks per vmap chunk, at most the batch's: ``chunk_size``, else on CPU about
        ``CPU_CHUNK_ELEMENTS`` input elements' worth, and on an accelerator all (None)."""
        if self.chunk_size is not None or batch[0].device.type != "cpu":
            chunk = self.chunk_size
        else:
            chunk = max(1, CPU_CHUNK_ELEMENTS // ((batch[0][0].numel() + batch[2][0].numel()) or 1))
        return chunk and min(chunk, batch[0].shape[0])

    def _backward_compiling_lazily(self, batch: TaskBatch, step_weights: Tensor | None,
                                   trainable: Params) -> tuple[Tensor, dict[str, Tensor]]:
        """``_backward``; a compiled forward builds its backward graph only in ``backward``, so
        a compile failure there also falls back to the eager path (gradients as before it)."""
        before = {n: p.grad for n, p in trainable.items()}
        try:
            return self._backward(batch, step_weights)
        except torch._dynamo.exc.TorchDynamoException as error:
            if self._compiled_batched is None:
                raise
            for name, p in trainable.items():
                p.grad = before[name]
            return self._uncompiled_from_now(error, lambda: self._backward(batch, step_weights))

    def _compiled_meta_gradient(self, trainable: Params, batch: TaskBatch,
                                step_weights: Tensor | None
                                ) -> tuple[Params, tuple[Tensor, dict[str, Tensor]]]:
        """``meta_backward``'s gradient by the compiled graph, checked
        (``_checked_compiled_gradient``), in the chunks of this shape's path."""
        choice = self._choice(batch)
        chunk = choice[1] if choice else self._chunk(batch)
        out = self._checked_compiled_gradient(trainable, batch, step_weights, chunk)
        if self._compiled_gradient is not None:
            self.path = _label(("compiled", chunk))
        else:  # it computed wrongly: the eager gradient
            self.path = _label(("batched", chunk)) if choice else "batched"
        return out

    def _checked_compiled_gradient(self, trainable: Params, batch: TaskBatch,
                                   step_weights: Tensor | None, chunk: int | None
                                   ) -> tuple[Params, tuple[Tensor, dict[str, Tensor]]]:
        """The compiled meta-gradient. The first of each input shape is compared with the eager
        one (same chunks, same random state, an eager forward). Where they differ by more than
        ``COMPILED_TOLERANCE``, the eager gradient is returned and the next call of the shape
        compares again (the path search compares at its first call only: its calls repeat one
        batch); after ``COMPILED_CHECKS`` such calls in a row, compiling is off from now on,
        with a warning. Measured once (its exact model unrecorded): inductor (torch 2.13)
        computed a transformer encoder layer's second-order meta-gradient 1.6% off (float64, 2
        inner steps; not reproduced later). Not compared, with a warning: under active
        dropout (the two would draw different masks) and where the eager pass runs out of
        accelerator memory. Where the eager gradient is not finite, the next call of the shape
        compares again; the weighted objective's graph is compared on its own
        (``_compiled_check_key``)."""
        key = self._compiled_check_key(batch, step_weights)
        if key not in self._compiled_checked and has_active_dropout(self.model):
            self._compiled_checked.add(key)
            warn("the compiled meta-gradient is not checked against the eager one "
                 "under active dropout (they draw different masks)", PathWarning)
        if key in self._compiled_checked or self._trying and key in self._compiled_misses:
            # trusted; or timed by the path search, whose calls repeat the batch it compared
            return self._gradient_by_chunks(self._compiled_gradient, trainable, batch,
                                            step_weights, chunk)
        device = batch.support_x.device
        start = random_state(device)
        grads, aux = self._gradient_by_chunks(self._compiled_gradient, trainable, batch,
                                              step_weights, chunk)
        end = random_state(device)
        set_random_state(start, device)
        trying, self._trying = self._trying, ("batched", chunk)  # an eager forward inside
        try:
            eager = self._gradient_by_chunks(self._gradient, trainable, batch, step_weights,
                                             chunk)
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            self._compiled_checked.add(key)
            warn("the compiled meta-gradient is not checked against the eager one: "
                 "the eager pass ran out of memory", PathWarning)
            return grads, aux
        finally:
            self._trying = trying
            set_random_state(end, device)
        if not all(torch.isfinite(g).all() for g in eager[0].values() if g is not None):
            return grads, aux  # nothing to compare with: the next call of the shape checks
        error = _relative_difference(grads, eager[0])
        if error <= COMPILED_TOLERANCE:
            self._compiled_checked.add(key)
            self._compiled_misses.pop(key, None)
            return grads, aux
        misses = self._compiled_misses.setdefault(key, [])
        misses.append(error)
        if len(misses) == COMPILED_CHECKS:
            self._compiled_batched = self._compiled_gradient = None
            warn("torch.compile computed this model's meta-gradient off (relative) from "
                 f"the eager path's by {', '.join(f'{e:.1e}' for e in misses)}; running "
                 "uncompiled", PathWarning)
        return eager

    def _gradient_by_chunks(self, gradient: Callable, trainable: Params, batch: TaskBatch,
                            step_weights: Tensor | None, chunk: int | None
                            ) -> tuple[Params, tuple[Tensor, dict[str, Tensor]]]:
        """The meta-gradient by ``gradient`` (``_gradient`` or its compiled graph), one call per
        chunk of tasks. A graph holds one chunk, so its compile time does not grow with the
        meta-batch (vmap's chunks inside one graph are unrolled: a 16-task batch in chunks of one
        compiled for over 20 minutes); an uneven last chunk compiles one more graph. The
        objective is a mean over tasks, so each chunk's gradient, loss and metrics count by its
        share of the tasks."""
        params = _graph_layout({n: p.detach() for n, p in trainable.items()})
        grads: Params = {}
        loss: Tensor | float = 0.0
        metrics: dict[str, Tensor] = {}
        for part in _chunks(batch, chunk):
            part_grads, (part_loss, part_metrics) = gradient(params, part, step_weights)
            share = part.num_tasks / batch.num_tasks
            grads = {n: grads.get(n, 0.0) + share * g for n, g in part_grads.items()}
            metrics = {k: metrics.get(k, 0.0) + share * v for k, v in part_metrics.items()}
            loss = loss + share * part_loss
        return grads, (loss, metrics)

    def _gradient(self, params: Params, batch: TaskBatch,
                  step_weights: Tensor | None) -> tuple[Params, tuple[Tensor, dict[str, Tensor]]]:
        def objective(params: Params) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
            loss, metrics = functional_call(
                self, with_aliases(params, {f"model.{alias}": f"model.{name}"
                                            for alias, name in self._aliases.items()}),
                (batch, step_weights), strict=False, tie_weights=False)
            return loss, (loss.detach(), metrics)
        return torch.func.grad(objective, has_aux=True)(params)


def escaped_tensors(model: torch.nn.Module) -> list[str]:
    """The attributes of the model's own modules (of a class of neither torch nor fastmaml:
    an ``nn.LSTM`` keeps its ``_flat_weights`` so) that hold a tensor of torch.func's
    transforms, alone or in a list, tuple or dict: one set inside a transform's call. Their
    parameters and buffers, which ``functional_call`` swaps in during a call, and weights that
    a forward pre-hook sets (weight_norm, spectral_norm, pruning), aside."""
    def names(prefix: str, module: torch.nn.Module) -> list[str]:
        own = {id(t) for t in [*module._parameters.values(), *module._buffers.values()]}
        hooked = {getattr(hook, "name", None) for hook in module._forward_pre_hooks.values()}

        def wrapped(value: Any) -> bool:
            return (isinstance(value, Tensor) and id(value) not in own
                    and torch._C._functorch.is_functorch_wrapped_tensor(value))
        return [f"{prefix}.{name}" if prefix else name for name, value in vars(module).items()
                if name not in hooked and (wrapped(value) or isinstance(
                    value, (list, tuple, dict)) and any(
                    map(wrapped, value.values() if isinstance(value, dict) else value)))]

    def users(module: torch.nn.Module) -> bool:
        return any(not cls.__module__.startswith(("torch.", "fastmaml.", "builtins"))
                   for cls in type(module).__mro__)
    return [name for prefix, module in model.named_modules() if users(module)
            for name in names(prefix, module)]


def _label(choice: tuple[str, int | None]) -> str:
    """A path choice as ``maml.path`` names it, e.g. ``batched, chunk 4`` or ``looped``."""
    path, chunk = choice
    return path if chunk is None else f"{path}, chunk {chunk}"


def _chunks(batch: TaskBatch, chunk: int | None) -> list[TaskBatch]:
    """``batch`` in consecutive chunks of ``chunk`` tasks (``None``: one chunk)."""
    return batch.split(chunk or batch.num_tasks)


def _concatenated(parts: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Per-task outputs of consecutive chunks of tasks, joined along the task dimension."""
    return parts[0] if len(parts) == 1 else tuple(torch.cat(column) for column in zip(*parts))


def _graph_layout(params: Params) -> Params:
    """Parameters as they enter a compiled graph: on CPU, 4-d (convolution) weights channels-last.

    Then the shared-weight convolutions (tasks in the batch) and the per-task ones (tasks in the
    channels) give activations in one layout, which inductor's fused kernels read without
    gathering (docs/results.md, session 6). ``clone`` sets the strides even with one channel.
    """
    return {n: p.clone(memory_format=torch.channels_last)
            if p.dim() == 4 and p.device.type == "cpu" else p for n, p in params.items()}


def _relative_difference(grads: Params, reference: Params) -> float:
    """||grads - reference|| / ||reference|| over every parameter that has a gradient."""
    names = [n for n, g in reference.items() if g is not None and grads.get(n) is not None]
    if not names:
        return 0.0
    difference = torch.cat([(grads[n] - reference[n]).flatten() for n in names]).norm()
    return (difference / torch.cat([reference[n].flatten() for n in names]).norm().clamp_min(
        torch.finfo(reference[names[0]].dtype).tiny)).item()


def _merged(shapes: list[SearchedShape], more: Sequence[SearchedShape]) -> list[SearchedShape]:
    """``shapes`` and those of ``more`` of a size not among them, in order."""
    merged, sizes = list(shapes), {size for size, _, _ in shapes}
    for shape in more:
        if shape[0] not in sizes:
            merged.append(shape)
            sizes.add(shape[0])
    return merged


def _size(batch: TaskBatch) -> tuple[int, int]:
    """A meta-batch's tasks and input elements per task (at least 1 each), for
    ``_nearest_choice``."""
    return batch.num_tasks or 1, sum(t[0].numel() for t in batch) or 1


def users_line(error: BaseException) -> str:
    """Where in the user's own code (not torch's, not fastmaml's) ``error``, or the error it was
    raised from, happened, as " at FILE:LINE, `SOURCE`", so that a vmap failure names the line
    to change (``F.one_hot(y)`` without ``num_classes``); "" where none of its frames is."""
    library = tuple(os.path.join(folder, "") for folder in (
        os.path.dirname(torch.__file__), os.path.dirname(__file__), sysconfig.get_path("stdlib")))
    for raised in (error.__cause__, error):
        if raised is None:
            continue
        for frame in reversed(traceback.extract_tb(raised.__traceback__)):
            if not frame.filename.startswith(library) and not frame.filename.startswith("<"):
                source = f", `{frame.line.strip()}`" if frame.line and frame.line.strip() else ""
                return f" at {frame.filename}:{frame.lineno}{source}"
    return ""
