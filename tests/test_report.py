"""`fastmaml report` and `fastmaml reproduce`: the status logic, skipping, a current report."""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from fastmaml import report
from fastmaml.atomic import write_text_atomic
from fastmaml.cli import main
from fastmaml.config import load_config_dict
from fastmaml.experiments import base
from fastmaml.paper import HEADLINES, Headline
from fastmaml.plots import stale_figures

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = next(h for h in HEADLINES if h.key == "omniglot-5w1s")  # 98.7, higher is better
SINUSOID = next(h for h in HEADLINES if h.key == "sinusoid")  # 0.35 MSE, lower is better


@pytest.mark.parametrize("headline, mean, ci, expected", [
    (OMNIGLOT, 99.53, 0.27, "met"),
    (OMNIGLOT, 98.7, 0.0, "met"),
    (OMNIGLOT, 100 * float(torch.tensor(0.987)), 0.0, "met"),  # 98.69999..., a float32 record
    (OMNIGLOT, 98.5, 0.3, "within CI"),
    (OMNIGLOT, 98.2, 98.7 - 98.2, "within CI"),  # the paper's figure at our interval's edge
    (OMNIGLOT, 98.33, 0.28, "short by 0.37 (the 95% intervals meet)"),  # [98.05, 98.61]
    (OMNIGLOT, 98.0, 0.2, "short by 0.7"),  # [97.8, 98.2]: below the paper's [98.3, 99.1]
    (SINUSOID, 0.30, 0.02, "met"),
    (SINUSOID, 0.37, 0.03, "within CI"),
    (SINUSOID, 0.52, 0.05, "short by 0.17"),
    (SINUSOID, float("nan"), float("nan"), "not finite (the adaptation diverges)"),
])
def test_status(headline: Headline, mean: float, ci: float, expected: str) -> None:
    assert report.status(mean, ci, headline) == expected


def test_a_figure_that_rounds_to_zero_has_no_sign() -> None:
    assert (report._fmt(-0.04, 1), report._fmt(-0.05, 1), report._fmt(None)) == ("0.0", "-0.1", "")


def test_locomotion_is_judged_against_the_pretrained_policy() -> None:
    assert report.shape_status((5.9, 3.0), (-21.0, 4.0)).startswith("met")
    assert report.shape_status((-74.6, 5.0), (-80.0, 2.0)) == "overlaps pretrained"
    assert report.shape_status((-90.0, 1.0), (-80.0, 2.0)) == "below pretrained by 10"
    # on the same tasks, the task-by-task difference decides: its interval is sharper
    assert report.shape_status((-74.6, 5.0), (-80.0, 2.0), (5.4, 1.8)).startswith("met")
    assert report.shape_status((-81.0, 5.0), (-80.0, 2.0), (-1.0, 0.5)) == (
        "below pretrained by 1")
    assert report.shape_status((5.9, 3.0), (-21.0, 4.0), (26.9, 30.0)) == "overlaps pretrained"
    nan = float("nan")
    assert report.shape_status((nan, nan), (-21.0, 4.0)) == report.shape_status(
        (5.9, 3.0), (-21.0, 4.0), (nan, nan)) == "not finite (an adaptation diverges)"


def nav_run(tmp_path: Path, tasks: int = 40, **config: object) -> report.Run:
    record = {"method": "maml", "mean": [-40.0, -8.0, -4.0, -3.5], "ci95": [1.0] * 4,
              "tasks": tasks}
    return report.Run(tmp_path / "nav", {"experiment": "rl", "env": "fastmaml/Nav2D-v0",
                                         "preset": "rl-nav2d", **config}, [record], 100, 60.0, [])


def test_an_rl_run_at_another_horizon_is_not_compared_with_the_paper(tmp_path: Path) -> None:
    headline = next(h for h in HEADLINES if h.key == "rl-nav2d")  # -11.7 after one step
    assert report.evaluate_row(headline, nav_run(tmp_path, horizon=0)).status == "met"
    assert report.evaluate_row(headline, nav_run(tmp_path, horizon=100)).status == "met"
    row = report.evaluate_row(headline, nav_run(tmp_path, horizon=20))
    assert (row.mean, row.status) == (-8.0, "not comparable: horizon 20, the paper's 100 (a "
                                            "return sums over an episode's steps)")


def test_a_locomotion_run_at_another_horizon_is_still_judged_against_pretrained(
        tmp_path: Path) -> None:
    records = [{"method": method, "mean": [0.0, mean, 0.0, 0.0], "ci95": [1.0] * 4, "tasks": 40}
               for method, mean in (("maml", -50.0), ("pretrained", -90.0))]
    run = report.Run(tmp_path / "cheetah", {"experiment": "rl", "preset": "rl-cheetah-vel-cpu",
                                            "env": "fastmaml/HalfCheetahVel-v0", "horizon": 100},
                     records, 500, 60.0, [])
    headline = next(h for h in HEADLINES if h.key == "rl-cheetah-vel")  # horizon 200
    assert report.evaluate_row(headline, run).status == (
        "met (MAML above pretrained) (horizon 100, the paper's 200)")


def test_a_row_measured_on_other_test_tasks_than_the_papers_says_so(tmp_path: Path) -> None:
    headline = next(h for h in HEADLINES if h.key == "rl-nav2d")
    assert report.evaluate_row(headline, nav_run(tmp_path, tasks=4)).status == (
        "met (4 test tasks; the paper's protocol has 40)")


def test_a_row_evaluated_on_fewer_steps_than_the_official_test_says_so(tmp_path: Path) -> None:
    """The official scripts' 4,000 environment steps per task and step (8,000 for the ant
    direction): 40 episodes of navigation's 100 steps, 20 of locomotion's 200."""
    headline = next(h for h in HEADLINES if h.key == "rl-nav2d")
    assert report.evaluate_row(headline, nav_run(tmp_path, eval_trajectories=40)).status == "met"
    run = nav_run(tmp_path, eval_trajectories=40)
    run.records[0]["eval_settings"] = {"eval_trajectories": 20}  # (eval's override, recorded)
    assert report.evaluate_row(headline, run).status == (
        "met (evaluated on 20 x 100 environment steps per task and step; the official test's "
        "4,000)")
    ant = next(h for h in HEADLINES if h.key == "rl-ant-dir")
    records = [{"method": method, "mean": [0.0, mean, 0.0, 0.0], "ci95": [1.0] * 4,
                "eval_settings": {"eval_trajectories": 20}}
               for method, mean in (("maml", 50.0), ("pretrained", 1.0))]
    run = report.Run(tmp_path / "ant", {"experiment": "rl", "env": "fastmaml/AntDir-v0",
                                        "preset": "rl-ant-dir-cpu", "horizon": 200}, records, 500,
                     60.0, [])
    assert report.evaluate_row(ant, run).status.endswith(
        "(evaluated on 20 x 200 environment steps per task and step; the official test's 8,000)")


def test_a_direction_row_also_says_how_many_tasks_turned_the_right_way(tmp_path: Path) -> None:
    config = {"experiment": "rl", "env": "fastmaml/HalfCheetahDir-v0", "preset": "rl-cheetah-dir"}
    records = [{"method": method, "mean": mean, "ci95": [5.0] * 4,
                "right_way": [0.5, share, share, share]}
               for method, mean, share in [("maml", [-20.0, 150.0, 160.0, 165.0], 0.95),
                                           ("pretrained", [-10.0, 5.0, 8.0, 9.0], 0.5)]]
    run = report.Run(tmp_path / "rl-cheetah-dir", config, records, 500, 3600.0, [])
    headline = next(h for h in HEADLINES if h.key == "rl-cheetah-dir")
    row = report.evaluate_row(headline, run)
    assert row.mean == 150.0
    assert row.status == "met (MAML above pretrained); right way 50% -> 95% of tasks"
    records[0]["right_way"] = [0.125, 0.925, 0.9, 0.925]  # 5 and 37 of 40 tasks
    assert "; right way 12.5% -> 92.5% of tasks" in report.evaluate_row(headline, run).status
    records[0]["right_way"] = [0.5, 0.0, 0.0, 0.0]  # above pretrained, but the wrong way
    assert report.evaluate_row(headline, run).status == (
        "not met: MAML above pretrained, but turns no more tasks the right way; right way "
        "50% -> 0% of tasks")


def test_a_locomotion_row_quotes_the_task_by_task_difference_when_evaluated_with_it(
        tmp_path: Path) -> None:
    config = {"experiment": "rl", "env": "fastmaml/AntVel-v0", "preset": "rl-ant-vel-cpu"}
    paired = {"pretrained": {"mean": [15.5, 44.9, 52.0, 53.2], "ci95": [9.0, 8.2, 8.0, 7.9]}}
    records = [{"method": "maml", "mean": [11.7, 44.5, 50.2, 55.0],
                "ci95": [33.1, 28.9, 29.2, 29.1], "paired_difference": paired},
               {"method": "pretrained", "mean": [-3.8, -0.4, -1.9, 1.9],
                "ci95": [26.3, 28.2, 29.6, 30.3]}]
    run = report.Run(tmp_path / "rl-ant-vel", config, records, 500, 3600.0, [])
    headline = next(h for h in HEADLINES if h.key == "rl-ant-vel")
    row = report.evaluate_row(headline, run)
    assert row.status == (  # the intervals overlap; the task-by-task difference is above 0
        "met (MAML above pretrained); MAML minus pretrained on the same tasks +44.9 +- 8.2")
    assert (row.mean, row.ci) == (44.5, 28.9)  # MAML's own interval, not the difference's


def test_the_paper_numbers_come_from_one_table() -> None:
    from fastmaml.experiments import fewshot, rl, sinusoid
    from fastmaml import paper
    assert fewshot.fewshot_paper is paper.fewshot_paper and rl.PAPER is paper.RL
    assert sinusoid.PAPER is paper.SINUSOID
    assert OMNIGLOT.value == 98.7 and OMNIGLOT.ci == 0.4 and OMNIGLOT.maml_pp == 99.47


def test_a_section_lists_the_papers_baselines_beside_its_own(tmp_path: Path) -> None:
    from fastmaml.experiments.base import eval_record

    cheetah = "fastmaml/HalfCheetahVel-v0"
    records = [eval_record(cheetah, method, 20, torch.full((40, 4), mean))
               for method, mean in (("maml", -60.0), ("pretrained", -90.0), ("oracle", -50.0))]
    run = report.Run(tmp_path / "cheetah", {"experiment": "rl", "preset": "rl-cheetah-vel",
                                            "env": cheetah}, records, 500, 60.0, [])
    text = report.render([run], tmp_path / "REPORT.md")
    # the columns are 0, 1 and 3 steps; the oracle is never adapted: its one figure at each
    for row in ("| paper: maml | -129.5 | -78.6 | -60.8 |",
                "| paper: pretrained | -158 | -135.4 | -133.6 |",
                "| paper: random | -254.8 | -254.3 | -230.8 |",
                "| paper: oracle (no adaptation) | -54.5 | -54.5 | -54.5 |"):
        assert row in text
    sinusoid = report.Run(tmp_path / "s", {"experiment": "sinusoid"},
                          [eval_record("sinusoid", "maml", 5, torch.ones(600, 11), metric="mse")],
                          100, 1.0, [])
    text = report.render([sinusoid], tmp_path / "REPORT.md")
    assert "| paper: MAML (K=5) |  | 0.67 | 0.35 |" in text  # 0, 1 and 10 steps
    assert "| paper: pretrained (K=5) |  | 2.41 | 2.19 |" in text


def test_the_projection_follows_a_power_law_and_refuses_a_flat_curve() -> None:
    # error = 0.5 * it ** -0.5: 1% error (99% accuracy) at it = 2,500
    curve = [(it, 0.0, 1 - 0.5 * it ** -0.5) for it in (100, 200, 300, 400, 500, 600)]
    assert report.projected_iterations(curve, 0.99) == pytest.approx(2500)
    flat = [(it, 0.0, 0.9) for it in (100, 200, 300, 400, 500, 600)]
    assert report.projected_iterations(flat, 0.99) is None
    assert report.projected_iterations(curve[:4], 0.99) is None  # two points in the second half


def test_a_run_with_a_cosine_schedule_is_not_projected(tmp_path: Path) -> None:
    curve = [(it, 0.0, 1 - 0.5 * it ** -0.5) for it in (100, 200, 300, 400, 500, 600)]
    config = {"experiment": "fewshot", "dataset": "omniglot", "n_way": 5, "k_shot": 1}
    constant = report.Run(tmp_path / "a", config, [], 600, 60.0, [], validation=curve)
    cosine = report.Run(tmp_path / "b", {**config, "meta_lr_schedule": "cosine"}, [], 600, 60.0,
                        [], validation=curve)
    assert report._projection(constant, 0.97) == "98.7% at ~1,479 it"  # 0.5 / 0.013 squared
    nearly_flat = [(it, 0.0, 0.97 + it * 1e-7) for it in (100, 200, 300, 400, 500, 600)]
    assert report._projection(report.Run(tmp_path / "c", config, [], 600, 60.0, [],
                                         validation=nearly_flat), 0.98) == (
        "98.7%: out of reach of the trend (the power law through its validation, beyond 100x "
        "its iterations)")
    assert "not projected (cosine meta_lr" in report._projection(cosine, 0.97)


def test_time_to_accuracy_counts_a_float32_level_skips_nan_and_lists_every_fewshot_run(
        tmp_path: Path) -> None:
    config = {"experiment": "fewshot", "dataset": "omniglot", "n_way": 5, "k_shot": 1}
    at_90 = float(torch.tensor(0.9))  # 0.8999999761581421, as the metrics log holds it
    curve = [(250, 60.0, float("nan")), (500, 120.0, at_90), (750, 180.0, 0.95)]
    runs = [report.Run(tmp_path / "a", config, [], 750, 180.0, [], validation=curve),
            report.Run(tmp_path / "b", config, [], 750, 180.0, []),  # val_every=0
            # validating every 500 iterations, stopped before the first
            report.Run(tmp_path / "c", {**config, "val_every": 500}, [], 400, 90.0, []),
            # past its first validation without one: its data has no val split
            report.Run(tmp_path / "d", {**config, "val_every": 500}, [], 600, 90.0, []),
            # a folder of the same name elsewhere: both named by their paths
            report.Run(tmp_path / "other" / "a", config, [], 750, 180.0, [], validation=curve)]
    rows = [line for line in report.time_to_accuracy(runs) if line.startswith(
        ("| b |", "| c |", "| d |", f"| {tmp_path.name}/a |", "| other/a |"))]
    assert rows[0].startswith(f"| {tmp_path.name}/a | 500 it, 2 min | 750 it, 3 min "
                              "| not reached | not reached | 95.0% |")
    assert rows[1] == "| b | no validation (val_every=0) |  |  |  |  |  |  |"
    assert rows[2] == "| c | no validation yet (every 500 iterations) |  |  |  |  |  |  |"
    assert rows[3] == "| d | no validation (no val split) |  |  |  |  |  |  |"
    assert rows[4].startswith("| other/a | 500 it, 2 min |")
    text = report.render(runs, tmp_path / "REPORT.md")  # all in the report's table
    assert f"| {tmp_path.name}/a | 500 it, 2 min |" in text
    assert "| b | no validation" in text


def test_a_cosine_run_is_projected_by_finished_runs_of_its_recipe_at_other_lengths(
        tmp_path: Path) -> None:
    def run(name: str, length: int, done: int, shift: float = 0.0, **changed: object
            ) -> report.Run:
        config = {"experiment": "fewshot", "preset": "omniglot-5w1s", "dataset": "omniglot",
                  "n_way": 5, "k_shot": 1, "meta_lr_schedule": "cosine", "iterations": length,
                  **changed}
        # 98.7% (1.3% error) at a 1,479-iteration schedule
        accuracy = 1 - 0.5 * length ** -0.5 + shift
        record = {"experiment": "omniglot", "method": "maml", "k_shot": 1, "tasks": 600,
                  "metric": "accuracy", "mean": [0.2] + [accuracy] * 10, "ci95": [0.01] * 11,
                  "checkpoint_iterations": {"maml": done}}
        return report.Run(tmp_path / name, config, [record], done, 60.0, [],
                          checkpoints={"maml": done})

    live = run("live", 8000, 500)
    long = run("long", 4000, 4000, eval_inner_steps=5)  # how it is evaluated: the same recipe
    short = [run("short", 1000, 1000, 0.002, val_every=100), run("seed", 1000, 1000, -0.002,
                                                                 seed=1)]  # averaged
    others = [run("unfinished", 2000, 1500), run("other-recipe", 3000, 3000, meta_batch=8),
              run("stale", 3000, 3000)]
    others[-1].checkpoints["maml"] = 3500  # trained on after its evaluation
    assert report._projection(live, 0.95, [live, *short, long, *others]) == (
        "98.7% with a ~1,479-iteration schedule (test error of its recipe's finished runs of "
        "1,000 and 4,000 iterations)")
    assert "not projected (cosine meta_lr: needs finished runs of this recipe at two" in (
        report._projection(live, 0.95, [live, *short, *others]))
    barely = run("barely", 4000, 4000, -0.0077)  # 1,000 -> 4,000: error 1.58% -> 1.56%
    assert report._projection(live, 0.95, [live, *short, barely]) == (
        "98.7%: out of reach of the trend (the power law through its recipe's finished runs of "
        "1,000 and 4,000 iterations, beyond 100x the longest)")


def _tested(run_dir: Path, accuracies: dict[int, float], **config: object) -> report.Run:
    """An Omniglot 5-way 1-shot run of 10,000 iterations evaluated at each of ``accuracies``'
    iterations as it trained (the last evaluation its eval.json)."""
    config = {"experiment": "fewshot", "preset": "omniglot-5w1s", "dataset": "omniglot",
              "n_way": 5, "k_shot": 1, "iterations": 10_000, **config}
    evaluations = [[{"experiment": "omniglot", "method": "maml", "k_shot": 1, "tasks": 600,
                     "metric": "accuracy", "mean": [0.2] + [accuracy] * 10,
                     "ci95": [0.01] * 11, "checkpoint_iterations": {"maml": iteration},
                     "eval_settings": {"eval_inner_steps": 10, "eval_tasks": 600}}]
                   for iteration, accuracy in accuracies.items()]
    last = max(accuracies)
    return report.Run(run_dir, config, evaluations[-1], last, 60.0, [],
                      checkpoints={"maml": last}, evaluations=evaluations)


def test_the_test_trend_projects_where_its_power_law_reaches_the_papers_figure(
        tmp_path: Path) -> None:
    # error = 0.5 * it ** -0.5: 98.7% (1.3% error) at ~1,479 iterations, 99.5% at 10,000
    law = {it: 1 - 0.5 * it ** -0.5 for it in range(100, 1300, 100)}
    run = _tested(tmp_path, law)
    assert report._test_projection(run) == (
        "98.7% at ~1,479 it; 99.50% at its 10,000 (the last 6 of 12 evaluations, 700-1,200 it)")
    assert report.evaluation_trend(OMNIGLOT, run) == [
        (it, pytest.approx(a * 100)) for it, a in law.items()]
    # an iteration evaluated again counts once (its latest), another protocol not at all
    again = dataclasses.replace(run, evaluations=[
        *run.evaluations[:-1],
        [{**run.evaluations[3][0], "mean": [0.2] + [0.5] * 10}],  # 400 again, lower
        [{**run.evaluations[5][0], "eval_settings": {"eval_tasks": 100}}],
        run.evaluations[-1]])
    trend = dict(report.evaluation_trend(OMNIGLOT, again))
    assert trend[400] == pytest.approx(50.0) and len(trend) == 12
    other = [{**run.evaluations[5][0], "eval_settings": {"eval_tasks": 100}}]
    assert report.evaluation_trend(OMNIGLOT, dataclasses.replace(
        again, records=other)) == [(600, pytest.approx(law[600] * 100))]
    assert report._test_projection(_tested(tmp_path, {**law, 1300: 0.99})) == "reached"
    assert report._test_projection(_tested(tmp_path, dict(list(law.items())[:3]))) == (
        "too few evaluations (3 of 6)")
    assert report._test_projection(_tested(tmp_path, {it: 0.9 for it in law})) == (
        "98.7%: no falling trend (the last 6 of 12 evaluations, 700-1,200 it)")
    assert report._test_projection(_tested(tmp_path, law, meta_lr_schedule="cosine")) == ""
    plateau = {1000 * i: a for i, a in enumerate(
        (0.97, 0.975, 0.98, 0.98, 0.98, 0.98, 0.98, 0.980001), 1)}  # a crossing past floats
    assert report._test_projection(_tested(tmp_path, plateau)).startswith(
        "98.7%: out of reach of the trend (the power law through the last 4 of 8 evaluations, "
        "5,000-8,000 it, beyond 100x its iterations); 98.00% at its 10,000")
    hundred = _tested(tmp_path, law)
    for records in hundred.history():
        records[0]["tasks"] = 100
    assert report._test_projection(hundred).endswith("700-1,200 it, of 100 test tasks)")
    text = report.render([run], tmp_path / "REPORT.md")
    assert ("After 3 steps, at each evaluation as it trained (iteration: figure; "
            "`eval-history.jsonl`): 100: 95.00; 200: 96.46; 300: 97.11;") in text
    assert "| 98.7% at ~1,479 it; 99.50% at its 10,000 (the last 6 of 12" in text


def test_every_evaluation_is_kept_in_the_history_that_the_report_reads(
        tmp_path: Path) -> None:
    run_dir = evaluated_sinusoid(tmp_path / "sinusoid")
    assert main(["eval", str(run_dir), "--no-progress"]) == 0  # again, at the same iteration
    assert main(["train", "sinusoid-demo", "--out", str(run_dir), "iterations=30",
                 "baseline_iterations=30", "--no-progress"]) == 0
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    lines = (run_dir / base.EVAL_HISTORY).read_text().splitlines()
    assert len(lines) == 3
    latest = json.loads(lines[-1])
    assert latest["records"] == json.loads((run_dir / "eval.json").read_text())
    assert latest["evaluated"].endswith("+00:00")  # its UTC time
    run = report.read_run(run_dir)
    assert [e[0]["checkpoint_iterations"]["maml"] for e in run.history()] == [20, 20, 30]
    trend = report.evaluation_trend(SINUSOID, run)
    assert [it for it, _ in trend] == [20, 30]
    assert trend[-1][1] == pytest.approx(report.evaluate_row(SINUSOID, run).mean)
    unknown = {**latest, "records": [{**latest["records"][0], "checkpoint_iterations": None}]}
    with open(run_dir / base.EVAL_HISTORY, "a") as handle:  # edited by hand, no last newline
        handle.write(f'{{"records": 3\n{json.dumps(unknown)}\nnot json')
    with pytest.warns(report.FastMAMLWarning, match=r"eval-history.jsonl: left out line\(s\) "
                                                    "4, 5, 6, which hold no evaluation records"):
        assert len(report.read_run(run_dir).history()) == 3
    assert main(["eval", str(run_dir), "--no-progress"]) == 0  # appended on a line of its own
    lines = (run_dir / base.EVAL_HISTORY).read_text().splitlines()
    assert lines[-2] == "not json" and json.loads(lines[-1])["records"]


def test_a_run_evaluated_to_fewer_steps_than_its_row_says_how_to_evaluate_it(
        tmp_path: Path) -> None:
    config = {"experiment": "fewshot", "dataset": "omniglot", "n_way": 20, "k_shot": 1}
    record = {"method": "maml", "mean": [0.05, 0.5, 0.8, 0.9], "ci95": [0.01] * 4}
    row = report.evaluate_row(next(h for h in HEADLINES if h.key == "omniglot-20w1s"),
                              report.Run(tmp_path / "run", config, [record], 100, 1.0, []))
    assert row.mean is None and row.status == (
        "evaluated to 3 step(s); the paper's figure is after 5: `fastmaml eval "
        f"{(tmp_path / 'run').as_posix()} eval_inner_steps=5`")


def test_rows_that_are_not_the_papers_protocol_say_so(tmp_path: Path) -> None:
    sinusoid = report.Run(tmp_path / "s", {"experiment": "sinusoid"},
                          [{"method": "maml", "k_shot": k, "mean": [1.0] * 11, "ci95": [0.1] * 11}
                           for k in (10, 20)], 100, 1.0, [])
    assert report.evaluate_row(SINUSOID, sinusoid).status == (
        f"evaluated with K=10, 20, the paper's row is 5-shot: `fastmaml eval "
        f"{(tmp_path / 's').as_posix()} eval_k_shots=5,10,20`")
    fewshot = {"experiment": "fewshot", "dataset": "omniglot", "n_way": 20, "k_shot": 1}
    assert report.headline_key(fewshot) == "omniglot-20w1s"
    assert report.headline_key({**fewshot, "within_alphabet": True}) is None  # no paper row
    lake = report.preset_config("omniglot-20w1s-lake", []).to_dict()  # as config.yaml holds it
    record = {"experiment": "omniglot", "method": "maml", "within_alphabet": True, "tasks": 600,
              "metric": "accuracy",
              "mean": [0.05] + [0.6] * 10, "ci95": [0.01] * 11}
    text = report.render([report.Run(tmp_path / "lake", lake, [record], 1650, 60.0, [])],
                         tmp_path / "REPORT.md")
    # Lake et al.'s figure is people's, after no inner steps: said so, and not in a step column
    assert ("| Omniglot 20-way 1-shot within an alphabet (Lake et al.) | 95.5 (people, Lake "
            "et al.) |  | 60.00 +- 1.00 | short by 35.5 | 1,650 of 60,000 |") in text
    assert "Published, not MAML's and after no inner steps: Lake et al.: people, within " \
        "alphabet 95.5; " in text
    assert "| Lake et al.: people" not in text
    assert "1,650 of 60,000 MAML iterations (unfinished: the train command below resumes it)" \
        in text


def test_an_mlp_run_is_judged_by_the_papers_mlp_row_listed_only_where_one_ran(
        tmp_path: Path) -> None:
    config = report.preset_config("omniglot-5w1s-mlp", []).to_dict()  # as config.yaml holds it
    assert report.headline_key(config) == "omniglot-5w1s-mlp"
    assert report.headline_key({**config, "k_shot": 5}) == "omniglot-5w5s-mlp"
    assert report.headline_key({**config, "dataset": "miniimagenet"}) is None  # no paper row
    record = {"experiment": "omniglot", "method": "maml", "k_shot": 1, "tasks": 600,
              "metric": "accuracy", "mean": [0.2] + [0.9] * 10, "ci95": [0.01] * 11}
    text = report.render([report.Run(tmp_path / "mlp", config, [record], 60000, 60.0, [])],
                         tmp_path / "REPORT.md")
    # the paper's 89.7 +- 1.1 for its MLP, not the conv net's 98.7
    assert "| Omniglot 5-way 1-shot, MLP | 89.7 +- 1.1 (3 steps) |  | 90.00 +- 1.00 | met |" \
        in text
    assert "| Omniglot 5-way 1-shot | 98.7 +- 0.4 (3 steps) | 99.47 |  | no run yet" in text
    assert "5-way 5-shot, MLP" not in text  # a variant without a run is not listed
    assert "Omniglot 5-way 1-shot, MLP" not in report.render([], tmp_path / "REPORT.md")


def test_a_first_order_miniimagenet_run_is_judged_by_the_papers_first_order_figure(
        tmp_path: Path) -> None:
    config = report.preset_config("miniimagenet-5w1s-fo", []).to_dict()
    assert report.headline_key(config) == "miniimagenet-5w1s-fo"
    assert report.headline_key({**config, "k_shot": 5}) == "miniimagenet-5w5s-fo"
    omniglot = report.preset_config("omniglot-5w1s-fo", []).to_dict()
    assert report.headline_key(omniglot) == "omniglot-5w1s"  # the paper has no first-order row
    record = {"experiment": "miniimagenet", "method": "first-order maml", "k_shot": 1,
              "tasks": 600, "metric": "accuracy", "mean": [0.2] + [0.481] * 10,
              "ci95": [0.01] * 11}
    text = report.render([report.Run(tmp_path / "fo", config, [record], 60000, 60.0, [])],
                         tmp_path / "REPORT.md")
    # the paper's 48.07 +- 1.75 for first-order MAML, not second-order MAML's 48.70
    assert ("| MiniImagenet 5-way 1-shot, first-order MAML | 48.07 +- 1.75 (10 steps) | 52.15 | "
            "48.10 +- 1.00 | met |") in text
    assert "first-order MAML" not in report.render([], tmp_path / "REPORT.md")


def test_a_fast_recipe_run_is_a_second_row_beside_the_faithful_one(tmp_path: Path) -> None:
    def run(preset: str, accuracy: float) -> report.Run:
        config = report.preset_config(preset, []).to_dict()  # as config.yaml holds it
        record = {"experiment": "omniglot", "method": "maml", "k_shot": 1, "tasks": 600,
                  "metric": "accuracy", "mean": [0.05] + [accuracy] * 10, "ci95": [0.01] * 11}
        return report.Run(tmp_path / preset, config, [record], 1000, 60.0, [])

    text = report.render([run("omniglot-20w1s", 0.90), run("omniglot-20w1s-fast", 0.96)],
                         tmp_path / "REPORT.md")
    rows = [line for line in text.splitlines()
            if line.startswith(("| Omniglot 20-way 1-shot |", "| Omniglot 20-way 1-shot (fast"))]
    assert len(rows) == 2
    assert "(fast recipe)" not in rows[0] and "short by 5.8" in rows[0]
    assert rows[1].startswith("| Omniglot 20-way 1-shot (fast recipe) |") and "| met |" in rows[1]
    # with the fast recipe's run alone, the paper's recipe still has its row: not run yet
    text = report.render([run("omniglot-20w1s-fast", 0.96)], tmp_path / "REPORT.md")
    rows = [line for line in text.splitlines()
            if line.startswith(("| Omniglot 20-way 1-shot |", "| Omniglot 20-way 1-shot (fast"))]
    assert len(rows) == 2 and "(fast recipe)" in rows[0]
    assert "| no run yet (`fastmaml reproduce --budget paper omniglot-20w1s`) |" in rows[1]
    # a run that changes what the recipe learns says how (the iterations of a cosine schedule
    # too); how it ran, was evaluated or seeded, it does not; nor a faithful row's other preset
    changed = run("omniglot-20w1s-fast", 0.96)
    changed.config.update(per_step="norm", norm_scale=True, iterations=30000, threads=1,
                          seed=3, eval_k_query=5)
    other = run("omniglot-20w1s-fo", 0.90)
    other.config.update(iterations=100, meta_batch=8)
    text = report.render([changed, other], tmp_path / "REPORT.md")
    assert ("| Omniglot 20-way 1-shot (fast recipe, iterations=30000, per_step=norm, "
            "norm_scale=True) |") in text
    assert "| Omniglot 20-way 1-shot (preset omniglot-20w1s-fo, meta_batch=8) |" in text


def test_reproduce_tiny_budget_then_skip_finished_runs(omniglot_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FASTMAML_OMNIGLOT", str(omniglot_root))
    monkeypatch.setenv("FASTMAML_MINIIMAGENET", str(tmp_path / "no-miniimagenet-here"))
    root = tmp_path / "reproduced"
    assert main(["reproduce", "--budget", "tiny", "--root", str(root), "--no-progress"]) == 0
    text = (root / "REPORT.md").read_text()
    for title in ("Sinusoid regression, 5-shot (preset sinusoid-demo)",
                  "Omniglot 5-way 1-shot (meta_batch=2, hidden=8)",
                  "2D navigation (preset rl-nav2d-cpu, meta_batch=2, horizon=10, trajectories=2, "
                  "hidden=8,8)"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {title} |"))
        assert "no run yet" not in row and "reproduced/" not in row  # a run, linked by name
    assert "fastmaml train omniglot-5w1s --out" in text and "hidden=8" in text
    assert ("| no data here (`fastmaml reproduce --budget tiny miniimagenet-5w1s` with the data "
            "in $FASTMAML_MINIIMAGENET; the loader is tested on synthetic files) |") in text
    machine = json.loads((root / "sinusoid" / "machine.json").read_text())[0]
    assert machine["cpus"] >= 1
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"({machine['cpu_capability']}), {machine['cpus']} CPUs" in text
    said = capsys.readouterr().out  # progress is hidden, so each evaluation is said
    for name in ("sinusoid", "omniglot-5w1s", "rl-nav2d"):
        assert (f"fastmaml: {name}: evaluating {root / name} with the paper's protocol\n"
                f"fastmaml: {name}: evaluated: {root / name}/results.md\n") in said

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained a finished run again")

    monkeypatch.setattr(report, "train_run", no_training)
    figures = sorted((root / "sinusoid" / "figures").iterdir())
    shutil.rmtree(root / "sinusoid" / "figures")  # as if stopped between its eval and its plot
    assert main(["reproduce", "--budget", "tiny", "--root", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished in") == 3
    assert sorted((root / "sinusoid" / "figures").iterdir()) == figures
    assert (root / "REPORT.md").read_text() == text


def test_the_command_a_report_suggests_evaluates_the_papers_row(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sinusoid run evaluated without K=5 is told how to evaluate it; the command runs (the
    evaluation's K, queries and baseline search are not what the run learned), and the report's
    own eval command then says it as the evaluation ran."""
    run = tmp_path / "s"
    assert main(["train", "sinusoid-demo", "--out", str(run), "iterations=20",
                 "baseline_iterations=20", "eval_tasks=20", "eval_k_shots=10",
                 "--no-progress"]) == 0
    assert main(["eval", str(run), "--no-progress"]) == 0
    text = report.render([report.read_run(run)], tmp_path / "REPORT.md")
    suggested = text.split("the paper's row is 5-shot: `")[1].split("`")[0]
    assert suggested == f"fastmaml eval {run.as_posix()} eval_k_shots=5,10"
    capsys.readouterr()
    assert main([*suggested.split()[1:], "eval_query=50", "tune_tasks=10", "baseline_lrs=0.01",
                 "--no-progress"]) == 0, capsys.readouterr().err
    text = report.render([report.read_run(run)], tmp_path / "REPORT.md")
    assert "the paper's row is 5-shot" not in text
    assert (f"fastmaml eval {run.as_posix()} eval_k_shots=5,10 eval_query=50 "
            "baseline_lrs=0.01 tune_tasks=10") in text
    assert load_config_dict(run / "config.yaml")["eval_k_shots"] == [10]  # the run's, kept


TINY_SINUSOID = report.BUDGETS["tiny"]["sinusoid"]


def test_unfinished_run_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "r"
    assert main(["train", "sinusoid-demo", "--out", str(root / "sinusoid"), "iterations=20",
                 "baseline_iterations=20", "eval_tasks=20", "eval_k_shots=5", "--no-progress"]) == 0
    assert not report.finished(root / "sinusoid", *TINY_SINUSOID)  # trained, not evaluated
    assert main(["reproduce", "sinusoid", "--budget", "tiny", "--root", str(root),
                 "--no-progress"]) == 0
    assert report.finished(root / "sinusoid", *TINY_SINUSOID)
    assert "sinusoid: finished" not in capsys.readouterr().out
    # another budget's run is neither skipped as finished nor trained over
    assert not report.finished(root / "sinusoid", *report.BUDGETS["cpu"]["sinusoid"])
    assert main(["reproduce", "sinusoid", "--budget", "cpu", "--root", str(root),
                 "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert ("sinusoid: not reproduced: " + f"{root / 'sinusoid'} holds a 'sinusoid-demo' run, not "
            "'sinusoid'") in out
    assert err == (f"fastmaml: error: not reproduced: sinusoid (said above); the report of "
                   f"{root} is in {root / 'REPORT.md'}\n")
    # the demo budget's run of the same preset is longer: neither resumed to stop short nor
    # evaluated again and again (the run is not its; it says so)
    demo = report.BUDGETS["demo"]["sinusoid"]
    assert demo[0] == TINY_SINUSOID[0]
    before = (root / "sinusoid" / "eval.json").stat().st_mtime_ns
    assert main(["reproduce", "sinusoid", "--budget", "demo", "--root", str(root),
                 "--no-progress"]) == 2
    demo_iterations = report.preset_config(*demo).iterations
    assert (f"sinusoid: not reproduced: {root / 'sinusoid'} holds a run of 20 iterations, the "
            f"demo budget trains {demo_iterations:,}: give another --root, or train it on "
            f"(fastmaml train {demo[0]} --out {root / 'sinusoid'} iterations={demo_iterations})"
            ) in capsys.readouterr().out
    assert (root / "sinusoid" / "eval.json").stat().st_mtime_ns == before


def test_an_evaluation_killed_between_its_two_files_is_not_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval.json, which marks a run evaluated, is written after results.md: a kill between the
    two leaves a run that ``reproduce`` evaluates again, never a new eval.json beside an old
    table, nor an earlier evaluation's eval.json beside a new table (a re-evaluation)."""
    run_dir = tmp_path / "r" / "sinusoid"
    assert main(["train", "sinusoid-demo", "--out", str(run_dir), "iterations=20",
                 "baseline_iterations=20", "eval_tasks=20", "eval_k_shots=5", "--no-progress"]) == 0
    assert main(["eval", str(run_dir), "--no-progress"]) == 0  # an earlier evaluation
    written: list[str] = []

    def killed_at_the_second_file(text: str, path: Path) -> None:
        written.append(Path(path).name)
        if len(written) == 2:
            raise KeyboardInterrupt
        write_text_atomic(text, path)

    monkeypatch.setattr(base, "write_text_atomic", killed_at_the_second_file)
    assert main(["eval", str(run_dir), "--no-progress"]) == 128 + signal.SIGINT
    assert written == ["results.md", "eval.json"] and not (run_dir / "eval.json").exists()
    assert not report.finished(run_dir, *TINY_SINUSOID)


def test_a_live_run_reads_without_the_row_being_appended(tmp_path: Path) -> None:
    run_dir = tmp_path / "sinusoid"
    assert main(["train", "sinusoid-demo", "--out", str(run_dir), "iterations=20",
                 "baseline_iterations=20", "log_every=10", "--no-progress"]) == 0
    with open(run_dir / "metrics-maml.csv", "a") as handle:
        handle.write("30,1")  # the training process is half-way through writing a row
    run = report.read_run(run_dir)
    assert run.iterations == 20
    assert main(["plot", str(run_dir)]) == 0


def evaluated_sinusoid(run_dir: Path) -> Path:
    """A sinusoid run of 20 iterations, trained and evaluated on 20 tasks."""
    assert main(["train", "sinusoid-demo", "--out", str(run_dir), "iterations=20",
                 "baseline_iterations=20", "eval_tasks=20", "eval_k_shots=5",
                 "--no-progress"]) == 0
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    return run_dir


def test_runs_of_one_name_in_two_folders_link_to_their_own_sections(tmp_path: Path) -> None:
    kept, again = tmp_path / "results" / "sinusoid", tmp_path / "reproduce-tiny" / "sinusoid"
    shutil.copytree(evaluated_sinusoid(kept), again)
    runs, unread = report.find_runs([kept.parent, again.parent, kept, kept])  # kept thrice
    assert [run.path for run in runs] == [kept, again] and not unread
    text = report.render(runs, tmp_path / "REPORT.md")
    anchors = [line.split('"')[1] for line in text.splitlines() if line.startswith("<a id=")]
    assert len(anchors) == len(set(anchors)) == 2
    for run_dir, anchor in zip((kept, again), anchors):
        assert f'<a id="{anchor}"></a>\n## Sinusoid regression, 5-shot: `{run_dir.as_posix()}`' \
            in text
        assert f"[{run_dir.parent.name}/sinusoid](#{anchor})" in text  # its row links to it
    assert "Preset `sinusoid-demo`; 20 MAML iterations; " in text
    one = dataclasses.replace(runs[0], iterations=1, config={**runs[0].config, "iterations": 1})
    assert "; 1 MAML iteration; " in report.render([one], tmp_path / "R.md")
    # paths that differ only in case and punctuation still get an anchor each
    twins = [dataclasses.replace(runs[0], path=Path(name)) for name in ("a/Run_1", "a/run-1")]
    text = report.render(twins, tmp_path / "R.md")
    assert '<a id="run-a-run-1"></a>' in text and '<a id="run-a-run-1-2"></a>' in text


def test_a_damaged_run_below_a_folder_is_left_out_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, damaged = tmp_path / "results" / "good", tmp_path / "results" / "damaged"
    shutil.copytree(evaluated_sinusoid(good), damaged)
    config = damaged / "config.yaml"
    config.write_text(config.read_text().replace("meta_batch: ", "meta_batch: two #"))
    capsys.readouterr()
    out = tmp_path / "REPORT.md"
    assert main(["report", str(good.parent), "--out", str(out)]) == 0
    why = f"{config}: config key 'meta_batch' expects int"
    assert f"fastmaml: warning: {damaged.as_posix()} is left out of the report: {why}" \
        in capsys.readouterr().err
    text = out.read_text()
    assert f"## Sinusoid regression, 5-shot: `{good.as_posix()}`" in text
    assert f"# Runs not read\n\nRun directories left out of this report:\n\n" \
           f"- `{damaged.as_posix()}`: {why}" in text
    assert main(["report", str(good), str(damaged), "--out", str(out)]) == 2  # named: an error


def test_a_run_stopped_between_log_rows_counts_the_iterations_of_its_checkpoint(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "sinusoid"
    assert main(["train", "sinusoid-demo", "--out", str(run_dir), "iterations=20",
                 "baseline_iterations=20", "log_every=10", "--no-progress"]) == 0
    elapsed = [torch.load(path, weights_only=True)["elapsed_s"]
               for path in (run_dir / "checkpoints").glob("*.pt")]
    log = run_dir / "metrics-maml.csv"
    *kept, last = log.read_text().splitlines(keepends=True)
    lost = ",".join(["30", "1e6", *last.split(",")[2:]])  # logged past the checkpoint, then lost
    log.write_text("".join(kept) + lost)  # as if stopped at 20 (a kill after a row at 30)
    run = report.read_run(run_dir)
    assert run.iterations == 20  # of 20, with the log's last row at 10
    assert run.train_seconds == pytest.approx(sum(elapsed))  # the learners' checkpoints' times
    log.write_text("".join(kept))
    (run_dir / "checkpoints" / "maml.pt").write_bytes(b"truncated")
    assert report.read_run(run_dir).iterations == 10  # the log's, not an error for every run
    (run_dir / "checkpoints" / "maml.pt").unlink()  # stopped before its first checkpoint
    assert report.read_run(run_dir).iterations == 0


def test_a_run_without_checkpoints_a_config_key_or_an_elapsed_time_reads_clearly(
        tmp_path: Path) -> None:
    run_dir = evaluated_sinusoid(tmp_path / "results" / "sinusoid")
    shutil.rmtree(run_dir / "checkpoints")  # shipped without them: as far as eval.json says
    assert report.read_run(run_dir).iterations == 20
    config = run_dir / "config.yaml"  # a key left out is its default, as training reads it
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.startswith("meta_batch:")))
    default = report.experiment_class("sinusoid").config_cls().meta_batch
    assert report.read_run(run_dir).config["meta_batch"] == default
    log = run_dir / "metrics-maml.csv"
    lines = log.read_text().splitlines(keepends=True)
    iteration, _, rest = lines[-1].split(",", 2)
    log.write_text("".join(lines[:-1]) + f"{iteration},,{rest}")  # elapsed_s left blank
    with pytest.raises(report.DataError, match=f"{log}: the row of iteration {iteration} has no "
                       "elapsed_s"):
        report.read_run(run_dir)
    with pytest.warns(report.FastMAMLWarning, match="left out of the report"):
        runs, unread = report.find_runs([run_dir.parent])  # one of a folder's runs: left out
    assert not runs and [path for path, _ in unread] == [run_dir] and "elapsed_s" in unread[0][1]


def test_the_eval_command_is_the_one_the_evaluation_ran(tmp_path: Path) -> None:
    run_dir = tmp_path / "sinusoid"
    assert main(["train", "sinusoid-demo", "--out", str(run_dir), "iterations=20",
                 "baseline_iterations=20", "eval_k_shots=5", "--no-progress"]) == 0
    assert main(["eval", str(run_dir), "eval_tasks=7", "eval_inner_steps=2", "eval_chunk=3",
                 "--no-progress"]) == 0  # (eval_chunk: how, not what, it measures)
    assert report._commands(report.read_run(run_dir))[1] == (
        f"fastmaml eval {run_dir.as_posix()} eval_inner_steps=2 eval_tasks=7")
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    assert report._commands(report.read_run(run_dir))[1] == f"fastmaml eval {run_dir.as_posix()}"


def test_a_command_with_the_data_folder_says_what_data_stands_for() -> None:
    """A run's own data folder is its machine's: the command names it DATA, and says so."""
    omniglot, sinusoid = (report.read_run(REPO / "results" / name)
                          for name in ("omniglot-5w1s", "sinusoid"))
    assert "--data-root DATA" in report._commands(omniglot)[0]
    text = report.render([omniglot, sinusoid], REPO / "docs" / "REPORT.md")
    assert text.count("`DATA`: the folder that holds the data set (`download=true` fetches "
                      "Omniglot's official files into it).") == 1
    assert "DATA" not in report._commands(sinusoid)[0]


def test_an_evaluation_older_than_the_training_is_flagged(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "sinusoid"
    common = ["baseline_iterations=20", "eval_tasks=20", "eval_k_shots=5", "--no-progress"]
    assert main(["train", "sinusoid-demo", "--out", str(run_dir), "iterations=20", *common]) == 0
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    records = json.loads((run_dir / "eval.json").read_text())
    assert records[0]["checkpoint_iterations"]["maml"] == 20
    assert report.finished(run_dir, *TINY_SINUSOID)
    assert not report.read_run(run_dir).stale_evaluation
    assert main(["plot", str(run_dir)]) == 0
    figures = {"learning_curves.png", "mse_vs_steps.png", "adaptation_k5.png"}
    assert {path.name for path in (run_dir / "figures").glob("*.png")} == figures
    assert report.read_run(run_dir).stale_figures == {}

    assert main(["train", "sinusoid-demo", "--out", str(run_dir), "iterations=30", *common]) == 0
    run = report.read_run(run_dir)
    assert run.stale_figures == {  # (the baselines' logs are as they were: 20 iterations)
        "adaptation_k5.png": "checkpoints/maml.pt changed since it was drawn",  # (the models)
        "learning_curves.png": "metrics-maml.csv changed since it was drawn"}
    assert ("Note: figures that may not show the run as it is now (adaptation_k5.png: "
            "checkpoints/maml.pt changed since it was drawn; learning_curves.png: "
            "metrics-maml.csv changed since it was drawn): run "
            f"`fastmaml plot {run_dir.as_posix()}`.") in report.render([run], tmp_path / "R.md")
    assert run.stale_evaluation.startswith(
        "evaluated older checkpoints (maml 20 -> 30 iterations)")
    assert not report.finished(run_dir, *TINY_SINUSOID)  # reproduce evaluates it again
    assert "maml 20 -> 30" in report.evaluate_row(SINUSOID, run).status
    capsys.readouterr()
    assert main(["plot", str(run_dir)]) == 0  # its figures of the evaluation are old too
    assert ("fastmaml: the evaluation figures draw eval.json, not the run as it is now: "
            "evaluated older checkpoints (maml 20 -> 30 iterations)") in capsys.readouterr().err
    assert report.read_run(run_dir).stale_figures == {}  # (they drew the files as they are)
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    assert report.finished(run_dir, *TINY_SINUSOID)
    assert set(report.read_run(run_dir).stale_figures) == figures - {"learning_curves.png"}
    capsys.readouterr()
    assert main(["plot", str(run_dir)]) == 0
    assert "eval.json, which" not in capsys.readouterr().err
    assert report.read_run(run_dir).stale_figures == {}


def test_a_baseline_evaluated_before_its_end_is_said_and_flagged(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "sinusoid"
    common = ["--out", str(run_dir), "iterations=20", "eval_tasks=20", "eval_k_shots=5",
              "--no-progress"]
    assert main(["train", "sinusoid-demo", "baseline_iterations=20", *common]) == 0
    # the baselines are to train on to 30 (e.g. in another process), MAML is done
    assert main(["train", "sinusoid-demo", "--learner", "maml", "baseline_iterations=30",
                 *common]) == 0
    assert f"Next, once every learner of the run is trained: fastmaml eval {run_dir}" in (
        capsys.readouterr().out)  # (was "Next:", and eval refused a run of MAML alone)
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    assert ("warning: pretrained of " + str(run_dir) + " is at iteration 20 of 30 (training, or "
            "stopped): it is used as it is now") in capsys.readouterr().err
    run = report.read_run(run_dir)
    assert run.stale_evaluation.startswith("evaluated pretrained at 20 of 30, oracle at 20 of 30 "
                                           "iterations: train it on")
    assert not report.finished(run_dir, *TINY_SINUSOID)
    assert main(["train", "sinusoid-demo", "--learner", "pretrained", "baseline_iterations=30",
                 *common]) == 0
    assert f"Next, once every learner of the run is trained: fastmaml eval {run_dir}" in (
        capsys.readouterr().out)
    alone = tmp_path / "maml-alone"
    assert main(["train", "sinusoid-demo", "--learner", "maml", "--out", str(alone),
                 *common[2:]]) == 0
    assert main(["eval", str(alone), "--no-progress"]) == 2
    assert capsys.readouterr().err.endswith(
        f"no pretrained, oracle checkpoint in {alone}: train them first (fastmaml train "
        f"sinusoid-demo --out {alone} --learner pretrained; fastmaml train sinusoid-demo --out "
        f"{alone} --learner oracle)\n")


def test_unknown_experiments_bad_overrides_and_a_folder_as_report_are_clear_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["reproduce", "cifar", "--budget", "tiny", "--root", str(tmp_path)]) == 2
    assert "unknown experiment(s) cifar for budget tiny; known:" in capsys.readouterr().err
    assert main(["reproduce", "cifar", "omniglt", "--budget", "tiny", "--root", str(tmp_path)]) == 2
    assert ("unknown experiment(s) cifar, omniglt (did you mean omniglot-5w5s or omniglot-5w1s?) "
            "for budget tiny"
            in capsys.readouterr().err)
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert f"error: {tmp_path / 'nothing'} does not exist\n" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no fastmaml run directory at or below" in capsys.readouterr().err
    with monkeypatch.context() as patched:
        patched.chdir(tmp_path)  # no results/ here
        assert main(["report"]) == 2
        assert ("results does not exist (report reads results/ of the current folder unless "
                "given run directories)") in capsys.readouterr().err
    assert main(["report", str(REPO / "results" / "sinusoid"), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder: name the report file" in capsys.readouterr().err
    assert main(["train", "sinusoid", "--out", str(tmp_path / "run"), "iterations=2",
                 "iterations"]) == 2  # the one bare item named, not every override
    assert capsys.readouterr().err == ("fastmaml: error: override 'iterations' is not of the "
                                       "form key=value\n")


def test_an_out_or_root_under_a_file_is_refused_before_any_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("")
    afile = tmp_path / "afile"
    for options, said in ((["--root", str(afile)], f"--root {afile} is a file"),
                          (["--root", str(tmp_path / "r"), "--out", str(afile / "REPORT.md")],
                           f"--out {afile / 'REPORT.md'}: {afile} is a file")):
        assert main(["reproduce", "sinusoid", "--budget", "tiny", *options]) == 2
        assert capsys.readouterr().err == f"fastmaml: error: {said}, not a folder\n"
        assert not (tmp_path / "r").exists()
    assert main(["train", "sinusoid-demo", "--out", str(tmp_path / "afile" / "run")]) == 2
    assert capsys.readouterr().err == (f"fastmaml: error: --out {tmp_path / 'afile' / 'run'}: "
                                       f"{tmp_path / 'afile'} is a file, not a folder\n")


def test_reproduce_with_no_experiment_reproduced_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    monkeypatch.setenv("FASTMAML_OMNIGLOT", str(tmp_path / "no-omniglot-here"))
    assert main(["reproduce", "omniglot-5w1s", "--budget", "tiny", "--root",
                 str(tmp_path / "runs"), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "omniglot-5w1s: not reproduced: Omniglot not found in" in out
    assert err.startswith("fastmaml: error: no run in") and "omniglot-5w1s could not be" in err


def test_a_reproduced_report_says_why_an_experiment_is_missing_and_the_budget_asked_for(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """The report of a reproduce without Omniglot's data said "no run yet" and suggested the
    paper budget's 60,000 iterations after a tiny one."""
    monkeypatch.setenv("FASTMAML_OMNIGLOT", str(tmp_path / "no-omniglot-here"))
    root = tmp_path / "runs"
    assert main(["reproduce", "sinusoid", "omniglot-5w1s", "--budget", "tiny", "--root",
                 str(root), "--no-progress"]) == 2
    capsys.readouterr()
    rows = {line.split(" | ")[0]: line for line in (root / "REPORT.md").read_text().splitlines()
            if line.startswith("| Omniglot")}
    assert (f"| not reproduced: Omniglot not found in {tmp_path / 'no-omniglot-here'}: missing "
            "images_background, images_evaluation |") in rows["| Omniglot 5-way 1-shot"]
    assert "| no run yet (`fastmaml reproduce --budget tiny omniglot-5w5s`) |" in (
        rows["| Omniglot 5-way 5-shot"])
    said = report.render([], root / "REPORT.md", budget="tiny", not_reproduced={
        "omniglot-5w5s": "a | b, e.g. c.\nNext line. Later"})  # one table cell, one sentence
    assert "| not reproduced: a \\| b, e.g. c |" in said
    monkeypatch.setenv("FASTMAML_MINIIMAGENET", str(tmp_path))  # a user's copy (none here)
    assert "| no run yet (`fastmaml reproduce --budget tiny miniimagenet-5w5s` with the data in " in (
        report.render([], root / "REPORT.md", budget="tiny"))


def test_the_committed_figures_are_current() -> None:
    stale = {f"{run.name}/figures/{name}": why for run in sorted((REPO / "results").iterdir())
             for name, why in stale_figures(run / "figures").items()}
    assert not stale, "figures to draw again with `fastmaml plot`: " + str(stale)


def test_the_committed_report_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("FASTMAML_MINIIMAGENET", str(REPO / "no-miniimagenet-here"))  # as here
    runs, unread = report.find_runs([Path("results")])
    expected = report.render(runs, Path("docs/REPORT.md"), unread)
    assert (REPO / "docs" / "REPORT.md").read_text() == expected, \
        "docs/REPORT.md is stale: run `fastmaml report --out docs/REPORT.md`"


def test_a_regression_run_of_its_own_tasks_reports_its_query_mse(tmp_path: Path) -> None:
    from fastmaml.experiments.base import eval_record

    record = eval_record("regression", "maml", 5, torch.rand(20, 11), metric="mse")
    run = report.Run(tmp_path / "mine", {"experiment": "regression", "preset": "regression-csv"},
                     [record], 100, 30.0, [])
    text = report.render([run], tmp_path / "REPORT.md")
    assert "query MSE after N inner steps, mean +- 95% CI over 20 tasks:" in text


def test_a_meta_rl_run_no_row_covers_reports_its_return(tmp_path: Path) -> None:
    from fastmaml.experiments.base import eval_record

    record = eval_record("fastmaml/Nav2D-v0", "maml", 20, -torch.rand(8, 4))
    run = report.Run(tmp_path / "point", {"experiment": "rl", "preset": "rl-env",  # (any id)
                                          "env": "fastmaml/Nav2D-v0"}, [record], 10, 30.0, [])
    text = report.render([run], tmp_path / "REPORT.md")
    assert "return after N inner steps, mean +- 95% CI over 8 tasks:" in text
