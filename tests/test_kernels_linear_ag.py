"""LinearAG kernel: pure torch, no ComfyUI."""
from __future__ import annotations

import pytest
import torch

import host

la = host.pack_module("kernels.linear_ag")
ag = host.pack_module("kernels.adaptive_guidance")


def test_schedule_of_the_paper():
    p = la.LinearAGParams(estimate_until=0.5)
    modes = [la.step_mode(p, s, 10) for s in range(10)]
    assert modes == ["compute", "estimate", "compute", "estimate", "compute"] + ["cond_only"] * 5
    assert [la.step_mode(p.replace(after="adaptive"), s, 10) for s in range(5, 10)] == ["compute"] * 5
    assert all(la.step_mode(p.replace(estimator="off"), s, 10) == "compute" for s in range(10))


def test_params_validate():
    assert la.LinearAGParams().validate() == []
    bad = la.LinearAGParams(estimator="magic", estimate_until=2.0, history=0, after="x",
                            guidance=ag.AdaptiveGuidanceParams(threshold=3.0))
    assert len(bad.validate()) == 5


def _synthetic_trajectory(steps, batch, coef, generator):
    """eps_u(t) = a*eps_c(t) + b*eps_c(t-1) + c*eps_u(t-1) + d exactly, for t >= 1."""
    a, b, c, d = coef
    eps_c = [torch.randn(batch, 2, 3, 3, generator=generator) for _ in range(steps)]
    eps_u = [torch.randn(batch, 2, 3, 3, generator=generator)]
    for t in range(1, steps):
        eps_u.append(a * eps_c[t] + b * eps_c[t - 1] + c * eps_u[t - 1] + d)
    return eps_c, eps_u


def test_fit_recovers_an_exact_affine_relation_per_step():
    g = torch.Generator().manual_seed(0)
    coef = (0.9, -0.2, 0.3, 0.05)
    stats = la.TrajectoryStats(history=1, steps=6)
    for _ in range(3):
        eps_c, eps_u = _synthetic_trajectory(6, 2, coef, g)
        past = []
        for t in range(6):
            stats.add_step(t, eps_c[t], eps_u[t], past)
            past = [(eps_c[t], eps_u[t])]
        stats.trajectories += 2
    coefficients, fitted = stats.fit(ridge=0.0)
    assert fitted.tolist() == [False] + [True] * 5
    for t in range(1, 6):
        torch.testing.assert_close(coefficients[t], torch.tensor(coef), atol=1e-4, rtol=1e-4)


def test_fitted_estimator_reproduces_the_relation_in_denoised_space():
    g = torch.Generator().manual_seed(1)
    coef = (0.8, 0.1, 0.2, 0.0)
    steps = 4
    coefficients = torch.tensor([coef] * steps)
    est = la.UncondEstimator(la.LinearAGParams(estimator="fitted", history=1), coefficients,
                             torch.ones(steps, dtype=torch.bool))
    eps_c, eps_u = _synthetic_trajectory(steps, 1, coef, g)
    sigmas = [4.0, 2.0, 1.0, 0.5]
    x = [torch.randn(1, 2, 3, 3, generator=g) for _ in range(steps)]
    den = lambda t, e: la.from_score(x[t], e, sigmas[t])  # noqa: E731
    est.record(x[0], den(0, eps_c[0]), den(0, eps_u[0]), sigmas[0], computed=True)
    assert est.can_estimate(1, 1)
    estimate = est.estimate(x[1], den(1, eps_c[1]), 1, sigmas[1])
    torch.testing.assert_close(estimate, den(1, eps_u[1]), atol=1e-4, rtol=1e-4)


def test_k_is_limited_by_the_step_and_padded_in_the_fit():
    g = torch.Generator().manual_seed(2)
    stats = la.TrajectoryStats(history=2, steps=4)
    past = []
    for t in range(4):
        c, u = torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g)
        stats.add_step(t, c, u, past)
        past = [(c, u)] + past[:1]
    coefficients, fitted = stats.fit(ridge=1e-3)
    assert coefficients.shape == (4, 6) and fitted.tolist() == [False, True, True, True]
    assert torch.all(coefficients[1, 4:] == 0)  # step 1 used k = 1: 4 coefficients, zero-padded


def test_online_estimators_work_in_score_space():
    x = torch.zeros(1, 3)
    est = la.UncondEstimator(la.LinearAGParams(estimator="hold_delta"))
    c1, u1 = torch.tensor([[1.0, 2, 3]]), torch.tensor([[0.5, 1, 1]])
    assert not est.can_estimate(1, 1)  # nothing computed yet
    est.record(x, c1, u1, 2.0, computed=True)
    c2 = torch.tensor([[2.0, 2, 2]])
    # score-space delta (x - D)/sigma is held: the denoised delta scales with sigma (2 -> 0.5)
    torch.testing.assert_close(est.estimate(x, c2, 1, 0.5), c2 - (c1 - u1) * 0.25)
    ext = la.UncondEstimator(la.LinearAGParams(estimator="extrapolate_delta"))
    ext.record(x, c1, u1, 1.0, computed=True)
    ext.record(x, c1, c1 - 2 * (c1 - u1), 1.0, computed=True)  # delta doubled
    torch.testing.assert_close(ext.estimate(x, c2, 2, 1.0), c2 - 3 * (c1 - u1))
    est.record(x, c2, c2, 0.5, computed=False)  # estimated steps do not feed the delta
    torch.testing.assert_close(est.estimate(x, c2, 3, 0.5), c2 - (c1 - u1) * 0.25)
    prev = la.UncondEstimator(la.LinearAGParams(estimator="previous_uncond"))
    prev.record(x, c1, u1, 1.0, computed=True)
    assert torch.equal(prev.estimate(x, c2, 1, 0.5), u1)
    assert not la.UncondEstimator(la.LinearAGParams(estimator="off")).can_estimate(1, 1)


def test_fitted_estimator_needs_fitted_steps():
    est = la.UncondEstimator(la.LinearAGParams(estimator="fitted", history=1), torch.zeros(3, 4),
                             torch.tensor([False, False, True]))
    est.record(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 1.0, computed=True)
    assert not est.can_estimate(1, 1) and est.can_estimate(2, 1)
    assert not est.can_estimate(2, 3)  # another batch size than the recorded history
    with pytest.raises(ValueError):
        la.features(torch.zeros(2), [], 1)
