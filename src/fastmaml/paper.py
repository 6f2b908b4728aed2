"""The published numbers fastmaml reproduces, in one place (../shared/docs/paper.md).

Finn, Abbeel & Levine 2017 (MAML, Tables 1-2 and the official result files behind Figure 5),
Antoniou et al. 2019 (MAML++), Lake et al. 2015 and Koch et al. 2015 (Omniglot one-shot within an
alphabet). The experiments print these beside their own results; ``fastmaml report`` compares
against ``HEADLINES``.
"""
from __future__ import annotations

from dataclasses import dataclass

NAV = "fastmaml/Nav2D-v0"
LOCOMOTION = ("fastmaml/HalfCheetahVel-v0", "fastmaml/HalfCheetahDir-v0", "fastmaml/AntVel-v0",
              "fastmaml/AntDir-v0")
PAPER_ENVS = (NAV, *LOCOMOTION)  # fastmaml's environments; any other id is a user's

PaperValues = list[tuple[str, dict[int, float]]]  # (label, the figure at each number of steps)

# Sinusoid (Table 2): 5-shot MSE after 1 / 5 / 10 steps.
SINUSOID: dict[int, PaperValues] = {
    5: [("paper: MAML", {1: 0.67, 5: 0.38, 10: 0.35}),
        ("paper: pretrained", {1: 2.41, 5: 2.23, 10: 2.19})]}

# Table 1 and the MiniImagenet results (accuracy, %), at the number of test steps the paper used.
FEWSHOT: dict[tuple[str, int, int], tuple[int, list[tuple[str, float]]]] = {
    ("omniglot", 5, 1): (3, [("paper: MAML", 98.7), ("paper: MAML++", 99.47)]),
    ("omniglot", 5, 5): (3, [("paper: MAML", 99.9), ("paper: MAML++", 99.85)]),
    ("omniglot", 20, 1): (5, [("paper: MAML", 95.8), ("paper: MAML++", 97.65)]),
    ("omniglot", 20, 5): (5, [("paper: MAML", 98.9), ("paper: MAML++", 99.33)]),
    ("miniimagenet", 5, 1): (10, [("paper: MAML", 48.70), ("paper: first-order MAML", 48.07),
                                  ("paper: MAML++", 52.15)]),
    ("miniimagenet", 5, 5): (10, [("paper: MAML", 63.11), ("paper: first-order MAML", 63.15),
                                  ("paper: MAML++", 68.32)]),
}
FEWSHOT_CI = {("omniglot", 5, 1): 0.4, ("omniglot", 5, 5): 0.1, ("omniglot", 20, 1): 0.3,
              ("omniglot", 20, 5): 0.2, ("miniimagenet", 5, 1): 1.84, ("miniimagenet", 5, 5): 0.92}
FIRST_ORDER_CI = {("miniimagenet", 5, 1): 1.75, ("miniimagenet", 5, 5): 0.91}
# Table 1's row of the paper's fully connected network (network=mlp), and its intervals.
FEWSHOT_MLP: dict[tuple[str, int, int], tuple[int, list[tuple[str, float]]]] = {
    ("omniglot", 5, 1): (3, [("paper: MAML, MLP", 89.7)]),
    ("omniglot", 5, 5): (3, [("paper: MAML, MLP", 97.5)]),
}
FEWSHOT_MLP_CI = {("omniglot", 5, 1): 1.1, ("omniglot", 5, 5): 0.6}


def _fewshot_tables(network: str) -> tuple[dict, dict]:
    """The accuracy table and the interval table of ``network`` (conv or mlp)."""
    return (FEWSHOT_MLP, FEWSHOT_MLP_CI) if network == "mlp" else (FEWSHOT, FEWSHOT_CI)


def fewshot_paper(dataset: str, n_way: int, k_shot: int, network: str = "conv"
                  ) -> tuple[int, list[tuple[str, float]]]:
    """The published accuracies (%) of a few-shot setting on ``network`` and the number of
    test steps they were taken after; ``(0, [])`` where the paper has none."""
    return _fewshot_tables(network)[0].get((dataset, n_way, k_shot), (0, []))


def at_step(step: int, figures: list[tuple[str, float]]) -> PaperValues:
    """``figures`` published after ``step`` steps, as rows of a table by number of steps."""
    return [(label, {step: value}) for label, value in figures]


# Lake et al.'s protocol (split=lake): 20-way one-shot within an alphabet, published as error
# rates (Lake et al. 2015; Koch et al. 2015 for the siamese nets), here as accuracies.
LAKE: dict[tuple[int, int], list[tuple[str, float]]] = {
    (20, 1): [("Lake et al.: people, within alphabet", 95.5),
              ("Lake et al.: Bayesian program learning, within alphabet", 96.7),
              ("Koch et al.: siamese nets, within alphabet", 92.0)],
}

# Meta-RL: mean return over the 40 test tasks after 0 / 1 / 2 / 3 steps, and the oracle.
RL: dict[str, dict[str, list[float]]] = {
    NAV: {"maml": [-40.4, -11.7, -3.3, -3.2], "pretrained": [-40.8, -19.7, -11.7, -8.5],
          "random": [-82.7, -58.0, -53.8, -46.8], "oracle": [-2.3]},
    "fastmaml/HalfCheetahVel-v0": {
        "maml": [-129.5, -78.6, -66.6, -60.8], "pretrained": [-158.0, -135.4, -128.5, -133.6],
        "random": [-254.8, -254.3, -246.8, -230.8], "oracle": [-54.5]},
    "fastmaml/HalfCheetahDir-v0": {
        "maml": [-50.7, 293.2, 313.5, 315.7], "pretrained": [-43.0, -24.8, -12.9, 19.6],
        "random": [-35.7, 21.8, 62.3, 86.2], "oracle": [442.7]},
    "fastmaml/AntVel-v0": {
        "maml": [30.6, 96.7, 100.1, 101.4], "pretrained": [-1.8, 6.1, 8.5, 9.5],
        "random": [-78.6, -62.8, -48.6, -35.6], "oracle": [107.9]},
    "fastmaml/AntDir-v0": {
        "maml": [8.7, 499.2, 500.7, 499.1], "pretrained": [3.2, 1.3, 6.5, 6.9],
        "random": [3.1, 9.3, 16.0, 26.1], "oracle": [524.8]},
}


def rl_paper(env: str, steps: int = 3) -> PaperValues:
    """The paper's mean returns on ``env`` by number of steps, its oracle (never adapted) at each
    step up to ``steps``; none for a user's environment."""
    published = RL.get(env, {})
    rows = [(f"paper: {method}", dict(enumerate(returns)))
            for method, returns in published.items() if method != "oracle"]
    if "oracle" in published:
        rows.append(("paper: oracle (no adaptation)",
                     dict.fromkeys(range(steps + 1), published["oracle"][0])))
    return rows


@dataclass(frozen=True)
class Headline:
    """One row of the paper that ``fastmaml report`` checks a run against.

    ``value`` is MAML's published figure after ``step`` inner steps (first-order MAML's in a
    first-order row), ``ci`` its published 95% interval (if any) and ``maml_pp`` MAML++'s. ``shape_only`` rows (locomotion: gymnasium's
    models differ from rllab's) are judged by MAML against the pretrained baseline after one
    step, not by the number. ``tasks`` is the paper's number of test tasks, ``horizon`` an
    RL row's episode length (returns sum over it) and ``eval_steps`` the environment steps per
    task and gradient step of the official test scripts. ``published``: whose figure ``value`` is
    where it is not MAML's after ``step`` steps (Lake et al.'s people), and ``others`` all the
    figures published beside it; our figure is still read after ``step`` steps.
    """

    key: str
    title: str
    metric: str
    higher_is_better: bool
    step: int
    value: float
    ci: float | None = None
    maml_pp: float | None = None
    shape_only: bool = False
    tasks: int = 600
    horizon: int | None = None
    eval_steps: int | None = None
    published: str = ""
    others: tuple[tuple[str, float], ...] = ()
    variant: bool = False
    rows: tuple[tuple[str, dict[int, float]], ...] = ()


def _fewshot_headline(key: str, title: str, dataset: str, n_way: int, k_shot: int,
                      network: str = "conv", first_order: bool = False) -> Headline:
    """A row of Table 1 or of the MiniImagenet results: MAML's, or first-order MAML's (a run
    with ``first_order`` is judged by the figure of its own algorithm where one is published)."""
    step, rows = fewshot_paper(dataset, n_way, k_shot, network)
    label, intervals = (("paper: first-order MAML", FIRST_ORDER_CI) if first_order else
                        (rows[0][0], _fewshot_tables(network)[1]))
    return Headline(key, title, "accuracy (%)", True, step, dict(rows)[label],
                    intervals[(dataset, n_way, k_shot)], dict(rows).get("paper: MAML++"),
                    variant=network == "mlp" or first_order, rows=tuple(at_step(step, rows)))


HEADLINES: list[Headline] = [
    Headline("sinusoid", "Sinusoid regression, 5-shot", "MSE", False, 10,
             SINUSOID[5][0][1][10], rows=tuple((f"{label} (K=5)", values)  # beside fastmaml's
                                               for label, values in SINUSOID[5])),  # K=5..20
    _fewshot_headline("omniglot-5w1s", "Omniglot 5-way 1-shot", "omniglot", 5, 1),
    _fewshot_headline("omniglot-5w5s", "Omniglot 5-way 5-shot", "omniglot", 5, 5),
    _fewshot_headline("omniglot-5w1s-mlp", "Omniglot 5-way 1-shot, MLP", "omniglot", 5, 1, "mlp"),
    _fewshot_headline("omniglot-5w5s-mlp", "Omniglot 5-way 5-shot, MLP", "omniglot", 5, 5, "mlp"),
    _fewshot_headline("omniglot-20w1s", "Omniglot 20-way 1-shot", "omniglot", 20, 1),
    _fewshot_headline("omniglot-20w5s", "Omniglot 20-way 5-shot", "omniglot", 20, 5),
    _fewshot_headline("miniimagenet-5w1s", "MiniImagenet 5-way 1-shot", "miniimagenet", 5, 1),
    _fewshot_headline("miniimagenet-5w5s", "MiniImagenet 5-way 5-shot", "miniimagenet", 5, 5),
    _fewshot_headline("miniimagenet-5w1s-fo", "MiniImagenet 5-way 1-shot, first-order MAML",
                      "miniimagenet", 5, 1, first_order=True),
    _fewshot_headline("miniimagenet-5w5s-fo", "MiniImagenet 5-way 5-shot, first-order MAML",
                      "miniimagenet", 5, 5, first_order=True),
    Headline("omniglot-20w1s-lake", "Omniglot 20-way 1-shot within an alphabet (Lake et al.)",
             "accuracy (%)", True, 5, dict(LAKE[(20, 1)])["Lake et al.: people, within alphabet"],
             published="people, Lake et al.", others=tuple(LAKE[(20, 1)])),
    Headline("rl-nav2d", "2D navigation", "return", True, 1, RL[NAV]["maml"][1], tasks=40,
             horizon=100, eval_steps=4000, rows=tuple(rl_paper(NAV))),
    *(Headline(f"rl-{name}", title, "return", True, 1, RL[env]["maml"][1], shape_only=True,
               tasks=40, horizon=200, eval_steps=8000 if name == "ant-dir" else 4000,
               rows=tuple(rl_paper(env)))
      for name, title, env in zip(("cheetah-vel", "cheetah-dir", "ant-vel", "ant-dir"),
                                  ("Half-cheetah goal velocity", "Half-cheetah goal direction",
                                   "Ant goal velocity", "Ant goal direction"), LOCOMOTION)),
]
