"""The ``fastmaml`` command line: presets, train, eval, plot."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import FastMAMLError, FastMAMLWarning
from .experiments import PRESETS, load_run, prepare_run
from .distributed import init_from_env, shutdown, world
from .train import check_resumable, fit


def _presets(_: argparse.Namespace) -> None:
    width = max(map(len, PRESETS))
    for name, chosen in PRESETS.items():
        print(f"{name:<{width}}  [{chosen.experiment}] {chosen.description}")


def _train(args: argparse.Namespace) -> None:
    init_from_env()
    run_dir = Path(args.out or f"runs/{args.preset}")
    overrides = args.overrides + ([f"data_root={args.data_root}"] if args.data_root else [])
    experiment = prepare_run(args.preset, run_dir, overrides)
    cfg = experiment.cfg
    learners = experiment.learners()  # loads the data and builds the models: bad values fail here
    for learner in learners:
        check_resumable(learner, run_dir)
    experiment.save_config()  # so a refused command leaves the run directory as it was
    rank, size = world()
    say = print if rank == 0 else (lambda *_: None)
    say(f"fastmaml: training {args.preset} in {run_dir} on {experiment.device}"
        + (f", {size} processes" if size > 1 else ""))
    for learner in learners:
        last = fit(learner, run_dir, cfg.checkpoint_every, cfg.log_every,
                   progress=not args.no_progress)
        engine = getattr(getattr(learner, "module", None), "path", None)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
        say(f"  {learner.name}: {learner.iterations} iterations done"
              + (f" ({engine} path)" if engine else "") + (f"; last: {summary}" if summary else ""))
    shutdown()
    say(f"fastmaml: checkpoints in {run_dir}/checkpoints, metrics in {run_dir}/metrics-*.csv. "
          f"Next: fastmaml eval {run_dir}")


def _eval(args: argparse.Namespace) -> None:
    experiment = load_run(Path(args.run_dir), args.overrides)
    experiment.evaluate(progress=not args.no_progress)
    print((experiment.run_dir / "results.md").read_text())
    print(f"fastmaml: wrote {experiment.run_dir}/eval.json and {experiment.run_dir}/results.md")


def _plot(args: argparse.Namespace) -> None:
    experiment = load_run(Path(args.run_dir))
    for path in experiment.plot():
        print(f"fastmaml: wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmaml", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("presets", help="list the named experiment presets").set_defaults(run=_presets)
    train = commands.add_parser("train", help="train a preset (resumes an existing --out)")
    train.add_argument("preset")
    train.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                       help="typed config overrides, e.g. iterations=2000 inner_steps=2")
    train.add_argument("--out", help="run directory (default runs/<preset>)")
    train.add_argument("--data-root", help="data set folder (the same as data_root=...)")
    train.set_defaults(run=_train)
    eval_overrides = ("key=value overrides after run_dir change settings that do not change "
                      "what was learned, e.g. eval_tasks=100 or data_root=PATH")
    for name, run, text, epilog in (
            ("eval", _eval, "evaluate a trained run with the paper's protocol", eval_overrides),
            ("plot", _plot, "write the figures of an evaluated run", None)):
        sub = commands.add_parser(name, help=text, epilog=epilog)
        sub.add_argument("run_dir")
        sub.set_defaults(run=run, overrides=[])
    for sub in (train, commands.choices["eval"]):
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """fastmaml's own warnings as one line; any other as Python shows it."""
    if issubclass(category, FastMAMLWarning):
        print(f"fastmaml: warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    parser = build_parser()
    # key=value overrides may come anywhere (train P --out D k=v; eval D eval_tasks=100).
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command == "plot" or any("=" not in item for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        args.run(args)
    except FastMAMLError as error:
        print(f"fastmaml: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastmaml: interrupted; the same command resumes from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0
