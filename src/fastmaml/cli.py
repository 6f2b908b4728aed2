"""The fastmaml command line: presets, train, eval, plot, adapt, report and reproduce."""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .atomic import refuse_unwritable, write_text_atomic
from .norms import has_batch_norm
from .errors import (ConfigError, DataError, FastMAMLError, FastMAMLWarning, PathWarning,
                     is_out_of_memory)
from .adaptation import NORMS, Predictions, TrainedPolicy, TrainedRun, load_run, predict_files
from .experiments import PRESETS, load_experiment, preset, preset_config, train_run
from .experiments.base import refuse_run_file
from .plots import counted
from .distributed import init_from_env, leave, shutdown, world
from .report import BUDGETS, EXPERIMENTS, read_run, reproduce, write_report
from .runlock import locked_run_dir
from .train import TrainingStopped, checkpoints_dir


def _presets(args: argparse.Namespace) -> None:
    if not args.names:
        width = max(map(len, PRESETS))
        for name, chosen in PRESETS.items():
            print(f"{name:<{width}}  [{chosen.experiment}] {chosen.description}")
        print("\n`fastmaml presets NAME` shows a preset's settings, which `fastmaml train NAME "
              "key=value ...` changes")
    for number, name in enumerate(args.names):
        print(("\n" if number else "") + _preset_settings(name), end="")


def _preset_settings(name: str) -> str:
    """A preset's description and every setting a new run of it starts with, each with its
    note from the config's source: what ``key=value`` can change, and to what."""
    chosen, config = preset(name), preset_config(name, [])
    notes, defaults = config.field_notes(), type(config)().to_dict()
    lines = [f"{name} [{chosen.experiment} experiment]: {chosen.description}",
             f"settings (change any with key=value, e.g. fastmaml train {name} seed=1):"]
    apart = config.settings_apart()
    hidden = ("experiment", "preset", *config.unused_settings, *sum(apart.values(), ()))
    values = {key: value for key, value in config.to_dict().items() if key not in hidden}
    width = min(max(len(f"{key}: {_setting_text(value)}") for key, value in values.items()),
                30)  # a long list goes past the notes' column, not the rest with it
    for key, value in values.items():
        note = notes.get(key, "")
        if value != defaults[key] and key in chosen.values:
            note = f"[{name}; default {_setting_text(defaults[key])}] {note}"
        setting = f"{key}: {_setting_text(value)}"
        lines.append(f"  {setting:<{width}}  # {note}".rstrip(" #") if note else f"  {setting}")
    lines += [f"unused here, only with {user}: {', '.join(keys)}" for user, keys in apart.items()]
    return "\n".join(lines) + "\n"


def _setting_text(value: Any) -> str:
    """A setting's value as config.yaml and ``key=value`` write it (a list comma-separated)."""
    if isinstance(value, list):
        return ",".join(map(_setting_text, value))
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _train(args: argparse.Namespace) -> None:
    init_from_env()
    run_dir = _folder_to_be(_train_folder(args), "--out")
    experiment = train_run(args.preset, run_dir, _overrides(args), progress=not args.no_progress,
                           learner=args.learner)
    main_rank = world()[0] == 0
    shutdown()
    if main_rank:
        then = ("Next" if args.learner is None  # eval needs every learner's checkpoint
                else "Next, once every learner of the run is trained")
        scalars = f" and {run_dir}/tensorboard" if experiment.cfg.tensorboard else ""
        print(f"fastmaml: checkpoints in {run_dir}/checkpoints, metrics in "
              f"{run_dir}/metrics-*.csv{scalars}. {then}: fastmaml eval {run_dir}")


def _train_folder(args: argparse.Namespace) -> Path:
    return Path(args.out or f"runs/{args.preset}")


def _how_to_go_on(args: argparse.Namespace) -> str:
    """What running an interrupted command again does (train: Ctrl-C before its loop, which
    checkpoints on its own, e.g. while the data download or decode)."""
    if args.command == "reproduce":
        return "; the same command goes on from each run's last checkpoint"
    if args.command != "train":
        return ""
    if any(checkpoints_dir(_train_folder(args)).glob(f"{args.learner or '*'}.pt")):
        return "; the same command resumes from the last checkpoint"
    return "; nothing was trained yet: the same command starts again"


def _overrides(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` overrides, ``--data-root`` among them."""
    return args.overrides + ([f"data_root={args.data_root}"] if args.data_root else [])


def _eval(args: argparse.Namespace) -> None:
    init_from_env()  # under torchrun the ranks split the test tasks
    experiment = load_experiment(Path(args.run_dir), _overrides(args))
    experiment.evaluate(progress=not args.no_progress)
    main_rank = world()[0] == 0
    shutdown()
    if main_rank:
        print((experiment.run_dir / "results.md").read_text())
        print(f"fastmaml: wrote {experiment.run_dir}/eval.json and "
              f"{experiment.run_dir}/results.md")


def _plot(args: argparse.Namespace) -> None:
    # drawing runs no model: the thread count the run trained with is neither applied nor
    # warned of where this machine has fewer CPUs
    experiment = load_experiment(Path(args.run_dir), ["threads=0"])
    figures = experiment.run_dir / "figures"
    before = set(figures.glob("*.png"))
    for path in experiment.plot():
        print(f"fastmaml: wrote {path}")
    for path in sorted(before - set(figures.glob("*.png"))):
        print(f"fastmaml: removed {path}, an earlier evaluation's figure that this one does not "
              "draw")
    if not (experiment.run_dir / "eval.json").is_file():
        print(f"fastmaml: {experiment.run_dir} is not evaluated yet, so only its learning curves "
              f"are drawn: run `fastmaml eval {experiment.run_dir}` for the rest", file=sys.stderr)
    else:
        with contextlib.suppress(FastMAMLError):  # a note only: a damaged file is eval's to say
            if stale := read_run(experiment.run_dir).stale_evaluation:
                print(f"fastmaml: the evaluation figures draw eval.json, not the run as it is "
                      f"now: {stale}", file=sys.stderr)


OUT_SUFFIXES = ("", ".csv", ".json", ".txt")  # adapt --out names that say what it writes


def _adapt(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the file to write the predictions to")
    if out is not None:
        refuse_unwritable(out, "--out")
    for option, path in (("--out", out), ("--plot", args.plot)):
        if path is not None:
            refuse_run_file(Path(path), run_dir, option)
    if out is not None and not args.format and out.suffix.lower() not in OUT_SUFFIXES:
        raise ConfigError(f"--out {out}: adapt writes CSV or JSON, not what the name's "
                          f"{out.suffix} says: name it *.csv or *.json, or give --format")
    inside = out is not None and out.resolve().is_relative_to(run_dir.resolve())
    if inside:
        with locked_run_dir(run_dir):
            _adapt_in(args, run_dir, out)
    else:
        _adapt_in(args, run_dir, out)


def _adapt_in(args: argparse.Namespace, run_dir: Path, out: Path | None) -> None:
    run = load_run(run_dir, device=args.device, settings=args.overrides)
    text, said = (_adapt_policy(args, run, out) if isinstance(run, TrainedPolicy)
                  else _predict(args, run, out))
    if out is None:
        _write_stdout(text)
    else:  # nothing is written unless everything above succeeded; the file appears whole
        try:
            write_text_atomic(text, out, follow_links=True)
        except OSError as error:
            raise DataError(f"cannot write the output to {out}: {error}") from None
    print(said, file=sys.stderr)


def _write_stdout(text: str) -> None:
    """``text`` to stdout, a file name that is not in its encoding (not UTF-8: decoded by Python
    as surrogates) as its bytes, as the file system holds it; any other character that the
    encoding lacks as an escape."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a stream of text alone
        sys.stdout.write(text)
        return
    encoding = sys.stdout.encoding or "utf-8"
    try:
        data = text.encode(encoding, "surrogateescape")
    except UnicodeEncodeError:
        data = text.encode(encoding, "backslashreplace")
    sys.stdout.flush()
    buffer.write(data)
    buffer.flush()


def _predict(args: argparse.Namespace, run: TrainedRun, out: Path | None) -> tuple[str, str]:
    """A few-shot or regression run adapted on the support files, and its query predictions
    (the text to write, and what to say)."""
    if args.task or args.seed:
        raise ConfigError(f"--{'task' if args.task else 'seed'} is for meta-RL runs; "
                          f"{run.run_dir} is a {run.task} run: give --support and --query")
    if not (args.support and args.query):
        raise ConfigError(f"{run.run_dir} is a {run.task} run: give --support (the new task's "
                          "labelled examples) and --query (the inputs to predict)")
    if args.norm == "query" and not has_batch_norm(run.maml.model):
        raise ConfigError(f"--norm query is for runs whose model has batch norm; "
                          f"{run.run_dir}'s has none, so each query prediction is independent "
                          "of the others (--norm each) anyway")
    result = predict_files(run, args.support, args.query, args.steps, args.plot,
                           args.norm or "each")
    text = _as_json(run.run_dir, result) if _format(args, out) == "json" else _as_csv(result)
    summary = result.summary
    said = f"fastmaml: adapted {run.run_dir} on {counted(summary['support'], 'support example')}"
    said += f" ({len(summary['classes'])} classes)" if "classes" in summary else ""
    said += f" in {summary['steps']} step(s); {counted(summary['query'], 'query prediction')}"
    said += f" in {out}" if out else ""
    if summary.get("accuracy") is not None:
        said += f"; accuracy {100 * summary['accuracy']:.2f}% on the labelled query"
    if summary.get("mse") is not None:
        said += f"; MSE {summary['mse']:.4g} on the labelled query"
    return text, said + (f"; plot in {args.plot}" if args.plot else "")


def _adapt_policy(args: argparse.Namespace, run: TrainedPolicy, out: Path | None
                  ) -> tuple[str, str]:
    """A meta-RL run's policy adapted to the ``--task`` by sampling it, and its mean returns
    after each step (the text to write, and what to say)."""
    given = [name for name, value in (("--support", args.support), ("--query", args.query),
                                      ("--plot", args.plot), ("--norm", args.norm)) if value]
    if given or not args.task:
        drawn = ({} if args.task else  # (+ 0.0: no -0.0 in the example)
                 {key: np.round(value, 2) + 0.0 for key, value in run.sample_tasks(1)[0].items()})
        raise ConfigError(f"{run.run_dir} is a meta-RL run: it adapts to a task by sampling "
                          "its environment" + (f", e.g. --task {run.task_text(drawn)}"
                                               if drawn else "")
                          + (f" ({', '.join(given)}: for few-shot and regression runs)"
                             if given else ""))
    task = run.parse_task(args.task)
    adapted = run.adapt(task, args.steps, args.seed)
    if _format(args, out) == "json":
        text = json.dumps({"run": str(run.run_dir), "env": run.env_id,
                           "task": {key: np.asarray(value).tolist()
                                    for key, value in task.items()}, "seed": args.seed,
                           "returns": adapted.returns}, indent=2) + "\n"
    else:
        text = "step,return\n" + "".join(f"{step},{value:.6g}\n"
                                          for step, value in enumerate(adapted.returns))
    return text, (f"fastmaml: adapted {run.run_dir} to {run.task_text(task)} in "
                  f"{len(adapted.returns) - 1} step(s): mean return "
                  f"{' -> '.join(f'{value:.1f}' for value in adapted.returns)}"
                  + (f"; returns per step in {out}" if out else ""))


def _format(args: argparse.Namespace, out: Path | None) -> str:
    """``--format``, or else the one ``--out``'s suffix names (``.json``; otherwise CSV)."""
    return args.format or ("json" if out is not None and out.suffix.lower() == ".json" else "csv")


def _as_csv(result: Predictions) -> str:
    """One row per query item; a classification row has a p(<class>) column per class."""
    buffer = io.StringIO()
    rows = [{**{k: v for k, v in row.items() if k != "probabilities"},
             **{f"p({name})": f"{p:.6f}" for name, p in row.get("probabilities", {}).items()}}
            for row in result.rows]
    writer = csv.DictWriter(buffer, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _as_json(run_dir: Path, result: Predictions) -> str:
    document: dict[str, Any] = {"run": str(run_dir), **result.summary,
                                "predictions": result.rows}
    return json.dumps(document, indent=2) + "\n"


def _report(args: argparse.Namespace) -> None:
    paths = [Path(p) for p in args.runs] or [Path("results")]
    out = write_report(paths, _report_file(args.out))
    print(f"fastmaml: wrote {out}")


def _reproduce(args: argparse.Namespace) -> None:
    init_from_env()  # under torchrun the ranks split each run's meta-batches and test tasks
    main_rank = world()[0] == 0
    root = _folder_to_be(Path(args.root or f"runs/reproduce-{args.budget}"), "--root")
    out = reproduce(args.budget, args.experiments, root,
                    _report_file(args.out) if args.out else None, progress=not args.no_progress,
                    say=print if main_rank else lambda *_: None)
    shutdown()
    if main_rank:
        print(f"fastmaml: wrote {out}")


def _report_file(out: str) -> Path:
    """``--out`` of report and reproduce: a file (refused at once when it is a folder, or when
    a file stands where one of its folders would be made)."""
    if Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder: name the report file, e.g. {out}/REPORT.md")
    _folder_to_be(Path(out).parent, "--out", given=Path(out))
    return Path(out)


def _folder_to_be(folder: Path, option: str, given: Path | None = None) -> Path:
    """``folder`` (from ``option``'s value ``given``), refused at once (not after hours of
    training) where it or a folder above it is a file."""
    given = given or folder
    for place in (folder, *folder.parents):
        if place.exists() and not place.is_dir():
            raise ConfigError(f"{option} {given}" + (f": {place}" if place != given else "")
                              + " is a file, not a folder")
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmaml", description=__doc__)
    from . import __version__

    parser.add_argument("--version", action="version",
                        version=f"fastmaml {__version__}, torch {torch.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, **options: Any) -> argparse.ArgumentParser:
        """A subcommand whose --help opens with its line in the list of commands, unless it
        has a longer description."""
        options.setdefault("description", text[0].upper() + text[1:] + ".")
        return commands.add_parser(name, help=text, **options)

    presets = command(
        "presets", "list the named experiment presets, or show one's settings",
        description="Without a name, list the presets. With names, show each one's "
        "settings: every key a new run starts with, its value and what it means; "
        "`fastmaml train PRESET key=value ...` changes any of them.")
    presets.add_argument("names", nargs="*", metavar="PRESET",
                         help="show these presets' settings")
    presets.set_defaults(run=_presets)
    train = command("train", "train a preset (resumes an existing --out)")
    train.add_argument("preset", help="a preset's name (`fastmaml presets` lists them, "
                       "`fastmaml presets NAME` shows its settings)")
    train.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                       help="typed config overrides, e.g. iterations=2000 inner_steps=2")
    train.add_argument("--out", help="run directory (default runs/<preset>)")
    data_root_help = "data set folder (the same as data_root=DIR)"
    train.add_argument("--data-root", metavar="DIR", help=data_root_help)
    train.add_argument("--learner", help="train only this learner of the run (e.g. pretrained), "
                       "while another process trains the others: one run on two cores")
    train.set_defaults(run=_train)
    eval_overrides = ("key=value overrides after run_dir change settings of the evaluation "
                      "that do not change what was learned, e.g. eval_tasks=100, threads=2 or "
                      "data_root=PATH (not training's, such as iterations or log_every)")
    for name, run, text, epilog in (
            ("eval", _eval, "evaluate a trained run with the paper's protocol", eval_overrides),
            ("plot", _plot, "write a run's figures: its learning curves while it trains, and "
                            "the evaluation's once it is evaluated", None)):
        sub = command(name, text, epilog=epilog, usage=(  # overrides: eval's
            f"fastmaml {name} [-h] [--no-progress] [--data-root DIR] run_dir [key=value ...]"
            if epilog else None))
        sub.add_argument("run_dir", help="a run directory (fastmaml train's --out)")
        if epilog:  # eval reads the test split: from where the data is now
            sub.add_argument("--data-root", metavar="DIR", help=data_root_help)
        sub.set_defaults(run=run, overrides=[])
    adapt = command(
        "adapt", "adapt a trained run to a new task and predict its query set",
        description="Adapt a trained run on a new task's support set and predict its query set. "
        "Image runs: SUPPORT is a folder with one subfolder per class (or a flat folder, one "
        "class per image), QUERY a flat folder, one image or subfolders named like the classes "
        "(then the accuracy is reported). Regression runs: SUPPORT is a CSV of x,y (x1,...,xd,y "
        "for a run on points of d x values) and QUERY a CSV of the x values (or with y, then the "
        "MSE is reported). Meta-RL runs: --task names the task; the "
        "policy samples it and takes policy-gradient steps, as fastmaml eval does, and the mean "
        "return after each step is reported. key=value evaluation settings after run_dir "
        "replace the run's for this adaptation, as fastmaml eval takes them (e.g. "
        "eval_policy=last or eval_inner_lr=0.05; before --task, which takes what follows it).")
    adapt.add_argument("run_dir", help="a trained run directory (fastmaml train's --out)")
    adapt.add_argument("--support", help="the new task's labelled examples")
    adapt.add_argument("--query",
                       help="the inputs to predict: a folder of images (or class folders, "
                            "labelled) or one image; a CSV of x values (or with y) for regression")
    adapt.add_argument("--task", nargs="+", action="extend", metavar="KEY=VALUE",
                       help="meta-RL runs: the task to adapt to, e.g. velocity=1.3, "
                            "direction=-1 or goal=0.3,-0.2")
    adapt.add_argument("--seed", type=int, default=0,
                       help="meta-RL runs: the seed of the sampled episodes (default 0)")
    adapt.add_argument("--steps", type=int, help="inner steps (default: the run's eval setting)")
    adapt.add_argument("--out", help="write the predictions (meta-RL: the returns per step) "
                       "here (default: standard output)")
    adapt.add_argument("--format", choices=("csv", "json"),
                       help="of the output (default: json for an --out named *.json, else csv)")
    adapt.add_argument("--plot", help="regression runs: draw the task and the adaptation here")
    adapt.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the run's device; "
                       "e.g. --device cpu adapts a GPU-trained run on a machine without one)")
    adapt.add_argument("--norm", choices=NORMS,
                       help="batch norm at prediction: each query image with the support set "
                       "(default; independent of the other query images), or the whole query "
                       "set as one batch (the paper's protocol)")
    adapt.set_defaults(run=_adapt, overrides=[])
    adapt.usage = adapt.format_usage().removeprefix("usage: ").rstrip() + " [key=value ...]"
    report = command("report", "every experiment beside the paper, in one Markdown document")
    report.add_argument("runs", nargs="*", metavar="RUN_DIR",
                        help="run directories, or folders of them (default: results/)")
    report.add_argument("--out", default="REPORT.md", help="the report file (default REPORT.md)")
    report.set_defaults(run=_report, overrides=[])
    again = command("reproduce", "train, evaluate and plot experiments at a budget (finished "
                    "runs are only plotted), then write the report")
    again.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                       help=f"any of {', '.join(EXPERIMENTS)} (default: sinusoid, "
                       "omniglot-5w1s and rl-nav2d for the tiny and demo budgets, all otherwise)")
    again.add_argument("--budget", choices=tuple(BUDGETS), default="demo",
                       help="tiny: seconds (a smoke test); demo (default): about 7 minutes on "
                       "2 cores; cpu: the CPU-budget presets; paper: the paper's settings")
    again.add_argument("--root", help="where the runs go (default runs/reproduce-<budget>)")
    again.add_argument("--out", help="the report file (default <root>/REPORT.md)")
    again.set_defaults(run=_reproduce, overrides=[])
    for sub in (train, commands.choices["eval"], again):
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")  # a terminal's colour or style


def _show_warning(message, category, filename, lineno, file=None, line=None, *,  # noqa: ANN001
                  others: Callable[..., None] = warnings.showwarning) -> None:
    """fastmaml's own warnings as one line, once per machine under torchrun (its ranks read one
    command line and the same files), but a rank's own execution path by each rank; any other
    as ``others`` shows it (the display in place when the command began)."""
    if issubclass(category, FastMAMLWarning):
        rank = os.environ.get("RANK", "0")
        if os.environ.get("LOCAL_RANK", "0") == "0" or issubclass(category, PathWarning):
            where = "" if rank == "0" else f" (rank {rank})"
            print(f"fastmaml: warning{where}: {message}", file=sys.stderr)
    else:  # a library's colours (gymnasium's) are escape codes in a log file
        plain = str(message) if sys.stderr.isatty() else ANSI_CODE.sub("", str(message))
        others(plain, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: the process's) and return its exit status; a
    caller in Python sees other warnings as its display shows them, and gets that display and
    its filters back on return."""
    with warnings.catch_warnings():
        warnings.showwarning = functools.partial(_show_warning, others=warnings.showwarning)
        return _command(argv)


SPLIT_COMMANDS = ("train", "eval", "reproduce")  # those that share their work under torchrun


def _a_torchrun_rank_but_the_first() -> bool:
    """Whether torchrun started this process, and not as rank 0: a command that runs in one
    process (plot, adapt, report, presets) runs on rank 0 alone (on every rank, adapt's
    ranks took each other for another command holding the run, and plot drew every figure
    twice). Processes other launchers start (Kubeflow's, one per machine) run it each."""
    return "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("RANK", "0") != "0"


def _command(argv: list[str] | None) -> int:
    parser = build_parser()
    # key=value overrides may come anywhere (train P --out D k=v; eval D eval_tasks=100).
    args, extra = parser.parse_known_args(argv)
    flags = [item for item in extra if item.startswith("-")]  # (an override is key=value)
    if flags or (extra and args.command not in ("train", "eval", "adapt")):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}"
                     + (f" (fastmaml {args.command} --help lists its options)" if flags else ""))
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command in SPLIT_COMMANDS or not _a_torchrun_rank_but_the_first():
            args.run(args)
    except FastMAMLError as error:
        rank, size = world()
        if isinstance(error, ConfigError):  # the ranks of a machine read one command line and
            # files: one of them says it (also where the group was refused: no rank known yet)
            if (os.environ.get("LOCAL_RANK", str(rank)) == "0"
                    or size == 1 and os.environ.get("WORLD_SIZE", "1") == "1"):
                print(f"fastmaml: error: {error}", file=sys.stderr)
        elif size == 1:
            print(f"fastmaml: error: {error}", file=sys.stderr)
        else:  # e.g. a file that this rank read
            print(f"fastmaml: error (rank {rank} of {size}): {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (e.g. `fastmaml adapt ... | head`): no noise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:  # the system's refusal (permissions, a full disk): it names the path
        print(f"fastmaml: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a GPU's OutOfMemoryError, or the CPU allocator's refusal
        if not is_out_of_memory(error):
            raise
        where = "device memory" if isinstance(error, torch.OutOfMemoryError) else "memory"
        detail = str(error).splitlines()[0]
        request = re.search(r"tried to allocate (\d+) bytes", detail)  # the CPU allocator's
        if request:
            size = int(request[1])
            detail = "tried to allocate " + (f"{size / 2**30:,.1f} GiB" if size >= 2**30
                                             else f"{size / 2**20:,.1f} MiB")
        print(f"fastmaml: error: out of {where} ({detail}): lower "
              "meta_batch, chunk_size or eval_chunk, or set checkpoint_steps=true; a training "
              "run keeps its last checkpoint", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        if world()[0] == 0:  # every rank stops; one says so (where stderr is still read)
            with contextlib.suppress(OSError):
                print(f"fastmaml: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print("fastmaml: interrupted" + _how_to_go_on(args), file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        leave()  # a rank that stopped early (the others finish with ``shutdown``)
    return 0
