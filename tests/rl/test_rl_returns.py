"""Linear baseline against the normal equations; GAE and returns against direct loops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmaml.errors import NonFiniteLossError
from fastmaml.rl import (Episodes, baseline_features, compute_advantages, discounted_returns,
                         fit_linear_baseline, gae, standardize)

TASKS, TRAJ, STEPS, OBS = 3, 5, 12, 2


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs = 4 * torch.randn(TASKS, TRAJ, STEPS, OBS, generator=g, dtype=torch.float64)
    obs[0, 0, 0, 0] = 25.0  # clipped to 10 in the features
    masks = torch.ones(TASKS, TRAJ, STEPS, dtype=torch.float64)
    masks[1, 2, 7:] = 0.0
    masks[2, 0, 1:] = 0.0
    rewards = torch.randn(TASKS, TRAJ, STEPS, generator=g, dtype=torch.float64) * masks
    return obs, rewards, masks


def _loop_discounted(x: np.ndarray, mask: np.ndarray, discount: float) -> np.ndarray:
    out, running = np.zeros_like(x), 0.0
    for t in reversed(range(len(x))):
        running = x[t] + discount * running if mask[t] else 0.0
        out[t] = running
    return out


def test_features() -> None:
    obs = torch.tensor([[[[-12.0, 3.0], [1.0, 0.5]], [[12.0, -3.0], [0.0, 0.0]]]])
    features = baseline_features(obs)
    assert features.shape == (1, 2, 2, 2 * 2 + 4)
    assert features[0, 0, 0].tolist() == [-10.0, 3.0, 100.0, 9.0, 0.0, 0.0, 0.0, 1.0]
    assert features[0, 1, 0, :4].tolist() == [10.0, -3.0, 100.0, 9.0]  # rllab's clip, both sides
    expected = torch.tensor([1.0, 0.5, 1.0, 0.25, 0.01, 1e-4, 1e-6, 1.0])
    assert torch.allclose(features[0, 0, 1], expected)


def test_baseline_fit_matches_normal_equations() -> None:
    obs, rewards, masks = _data()
    returns = discounted_returns(rewards, masks, 0.99)
    values = fit_linear_baseline(obs, returns, masks)
    for task in range(TASKS):
        valid = masks[task].reshape(-1).bool().numpy()
        features = baseline_features(obs[task]).reshape(-1, 2 * OBS + 4).numpy()[valid]
        target = returns[task].reshape(-1).numpy()[valid]
        coeffs = np.linalg.solve(features.T @ features + 1e-5 * np.eye(features.shape[1]),
                                 features.T @ target)
        expected = baseline_features(obs[task]).reshape(-1, 2 * OBS + 4).numpy() @ coeffs
        assert np.allclose(values[task].reshape(-1).numpy(), expected, atol=1e-8)


def test_baseline_ridge_grows_for_a_singular_task(monkeypatch: pytest.MonkeyPatch) -> None:
    obs, rewards, masks = _data()
    solve_ex = torch.linalg.solve_ex
    calls = []

    def fail_task_one_once(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, info = solve_ex(a, b)
        calls.append(a)
        if len(calls) == 1:
            info = info.clone()
            info[1] = 1  # as LAPACK reports an exactly singular matrix
        return x, info

    monkeypatch.setattr(torch.linalg, "solve_ex", fail_task_one_once)
    values = fit_linear_baseline(obs, rewards, masks)
    monkeypatch.undo()
    assert len(calls) == 2
    # the second solve used reg 1e-4 for task 1 and still 1e-5 for the others
    for task, reg in [(0, 1e-5), (1, 1e-4), (2, 1e-5)]:
        valid = masks[task].reshape(-1).bool().numpy()
        all_features = baseline_features(obs[task]).reshape(-1, 2 * OBS + 4).numpy()
        features = all_features[valid]
        coeffs = np.linalg.solve(features.T @ features + reg * np.eye(features.shape[1]),
                                 features.T @ rewards[task].reshape(-1).numpy()[valid])
        assert np.allclose(values[task].reshape(-1).numpy(), all_features @ coeffs, atol=1e-8)


def test_baseline_raises_on_non_finite_data() -> None:
    obs, rewards, masks = _data()
    obs[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="baseline"):
        fit_linear_baseline(obs, rewards, masks)


@pytest.mark.parametrize("lam", [1.0, 0.95])
def test_gae_and_returns_match_loops(lam: float) -> None:
    _, rewards, masks = _data()
    g = torch.Generator().manual_seed(5)
    values = torch.randn(TASKS, TRAJ, STEPS, generator=g, dtype=torch.float64)
    advantages = gae(rewards, values, masks, 0.99, lam)
    returns = discounted_returns(rewards, masks, 0.99)
    for task in range(TASKS):
        for traj in range(TRAJ):
            r, v = rewards[task, traj].numpy(), values[task, traj].numpy()
            m = masks[task, traj].numpy()
            length = int(m.sum())
            deltas = np.zeros(STEPS)
            for t in range(length):
                next_value = v[t + 1] if t + 1 < length else 0.0
                deltas[t] = r[t] + 0.99 * next_value - v[t]
            expected = np.zeros(STEPS)
            for t in range(length):
                expected[t] = sum((0.99 * lam) ** (k - t) * deltas[k] for k in range(t, length))
            assert np.allclose(advantages[task, traj].numpy(), expected, atol=1e-12)
            assert np.allclose(returns[task, traj].numpy(), _loop_discounted(r, m, 0.99))
    if lam == 1.0:
        assert torch.allclose(advantages, (returns - values) * masks)


def test_standardize_per_task_and_compute_advantages() -> None:
    obs, rewards, masks = _data()
    raw = 3 * torch.randn(TASKS, TRAJ, STEPS, dtype=torch.float64)
    raw += torch.arange(TASKS).view(-1, 1, 1)
    out = standardize(raw, masks)
    for task in range(TASKS):
        valid = out[task][masks[task].bool()]
        assert abs(valid.mean().item()) < 1e-10
        assert valid.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(out[masks == 0] == 0)
    episodes = Episodes(obs.float(), torch.zeros(TASKS, TRAJ, STEPS, 1), rewards.float(),
                        masks.float())
    advantages = compute_advantages(episodes)
    assert advantages.dtype == torch.float32 and advantages.shape == rewards.shape
    returns = discounted_returns(rewards, masks, 0.99)
    expected = standardize(returns - fit_linear_baseline(obs, returns, masks), masks)
    assert torch.allclose(advantages.double(), expected * masks, atol=1e-4)


@pytest.mark.parametrize("gamma, lam", [(0.9, 1.0), (0.99, 0.5)])
def test_compute_advantages_takes_gamma_and_lambda(gamma: float, lam: float) -> None:
    """A run's gamma and gae_lambda reach the baseline's returns and GAE (every other test
    runs the defaults, 0.99 and 1.0)."""
    obs, rewards, masks = _data()
    episodes = Episodes(obs, torch.zeros(TASKS, TRAJ, STEPS, 1, dtype=torch.float64), rewards,
                        masks)
    returns = discounted_returns(rewards, masks, gamma)
    values = fit_linear_baseline(obs, returns, masks)
    expected = standardize(gae(rewards, values, masks, gamma, lam), masks)
    assert torch.allclose(compute_advantages(episodes, gamma, lam), expected, atol=1e-12)
