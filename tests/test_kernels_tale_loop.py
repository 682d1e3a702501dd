"""TALE composition loop (kernels/tale_loop.py), pure torch: the denoisers are functions. The toy denoiser is the
exact posterior mean for N(0, 1) data, x / (1 + sigma^2), so every step is known in closed form."""
from __future__ import annotations

import pytest
import torch

import host

K = host.pack_module("kernels.tale")
L = host.pack_module("kernels.tale_loop")

SIGMAS = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.0])     # 5 steps
N = len(SIGMAS) - 1


def _latents(seed=0):
    g = torch.Generator().manual_seed(seed)
    bg = torch.randn(1, 4, 6, 8, generator=g)
    fg = torch.randn(1, 4, 6, 8, generator=g)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[1:5, 2:6] = True
    return bg, fg, mask


def _denoisers(calls=None):
    def den_cfg(x, i):
        if calls is not None:
            calls.append(("cfg", i))
        return x / (1 + SIGMAS[i] ** 2)

    def den_inv(x, sigma):
        if calls is not None:
            calls.append(("inv", float(sigma)))
        return x / (1 + sigma.reshape(-1, *[1] * (x.dim() - 1)) ** 2)

    return den_cfg, den_inv


def _compose(params, energy=None, trace=True, tick=None, calls=None):
    bg, fg, mask = _latents()
    den_cfg, den_inv = _denoisers(calls)
    report = L.TALEReport()
    x = L.compose(params, bg, fg, mask, SIGMAS, den_cfg, den_inv, energy=energy, report=report, trace=trace,
                  tick=tick)
    return x, report


def test_paste_at_t_prime_then_plain_solver_steps_bit_for_bit():
    params = K.TALEParams(steps=N, t_prime=2, tau=0)
    x, report = _compose(params)
    bg, fg, mask = _latents()
    # the inversion's states at T' (pasted), then DPM-Solver++ 2M from T' with no history
    states = L.invert_to(_denoisers()[1], torch.cat([bg, fg]), SIGMAS, 2)
    expected = K.paste(states[2][:1], states[2][1:], mask)
    old = None
    for i in range(2, N):
        den = expected / (1 + SIGMAS[i] ** 2)
        expected = K.dpmpp_2m_step(expected, den, old, SIGMAS[i - 1], SIGMAS[i], SIGMAS[i + 1])
        old = den
    assert torch.equal(x, expected)
    # nothing of the composite before T': one composite pass per step from T'; the inversion stops at T'
    assert report.passes == {"cfg": N - 2, "inversion": 2 * (N - 2), "grad": 0}


def test_window_keeps_the_background_outside_and_normalises_inside():
    params = K.TALEParams(steps=N, t_prime=1, tau=2)
    _, report = _compose(params)
    _, _, mask = _latents()
    assert sorted(report.composites) == [2, 3]
    for i in (2, 3):
        assert torch.equal(report.composites[i][..., ~mask], report.background[i][..., ~mask])
        assert not torch.equal(report.composites[i][..., mask], report.background[i][..., mask])
        assert torch.equal(report.optimised[i], report.composites[i])      # energy none: no gradient step


def test_energy_steps_move_only_the_object_and_lower_the_energy():
    target = torch.full((1, 4, 6, 8), 0.5)

    def energy(den):
        total = ((den - target) ** 2).sum()
        return K.EnergyTerms(total, 0.0, float(total.detach()))

    params = K.TALEParams(steps=N, t_prime=1, tau=1, inner_steps=3, energy="latent", latent_weight=1.0)
    ticks = []
    x, report = _compose(params, energy=energy, tick=lambda: ticks.append(1))
    _, _, mask = _latents()
    e = report.energies[2]
    assert len(e) == 3 and all(b < a for a, b in zip(e, e[1:])), e
    assert torch.equal(report.optimised[2][..., ~mask], report.composites[2][..., ~mask])
    assert not torch.equal(report.optimised[2][..., mask], report.composites[2][..., mask])
    assert report.passes["grad"] == 3 and report.passes["cfg"] == (N - 1) + 3
    assert len(ticks) == L.total_ticks(params, N) and torch.isfinite(x).all()


def test_a_non_finite_gradient_is_named_and_an_energy_is_required():
    def bad(den):
        total = (den.sqrt() * float("nan")).sum()
        return K.EnergyTerms(total, 0.0, 0.0)

    params = K.TALEParams(steps=N, t_prime=1, tau=1, inner_steps=1, energy="latent")
    with pytest.raises(L.NonFiniteGradient, match="step 2"):
        _compose(params, energy=bad)
    with pytest.raises(ValueError, match="no energy"):
        _compose(params, energy=None)


@pytest.mark.parametrize("changes, inversion_rows, cfg_passes", [
    (dict(), 2 * (N - 1), N - 1),
    (dict(history="reblend"), 2 * (N - 1 + 1), N - 1 + 2),
    (dict(history="reference"), 2 * N, N - 1 + 1),
    (dict(trajectories="replay"), 2 * N + 2 * 3, N - 1),
])
def test_history_and_trajectory_options_count_their_passes(changes, inversion_rows, cfg_passes):
    params = K.TALEParams(steps=N, t_prime=1, tau=2, **changes)
    ticks = []
    x, report = _compose(params, trace=False, tick=lambda: ticks.append(1))
    assert report.passes["inversion"] == inversion_rows and report.passes["cfg"] == cfg_passes
    assert len(ticks) == L.total_ticks(params, N) and torch.isfinite(x).all()


def test_an_interrupt_from_the_tick_stops_the_loop_and_the_next_run_is_a_fresh_run():
    params = K.TALEParams(steps=N, t_prime=1, tau=2)
    fresh, _ = _compose(params)

    class Stop(Exception):
        pass

    count = {"n": 0}

    def tick():
        count["n"] += 1
        if count["n"] == 4:
            raise Stop()

    with pytest.raises(Stop):
        _compose(params, tick=tick)
    again, _ = _compose(params)
    assert torch.equal(again, fresh)
